"""Properties of the rotary encodings: exact angles, relative scores, norms, layouts, xPos.

The element-wise comparisons against Hugging Face's formulas live in test_rope_hf.py; this file
checks what the papers claim and what users reported broken elsewhere.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings import rotary
from jpe.encodings.rotary import (
    apply_axial_rope,
    apply_rope,
    apply_xpos,
    permute_rope_weights,
    rope_angles,
    rope_frequencies,
    rope_permutation,
    xpos_scale,
)

INT32_MAX = 2**31 - 1


def _wrapped_error(angles, positions, inv_freq):
    """Phase error of float32 `angles` against an extended-precision reference, in rad."""
    exact = np.asarray(positions, np.longdouble)[..., None] * np.asarray(inv_freq, np.longdouble)
    diff = np.asarray(angles, np.longdouble) - exact
    two_pi = 2 * np.longdouble(np.pi)
    return np.abs(diff - two_pi * np.round(diff / two_pi)).astype(np.float64)


@pytest.mark.parametrize("base", [1e4, 5e5])
@pytest.mark.parametrize("rotary_dim", [64, 128])
def test_angles_exact_to_3e_6_rad_for_every_int32_position(base, rotary_dim):
    inv_freq, _ = rope_frequencies(rotary_dim, base=base)
    rng = np.random.default_rng(0)
    positions = np.concatenate(
        [
            [0, 1, 2049, 65537, 131071, 2**20, 2**20 - 1, 2**30, INT32_MAX, -1, -(2**31)],
            rng.integers(0, 2**20, 4000),
            rng.integers(-(2**31), INT32_MAX, 4000),
        ]
    ).astype(np.int32)
    err = _wrapped_error(rope_angles(positions, inv_freq), positions, inv_freq)
    # The documented bound is 3e-6 rad (jpe/encodings/_angles.py); the acceptance bound 1e-3.
    assert err.max() < 3e-6, err.max()


def test_naive_float32_product_is_not_exact():
    """The failure the exact reduction exists for: p * inv_freq in float32 at p ~ 2^20."""
    inv_freq, _ = rope_frequencies(128, base=1e4)
    positions = np.arange(2**20 - 64, 2**20, dtype=np.int32)
    naive = jnp.asarray(positions, jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]
    assert _wrapped_error(naive, positions, inv_freq).max() > 1e-2


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.int32, jnp.uint8, jnp.uint16])
def test_angles_any_integer_dtype(dtype):
    inv_freq, _ = rope_frequencies(16)
    positions = np.arange(0, 100, dtype=np.int64)
    got = rope_angles(jnp.asarray(positions, dtype), inv_freq)
    assert _wrapped_error(got, positions, inv_freq).max() < 3e-6


def test_angles_float_positions_fraction_is_exact():
    inv_freq, _ = rope_frequencies(32, base=1e4)
    positions = np.array([0.5, 1000.25, 65536.75, 1e6 + 0.5, -3.25], np.float32)
    err = _wrapped_error(rope_angles(positions, inv_freq), positions.astype(np.float64), inv_freq)
    assert err.max() < 3e-6


def test_angles_traced_inv_freq_falls_back_to_product():
    inv_freq, _ = rope_frequencies(16)
    positions = jnp.arange(50)
    got = jax.jit(rope_angles)(positions, jnp.asarray(inv_freq, jnp.float32))
    want = np.asarray(positions, np.float64)[:, None] * inv_freq
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def _random_qk(key, shape, dtype=jnp.float32):
    kq, kk = jax.random.split(key)
    return jax.random.normal(kq, shape, dtype), jax.random.normal(kk, shape, dtype)


def _score(q, k):
    return jnp.einsum("...hd,...hd->...h", q.astype(jnp.float32), k.astype(jnp.float32))


@given(
    m=st.integers(0, 2**20),
    n=st.integers(0, 2**20),
    shift=st.integers(-(10**5), 10**5),
    layout=st.sampled_from(rotary.LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_rope_score_depends_only_on_distance(m, n, shift, layout, seed):
    inv_freq, _ = rope_frequencies(32, base=1e4)
    q, k = _random_qk(jax.random.PRNGKey(seed), (1, 2, 32))
    s0 = _score(
        apply_rope(q, [m], inv_freq, layout=layout), apply_rope(k, [n], inv_freq, layout=layout)
    )
    s1 = _score(
        apply_rope(q, [m + shift], inv_freq, layout=layout),
        apply_rope(k, [n + shift], inv_freq, layout=layout),
    )
    # |q||k| ~ 32; phase errors of 3e-6 rad per pair bound the change by ~32 * 6e-6.
    np.testing.assert_allclose(s0, s1, atol=1e-3)


@given(
    positions=st.lists(st.integers(-(2**31), INT32_MAX), min_size=1, max_size=8),
    attention_factor=st.floats(0.5, 2.0),
    layout=st.sampled_from(rotary.LAYOUTS),
)
def test_rope_scales_norm_by_attention_factor(positions, attention_factor, layout):
    inv_freq, _ = rope_frequencies(24, base=5e5)
    x = jax.random.normal(jax.random.PRNGKey(len(positions)), (len(positions), 3, 32))
    y = apply_rope(x, positions, inv_freq, layout=layout, attention_factor=attention_factor)
    # Each rotated pair keeps its norm times the factor; pass-through features are untouched.
    norm = lambda t: jnp.linalg.norm(t, axis=-1)
    np.testing.assert_allclose(norm(y[..., :24]), attention_factor * norm(x[..., :24]), rtol=2e-5)
    np.testing.assert_array_equal(y[..., 24:], x[..., 24:])


def test_rope_position_zero_is_identity_and_bf16_stays_bf16():
    inv_freq, _ = rope_frequencies(8)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 2, 8), jnp.bfloat16)
    y = apply_rope(x, jnp.zeros((2, 5), jnp.int32), inv_freq)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, x)


def test_rope_broadcasts_positions_over_batch_and_batches_over_positions():
    inv_freq, _ = rope_frequencies(8)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 2, 8))
    shared = apply_rope(x, jnp.arange(5), inv_freq)
    per_row = apply_rope(x, jnp.broadcast_to(jnp.arange(5), (3, 5)), inv_freq)
    chex.assert_trees_all_close(shared, per_row, rtol=0, atol=0)
    chex.assert_shape(apply_rope(x[0], jnp.arange(10).reshape(2, 5), inv_freq), (2, 5, 2, 8))


@pytest.mark.parametrize("rotary_dim", [8, 16])
def test_layout_conversion_keeps_logits_and_round_trips_bit_exactly(rotary_dim):
    num_heads, head_dim, d_model, length = 3, 16, 20, 7
    kq, kk, kx = jax.random.split(jax.random.PRNGKey(1), 3)
    wq = jax.random.normal(kq, (d_model, num_heads * head_dim))
    wk = jax.random.normal(kk, (d_model, num_heads * head_dim))
    xs = jax.random.normal(kx, (length, d_model))
    inv_freq, _ = rope_frequencies(rotary_dim)
    positions = jnp.arange(length) * 37 + 5

    def logits(wq, wk, layout):
        q = (xs @ wq).reshape(length, num_heads, head_dim)
        k = (xs @ wk).reshape(length, num_heads, head_dim)
        q = apply_rope(q, positions, inv_freq, layout=layout)
        k = apply_rope(k, positions, inv_freq, layout=layout)
        return jnp.einsum("qhd,khd->hqk", q, k)

    convert = lambda w, s, t: permute_rope_weights(
        w, head_dim=head_dim, rotary_dim=rotary_dim, source=s, target=t
    )
    wq_i, wk_i = convert(wq, "half", "interleaved"), convert(wk, "half", "interleaved")
    chex.assert_trees_all_close(
        logits(wq, wk, "half"), logits(wq_i, wk_i, "interleaved"), rtol=1e-5, atol=1e-4
    )
    assert not np.allclose(logits(wq, wk, "half"), logits(wq, wk, "interleaved"), atol=1e-2)
    np.testing.assert_array_equal(convert(wq_i, "interleaved", "half"), wq)


def test_rope_permutation_small_case():
    # half [a0 a1 b0 b1 | p] -> interleaved [a0 b0 a1 b1 | p]
    np.testing.assert_array_equal(
        rope_permutation(5, 4, source="half", target="interleaved"), [0, 2, 1, 3, 4]
    )
    np.testing.assert_array_equal(rope_permutation(5, 4, source="half", target="half"), range(5))


def test_axial_rope_reduces_to_1d_rope_when_other_axis_is_constant():
    f_row, _ = rope_frequencies(8, base=100.0)
    f_col, _ = rope_frequencies(8, base=100.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (12, 2, 16))
    rows = jnp.repeat(jnp.arange(3), 4)
    coords = jnp.stack([rows, jnp.zeros_like(rows)], axis=-1)
    zeros = np.zeros_like(f_col)
    want = apply_rope(x, rows, np.concatenate([f_row, zeros]))
    chex.assert_trees_all_close(apply_axial_rope(x, coords, [f_row, f_col]), want, atol=1e-6)
    cols = jnp.tile(jnp.arange(4), 3)
    coords = jnp.stack([jnp.zeros_like(cols), cols], axis=-1)
    want = apply_rope(x, cols, np.concatenate([zeros, f_col]))
    chex.assert_trees_all_close(apply_axial_rope(x, coords, [f_row, f_col]), want, atol=1e-6)


def test_axial_rope_scores_depend_on_2d_offset_only():
    f, _ = rope_frequencies(8, base=100.0)
    q, k = _random_qk(jax.random.PRNGKey(3), (1, 1, 16))
    score = lambda a, b: _score(apply_axial_rope(q, [a], [f, f]), apply_axial_rope(k, [b], [f, f]))
    np.testing.assert_allclose(score([1, 2], [3, 5]), score([11, 42], [13, 45]), atol=1e-4)
    assert not np.allclose(score([1, 2], [3, 5]), score([1, 2], [5, 3]), atol=1e-3)


@given(n=st.integers(-60, 60), m=st.integers(-60, 60), shift=st.integers(-40, 40))
def test_xpos_pair_norms_and_relative_scores(n, m, shift):
    d = 16
    inv_freq, _ = rope_frequencies(d)
    q, k = _random_qk(jax.random.PRNGKey(4), (1, 2, d))
    qx = apply_xpos(q, [n], inv_freq, is_key=False, scale_base=8.0)
    kx = apply_xpos(k, [m], inv_freq, is_key=True, scale_base=8.0)
    # Pair norms scale by zeta^(n / scale_base) for queries, zeta^(-m / scale_base) for keys.
    zeta = (np.arange(0, d, 2) + 0.4 * d) / (1.4 * d)
    pair_norm = lambda t: np.hypot(t[..., : d // 2], t[..., d // 2 :])
    np.testing.assert_allclose(pair_norm(qx), pair_norm(q) * zeta ** (n / 8.0), rtol=1e-4)
    np.testing.assert_allclose(pair_norm(kx), pair_norm(k) * zeta ** (-m / 8.0), rtol=1e-4)
    # The score is a function of n - m alone.
    qs = apply_xpos(q, [n + shift], inv_freq, is_key=False, scale_base=8.0)
    ks = apply_xpos(k, [m + shift], inv_freq, is_key=True, scale_base=8.0)
    np.testing.assert_allclose(_score(qx, kx), _score(qs, ks), rtol=1e-3, atol=1e-3)


def test_xpos_scale_matches_paper_formula():
    positions = np.array([0, 1, 100, -7])
    zeta = (np.arange(0, 12, 2) + 0.4 * 12) / (1.4 * 12)
    want = zeta[None, :] ** (positions[:, None] / 512.0)
    np.testing.assert_allclose(xpos_scale(positions, 12), want, rtol=1e-6)


def test_xpos_decays_each_pair_with_distance():
    """Each pair's term of q_n . k_m is RoPE's times zeta_i^((n - m) / scale_base): a decay."""
    d = 32
    inv_freq, _ = rope_frequencies(d)
    q, k = _random_qk(jax.random.PRNGKey(5), (1, 1, d))

    def pair_terms(rot_q, rot_k):  # half layout: pair i is (i, i + d/2)
        prod = (rot_q * rot_k)[0, 0]
        return np.asarray(prod[: d // 2] + prod[d // 2 :], np.float64)

    dist = np.arange(0, 400, 40)
    ratios = []
    for n in dist:
        rope = pair_terms(apply_rope(q, [n], inv_freq), apply_rope(k, [0], inv_freq))
        xpos = pair_terms(
            apply_xpos(q, [n], inv_freq, is_key=False), apply_xpos(k, [0], inv_freq, is_key=True)
        )
        ratios.append(xpos / rope)
    ratios = np.array(ratios)  # [distance, pair]
    zeta = (np.arange(0, d, 2) + 0.4 * d) / (1.4 * d)
    np.testing.assert_allclose(ratios, zeta[None, :] ** (dist[:, None] / 512.0), rtol=1e-3)
    assert np.all(np.diff(ratios, axis=0) < 0)


# ---------------------------------------------------------------------------------------------
# Frequencies: identities that need no reference
# ---------------------------------------------------------------------------------------------


def test_frequency_identities():
    base, _ = rope_frequencies(64)
    assert base.dtype == np.float64 and base.shape == (32,)
    np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-15)
    lin, _ = rope_frequencies(64, scaling={"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(lin, base / 4, rtol=1e-15)
    dyn = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128}
    np.testing.assert_allclose(rope_frequencies(64, scaling=dyn, seq_len=100)[0], base, rtol=1e-15)
    np.testing.assert_allclose(rope_frequencies(64, scaling=dyn, seq_len=128)[0], base, rtol=1e-15)
    longer = rope_frequencies(64, scaling=dyn, seq_len=512)[0]
    assert longer[0] == base[0] and np.all(longer[1:] < base[1:])
    # Legacy key name `type` is accepted.
    np.testing.assert_array_equal(
        rope_frequencies(64, scaling={"type": "linear", "factor": 4.0})[0], lin
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rotary_dim=7), "rotary_dim"),
        (dict(rotary_dim=0), "rotary_dim"),
        (dict(rotary_dim=8, base=1.0), "base"),
        (dict(rotary_dim=8, scaling={"rope_type": "cubic"}), "rope_type"),
        (dict(rotary_dim=8, scaling={"factor": 2.0}), "rope_type"),
        (dict(rotary_dim=8, scaling={"rope_type": "linear"}), "factor"),
        (dict(rotary_dim=8, scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), "beta"),
        (dict(rotary_dim=8, scaling={"rope_type": "linear", "factor": -2.0}), "factor"),
        (dict(rotary_dim=8, scaling={"rope_type": "yarn", "factor": 2.0}), "original_max"),
        (
            dict(
                rotary_dim=8,
                scaling={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 3,
                    "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 16,
                    "factor": 2.0,
                },
            ),
            "short_factor",
        ),
        (
            dict(
                rotary_dim=8,
                scaling={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 4,
                    "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 16,
                },
            ),
            "attention_factor",
        ),
        (dict(rotary_dim=8, seq_len=0), "seq_len"),
        (
            dict(rotary_dim=8, scaling={"rope_type": "linear", "type": "yarn", "factor": 2.0}),
            "type",
        ),
    ],
)
def test_frequency_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rope_frequencies(**kwargs)


def test_apply_errors():
    inv_freq, _ = rope_frequencies(8)
    x = jnp.zeros((4, 2, 8))
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(jnp.zeros((4, 2, 6)), jnp.arange(4), inv_freq)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(x, jnp.arange(4), inv_freq, layout="neox")
    with pytest.raises(ValueError, match="length"):
        apply_rope(x, jnp.arange(5), inv_freq)
    with pytest.raises(ValueError, match=r"\[\.\.\., L, H, D\]"):
        apply_rope(jnp.zeros((4, 8)), jnp.arange(4), inv_freq)
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(jnp.zeros((3, 4, 2, 8)), jnp.zeros((2, 4), jnp.int32), inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(x, jnp.arange(4), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="positions"):
        rope_angles(jnp.array([True, False]), inv_freq)
    with pytest.raises(ValueError, match="A = len"):
        apply_axial_rope(x, jnp.zeros((4, 3), jnp.int32), [inv_freq[:1], inv_freq[:1]])
    with pytest.raises(ValueError, match="head_dim"):
        permute_rope_weights(jnp.zeros((3, 10)), head_dim=4, source="half", target="interleaved")
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_permutation(4, 6, source="half", target="interleaved")
    with pytest.raises(ValueError, match="rotary_dim"):
        xpos_scale(jnp.arange(3), 5)


class RotaryVariantsTest(chex.TestCase):
    """jit and eager agree; vmap over a batch axis equals the batched call."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("half", "interleaved")
    def test_apply_rope(self, layout):
        inv_freq, attention_factor = rope_frequencies(
            16, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
        )
        fn = self.variant(
            lambda x, p: apply_rope(
                x, p, inv_freq, layout=layout, attention_factor=attention_factor
            )
        )
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 2, 20))
        p = jnp.arange(12).reshape(2, 6) * 1000
        want = apply_rope(x, p, inv_freq, layout=layout, attention_factor=attention_factor)
        chex.assert_trees_all_close(fn(x, p), want, atol=1e-6)
        chex.assert_trees_all_close(jax.vmap(lambda a, b: fn(a, b))(x, p), want, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_xpos_and_axial(self):
        inv_freq, _ = rope_frequencies(8)
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 2, 8))
        p = jnp.arange(12).reshape(2, 6)
        xpos = self.variant(lambda x, p: apply_xpos(x, p, inv_freq, is_key=True))
        chex.assert_trees_all_close(xpos(x, p), apply_xpos(x, p, inv_freq, is_key=True), atol=1e-6)
        coords = jnp.stack([p, p + 1], axis=-1)
        axial = self.variant(lambda x, c: apply_axial_rope(x, c, [inv_freq[:2], inv_freq[:2]]))
        chex.assert_trees_all_close(
            jax.vmap(axial)(x, coords),
            apply_axial_rope(x, coords, [inv_freq[:2], inv_freq[:2]]),
            atol=1e-6,
        )


