"""`jpe.encodings.rotary` against independent float64 references (tests/rope_reference.py).

Frequencies must equal Hugging Face's `ROPE_INIT_FUNCTIONS` (REFERENCES.md, failure mode 12):
rtol 1e-6, the precision HF itself has in float32. Rotations must equal the GPT-NeoX
`rotate_half` and GPT-J `rotate_every_two` forms with the phase within 1e-3 rad of a float64
reference up to position 2**20 (failure mode 1), leave pass-through features bit for bit
(failure mode 15), and the two layouts must give the same logits once q and k are permuted
(failure mode 14).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rope_reference as ref
from hypothesis import given
from hypothesis import strategies as st

from jpe.encodings import rotary
from jpe.encodings.rotary import apply_rope, parse_rope_scaling, rope_frequencies

LAYOUT_REFERENCE = {"half": ref.apply_rope_half, "interleaved": ref.apply_rope_interleaved}

# Phi-3.5-mini shape (head_dim 96, 4k -> 128k): non-decreasing rescale factors, as LongRoPE's
# search produces (lambda_i in [1, 1.25 s]). Made up, but deterministic and all distinct.
PHI_SHORT = [round(1.0 + 0.02 * i, 6) for i in range(48)]
PHI_LONG = [float(v) for v in np.round(np.geomspace(1.0, 40.0, 48), 6)]
PHI = {
    "rope_type": "longrope",
    "short_factor": PHI_SHORT,
    "long_factor": PHI_LONG,
    "original_max_position_embeddings": 4096,
    "factor": 32.0,
}
DEEPSEEK_V3 = {
    "rope_type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
LLAMA_31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}
YARN_4X = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}

# (id, rotary_dim, base, scaling, seq_len)
FREQUENCY_CASES = [
    ("default", 128, 10000.0, None, None),
    ("default-explicit-500k", 64, 500000.0, {"rope_type": "default"}, None),
    ("linear-4", 128, 10000.0, {"rope_type": "linear", "factor": 4.0}, None),
    ("linear-legacy-type-key", 128, 10000.0, {"type": "linear", "factor": 4.0}, None),
    ("ntk-8", 128, 10000.0, {"rope_type": "ntk", "factor": 8.0}, None),
    ("ntk-partial-32", 32, 10000.0, {"rope_type": "ntk", "factor": 2.0}, None),
    ("dynamic-none", 128, 10000.0, DYNAMIC, None),
    ("dynamic-below", 128, 10000.0, DYNAMIC, 1000),
    ("dynamic-equal", 128, 10000.0, DYNAMIC, 2048),
    ("dynamic-above", 128, 10000.0, DYNAMIC, 8192),
    ("dynamic-just-above", 128, 10000.0, DYNAMIC, 2049),
    ("yarn-4", 128, 10000.0, YARN_4X, None),
    (
        "yarn-qwen2.5",
        128,
        1e6,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        None,
    ),
    ("yarn-deepseek-v3", 64, 10000.0, DEEPSEEK_V3, None),
    ("yarn-deepseek-mscale-0.707", 64, 10000.0, {**DEEPSEEK_V3, "mscale": 0.707}, None),
    # HF's `if mscale and mscale_all_dim`: with only one of them the default temperature is used.
    (
        "yarn-mscale-without-all-dim",
        64,
        10000.0,
        {k: v for k, v in DEEPSEEK_V3.items() if k != "mscale_all_dim"} | {"mscale": 0.707},
        None,
    ),
    ("yarn-no-truncate", 64, 10000.0, {**DEEPSEEK_V3, "truncate": False}, None),
    ("yarn-attention-factor", 128, 10000.0, {**YARN_4X, "attention_factor": 0.8}, None),
    ("yarn-betas", 128, 10000.0, {**YARN_4X, "beta_fast": 16.0, "beta_slow": 2.0}, None),
    # Upper edge ceil(32.15) = 33 lies past the last pair (31): HF clamps to d - 1 = 63, so the
    # ramp stops at (31 - 20) / 13 and never reaches 1.
    (
        "yarn-upper-edge-past-last-pair",
        64,
        10000.0,
        {**YARN_4X, "original_max_position_embeddings": 65536},
        None,
    ),
    # Lower edge floor(-1.57) = -2 is raised to 0.
    (
        "yarn-lower-edge-clamped",
        64,
        10000.0,
        {**YARN_4X, "original_max_position_embeddings": 128},
        None,
    ),
    # beta_fast == beta_slow and no truncation: the edges meet and HF adds 0.001 to the upper.
    (
        "yarn-edges-meet",
        64,
        10000.0,
        {**YARN_4X, "beta_fast": 4.0, "beta_slow": 4.0, "truncate": False},
        None,
    ),
    ("longrope-phi3.5-none", 96, 10000.0, PHI, None),
    ("longrope-phi3.5-4096", 96, 10000.0, PHI, 4096),
    ("longrope-phi3.5-4097", 96, 10000.0, PHI, 4097),
    ("longrope-phi3.5-131072", 96, 10000.0, PHI, 131072),
    ("longrope-attention-factor", 96, 10000.0, {**PHI, "attention_factor": 1.5}, 8192),
    (
        "longrope-attention-factor-only",
        96,
        10000.0,
        {k: v for k, v in PHI.items() if k != "factor"} | {"attention_factor": 1.25},
        8192,
    ),
    ("llama3.1", 128, 500000.0, LLAMA_31, None),
    ("llama3.1-partial-64", 64, 500000.0, LLAMA_31, None),
]


@pytest.mark.parametrize(
    ("rotary_dim", "base", "scaling", "seq_len"),
    [pytest.param(*case[1:], id=case[0]) for case in FREQUENCY_CASES],
)
def test_frequencies_match_hf_reference(rotary_dim, base, scaling, seq_len):
    inv_freq, attention_factor = rope_frequencies(
        rotary_dim, base=base, scaling=scaling, seq_len=seq_len
    )
    want_inv, want_factor = ref.reference_rope_frequencies(
        rotary_dim, base=base, scaling=scaling, seq_len=seq_len
    )
    assert isinstance(inv_freq, np.ndarray)
    assert inv_freq.dtype == np.float64
    assert inv_freq.shape == (rotary_dim // 2,)
    assert type(attention_factor) is float
    np.testing.assert_allclose(inv_freq, want_inv, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(want_factor, rel=1e-9)


@pytest.mark.parametrize(
    ("scaling", "seq_len", "want"),
    [
        (None, None, 1.0),
        ({"rope_type": "linear", "factor": 4.0}, None, 1.0),
        ({"rope_type": "ntk", "factor": 4.0}, None, 1.0),
        (DYNAMIC, 8192, 1.0),
        (LLAMA_31, None, 1.0),
        (YARN_4X, None, 1.0 + 0.1 * math.log(4.0)),
        (DEEPSEEK_V3, None, 1.0),
        ({**DEEPSEEK_V3, "mscale": 0.707}, None, 0.9210423553163399),
        ({**YARN_4X, "factor": 1.0}, None, 1.0),
        (PHI, None, math.sqrt(17.0 / 12.0)),  # 1 + ln 32 / ln 4096 = 1 + 5/12
        (PHI, 4097, math.sqrt(17.0 / 12.0)),
        ({**PHI, "factor": 1.0}, None, 1.0),
    ],
    ids=[
        "default",
        "linear",
        "ntk",
        "dynamic",
        "llama3",
        "yarn-0.1ln4+1",
        "deepseek-ratio-1",
        "deepseek-0.707",
        "yarn-factor-1",
        "longrope-sqrt(17/12)",
        "longrope-long",
        "longrope-factor-1",
    ],
)
def test_attention_factor_closed_forms(scaling, seq_len, want):
    rotary_dim = 96 if scaling is not None and scaling.get("rope_type") == "longrope" else 64
    _, attention_factor = rope_frequencies(rotary_dim, scaling=scaling, seq_len=seq_len)
    assert attention_factor == pytest.approx(want, rel=1e-12)


def test_longrope_switches_factor_lists_after_original_length():
    theta, _ = ref.default_rope(96, 10000.0)
    short, _ = rope_frequencies(96, scaling=PHI, seq_len=4096)
    long, _ = rope_frequencies(96, scaling=PHI, seq_len=4097)
    unset, _ = rope_frequencies(96, scaling=PHI)
    np.testing.assert_allclose(short, theta / np.array(PHI_SHORT), rtol=1e-12)
    np.testing.assert_allclose(long, theta / np.array(PHI_LONG), rtol=1e-12)
    np.testing.assert_array_equal(unset, short)


@given(
    rotary_dim=st.sampled_from([16, 32, 64, 96, 128]),
    log_base=st.floats(math.log(500.0), math.log(1e7)),
    factor=st.floats(1.0, 64.0),
    original=st.sampled_from([256, 2048, 4096, 8192, 32768]),
    beta_fast=st.floats(8.0, 64.0),
    beta_slow=st.floats(0.25, 4.0),
    truncate=st.booleans(),
)
def test_yarn_matches_reference_over_parameters(
    rotary_dim, log_base, factor, original, beta_fast, beta_slow, truncate
):
    scaling = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "truncate": truncate,
    }
    base = math.exp(log_base)
    got, got_factor = rope_frequencies(rotary_dim, base=base, scaling=scaling)
    want, want_factor = ref.reference_rope_frequencies(rotary_dim, base=base, scaling=scaling)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-9)


@given(
    rotary_dim=st.sampled_from([16, 64, 128]),
    factor=st.floats(1.0, 32.0),
    low=st.floats(0.5, 2.0),
    gap=st.floats(0.5, 8.0),
    original=st.sampled_from([2048, 8192, 16384]),
    seq_len=st.one_of(st.none(), st.integers(1, 200_000)),
)
def test_llama3_and_dynamic_match_reference_over_parameters(
    rotary_dim, factor, low, gap, original, seq_len
):
    llama3 = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": low + gap,
        "original_max_position_embeddings": original,
    }
    dynamic = {**DYNAMIC, "factor": factor, "original_max_position_embeddings": original}
    for scaling, base in ((llama3, 500000.0), (dynamic, 10000.0)):
        got, _ = rope_frequencies(rotary_dim, base=base, scaling=scaling, seq_len=seq_len)
        want, _ = ref.reference_rope_frequencies(
            rotary_dim, base=base, scaling=scaling, seq_len=seq_len
        )
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=str(scaling))


# --------------------------------------------------------------------------------------------
# Self-checks of the reference: reductions that must hold whoever wrote it.
# --------------------------------------------------------------------------------------------


class TestReferenceSelfChecks:
    def test_default_is_roformer(self):
        theta, factor = ref.default_rope(8, 10000.0)
        np.testing.assert_allclose(theta, [1.0, 0.1, 0.01, 0.001], rtol=1e-15)
        assert factor == 1.0

    def test_linear_is_default_over_factor(self):
        np.testing.assert_allclose(
            ref.linear_rope(128, 1e4, 4.0)[0], ref.default_rope(128, 1e4)[0] / 4.0, rtol=1e-15
        )

    def test_ntk_divides_lowest_frequency_by_factor(self):
        # b' = b s^(d/(d-2)) makes theta_{d/2-1} = b'^(-(d-2)/d) exactly b^(-(d-2)/d) / s.
        theta, _ = ref.default_rope(64, 1e4)
        scaled, _ = ref.ntk_rope(64, 1e4, 8.0)
        assert scaled[0] == theta[0] == 1.0
        assert scaled[-1] == pytest.approx(theta[-1] / 8.0, rel=1e-12)

    @pytest.mark.parametrize("seq_len", [None, 1, 2047, 2048])
    def test_dynamic_at_or_below_original_is_default(self, seq_len):
        got, _ = ref.dynamic_rope(128, 1e4, 2.0, 2048, seq_len)
        np.testing.assert_allclose(got, ref.default_rope(128, 1e4)[0], rtol=1e-15)

    def test_dynamic_above_original_is_ntk_with_grown_factor(self):
        # At L' = 2 L with factor 2: stretch = 2*2 - 1 = 3.
        got, _ = ref.dynamic_rope(128, 1e4, 2.0, 2048, 4096)
        np.testing.assert_allclose(got, ref.ntk_rope(128, 1e4, 3.0)[0], rtol=1e-15)

    def test_yarn_factor_one_is_default(self):
        got, factor = ref.yarn_rope(128, 1e4, 1.0, 4096)
        np.testing.assert_allclose(got, ref.default_rope(128, 1e4)[0], rtol=1e-15)
        assert factor == 1.0

    def test_yarn_band_ends(self):
        # Pairs below the band keep theta, pairs above it get theta / s, in between a blend.
        theta, _ = ref.default_rope(128, 1e4)
        got, _ = ref.yarn_rope(128, 1e4, 4.0, 4096)
        start, stop = ref.yarn_correction_range(32, 1, 128, 1e4, 4096, True)
        assert (start, stop) == (20, 46)
        np.testing.assert_allclose(got[: start + 1], theta[: start + 1], rtol=1e-15)
        np.testing.assert_allclose(got[stop:], theta[stop:] / 4.0, rtol=1e-15)
        middle = got[start + 1 : stop] / theta[start + 1 : stop]
        assert np.all(np.diff(middle) < 0) and np.all((middle > 0.25) & (middle < 1.0))

    def test_yarn_correction_index_counts_rotations(self):
        # At the returned index, theta turns exactly `rotations` times over the context.
        i = ref.yarn_correction_index(3.0, 64, 1e4, 4096)
        assert 4096 * 1e4 ** (-2 * i / 64) / (2 * math.pi) == pytest.approx(3.0, rel=1e-12)

    def test_yarn_ramp_guard(self):
        np.testing.assert_array_equal(ref.yarn_linear_ramp(2.5, 2.5, 5), [0, 0, 0, 1, 1])
        np.testing.assert_allclose(ref.yarn_linear_ramp(1, 3, 5), [0, 0, 0.5, 1, 1])

    def test_yarn_mscale(self):
        assert ref.yarn_get_mscale(1.0, 0.5) == 1.0
        assert ref.yarn_get_mscale(math.e, 0.5) == pytest.approx(1.05)

    def test_llama3_factor_one_is_default(self):
        got, _ = ref.llama3_rope(128, 5e5, 1.0, 1.0, 4.0, 8192)
        np.testing.assert_allclose(got, ref.default_rope(128, 5e5)[0], rtol=1e-15)

    def test_llama3_bands(self):
        theta, _ = ref.default_rope(128, 5e5)
        got, _ = ref.llama3_rope(128, 5e5, 8.0, 1.0, 4.0, 8192)
        wavelength = 2 * math.pi / theta
        high, low = wavelength < 2048, wavelength > 8192
        assert high.sum() > 0 and low.sum() > 0 and (~high & ~low).sum() > 0
        np.testing.assert_array_equal(got[high], theta[high])
        np.testing.assert_allclose(got[low], theta[low] / 8.0, rtol=1e-15)
        ratio = got[~high & ~low] / theta[~high & ~low]
        assert np.all((ratio > 1 / 8) & (ratio < 1))

    def test_llama3_is_continuous_at_band_edges(self):
        # smooth = 1 at lambda = L/high and 0 at lambda = L/low, so the blend meets both sides.
        for wavelength, want in ((8192 / 4.0, 1.0), (8192 / 1.0, 1.0 / 8.0)):
            theta = 2 * math.pi / wavelength
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            blended = (1 - smooth) * theta / 8.0 + smooth * theta
            assert blended == pytest.approx(want * theta, rel=1e-12)

    def test_longrope_unit_factors_are_default(self):
        ones = [1.0] * 48
        got, factor = ref.longrope_rope(96, 1e4, ones, ones, 4096, factor=32.0, seq_len=5000)
        np.testing.assert_allclose(got, ref.default_rope(96, 1e4)[0], rtol=1e-15)
        assert factor == pytest.approx(math.sqrt(17 / 12))

    def test_references_for_application_agree(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 5, 3, 20))
        pos = rng.integers(0, 10_000, size=(2, 5))
        inv, _ = ref.default_rope(16, 1e4)
        p = ref.half_to_interleaved_permutation(20, 16)
        inverse = np.argsort(p)
        interleaved = ref.apply_rope_interleaved(x[..., p], pos, inv, 1.3)
        np.testing.assert_allclose(
            interleaved, ref.apply_rope_complex(x[..., p], pos, inv, 1.3), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            interleaved[..., inverse], ref.apply_rope_half(x, pos, inv, 1.3), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_array_equal(ref.apply_rope_half(x, pos, inv)[..., 16:], x[..., 16:])

    def test_half_reference_rotates_one_pair(self):
        # Feature 0 pairs with feature r/2 = 2 and turns by m * theta_0 = m radians.
        x = np.zeros((1, 1, 6))
        x[..., 0] = 1.0
        out = ref.apply_rope_half(x, np.array([2]), np.array([1.0, 0.5]))
        np.testing.assert_allclose(out[0, 0], [math.cos(2), 0, math.sin(2), 0, 0, 0], atol=1e-15)

    def test_interleaved_reference_rotates_one_pair(self):
        x = np.zeros((1, 1, 4))
        x[..., 2] = 1.0
        out = ref.apply_rope_interleaved(x, np.array([3]), np.array([1.0, 0.5]))
        np.testing.assert_allclose(out[0, 0], [0, 0, math.cos(1.5), math.sin(1.5)], atol=1e-15)


# --------------------------------------------------------------------------------------------
# apply_rope
# --------------------------------------------------------------------------------------------

PHASE_BOUND = 1e-3  # rad, REFERENCES.md failure mode 1
BF16_STEP = 2.0**-8  # bf16 spacing relative to the value


def _pair_view(y, r, layout):
    """[..., D] -> [..., r/2, 2]: the rotated pairs of the first r features."""
    y = y[..., :r]
    if layout == "half":
        return np.stack([y[..., : r // 2], y[..., r // 2 :]], axis=-1)
    return y.reshape(*y.shape[:-1], r // 2, 2)


def _assert_rotation_close(got, want, x, r, layout, *, attention_factor=1.0, slack=0.0):
    """Each rotated pair within (PHASE_BOUND + slack) * |x pair| * attention_factor of `want`.

    A phase error delta moves a pair by 2 sin(delta/2) |pair| <= delta |pair|.
    """
    got_pairs = _pair_view(np.asarray(got, dtype=np.float64), r, layout)
    want_pairs = _pair_view(want, r, layout)
    norm = np.linalg.norm(_pair_view(x, r, layout), axis=-1) * attention_factor
    err = np.linalg.norm(got_pairs - want_pairs, axis=-1)
    bound = (PHASE_BOUND + slack) * norm + 1e-30
    # Phase error for the message (where the pair is not tiny).
    g = got_pairs[..., 0] + 1j * got_pairs[..., 1]
    w = want_pairs[..., 0] + 1j * want_pairs[..., 1]
    big = norm > 1e-3
    phase = np.abs(np.angle(g[big] / w[big])).max() if big.any() else 0.0
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"pair error up to {float((err / norm.clip(1e-30)).max()):.3g} x |pair| "
        f"(bound {PHASE_BOUND + slack:.3g}); max phase error {phase:.3g} rad; worst at {worst}"
    )


def _to_f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), dtype=np.float64)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240607)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(64, 64), (48, 64), (32, 80)])
def test_apply_rope_matches_reference(layout, rotary_dim, head_dim, rng):
    x = rng.normal(size=(2, 9, 3, head_dim)).astype(np.float32)
    pos = rng.integers(0, 8192, size=(2, 9)).astype(np.int32)
    inv_freq, _ = rope_frequencies(rotary_dim, base=10000.0)
    out = apply_rope(jnp.asarray(x), jnp.asarray(pos), inv_freq, layout=layout)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    want = LAYOUT_REFERENCE[layout](x, pos, inv_freq)
    _assert_rotation_close(out, want, x, rotary_dim, layout)
    # Pass-through features are copied, not recomputed.
    np.testing.assert_array_equal(np.asarray(out)[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_apply_rope_phase_at_large_positions(layout, base, rng):
    # REFERENCES.md failure mode 1: positions {0, 2049, 65537, 131071, max_ctx}, up to 2**20.
    positions = np.array([0, 1, 2049, 65537, 131071, 2**20 - 1, 2**20], dtype=np.int32)
    x = rng.normal(size=(1, len(positions), 2, 128)).astype(np.float32)
    inv_freq, _ = rope_frequencies(128, base=base)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions[None]), inv_freq, layout=layout)
    want = LAYOUT_REFERENCE[layout](x, positions[None], inv_freq)
    _assert_rotation_close(out, want, x, 128, layout)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_apply_rope_bf16(layout, rng):
    # bf16 in, bf16 out; the angle table must not be computed in bf16 (2049 is not even a bf16
    # number), so large positions still land within one bf16 step or so of the float64 answer.
    positions = np.array([[0, 7, 2049, 65537, 131071, 2**20]], dtype=np.int32)
    x = jnp.asarray(rng.normal(size=(1, 6, 2, 96)), dtype=jnp.bfloat16)
    inv_freq, _ = rope_frequencies(64, base=500000.0)
    out = apply_rope(x, jnp.asarray(positions), inv_freq, layout=layout)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    x64 = _to_f64(x)
    want = LAYOUT_REFERENCE[layout](x64, positions, inv_freq)
    _assert_rotation_close(_to_f64(out), want, x64, 64, layout, slack=4 * BF16_STEP)
    np.testing.assert_array_equal(np.asarray(out[..., 64:]), np.asarray(x[..., 64:]))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_rope_attention_factor(layout, dtype, rng):
    # Only cos and sin are scaled: the rotated part grows by the factor, pass-through does not.
    scaling = {**YARN_4X, "attention_factor": 1.7}
    inv_freq, attention_factor = rope_frequencies(48, scaling=scaling)
    assert attention_factor == 1.7
    x = jnp.asarray(rng.normal(size=(2, 5, 2, 64)), dtype=dtype)
    pos = jnp.asarray(rng.integers(0, 50_000, size=(2, 5)), dtype=jnp.int32)
    out = apply_rope(x, pos, inv_freq, layout=layout, attention_factor=attention_factor)
    assert out.dtype == dtype
    x64 = _to_f64(x)
    want = LAYOUT_REFERENCE[layout](x64, np.asarray(pos), inv_freq, attention_factor)
    slack = 4 * BF16_STEP if dtype == jnp.bfloat16 else 0.0
    _assert_rotation_close(
        _to_f64(out), want, x64, 48, layout, attention_factor=attention_factor, slack=slack
    )
    np.testing.assert_array_equal(np.asarray(out[..., 48:]), np.asarray(x[..., 48:]))
    if dtype == jnp.float32:
        plain = apply_rope(x, pos, inv_freq, layout=layout)
        np.testing.assert_allclose(
            np.asarray(out[..., :48]), 1.7 * np.asarray(plain[..., :48]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("rotary_dim", [64, 40])
def test_layouts_give_same_logits_after_permutation(rotary_dim, rng):
    # REFERENCES.md failure mode 14. Interleaved slot 2i <-> half slot i, 2i+1 <-> i + r/2.
    head_dim = 64
    perm = ref.half_to_interleaved_permutation(head_dim, rotary_dim)
    assert sorted(perm) == list(range(head_dim))
    q = rng.normal(size=(2, 12, 4, head_dim)).astype(np.float32)
    k = rng.normal(size=(2, 12, 4, head_dim)).astype(np.float32)
    pos = jnp.asarray(rng.integers(0, 100_000, size=(2, 12)), dtype=jnp.int32)
    inv_freq, factor = rope_frequencies(rotary_dim, base=500000.0, scaling=LLAMA_31)

    def rope(a, layout):
        return np.asarray(apply_rope(jnp.asarray(a), pos, inv_freq, layout=layout), np.float64)

    q_half, k_half = rope(q, "half"), rope(k, "half")
    q_int, k_int = rope(q[..., perm], "interleaved"), rope(k[..., perm], "interleaved")
    np.testing.assert_allclose(q_int, q_half[..., perm], rtol=1e-5, atol=1e-5)
    logits_half = np.einsum("bqhd,bkhd->bhqk", q_half, k_half)
    logits_int = np.einsum("bqhd,bkhd->bhqk", q_int, k_int)
    np.testing.assert_allclose(logits_int, logits_half, rtol=1e-5, atol=1e-4)
    # And the permutation undoes itself bit for bit.
    np.testing.assert_array_equal(q[..., perm][..., np.argsort(perm)], q)
    assert factor == 1.0


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rotary_dim", "scaling", "match"),
    [
        (64, {"rope_type": "foo"}, "rope_type"),
        (64, {"type": "foo", "factor": 2.0}, "type|rope_type"),
        (64, {"rope_type": "linear"}, "factor"),
        (64, {"rope_type": "ntk"}, "factor"),
        (64, {"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings"),
        (64, {"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
        (64, {k: v for k, v in LLAMA_31.items() if k != "low_freq_factor"}, "low_freq_factor"),
        (96, {k: v for k, v in PHI.items() if k != "long_factor"}, "long_factor"),
        (
            96,
            {k: v for k, v in PHI.items() if k != "original_max_position_embeddings"},
            "original_max_position_embeddings",
        ),
        (64, {"rope_type": "linear", "factor": 2.0, "bogus_key": 1}, "bogus_key"),
        (64, {**DEEPSEEK_V3, "low_freq_factor": 1.0}, "low_freq_factor"),
        (64, {"rope_type": "default", "factor": 2.0}, "factor"),
    ],
    ids=[
        "unknown-rope-type",
        "unknown-legacy-type",
        "linear-missing-factor",
        "ntk-missing-factor",
        "dynamic-missing-original",
        "yarn-missing-original",
        "llama3-missing-low",
        "longrope-missing-long",
        "longrope-missing-original",
        "unknown-key",
        "yarn-with-llama3-key",
        "default-with-factor",
    ],
)
def test_rope_frequencies_rejects_bad_scaling(rotary_dim, scaling, match):
    with pytest.raises(ValueError, match=match):
        rope_frequencies(rotary_dim, scaling=scaling, seq_len=8192)
    # None of these needs rotary_dim to be found: parsing alone, at config time, rejects them.
    with pytest.raises(ValueError, match=match):
        parse_rope_scaling(scaling)


@pytest.mark.parametrize(
    ("scaling", "key"),
    [
        ({"rope_type": "linear", "factor": -1.0}, "factor"),
        ({"rope_type": "linear", "factor": "2"}, "factor"),
        (
            {**YARN_4X, "original_max_position_embeddings": 4096.5},
            "original_max_position_embeddings",
        ),
        ({**YARN_4X, "beta_fast": -32.0}, "beta_fast"),
        ({**YARN_4X, "truncate": None}, "truncate"),
        ({**YARN_4X, "mscale": "big"}, "mscale"),
        ({**YARN_4X, "attention_factor": 0.0}, "attention_factor"),
        ({**PHI, "long_factor": [1.0, -2.0]}, "long_factor"),
        ({**PHI, "short_factor": "short"}, "short_factor"),
        ({**LLAMA_31, "high_freq_factor": 0.5}, "high_freq_factor"),
    ],
    ids=[
        "negative-factor",
        "string-factor",
        "fractional-original",
        "negative-beta",
        "truncate-none",
        "string-mscale",
        "zero-attention-factor",
        "negative-long-factor",
        "string-short-factor",
        "llama3-bands-crossed",
    ],
)
def test_parse_rope_scaling_names_the_bad_value(scaling, key):
    with pytest.raises(ValueError, match=rf"scaling\['{key}'\]"):
        parse_rope_scaling(scaling)


@pytest.mark.parametrize("seq_len", [None, 4096, 8192])
@pytest.mark.parametrize("key", ["short_factor", "long_factor"])
def test_longrope_rejects_wrong_length_lists_whichever_is_in_use(key, seq_len):
    # A bad list is a config error whether or not the current length selects it; found only
    # once a sequence crosses the original length, it would surface mid-generation.
    with pytest.raises(ValueError, match=key):
        rope_frequencies(96, scaling={**PHI, key: PHI[key][:-1]}, seq_len=seq_len)


@pytest.mark.parametrize("rotary_dim", [63, 1, 0, -2])
def test_rope_frequencies_rejects_bad_rotary_dim(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_frequencies(rotary_dim)


def test_apply_rope_rejects_rotary_dim_wider_than_head():
    inv_freq, _ = rope_frequencies(80)
    x = jnp.zeros((1, 4, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="inv_freq|rotary"):
        apply_rope(x, jnp.arange(4, dtype=jnp.int32)[None], inv_freq)


def test_apply_rope_rejects_unknown_layout():
    inv_freq, _ = rope_frequencies(64)
    x = jnp.zeros((1, 4, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(x, jnp.arange(4, dtype=jnp.int32)[None], inv_freq, layout="neox")


def test_apply_rope_accepts_fractional_positions_as_documented():
    # Fractional positions (interpolated, or CoPE-style) are allowed: they rotate by p * theta.
    inv_freq, _ = rope_frequencies(64)
    x = np.ones((1, 2, 1, 64), np.float32)
    got = apply_rope(x, jnp.array([[0.5, 2.25]], jnp.float32), inv_freq)
    want = ref.apply_rope_half(x, np.array([[0.5, 2.25]]), inv_freq)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_apply_rope_under_jit(rng):
    # The phase bound must survive XLA's fusion too, not only op-by-op execution.
    x = rng.normal(size=(1, 6, 2, 64)).astype(np.float32)
    pos = np.array([[0, 5, 9, 2049, 65537, 2**20]], dtype=np.int32)
    inv_freq, _ = rope_frequencies(64, base=10000.0)
    jitted = jax.jit(lambda a, p: apply_rope(a, p, inv_freq, layout="interleaved"))
    out = jitted(jnp.asarray(x), jnp.asarray(pos))
    want = ref.apply_rope_interleaved(x, pos, inv_freq)
    _assert_rotation_close(out, want, x, 64, "interleaved")


# --------------------------------------------------------------------------------------------
# Parsing once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rotary_dim", "base", "scaling", "seq_len"),
    [pytest.param(*case[1:], id=case[0]) for case in FREQUENCY_CASES],
)
def test_parsed_scaling_gives_the_mapping_frequencies(rotary_dim, base, scaling, seq_len):
    want_freq, want_factor = rope_frequencies(
        rotary_dim, base=base, scaling=scaling, seq_len=seq_len
    )
    parsed = parse_rope_scaling(scaling)
    got_freq, got_factor = rope_frequencies(rotary_dim, base=base, scaling=parsed, seq_len=seq_len)
    np.testing.assert_array_equal(got_freq, want_freq)
    assert got_factor == want_factor == parsed.attention_factor


def test_parsed_scaling_is_immutable_hashable_and_idempotent():
    parsed = parse_rope_scaling(PHI)
    assert parse_rope_scaling(parsed) is parsed
    again = parse_rope_scaling(dict(PHI))
    assert parsed == again and hash(parsed) == hash(again)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.rope_type = "linear"
    assert parsed["long_factor"] == tuple(PHI_LONG)
    assert parse_rope_scaling(None) == parse_rope_scaling({"rope_type": "default"})
    # A key given as None is not given, as in Hugging Face's configs.
    with_nones = {**YARN_4X, "beta_fast": None, "attention_factor": None, "mscale": None}
    assert parse_rope_scaling(with_nones) == parse_rope_scaling(YARN_4X)


class _CountingMapping(Mapping):
    """A mapping that counts how often it is read through."""

    def __init__(self, items):
        self._items, self.reads = dict(items), 0

    def __iter__(self):
        self.reads += 1
        return iter(self._items)

    def __getitem__(self, key):
        return self._items[key]

    def __len__(self):
        return len(self._items)


_SMALL_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0] * 4,
    "long_factor": [1.0, 2.0, 4.0, 8.0],
    "original_max_position_embeddings": 8,
    "factor": 4.0,
}
_SMALL_DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("scaling", [_SMALL_DYNAMIC, _SMALL_LONGROPE, YARN_4X])
def test_cos_sin_at_length_parses_the_scaling_once(scaling):
    positions = jnp.array([[0, 3, 7, 100], [1, 2, 3, 4]])
    lengths = jnp.array([5, 20_000])
    counting = _CountingMapping(scaling)
    got = rotary.rope_cos_sin_at_length(positions, lengths, 8, scaling=counting)
    assert counting.reads == 1
    # and a parsed scaling, which a jitted caller can hold as a static argument, agrees
    fn = jax.jit(
        lambda p, n, s: rotary.rope_cos_sin_at_length(p, n, 8, scaling=s), static_argnums=2
    )
    want = fn(positions, lengths, parse_rope_scaling(scaling))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
