"""Tests for `jpe.encodings.relative`.

Every golden value comes from a NumPy float64 reference written here from the papers (and, for
T5 buckets and ALiBi slopes, from the authors' reference code), never from the module itself.
float32 results are compared with explicit tolerances.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings import relative as rel

# float32 against float64 for biases that are a few arithmetic operations on exact integers.
TOL = {"rtol": 1e-5, "atol": 1e-5}
# Biases built from sinusoids of the positions: the float32 angle w*t is off by up to ulp(w*t)
# (~4e-6 at t ~ 30), summed over up to dim = 128 terms of size ~1 (measured error: 6e-6).
TRIG_TOL = {"rtol": 1e-5, "atol": 5e-5}

# A small block with Lq != Lk, unsorted and repeated positions, and a batch of two rows.
Q_POS = np.array([[3, 7, 8], [0, 1, 20]], np.int32)  # [B=2, Lq=3]
K_POS = np.array([[0, 2, 5, 8, 12], [0, 1, 2, 3, 30]], np.int32)  # [B=2, Lk=5]
HEADS = 6  # not a power of two
DEPTH = 4


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- references


def press_get_slopes(n):
    """Press et al.'s `get_slopes` (fairseq `transformer.py`), transcribed."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + press_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def pairwise(fn, q_pos, k_pos, heads):
    """Dense [..., H, Lq, Lk] float64 tensor of fn(h, q, k) by explicit loops."""
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    batch = np.broadcast_shapes(q_pos.shape[:-1], k_pos.shape[:-1])
    q_pos = np.broadcast_to(q_pos, batch + q_pos.shape[-1:])
    k_pos = np.broadcast_to(k_pos, batch + k_pos.shape[-1:])
    out = np.zeros(batch + (heads, q_pos.shape[-1], k_pos.shape[-1]))
    for b in np.ndindex(*batch):
        for h in range(heads):
            for i, qi in enumerate(q_pos[b]):
                for j, kj in enumerate(k_pos[b]):
                    out[b + (h, i, j)] = fn(h, int(qi), int(kj))
    return out