# ---------------------------------------------------------------------------------------------
# Regressions: exact angles for any float64 frequency, int32 range, length-dependent scalings
# ---------------------------------------------------------------------------------------------


def _decimal_angle_error(angles, positions, inv_freq):
    """Phase error of `angles` against p * w mod 2 pi in 450-digit decimal arithmetic (float64
    w taken exactly, so even w near 1e308 and p near 2^31 lose nothing), in rad. 2 pi comes
    from the Gauss-Legendre iteration, independent of the library's Machin series."""
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 450
        a, b = decimal.Decimal(1), 1 / decimal.Decimal(2).sqrt()
        t, p = decimal.Decimal("0.25"), decimal.Decimal(1)
        for _ in range(12):  # doubles the correct digits each time: far beyond 450
            a, b, t, p = (a + b) / 2, (a * b).sqrt(), t - p * ((a - b) / 2) ** 2, 2 * p
        two_pi = (a + b) ** 2 / (2 * t)
        worst = 0.0
        for i, pos in enumerate(np.asarray(positions).tolist()):
            for j, w in enumerate(np.asarray(inv_freq, np.float64).tolist()):
                diff = decimal.Decimal(float(angles[i][j])) - decimal.Decimal(
                    pos
                ) * decimal.Decimal(w)
                turns = (diff / two_pi).to_integral_value(decimal.ROUND_HALF_EVEN)
                worst = max(worst, abs(float(diff - turns * two_pi)))
    return worst


