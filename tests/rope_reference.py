"""Float64 NumPy references for RoPE frequencies and for applying RoPE.

Written from the papers and the public formulas, independently of `jpe.encodings.rotary`, so
that the tests compare two implementations rather than one implementation with itself.

Frequency tables follow Hugging Face transformers' `ROPE_INIT_FUNCTIONS`
(`src/transformers/modeling_rope_utils.py`), whose conventions decide the last bits:

- default (RoFormer, arXiv 2104.09864): theta_i = base^(-2i/d), i = 0 .. d/2-1.
- linear (PI, arXiv 2306.15595): theta_i / factor.
- ntk (bloc97): base' = base * factor^(d/(d-2)).
- dynamic (emozilla): L' = max(seq_len, L); base' = base * (factor*L'/L - (factor-1))^(d/(d-2)).
- yarn (arXiv 2309.00071): a ramp over the *pair index* between two correction indices (HF's
  form, not the paper's ramp in r = L/lambda), band edges floored/ceiled when `truncate`,
  clamped to `max(low, 0)` and `min(high, d - 1)` (d, not d/2), `+0.001` when the edges meet;
  attention factor `get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)` when both are set
  and non-zero, else `get_mscale(s) = 0.1 ln s + 1` (1 for s <= 1).
- longrope (arXiv 2402.13753): theta_i / ext_i with ext = long_factor when
  seq_len > original, else short_factor (also when seq_len is None); attention factor
  sqrt(1 + ln s / ln original) for s > 1, else 1.
- llama3 (Meta's `apply_scaling` for Llama 3.1): wavelength lambda = 2 pi / theta; keep theta
  when lambda < L/high, divide by factor when lambda > L/low, else blend with
  smooth = (L/lambda - low) / (high - low).

Application follows the two public layouts:

- half (GPT-NeoX / LLaMA): out = x * cos + rotate_half(x) * sin, cos/sin = cat(angles, angles).
- interleaved (GPT-J / RoFormer): pairs (2i, 2i+1), `rotate_every_two`, cos/sin repeated twice.

Only the first r = 2 * len(inv_freq) features rotate; the rest are copied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------
# Frequency tables
# --------------------------------------------------------------------------------------------


def pair_exponents(rotary_dim: int) -> np.ndarray:
    """2i/d for i = 0 .. d/2-1, the exponent of the base in theta_i = base^(-2i/d)."""
    return np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim


def default_rope(rotary_dim: int, base: float) -> tuple[np.ndarray, float]:
    """RoFormer frequencies: theta_i = base^(-2i/d)."""
    return np.power(float(base), -pair_exponents(rotary_dim)), 1.0


def linear_rope(rotary_dim: int, base: float, factor: float) -> tuple[np.ndarray, float]:
    """Position interpolation: m -> m / s, the same as theta -> theta / s."""
    theta, _ = default_rope(rotary_dim, base)
    return theta / float(factor), 1.0


def ntk_base(base: float, stretch: float, rotary_dim: int) -> float:
    """NTK-aware base change: b' = b * s^(d / (d - 2)), so the lowest frequency is divided by s."""
    return float(base) * float(stretch) ** (rotary_dim / (rotary_dim - 2))


def ntk_rope(rotary_dim: int, base: float, factor: float) -> tuple[np.ndarray, float]:
    """Static NTK-aware scaling."""
    return default_rope(rotary_dim, ntk_base(base, factor, rotary_dim))[0], 1.0


