"""Tests for jpe.encodings.absolute against float64 NumPy references written from the papers."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings import absolute

# Error budget of one table entry: the angle is the sum of five float32 pieces of at most
# 2.5 turns, each rounding costing at most half an ulp of 2.5 (2**-23 turns), then sin/cos
# add half an ulp of 1.
ANGLE_ATOL = 2 * np.pi * 5 * 2.0**-23
TABLE_ATOL = ANGLE_ATOL + 2.0**-24
# combine: x + pe or x * pe rounded once in x's dtype (|values| < 4 here).
COMBINE_ATOL = {jnp.float32: 4 * 2.0**-23, jnp.bfloat16: 4 * 2.0**-8}


# ---------------------------------------------------------------- references (float64 NumPy)


def ref_sinusoidal(positions, dim, base=10000.0):
    """Vaswani et al. sec. 3.5: PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(same).

    Column by column from the formula with d = dim for every dim, odd or even (DESIGN.md), so
    an odd dim ends with a sine column.
    """
    p = np.asarray(positions, np.float64)
    columns = []
    for column in range(dim):
        angle = p / base ** (2 * (column // 2) / dim)
        columns.append(np.sin(angle) if column % 2 == 0 else np.cos(angle))
    return np.stack(columns, axis=-1)


def ref_binary(positions, dim):
    p = np.asarray(positions, np.int64)
    return np.stack([np.where((p >> b) & 1, 1.0, -1.0) for b in range(dim)], axis=-1)


def ref_mae_1d(embed_dim, pos, base):
    # MAE util/pos_embed.py, get_1d_sincos_pos_embed_from_grid, in float64.
    omega = 1.0 / base ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def ref_mae_2d(height, width, dim, base=10000.0):
    # MAE get_2d_sincos_pos_embed, generalised to height != width: meshgrid(w, h) puts the
    # column coordinate first; the first half of the features encodes grid[0].
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height)))
    return np.concatenate(
        [ref_mae_1d(dim // 2, grid[0], base), ref_mae_1d(dim // 2, grid[1], base)], axis=1
    )


def ref_x_transformers(positions, dim, scale, base=10000.0):
    # x-transformers ScaledSinusoidalEmbedding: concat [sin | cos], inv_freq = base^-(i/half).
    half = dim // 2
    inv_freq = base ** -(np.arange(half) / half)
    angle = np.outer(np.asarray(positions, np.float64), inv_freq)
    return scale * np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)


# ---------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 8, 64, 65])
def test_sinusoidal_matches_reference(dim):
    rng = np.random.default_rng(dim)
    positions = np.concatenate([np.arange(200), rng.integers(0, 10**5, 300), [10**5]])
    got = absolute.sinusoidal(jnp.asarray(positions, jnp.int32), dim)
    chex.assert_shape(got, (positions.size, dim))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_sinusoidal(positions, dim), rtol=0, atol=TABLE_ATOL)


def test_sinusoidal_tolerance_would_catch_a_plain_float32_angle():
    # The angle p * w formed in float32 is off by more than TABLE_ATOL at large positions,
    # so the reference test above does test the angle reduction.
    positions = np.arange(10**5 - 100, 10**5 + 1)
    w = 10000.0 ** (-2.0 * np.arange(32) / 64)
    plain = np.sin(np.float32(positions)[:, None] * np.float32(w))
    error = np.abs(plain - np.sin(np.outer(positions, w))).max()
    assert error > 100 * TABLE_ATOL


def test_sinusoidal_precision_over_the_int32_range():
    positions = np.array([2**20, 2**24 - 1, -(2**24) + 1, 12_345_678, 2**31 - 1, -(2**31)])
    got = absolute.sinusoidal(jnp.asarray(positions, jnp.int32), 16)
    np.testing.assert_allclose(got, ref_sinusoidal(positions, 16), rtol=0, atol=TABLE_ATOL)


def test_sinusoidal_golden_and_odd_dim_layout():
    got = np.asarray(absolute.sinusoidal(jnp.array([0, 1]), 3))
    # dim 3: [sin(p), cos(p), sin(p / 10000^(2/3))], the exponent over dim = 3, ending in a sine.
    want = [[0.0, 1.0, 0.0], [np.sin(1.0), np.cos(1.0), np.sin(10000.0 ** (-2 / 3))]]
    np.testing.assert_allclose(got, want, atol=TABLE_ATOL)
    got = np.asarray(absolute.sinusoidal(jnp.array([0, 1]), 4))
    want = [[0.0, 1.0, 0.0, 1.0], [np.sin(1.0), np.cos(1.0), np.sin(0.01), np.cos(0.01)]]
    np.testing.assert_allclose(got, want, atol=TABLE_ATOL)


@pytest.mark.parametrize("dim", [3, 5, 9, 33])
def test_sinusoidal_odd_dim_is_not_the_truncated_table_of_dim_plus_one(dim):
    # base^(2i/dim), not base^(2i/(dim + 1)): the two differ from the second frequency on, by
    # far more than the tolerance at these positions.
    positions = np.arange(1000, 1100)
    got = absolute.sinusoidal(jnp.asarray(positions, jnp.int32), dim)
    np.testing.assert_allclose(got, ref_sinusoidal(positions, dim), rtol=0, atol=TABLE_ATOL)
    truncated = ref_sinusoidal(positions, dim + 1)[:, :dim]
    assert np.abs(np.asarray(got, np.float64) - truncated)[:, 2:].max() > 100 * TABLE_ATOL


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.uint32, jnp.int32])
def test_sinusoidal_any_integer_dtype_and_batch_axes(dtype):
    positions = np.array([[0, 3, 7], [1, 2, 100]])
    got = absolute.sinusoidal(jnp.asarray(positions, dtype), 6, base=100.0)
    chex.assert_shape(got, (2, 3, 6))
    np.testing.assert_allclose(got, ref_sinusoidal(positions, 6, 100.0), atol=TABLE_ATOL)


# Hypothesis draws many dims: compile once per dim rather than op by op per example.
_sinusoidal = jax.jit(absolute.sinusoidal, static_argnums=1, static_argnames="base")


@given(
    t=st.integers(0, 10**4),
    k=st.integers(-(10**3), 10**3),
    half=st.integers(1, 16),
    base=st.sampled_from([100.0, 10000.0]),
)
def test_sinusoidal_shift_is_a_fixed_rotation(t, k, half, base):
    # PE_{t+k} = M_k PE_t with M_k block-diagonal 2x2 rotations by k * w_i, the same for all t.
    dim = 2 * half
    w = base ** (-2.0 * np.arange(half) / dim)
    m = np.zeros((dim, dim))
    for i, angle in enumerate(k * w):
        c, s = np.cos(angle), np.sin(angle)
        m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, s], [-s, c]]
    table = np.asarray(_sinusoidal(jnp.array([t, t + k]), dim, base=base), np.float64)
    np.testing.assert_allclose(table[1], m @ table[0], rtol=0, atol=4 * TABLE_ATOL)


@given(
    t=st.integers(10**3, 10**4),
    s=st.integers(10**3, 10**4),
    k=st.integers(0, 10**3),
    half=st.integers(1, 16),
)
def test_sinusoidal_dot_product_depends_only_on_distance(t, s, k, half):
    dim = 2 * half
    table = np.asarray(_sinusoidal(jnp.array([t - k, t, t + k, s, s + k]), dim))
    table = table.astype(np.float64)
    forward, backward = table[1] @ table[2], table[1] @ table[0]
    other_start = table[3] @ table[4]
    exact = np.sum(np.cos(k * 10000.0 ** (-2.0 * np.arange(half) / dim)))
    atol = 4 * dim * TABLE_ATOL
    np.testing.assert_allclose(forward, backward, rtol=0, atol=atol)  # direction blindness
    np.testing.assert_allclose(forward, other_start, rtol=0, atol=atol)
    np.testing.assert_allclose(forward, exact, rtol=0, atol=atol)


# ---------------------------------------------------------------- scaled sinusoidal


def test_scaled_sinusoidal_init():
    assert absolute.scaled_sinusoidal_init(64) == pytest.approx(0.125)
    assert absolute.scaled_sinusoidal_init(2) == pytest.approx(2**-0.5)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_scaled_sinusoidal_matches_x_transformers_up_to_permutation(scale_shape):
    dim, positions = 16, np.arange(0, 3000, 7)
    scale = absolute.scaled_sinusoidal_init(dim)
    got = absolute.scaled_sinusoidal(jnp.asarray(positions), dim, jnp.full(scale_shape, scale))
    chex.assert_shape(got, (positions.size, dim))
    np.testing.assert_allclose(
        got, scale * ref_sinusoidal(positions, dim), rtol=0, atol=scale * TABLE_ATOL + 1e-7
    )
    # Interleaved [s0, c0, s1, c1, ...] -> x-transformers' [s0, s1, ... | c0, c1, ...].
    permutation = np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
    np.testing.assert_allclose(
        np.asarray(got)[:, permutation],
        ref_x_transformers(positions, dim, scale),
        rtol=0,
        atol=scale * TABLE_ATOL + 1e-7,
    )


@pytest.mark.parametrize("dim", [7, 8])
def test_scaled_sinusoidal_follows_the_formula_for_odd_and_even_dim(dim):
    positions, scale = np.arange(0, 3000, 7), 0.3
    got = absolute.scaled_sinusoidal(jnp.asarray(positions), dim, scale)
    chex.assert_shape(got, (positions.size, dim))
    want = scale * ref_sinusoidal(positions, dim)
    np.testing.assert_allclose(got, want, rtol=0, atol=scale * TABLE_ATOL + 1e-7)


def test_scaled_sinusoidal_gradient_with_respect_to_scale():
    positions = jnp.arange(5)
    grad = jax.grad(lambda g: absolute.scaled_sinusoidal(positions, 8, g).sum())(0.3)
    np.testing.assert_allclose(grad, ref_sinusoidal(np.arange(5), 8).sum(), rtol=1e-5)


# ---------------------------------------------------------------- binary


def test_binary_matches_reference():
    positions = np.array([[0, 1, 2, 5], [6, 255, 128, 77]])
    got = absolute.binary(jnp.asarray(positions), 8)
    chex.assert_shape(got, (2, 4, 8))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, ref_binary(positions, 8))


def test_binary_dim_wider_than_the_dtype():
    positions = np.array([0, 3, 255])
    got = absolute.binary(jnp.asarray(positions, jnp.uint8), 12)
    np.testing.assert_array_equal(got, ref_binary(positions, 12))


@functools.cache
def _binary_table(dim):
    return np.asarray(jax.jit(absolute.binary, static_argnums=1)(jnp.arange(2**dim), dim))


@given(dim=st.integers(1, 12), data=st.data())
def test_binary_varying_columns(dim, data):
    n = data.draw(st.integers(1, 2**dim))
    table = _binary_table(dim)[:n]  # rows are independent: the table of positions 0..n-1
    varying = int(np.sum(np.any(table != table[:1], axis=0)))
    assert varying == (n - 1).bit_length()  # = ceil(log2(n))
    assert set(np.unique(table)) <= {-1.0, 1.0}


def test_binary_wraps_under_jit():
    # Documented: values cannot be checked under jit, p is encoded as p mod 2**dim.
    got = jax.jit(functools.partial(absolute.binary, dim=4))(jnp.array([16, 17, -1]))
    np.testing.assert_array_equal(got, ref_binary(np.array([0, 1, 15]), 4))


# ---------------------------------------------------------------- sincos_2d


@pytest.mark.parametrize("height,width,dim", [(4, 4, 16), (3, 5, 8), (1, 7, 4), (14, 14, 64)])
def test_sincos_2d_matches_mae(height, width, dim):
    got = absolute.sincos_2d(height, width, dim)
    chex.assert_shape(got, (height * width, dim))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_mae_2d(height, width, dim), rtol=0, atol=TABLE_ATOL)


def test_sincos_2d_column_coordinate_fills_the_first_half():
    # dim 4: omega = [1]; row-major patch 1 is (row 0, column 1); patch 2 is (row 1, column 0).
    got = np.asarray(absolute.sincos_2d(2, 2, 4))
    s, c = np.sin(1.0), np.cos(1.0)
    np.testing.assert_allclose(got[1], [s, c, 0.0, 1.0], atol=TABLE_ATOL)
    np.testing.assert_allclose(got[2], [0.0, 1.0, s, c], atol=TABLE_ATOL)


# ---------------------------------------------------------------- learned


@pytest.mark.parametrize("truncated,std_ratio", [(True, 0.8796), (False, 1.0)])
def test_learned_init(truncated, std_ratio):
    key = jax.random.key(0)
    table = absolute.learned_init(key, 512, 64, stddev=0.02, truncated=truncated)
    chex.assert_shape(table, (512, 64))
    assert table.dtype == jnp.float32
    values = np.asarray(table)
    assert abs(values.std() / 0.02 - std_ratio) < 0.03
    assert abs(values.mean()) < 0.001
    beyond = np.mean(np.abs(values) > 2 * 0.02)
    assert beyond == 0 if truncated else beyond > 0.03  # 4.6% of a normal is past 2 sigma
    np.testing.assert_array_equal(
        table, absolute.learned_init(key, 512, 64, stddev=0.02, truncated=truncated)
    )


def test_learned_lookup_gathers_rows():
    table = jnp.arange(20.0).reshape(10, 2)
    positions = np.array([[0, 9, 3], [4, 4, 1]])
    got = absolute.learned_lookup(table, jnp.asarray(positions, jnp.uint8))
    chex.assert_shape(got, (2, 3, 2))
    np.testing.assert_array_equal(got, np.asarray(table)[positions])


def test_learned_lookup_keeps_table_dtype():
    table = jnp.ones((4, 3), jnp.bfloat16)
    assert absolute.learned_lookup(table, jnp.arange(4)).dtype == jnp.bfloat16


def test_learned_lookup_out_of_range_is_nan_under_jit():
    # Documented: under jit the caller must bound positions; an out-of-range row is NaN,
    # never a silently clamped (or, for -1, wrapped) row.
    table = jnp.arange(20.0).reshape(10, 2)
    got = np.asarray(jax.jit(absolute.learned_lookup)(table, jnp.array([9, 10, -1])))
    np.testing.assert_array_equal(got[0], [18.0, 19.0])
    assert np.isnan(got[1:]).all()


# ---------------------------------------------------------------- combine


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["add", "multiply", "concat"])
@pytest.mark.parametrize("pe_batched", [False, True])
def test_combine(dtype, mode, pe_batched):
    rng = np.random.default_rng(0)
    x64 = rng.uniform(-1, 1, (2, 5, 8))
    pe64 = ref_sinusoidal(np.arange(5), 8)
    x = jnp.asarray(x64, dtype)
    pe = jnp.asarray(pe64, jnp.float32)
    if pe_batched:
        pe = pe[None]  # [1, L, d]: same rank as x
    got = absolute.combine(x, pe, mode=mode)
    assert got.dtype == dtype
    x_rounded = np.asarray(x, np.float64)
    want = {
        "add": x_rounded + pe64,
        "multiply": x_rounded * pe64,
        "concat": np.concatenate([x_rounded, np.broadcast_to(pe64, (2, 5, 8))], axis=-1),
    }[mode]
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=0, atol=COMBINE_ATOL[dtype] + TABLE_ATOL
    )


def test_combine_concat_with_a_narrower_table():
    x = jnp.zeros((3, 4, 6))
    got = absolute.combine(x, absolute.binary(jnp.arange(4), 2), mode="concat")
    chex.assert_shape(got, (3, 4, 8))
    np.testing.assert_array_equal(got[1, :, 6:], ref_binary(np.arange(4), 2))


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: absolute.sinusoidal(jnp.arange(3), 0), "dim"),
        (lambda: absolute.sinusoidal(jnp.arange(3), 2.0), "dim"),
        (lambda: absolute.sinusoidal(jnp.arange(3), 4, base=0.0), "base"),
        (lambda: absolute.sinusoidal(jnp.arange(3.0), 4), "positions"),
        (lambda: absolute.sinusoidal(jnp.array(3), 4), "positions"),
        (lambda: absolute.scaled_sinusoidal(jnp.arange(3), 4, jnp.ones(2)), "scale"),
        (lambda: absolute.scaled_sinusoidal(jnp.arange(3), 4, jnp.ones((), jnp.int32)), "scale"),
        (lambda: absolute.scaled_sinusoidal_init(0), "dim"),
        (lambda: absolute.binary(jnp.arange(17), 4), r"positions.*\[0, 16\)"),
        (lambda: absolute.binary(jnp.array([-1, 0]), 4), "positions"),
        (lambda: absolute.binary(jnp.arange(3.0), 4), "positions"),
        (lambda: absolute.binary(jnp.arange(3), 0), "dim"),
        (lambda: absolute.sincos_2d(2, 2, 6), "dim.*multiple of 4"),
        (lambda: absolute.sincos_2d(2, 2, 0), "dim"),
        (lambda: absolute.sincos_2d(0, 2, 8), "height"),
        (lambda: absolute.sincos_2d(2, -1, 8), "width"),
        (lambda: absolute.learned_init(jax.random.key(0), 0, 4), "max_len"),
        (lambda: absolute.learned_init(jax.random.key(0), 4, 4, stddev=-1.0), "stddev"),
        (lambda: absolute.learned_lookup(jnp.zeros((10, 2)), jnp.array([0, 10])), "positions"),
        (lambda: absolute.learned_lookup(jnp.zeros((10, 2)), jnp.array([-1])), "positions"),
        (lambda: absolute.learned_lookup(jnp.zeros((10, 2)), jnp.array([1.0])), "positions"),
        (lambda: absolute.learned_lookup(jnp.zeros(10), jnp.array([1])), "table"),
        (lambda: absolute.combine(jnp.zeros((2, 3)), jnp.zeros((2, 3)), mode="sum"), "mode"),
        (lambda: absolute.combine(jnp.zeros((1, 2, 3)), jnp.zeros((2, 2, 3, 1))), "pe"),
        (lambda: absolute.combine(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "pe"),
        (lambda: absolute.combine(jnp.zeros((2, 3)), jnp.zeros((3, 1)), mode="concat"), "pe"),
        (lambda: absolute.combine(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))), "x"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- jit and vmap


class AbsoluteVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sinusoidal(self):
        positions = np.array([[0, 5, 99999], [3, 2, 1]])
        got = self.variant(lambda p: absolute.sinusoidal(p, 9))(jnp.asarray(positions))
        np.testing.assert_allclose(got, ref_sinusoidal(positions, 9), atol=TABLE_ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_scaled_sinusoidal(self):
        positions = np.arange(6)
        got = self.variant(lambda p, g: absolute.scaled_sinusoidal(p, 4, g))(
            jnp.asarray(positions), jnp.float32(0.5)
        )
        np.testing.assert_allclose(got, 0.5 * ref_sinusoidal(positions, 4), atol=TABLE_ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_binary(self):
        positions = np.array([0, 1, 6, 15])
        got = self.variant(lambda p: absolute.binary(p, 4))(jnp.asarray(positions))
        np.testing.assert_array_equal(got, ref_binary(positions, 4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_sincos_2d(self):
        got = self.variant(lambda: absolute.sincos_2d(3, 2, 8))()
        np.testing.assert_allclose(got, ref_mae_2d(3, 2, 8), atol=TABLE_ATOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_learned_init_and_lookup(self):
        key = jax.random.key(1)
        table = self.variant(lambda k: absolute.learned_init(k, 6, 3))(key)
        np.testing.assert_allclose(table, absolute.learned_init(key, 6, 3), rtol=1e-6)
        positions = np.array([[5, 0], [2, 2]])
        got = self.variant(absolute.learned_lookup)(table, jnp.asarray(positions))
        np.testing.assert_array_equal(got, np.asarray(table)[positions])

    @chex.variants(with_jit=True, without_jit=True)
    def test_combine(self):
        x = jnp.ones((2, 3, 4), jnp.bfloat16)
        pe = absolute.sinusoidal(jnp.arange(3), 4)
        for mode in absolute.COMBINE_MODES:
            got = self.variant(functools.partial(absolute.combine, mode=mode))(x, pe)
            assert got.dtype == jnp.bfloat16
            want = absolute.combine(x.astype(jnp.float32), pe, mode=mode)
            np.testing.assert_allclose(
                np.asarray(got, np.float32), want, atol=COMBINE_ATOL[jnp.bfloat16]
            )


def test_vmap_over_leading_axis():
    positions = jnp.array([[0, 4, 9], [7, 1, 3]])
    table = absolute.learned_init(jax.random.key(2), 10, 6)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 6)), jnp.float32)
    cases = [
        (lambda p: absolute.sinusoidal(p, 6), (positions,)),
        (lambda p: absolute.scaled_sinusoidal(p, 6, 0.25), (positions,)),
        (lambda p: absolute.binary(p, 6), (positions,)),
        (lambda p: absolute.learned_lookup(table, p), (positions,)),
        (lambda x, p: absolute.combine(x, absolute.sinusoidal(p, 6)), (x, positions)),
    ]
    for fn, args in cases:
        mapped = jax.vmap(fn)(*args)
        rows = jnp.stack([fn(*(a[i] for a in args)) for i in range(2)])
        np.testing.assert_allclose(mapped, rows, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "fn, bad, good",
    [
        (functools.partial(absolute.binary, dim=4), [0, 16], [0, 15]),
        (functools.partial(absolute.learned_lookup, jnp.zeros((8, 2))), [0, 8], [0, 7]),
    ],
)
def test_range_checks_read_closed_over_constants_under_jit(fn, bad, good):
    """A constant closed over by a jitted function is concrete: it is checked with NumPy
    (a jnp reduction of it would be traced and fail with a ConcretizationTypeError)."""
    bad, good = jnp.array(bad), jnp.array(good)
    with pytest.raises(ValueError, match="positions must be in"):
        jax.jit(lambda: fn(bad))()
    chex.assert_tree_all_finite(jax.jit(lambda: fn(good))())


def test_learned_lookup_int64_positions_outside_int32_raise():
    with pytest.raises(ValueError, match="int32"):
        absolute.learned_lookup(jnp.zeros((8, 2)), np.array([0, 2**32 + 1], np.int64))
    with pytest.raises(ValueError, match="int32"):
        absolute.sinusoidal(np.array([2**31], np.int64), 4)


@pytest.mark.parametrize("mode", ["add", "multiply", "concat"])
def test_combine_never_enlarges_x(mode):
    """pe's leading axes broadcast to x's, never the other way: x [1, L, D] with pe [4, L, D]
    used to return [4, L, D]."""
    x = jnp.ones((1, 5, 8))
    with pytest.raises(ValueError, match="leading axes"):
        absolute.combine(x, jnp.ones((4, 5, 8)), mode=mode)
    with pytest.raises(ValueError, match="leading axes"):
        absolute.combine(jnp.ones((2, 5, 8)), jnp.ones((3, 5, 8)), mode=mode)
    got = absolute.combine(jnp.ones((3, 5, 8)), jnp.ones((1, 5, 8)), mode=mode)
    chex.assert_shape(got, (3, 5, 16 if mode == "concat" else 8))