def test_angles_exact_for_large_frequencies():
    """w = 1000 rad/position lost 2e-4 rad at |p| = 2^31 when t = w / 2 pi was rounded to
    float64; the constants are now reduced exactly, for any finite float64 w."""
    inv_freq = np.array([1000.0, 12345.678, 1e6, 2 * np.pi * (1 + 2**-30), 1.7e308, 1e-300])
    rng = np.random.default_rng(0)
    positions = np.concatenate(
        [[INT32_MAX, -(2**31), 2**20, 2**20 - 1, 65537, 1, -1], rng.integers(-(2**31), 2**31, 25)]
    ).astype(np.int32)
    err = _decimal_angle_error(rope_angles(positions, inv_freq), positions, inv_freq)
    assert err < 3e-6, err


def test_angles_float_positions_with_large_frequencies():
    """Negative fractions and large w: the fraction is split exactly around the nearest integer."""
    inv_freq = np.array([1.0, 1000.0, 2.0**31])
    positions = np.array([-1e-7, 1e-7, -0.3, 0.3, -2.5, 1000.25, -65536.75], np.float32)
    # the float32 values are what the angles are of
    exact_positions = [float(p) for p in positions]
    got = rope_angles(positions, inv_freq)
    assert _decimal_angle_error(got, exact_positions, inv_freq) < 1e-4
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rope_angles(positions, np.array([2.0**33]))