def dynamic_rope(
    rotary_dim: int, base: float, factor: float, original: int, seq_len: int | None
) -> tuple[np.ndarray, float]:
    """Dynamic NTK: the stretch grows with the current length and is 1 up to `original`."""
    length = original if seq_len is None else max(int(seq_len), int(original))
    stretch = factor * length / original - (factor - 1.0)
    return default_rope(rotary_dim, ntk_base(base, stretch, rotary_dim))[0], 1.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 * mscale * ln(s) + 1, and 1 when there is no stretch."""
    if scale <= 1.0:
        return 1.0
    return 1.0 + 0.1 * mscale * math.log(scale)


def yarn_correction_index(rotations: float, rotary_dim: int, base: float, context: int) -> float:
    """The (fractional) pair index i at which theta_i turns `rotations` times over `context`.

    Solves context * base^(-2i/d) = 2 pi * rotations for i.
    """
    return rotary_dim * math.log(context / (TWO_PI * rotations)) / (2.0 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, rotary_dim: int, base: float, context: int, truncate: bool
) -> tuple[float, float]:
    """Pair indices where the ramp starts (beta_fast) and ends (beta_slow), HF's clamps included."""
    start = yarn_correction_index(beta_fast, rotary_dim, base, context)
    stop = yarn_correction_index(beta_slow, rotary_dim, base, context)
    if truncate:
        start, stop = math.floor(start), math.ceil(stop)
    # HF clamps the upper edge to d - 1, not to d/2 - 1; the ramp then stops short of 1 when the
    # edge lies past the last pair. The lower edge is only raised to 0, the upper never raised.
    return max(start, 0), min(stop, rotary_dim - 1)


def yarn_linear_ramp(start: float, stop: float, n: int) -> np.ndarray:
    """0 up to `start`, 1 from `stop`, linear in between; `stop` nudged by 0.001 if they meet."""
    if start == stop:
        stop = stop + 0.001
    return np.clip((np.arange(n, dtype=np.float64) - start) / (stop - start), 0.0, 1.0)


