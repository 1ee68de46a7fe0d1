"""Tests for jpe.encodings.positions against loop references and sampling statistics."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings import positions as pos

# ---------------------------------------------------------------- references (plain loops)


def ref_from_segments(segment_ids):
    segment_ids = np.asarray(segment_ids)
    out = np.zeros(segment_ids.shape, np.int64)
    for row in np.ndindex(segment_ids.shape[:-1]):
        for t in range(segment_ids.shape[-1]):
            same = t > 0 and segment_ids[row + (t,)] == segment_ids[row + (t - 1,)]
            out[row + (t,)] = out[row + (t - 1,)] + 1 if same else 0
    return out


def ref_from_mask(mask):
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, np.int64)
    for row in np.ndindex(mask.shape[:-1]):
        seen = 0
        for t in range(mask.shape[-1]):
            if mask[row + (t,)]:
                out[row + (t,)] = seen
                seen += 1
    return out


# Hypothesis draws many shapes: compile once per shape rather than op by op per example.
_from_segments = jax.jit(pos.positions_from_segments)
_from_mask = jax.jit(pos.positions_from_mask)
_randomized = jax.jit(pos.randomized_positions, static_argnums=(1, 2))

# ---------------------------------------------------------------- positions_from_segments


def test_from_segments_example():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 4, 4]], jnp.int8)
    got = pos.positions_from_segments(segment_ids)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])


@given(
    rows=st.integers(1, 3),
    length=st.integers(1, 24),
    data=st.data(),
)
def test_from_segments_restarts_at_every_boundary(rows, length, data):
    # Few distinct ids so that equal neighbours (one segment) and changes are both common;
    # a reused id after a different one still starts a new segment.
    ids = data.draw(st.lists(st.integers(0, 2), min_size=rows * length, max_size=rows * length))
    segment_ids = np.array(ids).reshape(rows, length)
    got = np.asarray(_from_segments(jnp.asarray(segment_ids)))
    np.testing.assert_array_equal(got, ref_from_segments(segment_ids))
    boundary = np.ones(segment_ids.shape, bool)
    boundary[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    np.testing.assert_array_equal(got == 0, boundary)
    np.testing.assert_array_equal(got[:, 1:][~boundary[:, 1:]], got[:, :-1][~boundary[:, 1:]] + 1)


# ---------------------------------------------------------------- offset_positions


def test_offset_positions():
    np.testing.assert_array_equal(pos.offset_positions(4), [0, 1, 2, 3])
    np.testing.assert_array_equal(pos.offset_positions(3, 7), [7, 8, 9])
    got = pos.offset_positions(3, jnp.array([[0, -2], [5, 100]], jnp.int16))
    assert got.dtype == jnp.int32
    chex.assert_shape(got, (2, 2, 3))
    want = np.array([[0, -2], [5, 100]])[..., None] + np.arange(3)
    np.testing.assert_array_equal(got, want)
    chex.assert_shape(pos.offset_positions(0, jnp.array([1, 2])), (2, 0))


# ---------------------------------------------------------------- positions_from_mask


def test_from_mask_left_and_right_padding():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1]])
    got = pos.positions_from_mask(mask)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0], [0, 0, 1, 0, 2]])
    # Left-padded real tokens get the positions they would have unpadded.
    np.testing.assert_array_equal(got[0, 2:], pos.offset_positions(3))


@given(rows=st.integers(1, 3), length=st.integers(1, 24), data=st.data())
def test_from_mask_matches_loop(rows, length, data):
    bits = data.draw(st.lists(st.booleans(), min_size=rows * length, max_size=rows * length))
    mask = np.array(bits).reshape(rows, length)
    np.testing.assert_array_equal(_from_mask(jnp.asarray(mask)), ref_from_mask(mask))


# ---------------------------------------------------------------- randomized_positions


@given(
    length=st.sampled_from([1, 2, 7, 40]),
    extra=st.sampled_from([0, 1, 13, 500]),
    seed=st.integers(0, 2**31 - 1),
)
def test_randomized_sorted_distinct_in_range(length, extra, seed):
    # Few shapes (each one compiles), many keys.
    batch, max_position = 3, length + extra
    key = jax.random.key(seed)
    got = np.asarray(_randomized(key, (batch, length), max_position))
    assert got.shape == (batch, length) and got.dtype == np.int32
    assert np.all(np.diff(got, axis=-1) > 0)  # strictly increasing, hence distinct
    assert got.min() >= 0 and got.max() < max_position
    np.testing.assert_array_equal(got, _randomized(key, (batch, length), max_position))
    if extra == 0:  # all of [0, L) must be taken
        np.testing.assert_array_equal(got, np.broadcast_to(np.arange(length), got.shape))


def test_randomized_different_keys_differ():
    # Two equal 16-subsets of [0, 1000) have probability 1 / C(1000, 16) < 1e-34.
    a = pos.randomized_positions(jax.random.key(0), (16,), 1000)
    b = pos.randomized_positions(jax.random.key(1), (16,), 1000)
    assert not np.array_equal(a, b)
    rows = np.asarray(pos.randomized_positions(jax.random.key(0), (4, 16), 1000))
    assert len({tuple(r) for r in rows}) == 4


def test_randomized_is_uniform_over_subsets():
    # A uniform L-subset of {0..M-1}: the j-th smallest (1-based) has mean j(M+1)/(L+1) - 1 and
    # variance j(L-j+1)(M+1)(M-L) / ((L+1)^2 (L+2)); each value is in a row with prob. L/M.
    rows, length, max_position = 4000, 10, 50
    got = np.asarray(pos.randomized_positions(jax.random.key(3), (rows, length), max_position))
    j = np.arange(1, length + 1)
    mean = j * (max_position + 1) / (length + 1) - 1
    var = j * (length - j + 1) * (max_position + 1) * (max_position - length)
    var = var / ((length + 1) ** 2 * (length + 2))
    z = (got.mean(axis=0) - mean) / np.sqrt(var / rows)
    assert np.all(np.abs(z) < 5), z
    # Coverage: every value appears (a miss has probability 50 * 0.8**4000), at about rate L/M.
    counts = np.bincount(got.ravel(), minlength=max_position)
    expected = rows * length / max_position
    assert counts.min() > 0
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected)), counts


def test_randomized_vmap_over_keys():
    keys = jax.random.split(jax.random.key(4), 3)
    mapped = jax.vmap(lambda k: pos.randomized_positions(k, (2, 5), 64))(keys)
    chex.assert_shape(mapped, (3, 2, 5))
    for i in range(3):
        np.testing.assert_array_equal(mapped[i], pos.randomized_positions(keys[i], (2, 5), 64))


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: pos.positions_from_segments(jnp.array([0.0, 1.0])), "segment_ids"),
        (lambda: pos.positions_from_segments(jnp.array(3)), "segment_ids"),
        (lambda: pos.offset_positions(-1), "length"),
        (lambda: pos.offset_positions(2.0), "length"),
        (lambda: pos.offset_positions(3, 1.5), "offset"),
        (lambda: pos.offset_positions(3, jnp.array([0.0])), "offset"),
        # int64 / uint32 values beyond int32 used to wrap silently in jnp.asarray
        (lambda: pos.offset_positions(3, np.array([2**31 + 5], np.int64)), "offset.*int32"),
        (lambda: pos.offset_positions(3, 2**40), "offset.*int32"),
        (lambda: pos.positions_from_segments(np.array([2**32, 1], np.uint64)), "int32"),
        (lambda: pos.positions_from_mask(jnp.array([1.0, 0.0])), "mask"),
        (lambda: pos.positions_from_mask(jnp.array(True)), "mask"),
        (lambda: pos.randomized_positions(jax.random.key(0), (2, 11), 10), "max_position"),
        (lambda: pos.randomized_positions(jax.random.key(0), (0,), 0), "max_position"),
        (lambda: pos.randomized_positions(jax.random.key(0), (4,), 2**31), "max_position"),
        (lambda: pos.randomized_positions(jax.random.key(0), 4, 10), "shape"),
        (lambda: pos.randomized_positions(jax.random.key(0), (), 10), "shape"),
        (lambda: pos.randomized_positions(jax.random.key(0), (2, -1), 10), "shape"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- jit and vmap


class PositionsVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_from_segments(self):
        segment_ids = np.array([[[5, 5, 6, 6, 6]], [[1, 2, 3, 3, 1]]])  # two batch axes
        got = self.variant(pos.positions_from_segments)(jnp.asarray(segment_ids))
        np.testing.assert_array_equal(got, ref_from_segments(segment_ids))

    @chex.variants(with_jit=True, without_jit=True)
    def test_offset_positions(self):
        got = self.variant(functools.partial(pos.offset_positions, 4))(jnp.array([3, -1]))
        np.testing.assert_array_equal(got, [[3, 4, 5, 6], [-1, 0, 1, 2]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_from_mask(self):
        mask = np.array([[False, True, True], [True, True, False]])
        got = self.variant(pos.positions_from_mask)(jnp.asarray(mask))
        np.testing.assert_array_equal(got, ref_from_mask(mask))

    @chex.variants(with_jit=True, without_jit=True)
    def test_randomized(self):
        key = jax.random.key(7)
        got = self.variant(lambda k: pos.randomized_positions(k, (3, 6), 100))(key)
        np.testing.assert_array_equal(got, pos.randomized_positions(key, (3, 6), 100))
        assert np.all(np.diff(np.asarray(got), axis=-1) > 0)


def test_vmap_over_leading_axis():
    segment_ids = jnp.array([[1, 1, 2, 2], [0, 1, 1, 1]])
    mask = segment_ids > 0
    offsets = jnp.array([2, -3])
    for fn, arg in [
        (pos.positions_from_segments, segment_ids),
        (pos.positions_from_mask, mask),
        (functools.partial(pos.offset_positions, 4), offsets),
    ]:
        np.testing.assert_array_equal(jax.vmap(fn)(arg), fn(arg))