@pytest.mark.parametrize(
    "positions",
    [
        np.array([0, 2**31 + 5], np.int64),  # wrapped silently by jnp.asarray without x64
        np.array([2**31 + 5], np.uint32),
        jnp.asarray(np.array([2**31 + 5], np.uint32)),
        [0, -(2**31) - 1],
    ],
)
def test_positions_outside_int32_raise(positions):
    inv_freq, _ = rope_frequencies(8)
    with pytest.raises(ValueError, match="int32"):
        rope_angles(positions, inv_freq)
    with pytest.raises(ValueError, match="int32"):
        apply_rope(jnp.ones((np.shape(positions)[0], 1, 8)), positions, inv_freq)
    # values inside the range are fine in any dtype
    np.testing.assert_allclose(
        rope_angles(np.array([7, 2**31 - 1], np.int64), inv_freq),
        rope_angles(np.array([7, 2**31 - 1], np.int32), inv_freq),
    )


def test_apply_rope_needs_floating_x_and_ntk_needs_rotary_dim_4():
    inv_freq, _ = rope_frequencies(4)
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        apply_rope(jnp.ones((1, 2, 1, 4), jnp.int32), jnp.arange(2), inv_freq)
    with pytest.raises(ValueError, match="x must have a floating dtype"):
        apply_xpos(jnp.ones((1, 2, 1, 4), jnp.int32), jnp.arange(2), inv_freq, is_key=True)
    dyn = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
    for scaling in ({"rope_type": "ntk", "factor": 2.0}, dyn):
        with pytest.raises(ValueError, match="rotary_dim must be >= 4"):
            rope_frequencies(2, scaling=scaling, seq_len=16)
        assert rope_frequencies(4, scaling=scaling, seq_len=16)[0].shape == (2,)