def t5_bucket_ref(relative_position, bidirectional, num_buckets, max_distance):
    """Mesh TensorFlow's `_relative_position_bucket` for one int, float32 log as in TF."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = (
        np.log(np.float32(n) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    return ret + min(max_exact + int(val), num_buckets - 1)


def sandwich_ref(q_pos, k_pos, heads, dim, base=10000.0):
    def bias(h, m, n):
        total = sum(math.cos((m - n) / base ** (2 * k / dim)) for k in range(1, dim // 2 + 1))
        return (total - dim / 2) / ((h + 1) * 8 / heads)

    return pairwise(bias, q_pos, k_pos, heads)


def fire_ref(q_pos, k_pos, params, causal):
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    c, threshold = abs(float(p["c"])), abs(float(p["L"]))
    w1, b1, w2, b2 = p["w1"].reshape(-1), p["b1"], p["w2"], p["b2"]

    def bias(h, i, j):
        distance = max(i - j, 0) if causal else abs(i - j)
        x = math.log(c * distance + 1) / (math.log(c * max(threshold, i) + 1) + 1e-6)
        hidden = np.maximum(x * w1 + b1, 0.0)
        return float(hidden @ w2[:, h] + b2[h])

    return pairwise(bias, q_pos, k_pos, w2.shape[1])


def shaw_logits_ref(q, table, q_pos, k_pos, max_distance):
    """q [B, Lq, H, D] -> [B, H, Lq, Lk] by explicit loops."""
    q, table = np.asarray(q, np.float64), np.asarray(table, np.float64)
    batch, lq, heads, _ = q.shape
    out = np.zeros((batch, heads, lq, k_pos.shape[-1]))
    for b, h, i, j in np.ndindex(*out.shape):
        r = min(max(int(k_pos[b, j]) - int(q_pos[b, i]), -max_distance), max_distance)
        out[b, h, i, j] = q[b, i, h] @ table[r + max_distance]
    return out


def shaw_values_ref(weights, table, q_pos, k_pos, max_distance):
    """weights [B, H, Lq, Lk] -> [B, Lq, H, D] by explicit loops."""
    weights, table = np.asarray(weights, np.float64), np.asarray(table, np.float64)
    batch, heads, lq, lk = weights.shape
    out = np.zeros((batch, lq, heads, table.shape[1]))
    for b, h, i, j in np.ndindex(batch, heads, lq, lk):
        r = min(max(int(k_pos[b, j]) - int(q_pos[b, i]), -max_distance), max_distance)
        out[b, i, h] += weights[b, h, i, j] * table[r + max_distance]
    return out


def transformer_xl_ref(q, q_pos, k_pos, w_r, v, base=10000.0):
    """Dense (b) + (d): R for every pair, projected, dotted with q + v. q [B, Lq, H, D]."""
    q, w_r, v = (np.asarray(x, np.float64) for x in (q, w_r, v))
    d = w_r.shape[0]
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)
    t = (np.asarray(q_pos)[:, :, None] - np.asarray(k_pos)[:, None, :]).astype(np.float64)
    angle = t[..., None] * inv_freq  # [B, Lq, Lk, d/2]
    r = np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)  # [B, Lq, Lk, d]
    projected = np.einsum("bijf,fhe->bijhe", r, w_r)
    return np.einsum("bihe,bijhe->bhij", q + v, projected)


def make_fire_params(heads=HEADS, hidden=8, c=0.3, threshold=4.0, seed=0):
    rng = _rng(seed)
    return {
        "c": np.float32(c),
        "L": np.float32(threshold),
        "w1": rng.normal(size=(1, hidden)).astype(np.float32),
        "b1": rng.normal(size=(hidden,)).astype(np.float32),
        "w2": rng.normal(size=(hidden, heads)).astype(np.float32),
        "b2": rng.normal(size=(heads,)).astype(np.float32),
    }


# ----------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("num_heads", range(1, 129))
def test_alibi_slopes_match_press_get_slopes(num_heads):
    slopes = rel.alibi_slopes(num_heads)
    assert slopes.dtype == np.float64 and slopes.shape == (num_heads,)
    np.testing.assert_allclose(slopes, press_get_slopes(num_heads), rtol=1e-13, atol=0)
    assert np.all(slopes > 0)


@pytest.mark.parametrize(
    "num_heads, exponents",
    [
        (6, [2, 4, 6, 8, 1, 3]),
        (8, [1, 2, 3, 4, 5, 6, 7, 8]),
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
    ],
)
def test_alibi_slopes_literal_values(num_heads, exponents):
    np.testing.assert_allclose(
        rel.alibi_slopes(num_heads), 2.0 ** -np.array(exponents), rtol=1e-15, atol=0
    )


def test_alibi_bias_bidirectional_dense_reference():
    slopes = rel.alibi_slopes(HEADS)
    want = pairwise(lambda h, i, j: -slopes[h] * abs(i - j), Q_POS, K_POS, HEADS)
    got = rel.alibi_bias(Q_POS, K_POS, slopes)
    chex.assert_shape(got, (2, HEADS, 3, 5))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **TOL)


def test_alibi_bias_causal_matches_press_form_on_unmasked_entries():
    # The last Lq = 3 queries of a 7-token causal prefix; Press adds m * [-(i-1), ..., -1, 0].
    k_pos = np.arange(7)
    q_pos = np.arange(4, 7)
    slopes = rel.alibi_slopes(4)
    got = np.asarray(rel.alibi_bias(q_pos, k_pos, slopes))
    chex.assert_shape(got, (4, 3, 7))
    for h in range(4):
        for i, qi in enumerate(q_pos):
            row = slopes[h] * np.arange(-qi, 1)  # keys 0..qi
            np.testing.assert_allclose(got[h, i, : qi + 1], row, **TOL)


def test_alibi_bias_accepts_jax_slopes_and_broadcasts_batch():
    got = rel.alibi_bias(Q_POS[0], K_POS, jnp.asarray(rel.alibi_slopes(HEADS)))
    want = pairwise(
        lambda h, i, j: -rel.alibi_slopes(HEADS)[h] * abs(i - j), Q_POS[0], K_POS, HEADS
    )
    np.testing.assert_allclose(got, want, **TOL)


@given(
    q=st.lists(st.integers(0, 1000), min_size=3, max_size=3),
    k=st.lists(st.integers(0, 1000), min_size=4, max_size=4),
    shift=st.integers(-(10**5), 10**5),
    slopes=st.lists(st.floats(1e-3, 10.0), min_size=3, max_size=3),
)
def test_alibi_bias_is_translation_invariant(q, k, shift, slopes):
    q, k = np.array(q), np.array(k)
    base = rel.alibi_bias(q, k, np.array(slopes))
    shifted = rel.alibi_bias(q + shift, k + shift, np.array(slopes))
    np.testing.assert_array_equal(base, shifted)


@given(slopes=st.lists(st.floats(1e-3, 10.0), min_size=3, max_size=3))
def test_alibi_bias_is_non_increasing_in_distance(slopes):
    distances = np.arange(0, 300)
    bias = np.asarray(rel.alibi_bias(np.array([0]), distances, np.array(slopes)))[:, 0, :]
    mirrored = np.asarray(rel.alibi_bias(np.array([0]), -distances, np.array(slopes)))[:, 0, :]
    np.testing.assert_array_equal(bias, mirrored)
    assert np.all(np.diff(bias, axis=-1) <= 0)


# ----------------------------------------------------------------------------- T5

T5_CONFIGS = [(32, 128), (8, 20), (16, 64), (64, 1000), (4, 5)]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", T5_CONFIGS)
def test_t5_relative_bucket_matches_loop_reference(bidirectional, num_buckets, max_distance):
    if bidirectional and num_buckets < 4:
        pytest.skip("needs two buckets per direction")
    positions = np.concatenate(
        [
            np.arange(-3 * max_distance, 3 * max_distance + 1),
            [-(10**6), -(2**30), 10**6, 2**30],
        ]
    ).astype(np.int32)
    got = rel.t5_relative_bucket(
        positions, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    want = [t5_bucket_ref(int(r), bidirectional, num_buckets, max_distance) for r in positions]
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "bidirectional, relative_position, bucket",
    [
        # Hand-computed from the T5 formula for 32 buckets, max_distance 128.
        (True, 0, 0),
        (True, -1, 1),
        (True, 1, 17),
        (True, -7, 7),
        (True, -8, 8),
        (True, -16, 10),
        (True, 16, 26),
        (True, -127, 15),
        (True, -(10**5), 15),
        (True, 10**5, 31),
        (False, 5, 0),
        (False, -15, 15),
        (False, -16, 16),
        (False, -(10**5), 31),
    ],
)
def test_t5_relative_bucket_literal_values(bidirectional, relative_position, bucket):
    got = rel.t5_relative_bucket(np.array(relative_position), bidirectional=bidirectional)
    assert int(got) == bucket


@functools.cache
def _jitted_bucket(num_buckets, max_distance, bidirectional):
    return jax.jit(
        functools.partial(
            rel.t5_relative_bucket,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
    )


@given(
    config=st.sampled_from([(b, m, d) for b, m in T5_CONFIGS for d in (True, False)]),
    start=st.integers(0, 10**6),
)
def test_t5_relative_bucket_is_monotone_within_each_direction(config, start):
    num_buckets, max_distance, bidirectional = config
    bucket = _jitted_bucket(num_buckets, max_distance, bidirectional)
    # Every distance up to 1100 (past each config's max_distance) and 50 from `start` on.
    n = np.sort(np.concatenate([np.arange(0, 1100), start + np.arange(0, 50)])).astype(np.int32)
    past = np.asarray(bucket(-n))  # keys before the query
    assert np.all(np.diff(past) >= 0)
    assert (
        past.min() == 0 and past.max() == (num_buckets // 2 if bidirectional else num_buckets) - 1
    )
    future = np.asarray(bucket(np.maximum(n, 1)))  # keys after the query
    if bidirectional:
        assert np.all(np.diff(future) >= 0)
        assert future.min() == num_buckets // 2 + 1 and future.max() == num_buckets - 1
    else:
        assert np.all(future == 0)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_gathers_table_rows(bidirectional):
    num_buckets, max_distance = 16, 10
    table = _rng().normal(size=(num_buckets, HEADS)).astype(np.float32)

    def bias(h, i, j):
        return table[t5_bucket_ref(j - i, bidirectional, num_buckets, max_distance), h]

    got = rel.t5_bias(Q_POS, K_POS, table, bidirectional=bidirectional, max_distance=max_distance)
    chex.assert_shape(got, (2, HEADS, 3, 5))
    np.testing.assert_array_equal(got, pairwise(bias, Q_POS, K_POS, HEADS).astype(np.float32))


# ----------------------------------------------------------------------------- KERPLE


def _kerple_params(seed=1):
    rng = _rng(seed)
    return rng.uniform(0.1, 2.0, HEADS).astype(np.float32), rng.uniform(0.1, 2.0, HEADS).astype(
        np.float32
    )


def test_kerple_log_dense_reference():
    r1, r2 = _kerple_params()
    want = pairwise(
        lambda h, i, j: -float(r1[h]) * math.log(1 + float(r2[h]) * abs(i - j)),
        Q_POS,
        K_POS,
        HEADS,
    )
    got = rel.kerple_bias(Q_POS, K_POS, r1, r2, kind="log")
    chex.assert_shape(got, (2, HEADS, 3, 5))
    np.testing.assert_allclose(got, want, **TOL)


def test_kerple_power_dense_reference():
    r1, r2 = _kerple_params()
    want = pairwise(lambda h, i, j: -float(r1[h]) * abs(i - j) ** float(r2[h]), Q_POS, K_POS, HEADS)
    got = rel.kerple_bias(Q_POS, K_POS, r1, r2, kind="power")
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_gradients_are_finite_at_distance_zero(kind):
    r1, r2 = _kerple_params()

    def total(r1, r2):
        return jnp.sum(rel.kerple_bias(Q_POS, K_POS, r1, r2, kind=kind))

    g1, g2 = jax.grad(total, argnums=(0, 1))(jnp.asarray(r1), jnp.asarray(r2))
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
    assert np.all(np.asarray(g1) < 0)  # every head sees some positive distance


@given(
    q=st.lists(st.integers(0, 1000), min_size=3, max_size=3),
    k=st.lists(st.integers(0, 1000), min_size=4, max_size=4),
    shift=st.integers(-(10**5), 10**5),
    kind=st.sampled_from(["log", "power"]),
)
def test_kerple_bias_is_translation_invariant(q, k, shift, kind):
    r1, r2 = _kerple_params()
    q, k = np.array(q), np.array(k)
    base = rel.kerple_bias(q, k, r1, r2, kind=kind)
    shifted = rel.kerple_bias(q + shift, k + shift, r1, r2, kind=kind)
    np.testing.assert_array_equal(base, shifted)


@given(
    r1=st.floats(0.01, 10.0),
    r2_log=st.floats(0.01, 10.0),
    r2_power=st.floats(0.01, 2.0),
    kind=st.sampled_from(["log", "power"]),
)
def test_kerple_bias_is_non_increasing_in_distance(r1, r2_log, r2_power, kind):
    r2 = r2_log if kind == "log" else r2_power
    distances = np.arange(0, 500)
    bias = rel.kerple_bias(np.array([0]), distances, np.array([r1]), np.array([r2]), kind=kind)
    bias = np.asarray(bias)[0, 0]
    assert bias[0] == 0
    assert np.all(np.diff(bias) <= 0)


# ----------------------------------------------------------------------------- Sandwich


@pytest.mark.parametrize("heads, dim", [(HEADS, 16), (8, 128)])
def test_sandwich_dense_reference(heads, dim):
    got = rel.sandwich_bias(Q_POS, K_POS, heads, dim=dim)
    chex.assert_shape(got, (2, heads, 3, 5))
    np.testing.assert_allclose(got, sandwich_ref(Q_POS, K_POS, heads, dim), **TRIG_TOL)


@functools.cache
def _jitted_sandwich(heads, dim):
    return jax.jit(functools.partial(rel.sandwich_bias, num_heads=heads, dim=dim))


@given(
    position=st.integers(-(10**5), 10**5),
    heads=st.sampled_from([1, 3, 8]),
    dim=st.sampled_from([2, 16, 128]),
)
def test_sandwich_is_zero_at_distance_zero_and_non_positive(position, heads, dim):
    q = np.array([position])
    k = position + np.arange(-20, 21)
    bias = np.asarray(_jitted_sandwich(heads, dim)(q, k))[:, 0, :]
    np.testing.assert_allclose(bias[:, 20], 0.0, atol=2e-5)
    assert np.all(bias <= 2e-5)


@given(shift=st.integers(-(10**5), 10**5))
def test_sandwich_is_translation_invariant(shift):
    base = rel.sandwich_bias(Q_POS, K_POS, 4, dim=32)
    shifted = rel.sandwich_bias(Q_POS + shift, K_POS + shift, 4, dim=32)
    np.testing.assert_array_equal(base, shifted)


# ----------------------------------------------------------------------------- FIRE


@pytest.mark.parametrize("causal", [True, False])
def test_fire_matches_numpy_mlp(causal):
    params = make_fire_params()
    got = rel.fire_bias(Q_POS, K_POS, params, causal=causal)
    chex.assert_shape(got, (2, HEADS, 3, 5))
    np.testing.assert_allclose(got, fire_ref(Q_POS, K_POS, params, causal), **TOL)


def test_fire_accepts_flat_w1_and_negative_c_and_threshold():
    params = make_fire_params(c=-0.3, threshold=-4.0)
    flat = dict(params, w1=params["w1"].reshape(-1))
    want = fire_ref(Q_POS, K_POS, make_fire_params(), causal=True)
    np.testing.assert_allclose(rel.fire_bias(Q_POS, K_POS, flat), want, **TOL)


@pytest.mark.parametrize("threshold", [0.0, 1e-8])
def test_fire_has_no_nan_at_position_zero(threshold):
    params = make_fire_params(threshold=threshold)
    positions = np.arange(0, 4)

    def total(p):
        bias = rel.fire_bias(positions, positions, p)
        return jnp.sum(bias), bias

    grads, bias = jax.jit(jax.grad(total, has_aux=True))(params)
    assert np.all(np.isfinite(bias))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(bias, fire_ref(positions, positions, params, True), **TOL)


def test_fire_init_values_and_shapes():
    params = jax.jit(functools.partial(rel.fire_init, num_heads=5))(jax.random.PRNGKey(0))
    assert float(params["c"]) == pytest.approx(0.1) and float(params["L"]) == 512.0
    chex.assert_shape([params["w1"], params["b1"]], [(1, 32), (32,)])
    chex.assert_shape([params["w2"], params["b2"]], [(32, 5), (5,)])
    assert np.all(np.abs(params["w1"]) <= 1.0) and np.all(np.abs(params["b1"]) <= 1.0)
    bound = 1 / math.sqrt(32)
    assert np.all(np.abs(params["w2"]) <= bound) and np.all(np.abs(params["b2"]) <= bound)
    assert np.std(params["w1"]) > 0.2  # not all zero
    bias = rel.fire_bias(np.arange(4), np.arange(6), params)
    chex.assert_shape(bias, (5, 4, 6))


# ----------------------------------------------------------------------------- Shaw et al.


def test_shaw_relative_index_clips():
    got = rel.shaw_relative_index(np.array([0, 5]), np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), 3)
    want = np.clip(np.arange(10)[None, :] - np.array([[0], [5]]), -3, 3) + 3
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    zero = rel.shaw_relative_index(Q_POS, K_POS, 0)
    np.testing.assert_array_equal(zero, np.zeros((2, 3, 5)))


@pytest.mark.parametrize("max_distance", [0, 2, 40])
def test_shaw_logits_loop_reference(max_distance):
    rng = _rng(2)
    q = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)
    table = rng.normal(size=(2 * max_distance + 1, DEPTH)).astype(np.float32)
    got = rel.shaw_logits(q, table, Q_POS, K_POS, max_distance)
    chex.assert_shape(got, (2, HEADS, 3, 5))
    want = shaw_logits_ref(q, table, Q_POS, K_POS, max_distance)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("max_distance", [0, 2, 40])
def test_shaw_values_loop_reference(max_distance):
    rng = _rng(3)
    weights = rng.uniform(size=(2, HEADS, 3, 5)).astype(np.float32)
    table = rng.normal(size=(2 * max_distance + 1, DEPTH)).astype(np.float32)
    got = rel.shaw_values(weights, table, Q_POS, K_POS, max_distance)
    chex.assert_shape(got, (2, 3, HEADS, DEPTH))
    want = shaw_values_ref(weights, table, Q_POS, K_POS, max_distance)
    np.testing.assert_allclose(got, want, **TOL)


def test_shaw_flat_index_equals_the_per_axis_form_with_gradients(monkeypatch):
    """The one-scalar-index gather and segment sum (`_flat_rows`) against the forms they
    replace below 2**31 elements (`take_along_axis`, a segment sum per query), which arrays
    too large for an int32 index still use: values and the gradients of q, the weights and
    both tables."""
    rng = _rng(6)
    q = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)
    weights = rng.uniform(size=(2, HEADS, 3, 5)).astype(np.float32)
    tables = [rng.normal(size=(7, DEPTH)).astype(np.float32) for _ in range(2)]
    g_logits = rng.normal(size=(2, HEADS, 3, 5)).astype(np.float32)
    g_values = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)

    def loss(q, weights, key_table, value_table):
        logits = rel.shaw_logits(q, key_table, Q_POS, K_POS, 3)
        values = rel.shaw_values(weights, value_table, Q_POS, K_POS, 3)
        return jnp.sum(logits * g_logits) + jnp.sum(values * g_values), (logits, values)

    args = (q, weights, *tables)
    flat = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    monkeypatch.setattr(rel, "_FLAT_INDEX_LIMIT", 0)
    per_axis = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    for got, want in zip(jax.tree.leaves(flat), jax.tree.leaves(per_axis), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    want_logits = shaw_logits_ref(q, tables[0], Q_POS, K_POS, 3)
    np.testing.assert_allclose(flat[0][1][0], want_logits, **TOL)


def test_shaw_positions_shared_by_the_batch_equal_a_copy_per_row_with_gradients(monkeypatch):
    """Positions shared by the batch take the gather and segment sum over rows of batch x heads
    values (`_shared_rows`); the same positions copied to every row take the per-element forms.
    Values and the gradients of q, the weights and both tables agree, and both match the loops.
    q has an extra leading axis, which the shared positions broadcast against; the table's 7 rows
    differ from Lk = 5, so neither can stand in for the other."""
    rng = _rng(4)
    q = rng.normal(size=(2, 2, 3, HEADS, DEPTH)).astype(np.float32)
    weights = rng.uniform(size=(2, 2, HEADS, 3, 5)).astype(np.float32)
    tables = [rng.normal(size=(7, DEPTH)).astype(np.float32) for _ in range(2)]
    g_logits = rng.normal(size=(2, 2, HEADS, 3, 5)).astype(np.float32)
    g_values = rng.normal(size=(2, 2, 3, HEADS, DEPTH)).astype(np.float32)

    def loss(q, weights, key_table, value_table, q_pos, k_pos):
        logits = rel.shaw_logits(q, key_table, q_pos, k_pos, 3)
        values = rel.shaw_values(weights, value_table, q_pos, k_pos, 3)
        return jnp.sum(logits * g_logits) + jnp.sum(values * g_values), (logits, values)

    calls = []
    shared_rows = rel._shared_rows
    monkeypatch.setattr(rel, "_shared_rows", lambda *a: calls.append(a) or shared_rows(*a))
    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    shared = grad(q, weights, *tables, Q_POS[:1], K_POS[:1])  # [1, L]: one batch row
    assert len(calls) == 2, "shared positions should take the _shared_rows path"
    copied = (np.broadcast_to(Q_POS[0], (2, 2, 3)), np.broadcast_to(K_POS[0], (2, 2, 5)))
    per_row = grad(q, weights, *tables, *copied)
    assert len(calls) == 2, "positions per row should take the per-element path"
    for got, want in zip(jax.tree.leaves(shared), jax.tree.leaves(per_row), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    (_, (logits, values)), _ = shared
    flat = (2 * 2,)
    q_ref = q.reshape(flat + q.shape[2:])
    pos = (np.broadcast_to(Q_POS[0], (4, 3)), np.broadcast_to(K_POS[0], (4, 5)))
    want = shaw_logits_ref(q_ref, tables[0], *pos, 3).reshape(logits.shape)
    np.testing.assert_allclose(logits, want, **TOL)
    want = shaw_values_ref(weights.reshape(flat + weights.shape[2:]), tables[1], *pos, 3)
    np.testing.assert_allclose(values, want.reshape(values.shape), **TOL)


# ----------------------------------------------------------------------------- Transformer-XL


def _txl_inputs(d_model=8, seed=5):
    rng = _rng(seed)
    q = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)
    w_r = (rng.normal(size=(d_model, HEADS, DEPTH)) / math.sqrt(d_model)).astype(np.float32)
    v = rng.normal(size=(HEADS, DEPTH)).astype(np.float32)
    return q, w_r, v


@pytest.mark.parametrize("d_model, base", [(8, 10000.0), (16, 100.0)])
def test_transformer_xl_dense_reference(d_model, base):
    q, w_r, v = _txl_inputs(d_model)
    got = rel.transformer_xl_bias(q, Q_POS, K_POS, w_r, v, base=base)
    chex.assert_shape(got, (2, HEADS, 3, 5))
    want = transformer_xl_ref(q, Q_POS, K_POS, w_r, v, base=base)
    np.testing.assert_allclose(got, want, **TRIG_TOL)


def test_transformer_xl_far_from_origin_and_translation_invariant():
    q, w_r, v = _txl_inputs()
    shift = 10**5
    far = rel.transformer_xl_bias(q, Q_POS + shift, K_POS + shift, w_r, v)
    np.testing.assert_array_equal(far, rel.transformer_xl_bias(q, Q_POS, K_POS, w_r, v))
    np.testing.assert_allclose(far, transformer_xl_ref(q, Q_POS, K_POS, w_r, v), **TRIG_TOL)


def test_transformer_xl_broadcasts_unbatched_q():
    q, w_r, v = _txl_inputs()
    got = rel.transformer_xl_bias(q[0], Q_POS, K_POS, w_r, v)
    want = transformer_xl_ref(np.broadcast_to(q[0], q.shape), Q_POS, K_POS, w_r, v)
    np.testing.assert_allclose(got, want, **TRIG_TOL)


def test_transformer_xl_positions_shared_by_the_batch():
    q, w_r, v = _txl_inputs()
    batched = np.broadcast_to(Q_POS[1], (2, 3)), np.broadcast_to(K_POS[1], (2, 5))
    want = transformer_xl_ref(q, *batched, w_r, v)
    for shared in (Q_POS[1], K_POS[1]), (Q_POS[1:], K_POS[1:]), (Q_POS[1:], K_POS[1]):
        got = rel.transformer_xl_bias(q, *shared, w_r, v)
        chex.assert_shape(got, (2, HEADS, 3, 5))
        np.testing.assert_allclose(got, want, **TRIG_TOL)


# ----------------------------------------------------------------------------- bad input


def _fire_missing_b2():
    params = make_fire_params()
    del params["b2"]
    return params


q_ok, k_ok = np.arange(3), np.arange(5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rel.alibi_slopes(0), "num_heads"),
        (lambda: rel.alibi_slopes(2.0), "num_heads"),
        (lambda: rel.alibi_bias(q_ok * 1.0, k_ok, np.ones(2)), "q_positions"),
        (lambda: rel.alibi_bias(q_ok, k_ok.astype(np.float32), np.ones(2)), "k_positions"),
        (lambda: rel.alibi_bias(np.int32(3), k_ok, np.ones(2)), "q_positions"),
        (lambda: rel.alibi_bias(np.zeros((2, 3), int), np.zeros((3, 5), int), [1.0]), "k_pos"),
        (lambda: rel.alibi_bias(q_ok, k_ok, np.ones((2, 2))), "slopes"),
        (lambda: rel.t5_relative_bucket(np.ones(3)), "relative_position"),
        (lambda: rel.t5_relative_bucket(q_ok, bidirectional=False, num_buckets=1), "num_buck"),
        (lambda: rel.t5_relative_bucket(q_ok, num_buckets=31), "num_buckets"),
        (lambda: rel.t5_relative_bucket(q_ok, max_distance=0), "max_distance"),
        (lambda: rel.t5_relative_bucket(q_ok, num_buckets=32, max_distance=8), "max_distance"),
        (lambda: rel.t5_bias(q_ok, k_ok, np.ones((31, 2))), "num_buckets"),
        (lambda: rel.t5_bias(q_ok, k_ok, np.ones(32)), "table"),
        (lambda: rel.kerple_bias(q_ok, k_ok, np.ones(2), np.ones(2), kind="cubic"), "kind"),
        (lambda: rel.kerple_bias(q_ok, k_ok, np.ones(2), np.ones(3)), "r1"),
        (lambda: rel.kerple_bias(q_ok, k_ok, np.ones((2, 1)), np.ones(2)), "r1"),
        (lambda: rel.sandwich_bias(q_ok, k_ok, 0), "num_heads"),
        (lambda: rel.sandwich_bias(q_ok, k_ok, 2, dim=7), "dim"),
        (lambda: rel.sandwich_bias(q_ok, k_ok, 2, base=-1.0), "base"),
        (lambda: rel.fire_bias(q_ok, k_ok, _fire_missing_b2()), "params"),
        (lambda: rel.fire_bias(q_ok, k_ok, dict(make_fire_params(), c=np.ones(2))), "params"),
        (lambda: rel.fire_bias(q_ok, k_ok, dict(make_fire_params(), b1=np.ones(3))), "b1"),
        (lambda: rel.fire_init(jax.random.PRNGKey(0), 0), "num_heads"),
        (lambda: rel.fire_init(jax.random.PRNGKey(0), 2, L=0.0), "L"),
        (lambda: rel.shaw_relative_index(q_ok, k_ok, -1), "max_distance"),
        (lambda: rel.shaw_logits(np.ones((3, 2, 4)), np.ones((5, 4)), q_ok, k_ok, -1), "max_d"),
        (lambda: rel.shaw_logits(np.ones((4, 2, 4)), np.ones((5, 4)), q_ok, k_ok, 2), "q has"),
        (lambda: rel.shaw_logits(np.ones((3, 2, 4)), np.ones((7, 4)), q_ok, k_ok, 2), "table"),
        (lambda: rel.shaw_logits(np.ones((3, 2, 4)), np.ones((5, 3)), q_ok, k_ok, 2), "table"),
        (lambda: rel.shaw_logits(np.ones((2, 4)), np.ones((5, 4)), q_ok, k_ok, 2), "q must"),
        (lambda: rel.shaw_values(np.ones((2, 3, 4)), np.ones((5, 4)), q_ok, k_ok, 2), "weights"),
        (
            lambda: rel.shaw_values(np.ones((3, 2, 3, 5)), np.ones((5, 4)), Q_POS, K_POS, 2),
            "shapes do not broadcast",
        ),
        (
            lambda: rel.transformer_xl_bias(
                np.ones((3, 2, 4)), q_ok, k_ok, np.ones((7, 2, 4)), np.ones((2, 4))
            ),
            "w_r",
        ),
        (
            lambda: rel.transformer_xl_bias(
                np.ones((3, 2, 4)), q_ok, k_ok, np.ones((8, 2, 4)), np.ones((4, 2))
            ),
            "v must",
        ),
        (
            lambda: rel.transformer_xl_bias(
                np.ones((3, 2, 4)), q_ok * 0.5, k_ok, np.ones((8, 2, 4)), np.ones((2, 4))
            ),
            "q_positions",
        ),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- jit and vmap


class TransformTest(chex.TestCase):
    """Each function with and without `jax.jit`, against the NumPy references."""

    def _check(self, fn, args, want, tol=TOL):
        got = self.variant(fn)(*args)
        np.testing.assert_allclose(got, want, **tol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_alibi(self):
        slopes = rel.alibi_slopes(HEADS)
        want = pairwise(lambda h, i, j: -slopes[h] * abs(i - j), Q_POS, K_POS, HEADS)
        self._check(
            lambda q, k: rel.alibi_bias(q, k, rel.alibi_slopes(HEADS)), (Q_POS, K_POS), want
        )
        self._check(rel.alibi_bias, (Q_POS, K_POS, jnp.asarray(slopes)), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_t5(self):
        positions = np.arange(-300, 300)
        want = [t5_bucket_ref(int(r), False, 16, 50) for r in positions]
        fn = functools.partial(
            rel.t5_relative_bucket, bidirectional=False, num_buckets=16, max_distance=50
        )
        self._check(fn, (positions,), want, tol={"rtol": 0, "atol": 0})
        table = _rng().normal(size=(16, HEADS)).astype(np.float32)
        want = pairwise(
            lambda h, i, j: table[t5_bucket_ref(j - i, True, 16, 50), h], Q_POS, K_POS, HEADS
        )
        self._check(functools.partial(rel.t5_bias, max_distance=50), (Q_POS, K_POS, table), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_kerple(self):
        r1, r2 = _kerple_params()
        want = pairwise(
            lambda h, i, j: -float(r1[h]) * math.log(1 + float(r2[h]) * abs(i - j)),
            Q_POS,
            K_POS,
            HEADS,
        )
        self._check(rel.kerple_bias, (Q_POS, K_POS, r1, r2), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sandwich(self):
        fn = functools.partial(rel.sandwich_bias, num_heads=4, dim=16)
        self._check(fn, (Q_POS, K_POS), sandwich_ref(Q_POS, K_POS, 4, 16), TRIG_TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_fire(self):
        params = make_fire_params()
        fn = functools.partial(rel.fire_bias, causal=False)
        self._check(fn, (Q_POS, K_POS, params), fire_ref(Q_POS, K_POS, params, False))
        init = self.variant(functools.partial(rel.fire_init, num_heads=3, hidden=4))
        chex.assert_shape(init(jax.random.PRNGKey(1))["w2"], (4, 3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_shaw(self):
        rng = _rng(6)
        q = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)
        weights = rng.uniform(size=(2, HEADS, 3, 5)).astype(np.float32)
        table = rng.normal(size=(5, DEPTH)).astype(np.float32)
        index = self.variant(functools.partial(rel.shaw_relative_index, max_distance=2))
        want = np.clip(K_POS[:, None, :] - Q_POS[:, :, None], -2, 2) + 2
        np.testing.assert_array_equal(index(Q_POS, K_POS), want)
        logits = functools.partial(rel.shaw_logits, max_distance=2)
        self._check(logits, (q, table, Q_POS, K_POS), shaw_logits_ref(q, table, Q_POS, K_POS, 2))
        values = functools.partial(rel.shaw_values, max_distance=2)
        want = shaw_values_ref(weights, table, Q_POS, K_POS, 2)
        self._check(values, (weights, table, Q_POS, K_POS), want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_transformer_xl(self):
        q, w_r, v = _txl_inputs()
        want = transformer_xl_ref(q, Q_POS, K_POS, w_r, v)
        self._check(rel.transformer_xl_bias, (q, Q_POS, K_POS, w_r, v), want, TRIG_TOL)


def _vmap_cases():
    rng = _rng(7)
    q = rng.normal(size=(2, 3, HEADS, DEPTH)).astype(np.float32)
    weights = rng.uniform(size=(2, HEADS, 3, 5)).astype(np.float32)
    shaw_table = rng.normal(size=(5, DEPTH)).astype(np.float32)
    t5_table = rng.normal(size=(32, HEADS)).astype(np.float32)
    r1, r2 = _kerple_params()
    params = make_fire_params()
    _, w_r, v = _txl_inputs()
    slopes = rel.alibi_slopes(HEADS)
    return {
        "alibi": (lambda qp, kp: rel.alibi_bias(qp, kp, slopes), ()),
        "t5": (lambda qp, kp: rel.t5_bias(qp, kp, t5_table), ()),
        "kerple": (lambda qp, kp: rel.kerple_bias(qp, kp, r1, r2, kind="power"), ()),
        "sandwich": (lambda qp, kp: rel.sandwich_bias(qp, kp, 4, dim=16), ()),
        "fire": (lambda qp, kp: rel.fire_bias(qp, kp, params), ()),
        "shaw_index": (lambda qp, kp: rel.shaw_relative_index(qp, kp, 2), ()),
        "shaw_logits": (lambda qp, kp, x: rel.shaw_logits(x, shaw_table, qp, kp, 2), (q,)),
        "shaw_values": (lambda qp, kp, w: rel.shaw_values(w, shaw_table, qp, kp, 2), (weights,)),
        "transformer_xl": (lambda qp, kp, x: rel.transformer_xl_bias(x, qp, kp, w_r, v), (q,)),
    }


@pytest.mark.parametrize("name", list(_vmap_cases()))
def test_vmap_over_batch_axis_matches_batched_call(name):
    fn, extra = _vmap_cases()[name]
    mapped = jax.jit(jax.vmap(fn))(Q_POS, K_POS, *extra)
    batched = jax.jit(fn)(Q_POS, K_POS, *extra)
    rows = [jax.jit(fn)(Q_POS[b], K_POS[b], *(x[b] for x in extra)) for b in range(2)]
    np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mapped, np.stack(rows), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ dynamic position bias


def _dpb_reference(qp, kp, params):
    """Loop over pairs, float64: MLP(sign(d) log(1 + |d|)), d = i - j, SiLU between layers."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    silu = lambda x: x / (1 + np.exp(-x))
    heads = p["b3"].shape[0]
    out = np.zeros((heads, len(qp), len(kp)))
    for a, i in enumerate(qp):
        for b, j in enumerate(kp):
            d = float(i - j)
            x = np.array([np.sign(d) * np.log1p(abs(d))])
            h = silu(x @ p["w1"] + p["b1"])
            h = silu(h @ p["w2"] + p["b2"])
            out[:, a, b] = h @ p["w3"] + p["b3"]
    return out