def yarn_rope(
    rotary_dim: int,
    base: float,
    factor: float,
    original: int,
    *,
    attention_factor: float | None = None,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> tuple[np.ndarray, float]:
    """YaRN "NTK-by-parts" frequencies and its attention temperature."""
    # HF reads these with `or`, so 0 and None both mean the paper's defaults.
    beta_fast = beta_fast or 32.0
    beta_slow = beta_slow or 1.0
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(
                factor, mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    theta, _ = default_rope(rotary_dim, base)
    start, stop = yarn_correction_range(beta_fast, beta_slow, rotary_dim, base, original, truncate)
    # gamma = 1 - ramp is the share kept from extrapolation (the unscaled theta).
    ramp = yarn_linear_ramp(start, stop, rotary_dim // 2)
    return theta * ((1.0 - ramp) + ramp / factor), float(attention_factor)


def longrope_rope(
    rotary_dim: int,
    base: float,
    short_factor,
    long_factor,
    original: int,
    *,
    factor: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """LongRoPE: a per-pair rescale lambda_i, switching from short to long past `original`."""
    if attention_factor is None:
        if factor is None or factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1.0 + math.log(factor) / math.log(original))
    use_long = seq_len is not None and seq_len > original
    rescale = np.asarray(long_factor if use_long else short_factor, dtype=np.float64)
    theta, _ = default_rope(rotary_dim, base)
    return theta / rescale, float(attention_factor)


def llama3_rope(
    rotary_dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original: int,
) -> tuple[np.ndarray, float]:
    """Llama 3.1's wavelength-banded interpolation."""
    theta, _ = default_rope(rotary_dim, base)
    wavelength = TWO_PI / theta
    short_edge = original / high_freq_factor  # wavelengths below this keep theta
    long_edge = original / low_freq_factor  # wavelengths above this get theta / factor
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * theta / factor + smooth * theta
    out = np.select(
        [wavelength < short_edge, wavelength > long_edge], [theta, theta / factor], blended
    )
    return out, 1.0


_KNOWN = {
    "default": set(),
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "longrope": {
        "short_factor",
        "long_factor",
        "original_max_position_embeddings",
        "factor",
        "attention_factor",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def reference_rope_frequencies(
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping | None = None,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """Dispatches an HF-style `rope_scaling` mapping to the functions above.

    This is a reference, not a validator: it assumes a well-formed mapping.
    """
    cfg = dict(scaling or {})
    kind = cfg.pop("rope_type", None) or cfg.pop("type", "default")
    cfg.pop("type", None)
    assert set(cfg) <= _KNOWN[kind], f"reference does not know keys {set(cfg) - _KNOWN[kind]}"
    original = cfg.get("original_max_position_embeddings")
    if kind == "default":
        return default_rope(rotary_dim, base)
    if kind == "linear":
        return linear_rope(rotary_dim, base, cfg["factor"])
    if kind == "ntk":
        return ntk_rope(rotary_dim, base, cfg["factor"])
    if kind == "dynamic":
        return dynamic_rope(rotary_dim, base, cfg["factor"], original, seq_len)
    if kind == "yarn":
        factor = cfg.pop("factor")
        cfg.pop("original_max_position_embeddings")
        return yarn_rope(rotary_dim, base, factor, original, **cfg)
    if kind == "longrope":
        return longrope_rope(
            rotary_dim,
            base,
            cfg["short_factor"],
            cfg["long_factor"],
            original,
            factor=cfg.get("factor"),
            attention_factor=cfg.get("attention_factor"),
            seq_len=seq_len,
        )
    if kind == "llama3":
        return llama3_rope(
            rotary_dim,
            base,
            cfg["factor"],
            cfg["low_freq_factor"],
            cfg["high_freq_factor"],
            original,
        )
    raise AssertionError(f"reference has no rope_type {kind!r}")


# --------------------------------------------------------------------------------------------
# Applying the rotation
# --------------------------------------------------------------------------------------------


def rotate_half(x: np.ndarray) -> np.ndarray:
    """GPT-NeoX / LLaMA: (x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    first, second = np.split(x, 2, axis=-1)
    return np.concatenate([-second, first], axis=-1)


def rotate_every_two(x: np.ndarray) -> np.ndarray:
    """GPT-J: (x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i})."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return np.stack([-odd, even], axis=-1).reshape(x.shape)


def angles(positions, inv_freq) -> np.ndarray:
    """m * theta_i in float64, shaped [..., L, 1, r/2] to broadcast over heads."""
    pos = np.asarray(positions, dtype=np.float64)
    return pos[..., :, None, None] * np.asarray(inv_freq, dtype=np.float64)


def _split_rotary(x, inv_freq) -> tuple[np.ndarray, np.ndarray, int]:
    x = np.asarray(x, dtype=np.float64)
    r = 2 * len(inv_freq)
    assert r <= x.shape[-1], "rotary part wider than the head"
    return x[..., :r], x[..., r:], r


def apply_rope_half(x, positions, inv_freq, attention_factor: float = 1.0) -> np.ndarray:
    """x [..., L, H, D], positions [..., L] -> float64 [..., L, H, D], half-split pairs."""
    rot, rest, _ = _split_rotary(x, inv_freq)
    phase = angles(positions, inv_freq)
    phase = np.concatenate([phase, phase], axis=-1)
    cos, sin = attention_factor * np.cos(phase), attention_factor * np.sin(phase)
    return np.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)


def apply_rope_interleaved(x, positions, inv_freq, attention_factor: float = 1.0) -> np.ndarray:
    """x [..., L, H, D], positions [..., L] -> float64 [..., L, H, D], adjacent pairs."""
    rot, rest, _ = _split_rotary(x, inv_freq)
    phase = np.repeat(angles(positions, inv_freq), 2, axis=-1)
    cos, sin = attention_factor * np.cos(phase), attention_factor * np.sin(phase)
    return np.concatenate([rot * cos + rotate_every_two(rot) * sin, rest], axis=-1)


def apply_rope_complex(x, positions, inv_freq, attention_factor: float = 1.0) -> np.ndarray:
    """Interleaved RoPE as complex multiplication (Meta's LLaMA `view_as_complex` form).

    A third, differently written reference used to check the two above against each other.
    """
    rot, rest, _ = _split_rotary(x, inv_freq)
    z = rot[..., 0::2] + 1j * rot[..., 1::2]
    z = z * attention_factor * np.exp(1j * angles(positions, inv_freq))
    out = np.stack([z.real, z.imag], axis=-1).reshape(rot.shape)
    return np.concatenate([out, rest], axis=-1)


def half_to_interleaved_permutation(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Index array p with x_interleaved = x_half[..., p].

    Interleaved slot 2i holds half slot i, slot 2i+1 holds half slot i + r/2; the pass-through
    features keep their places.
    """
    half = rotary_dim // 2
    order = np.empty(rotary_dim, dtype=np.int64)
    order[0::2] = np.arange(half)
    order[1::2] = np.arange(half) + half
    return np.concatenate([order, np.arange(rotary_dim, head_dim)])