_D = 16
_DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8}
_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0] * (_D // 2),
    "long_factor": list(np.linspace(1.0, 8.0, _D // 2)),
    "original_max_position_embeddings": 8,
    "factor": 4.0,
}


@pytest.mark.parametrize("scaling", [_DYNAMIC, _LONGROPE, {"rope_type": "linear", "factor": 2}])
def test_cos_sin_at_length_equals_static_frequencies(scaling):
    """A traced per-row seq_len gives rope_frequencies(seq_len=...)'s rotation for each row."""
    positions = jnp.array([[0, 5, 100, 3000], [3, 4, 5, 6], [0, 1, 2, 3]])
    lengths = jnp.array([9, 8, 20_000])
    fn = jax.jit(lambda p, n: rotary.rope_cos_sin_at_length(p, n, _D, scaling=scaling))
    cos, sin = fn(positions, lengths)
    for row, n in enumerate(np.asarray(lengths).tolist()):
        inv_freq, factor = rope_frequencies(_D, scaling=scaling, seq_len=n)
        angle = np.asarray(positions[row], np.float64)[:, None] * inv_freq
        np.testing.assert_allclose(cos[row], factor * np.cos(angle), atol=2e-5)
        np.testing.assert_allclose(sin[row], factor * np.sin(angle), atol=2e-5)
    # and apply_rope_at_length rotates with them
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 2, _D))
    inv_freq, factor = rope_frequencies(_D, scaling=scaling, seq_len=9)
    want = apply_rope(x[0], positions[0], inv_freq, attention_factor=factor)
    got = rotary.apply_rope_at_length(x, positions, lengths, _D, scaling=scaling)
    np.testing.assert_allclose(got[0], want, atol=2e-5)