def test_dpb_matches_loop_reference():
    params = rel.dpb_init(jax.random.PRNGKey(0), 3, hidden=8)
    qp, kp = np.array([0, 5, 9, 300]), np.array([0, 1, 7, 9, 1000])
    got = rel.dpb_bias(qp, kp, params)
    np.testing.assert_allclose(got, _dpb_reference(qp, kp, params), rtol=1e-5, atol=1e-5)
    # a function of i - j alone
    shifted = rel.dpb_bias(qp + 12345, kp + 12345, params)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(shifted))


def test_dpb_errors():
    params = rel.dpb_init(jax.random.PRNGKey(0), 2, hidden=4)
    with pytest.raises(ValueError, match="w2"):
        rel.dpb_bias(np.arange(3), np.arange(3), {**params, "w2": np.zeros((4, 5))})
    with pytest.raises(ValueError, match="keys"):
        rel.dpb_bias(np.arange(3), np.arange(3), {"w1": params["w1"]})
    with pytest.raises(ValueError, match="num_heads"):
        rel.dpb_init(jax.random.PRNGKey(0), 0)


@pytest.mark.parametrize(
    ("name", "positions"),
    [
        ("fire", (Q_POS, K_POS)),  # [2, Lq], [2, Lk]
        ("fire-bidirectional", (Q_POS[:1], K_POS[:1])),  # one row, as a kernel block
        ("dpb", (Q_POS[0], K_POS[0])),  # unbatched
        ("dpb", (Q_POS, K_POS)),
    ],
)
def test_kernel_forms_match_the_references_and_their_gradients(name, positions):
    """`kernel=True` (the layout the fused Pallas kernel lowers) against the numpy references,
    and its parameter gradients against those of the default form."""
    qp, kp = positions
    if name.startswith("fire"):
        params, causal = make_fire_params(), name == "fire"
        fn = functools.partial(rel.fire_bias, qp, kp, causal=causal)
        want = fire_ref(np.atleast_2d(qp), np.atleast_2d(kp), params, causal)
    else:
        params = rel.dpb_init(jax.random.PRNGKey(0), 3, hidden=8)
        fn = functools.partial(rel.dpb_bias, qp, kp)
        rows = zip(*np.atleast_2d(qp, kp), strict=True)
        want = np.stack([_dpb_reference(q, k, params) for q, k in rows])
    got = fn(params, kernel=True)
    np.testing.assert_allclose(got, want.reshape(got.shape), **TOL)
    weights = jax.random.normal(jax.random.PRNGKey(1), got.shape)

    def loss(p, kernel):
        return jnp.sum(fn(p, kernel=kernel) * weights)

    grads = jax.grad(loss)(params, True)
    for key, g in jax.grad(loss)(params, False).items():
        np.testing.assert_allclose(grads[key], g, rtol=1e-4, atol=1e-5)