def test_dynamic_at_length_is_exact_within_the_original_length_and_close_past_it():
    positions = jnp.array([[2**20, 2**20 + 7, 123_457]])
    base, _ = rope_frequencies(_D)
    cos, _ = rotary.rope_cos_sin_at_length(positions, jnp.array([8]), _D, scaling=_DYNAMIC)
    np.testing.assert_array_equal(cos, rotary.rope_cos_sin(positions, base)[0])
    # Past it the frequencies come from float32 arithmetic on the device (as Hugging Face's).
    positions = jnp.array([[1000, 50_000, 123_457]])
    for length in (1000, 200_000):
        longer, _ = rope_frequencies(_D, scaling=_DYNAMIC, seq_len=length)
        got = rotary.rope_cos_sin_at_length(positions, jnp.array([length]), _D, scaling=_DYNAMIC)
        angle = np.asarray(positions, np.float64)[..., None] * longer
        np.testing.assert_allclose(got[0], np.cos(angle), atol=5e-3)
        np.testing.assert_allclose(got[1], np.sin(angle), atol=5e-3)


def test_xpos_anchor_keeps_far_positions_finite_and_scores_unchanged():
    """Scales measured from an anchor: only differences matter, so far positions stay finite."""
    d = 16
    inv_freq, _ = rope_frequencies(d)
    assert rotary.xpos_max_position(d) == 32_695  # 80 * 512 / ln(3.5)
    q, k = _random_qk(jax.random.PRNGKey(6), (1, 3, 2, d))
    near = jnp.array([[0, 1, 2]])

    def scores(positions, anchor):
        qx = apply_xpos(q, positions, inv_freq, is_key=False, anchor=anchor)
        kx = apply_xpos(k, positions, inv_freq, is_key=True, anchor=anchor)
        return jnp.einsum("bqhd,bkhd->bhqk", qx, kx)

    want = scores(near, None)
    for offset in (40_000, 1_000_000):
        far = near + offset
        got = scores(far, jnp.array([offset]))
        chex.assert_tree_all_finite(got)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="anchor"):
            apply_xpos(q, far, inv_freq, is_key=True)  # no anchor: past the finite range
    # under jit the values are not checked: the same call overflows (documented)
    jitted = jax.jit(lambda p: apply_xpos(k, p, inv_freq, is_key=True))(near + 40_000)
    assert not np.all(np.isfinite(np.asarray(jitted)))
    with pytest.raises(ValueError, match="anchor"):
        apply_xpos(q, near, inv_freq, is_key=True, anchor=jnp.array([0, 1]))
