"""RoPE frequencies and the context-extension scalings in Hugging Face's `rope_scaling` form.

`rope_frequencies` gives RoFormer's inverse frequencies, rescaled by one of the scalings that
stretch a pretrained context (linear, ntk, dynamic, yarn, longrope, llama3). A scaling is a
mapping with a `rope_type` and Hugging Face's key names; `parse_rope_scaling` checks it once
and returns an immutable `ParsedScaling`, which `rope_frequencies` and the rotary functions also
accept, so a caller that builds many rotations parses once.

Each scaling is one entry of the table `_SCALINGS`: its required and optional keys, its
frequencies and its attention factor. Every key is checked in one place (`_KEY_CHECKS`),
whichever scalings read it. Everything here runs on the host in float64: the frequencies are
static constants, from which `apply_rope` computes exact angles.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jpe.encodings import _checks

__all__ = ["ROPE_TYPES", "ParsedScaling", "parse_rope_scaling", "rope_frequencies"]


@dataclasses.dataclass(frozen=True)
class ParsedScaling:
    """A checked `rope_scaling` mapping: immutable and hashable (a static argument under jit).

    Made by `parse_rope_scaling`, never by hand: the fields are trusted as checked.

    Attributes:
      rope_type: one of `ROPE_TYPES` ("default" for plain RoPE).
      params: the given keys (other than `rope_type`) with their checked values, sorted by key:
        floats, ints, bools, and tuples of floats for LongRoPE's factor lists. A key given as
        None is left out, so its default applies.
      attention_factor: the factor by which cos and sin are scaled (YaRN's and LongRoPE's
        temperature; 1.0 for the others), computed once from `params`.
    """

    rope_type: str
    params: tuple[tuple[str, Any], ...] = ()
    attention_factor: float = 1.0

    def get(self, key: str, default: Any = None) -> Any:
        """The checked value of `key`, or `default` when it was not given."""
        return dict(self.params).get(key, default)

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]


# --------------------------------------------------------------------------------------------
# Checking the keys: each key's rule written once, whichever scalings read it
# --------------------------------------------------------------------------------------------

# A check takes the key's display name and its value, and returns the checked value, or None
# for "not given: use the default".
Check = Callable[[str, Any], Any]


def _given(check: Check) -> Check:
    """`check`, with None meaning "not given" (Hugging Face writes unset fields as None)."""
    return lambda name, value: None if value is None else check(name, value)


def _positive_or_default(name: str, value) -> float | None:
    # YaRN's betas are read as Hugging Face's `value or default`: 0 means the default too.
    if value is None or (isinstance(value, numbers.Real) and value == 0):
        return None
    return _checks.positive_float(name, value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _bool(name: str, value) -> bool:
    # Not `_given`: Hugging Face's `if truncate:` reads None as False, but its default is True.
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _factor_list(name: str, value) -> tuple[float, ...]:
    # The length (rotary_dim // 2) is checked where rotary_dim is known, in `_longrope_inv_freq`.
    try:
        ext = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        ext = None
    if ext is None or ext.ndim != 1 or not np.all(np.isfinite(ext) & (ext > 0)):
        raise ValueError(
            f"{name} must be a list of positive numbers, one per pair, got {reprlib.repr(value)}"
        )
    return tuple(float(e) for e in ext)


_KEY_CHECKS: dict[str, Check] = {
    "factor": _given(_checks.positive_float),
    "original_max_position_embeddings": _given(_checks.positive_int),
    "low_freq_factor": _given(_checks.positive_float),
    "high_freq_factor": _given(_checks.positive_float),
    "attention_factor": _given(_checks.positive_float),
    "beta_fast": _positive_or_default,
    "beta_slow": _positive_or_default,
    "mscale": _given(_real),
    "mscale_all_dim": _given(_real),
    "truncate": _bool,
    "short_factor": _given(_factor_list),
    "long_factor": _given(_factor_list),
}


# --------------------------------------------------------------------------------------------
# Each scaling's frequencies (host, float64) and attention factor
# --------------------------------------------------------------------------------------------


def _default_inv_freq(rotary_dim: int, base: float) -> np.ndarray:
    # RoFormer eq. (15): theta_i = base^(-2i/d), i = 0 .. d/2 - 1.
    return 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def _plain_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    return _default_inv_freq(rotary_dim, base)


def _linear_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    # Position Interpolation (arXiv 2306.15595): p -> p / factor, i.e. theta_i / factor.
    return _default_inv_freq(rotary_dim, base) / s["factor"]


def _ntk_base_inv_freq(rotary_dim: int, base: float, alpha: float, rope_type: str) -> np.ndarray:
    """theta_i with base' = base * alpha^(d / (d - 2)) (NTK-aware, bloc97 2023)."""
    if rotary_dim < 4:
        # d / (d - 2) is undefined at d = 2 (Hugging Face divides by 0).
        raise ValueError(
            f"rotary_dim must be >= 4 for rope_type={rope_type!r} (its base grows as "
            f"factor ** (d / (d - 2))), got {rotary_dim}"
        )
    return _default_inv_freq(rotary_dim, base * alpha ** (rotary_dim / (rotary_dim - 2)))


def _ntk_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    return _ntk_base_inv_freq(rotary_dim, base, s["factor"], s.rope_type)


def _dynamic_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    # Dynamic NTK: the factor grows with the sequence past the original length L,
    # alpha = factor * L' / L - (factor - 1), L' = max(seq_len, L).
    factor, original = s["factor"], s["original_max_position_embeddings"]
    length = original if seq_len is None else max(seq_len, original)
    alpha = factor * length / original - (factor - 1)
    return _ntk_base_inv_freq(rotary_dim, base, alpha, s.rope_type)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN (arXiv 2309.00071) eq. (22): sqrt(1/t) = 0.1 ln(s) + 1.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(p: Mapping) -> float:
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        factor, mscale, mscale_all_dim = p["factor"], p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:  # DeepSeek-V2/V3 form, as in Hugging Face
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return _checks.positive_float("scaling['attention_factor']", attention_factor)


def _yarn_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    factor, original = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast", 32.0), s.get("beta_slow", 1.0)

    # The dimension index whose wavelength makes `num_rotations` turns over the original context
    # (YaRN sec. 3.2, "NTK-by-parts"): d * ln(L / (2 pi r)) / (2 ln base).
    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as Hugging Face: avoid a zero-width ramp
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate (divide)
    inv_freq = _default_inv_freq(rotary_dim, base)
    return (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation


def _longrope_attention_factor(p: Mapping) -> float:
    attention_factor = p.get("attention_factor")
    if attention_factor is not None:
        return attention_factor
    factor = p.get("factor")
    if factor is None:
        raise ValueError(
            "scaling for rope_type='longrope' needs 'factor' (max_position_embeddings / "
            "original_max_position_embeddings) or 'attention_factor'"
        )
    # LongRoPE (arXiv 2402.13753) as used by Phi-3: sqrt(1 + ln s / ln L).
    original = p["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    # Both lists are checked, not only the one this seq_len selects, so a bad config fails
    # at once rather than when a sequence first grows past the original length.
    for key in ("short_factor", "long_factor"):
        if len(s[key]) != rotary_dim // 2:
            raise ValueError(
                f"scaling[{key!r}] must hold rotary_dim // 2 = {rotary_dim // 2} positive "
                f"numbers, got shape ({len(s[key])},)"
            )
    original = s["original_max_position_embeddings"]
    key = "long_factor" if seq_len is not None and seq_len > original else "short_factor"
    return _default_inv_freq(rotary_dim, base) / np.asarray(s[key], dtype=np.float64)


def _llama3_check(p: Mapping) -> None:
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    if not high > low:
        raise ValueError(
            f"scaling['high_freq_factor'] ({high}) must be > scaling['low_freq_factor'] ({low})"
        )


def _llama3_inv_freq(rotary_dim: int, base: float, s: ParsedScaling, seq_len) -> np.ndarray:
    factor, original = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    inv_freq = _default_inv_freq(rotary_dim, base)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    # Long wavelengths are interpolated, short ones kept, and the band between is blended.
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(
        wavelen > low_freq_wavelen,
        inv_freq / factor,
        np.where(wavelen < high_freq_wavelen, inv_freq, blended),
    )


# --------------------------------------------------------------------------------------------
# The dispatch table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Scaling:
    """One `rope_type`: its Hugging Face keys, and how its frequencies follow from them.

    `inv_freq(rotary_dim, base, parsed, seq_len)` gives the float64 frequencies;
    `attention_factor(params)` and `check(params)` run once, when a mapping is parsed.
    """

    required: tuple[str, ...]
    optional: tuple[str, ...]
    inv_freq: Callable[[int, float, ParsedScaling, int | None], np.ndarray]
    attention_factor: Callable[[Mapping], float] = lambda p: 1.0
    check: Callable[[Mapping], None] = lambda p: None


# The pretrained context length is always `original_max_position_embeddings`: Hugging Face
# reads it from the model config, and there is none here.
_ORIGINAL = "original_max_position_embeddings"
_SCALINGS: dict[str, _Scaling] = {
    "default": _Scaling((), (), _plain_inv_freq),
    "linear": _Scaling(("factor",), (), _linear_inv_freq),
    "ntk": _Scaling(("factor",), (), _ntk_inv_freq),
    "dynamic": _Scaling(("factor", _ORIGINAL), (), _dynamic_inv_freq),
    "yarn": _Scaling(
        ("factor", _ORIGINAL),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
        _yarn_inv_freq,
        attention_factor=_yarn_attention_factor,
    ),
    "longrope": _Scaling(
        ("short_factor", "long_factor", _ORIGINAL),
        ("factor", "attention_factor"),
        _longrope_inv_freq,
        attention_factor=_longrope_attention_factor,
    ),
    "llama3": _Scaling(
        ("factor", "low_freq_factor", "high_freq_factor", _ORIGINAL),
        (),
        _llama3_inv_freq,
        check=_llama3_check,
    ),
}
ROPE_TYPES = tuple(_SCALINGS)


def parse_rope_scaling(scaling: Mapping | ParsedScaling | None) -> ParsedScaling:
    """Checks a Hugging Face `rope_scaling` mapping once, for every later use.

    The keys and values are checked as `rope_frequencies` documents: `rope_type` (or Hugging
    Face's older `type`) one of `ROPE_TYPES`, every required key present, no unknown key, every
    value of its kind and range. Checks that need `rotary_dim` (LongRoPE's list lengths; d >= 4
    for ntk and dynamic) are left to `rope_frequencies`. A key given as None counts as not
    given, as in Hugging Face's configs.

    Args:
      scaling: a `rope_scaling` mapping; None for plain RoPE (rope_type "default"); or a
        `ParsedScaling`, returned as it is.

    Returns:
      A `ParsedScaling`, which `rope_frequencies`, `rope_cos_sin_at_length` and
      `apply_rope_at_length` accept in place of the mapping.

    Raises:
      ValueError: `scaling` not a mapping, an unknown `rope_type`, missing or unknown keys, or
        a value out of range; the message names the key.

    Example:
      >>> parse_rope_scaling({"rope_type": "linear", "factor": 4}).params
      (('factor', 4.0),)
    """
    if scaling is None:
        return ParsedScaling("default")
    if isinstance(scaling, ParsedScaling):
        return scaling
    if not isinstance(scaling, Mapping):
        raise ValueError(
            f"scaling must be a mapping with a 'rope_type' key or None, got {scaling!r}"
        )
    given = dict(scaling)
    rope_type = given.pop("rope_type", None)
    legacy = given.pop("type", None)  # Hugging Face's older key name
    if rope_type is None:
        rope_type = legacy
    elif legacy is not None and legacy != rope_type:
        raise ValueError(f"scaling has rope_type={rope_type!r} but type={legacy!r}")
    if rope_type is None:
        raise ValueError("scaling is missing the key 'rope_type'")
    _checks.one_of("scaling['rope_type']", rope_type, ROPE_TYPES)
    rule = _SCALINGS[rope_type]
    missing = [k for k in rule.required if given.get(k) is None]
    if missing:
        raise ValueError(
            f"scaling for rope_type={rope_type!r} is missing the keys {missing}; "
            f"required: {list(rule.required)}, optional: {list(rule.optional)}"
        )
    unknown = sorted(set(given) - set(rule.required) - set(rule.optional))
    if unknown:
        raise ValueError(
            f"scaling for rope_type={rope_type!r} has unknown keys {unknown}; "
            f"allowed: {['rope_type', *rule.required, *rule.optional]}"
        )
    params = {}
    for key, value in sorted(given.items()):
        value = _KEY_CHECKS[key](f"scaling[{key!r}]", value)
        if value is not None:
            params[key] = value
    rule.check(params)
    return ParsedScaling(
        rope_type, tuple(params.items()), attention_factor=rule.attention_factor(params)
    )


def rope_frequencies(
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping | ParsedScaling | None = None,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies, with any common context-extension scaling.

    The default is RoFormer's theta_i = base^(-2i/d), i = 0 .. d/2 - 1 (arXiv 2104.09864,
    eq. 15). `scaling` is a mapping in Hugging Face transformers' `rope_scaling` form, and the
    result equals its `ROPE_INIT_FUNCTIONS` (to float32 precision; Hugging Face computes in
    float32, this in float64):

    - `linear` (Position Interpolation, arXiv 2306.15595): theta_i / factor.
    - `ntk` (NTK-aware, bloc97 2023): base' = base * factor^(d / (d - 2)).
    - `dynamic` (dynamic NTK): as `ntk` with factor' = factor * L' / L - (factor - 1),
      L' = max(seq_len, L), L = `original_max_position_embeddings`.
    - `yarn` (arXiv 2309.00071): NTK-by-parts ramp between beta_fast (32) and beta_slow (1)
      rotations over L, `truncate` (True) rounding its ends outwards; attention factor
      0.1 ln(factor) + 1, or the DeepSeek form mscale(factor, mscale) /
      mscale(factor, mscale_all_dim), or an explicit `attention_factor`.
    - `longrope` (arXiv 2402.13753): theta_i / ext_i with `long_factor` when
      seq_len > L and `short_factor` otherwise; attention factor sqrt(1 + ln(factor) / ln(L)).
    - `llama3` (Llama 3.1): wavelengths above L / low_freq_factor divided by `factor`, below
      L / high_freq_factor kept, blended linearly in 1/wavelength between.

    Hugging Face reads the pretrained context from the model config; here it is always the key
    `original_max_position_embeddings`. Where Hugging Face derives `factor` from
    `max_position_embeddings / original_max_position_embeddings` (YaRN, LongRoPE), pass that
    ratio as `factor`.

    Args:
      rotary_dim: number of rotated features r (even); `len(inv_freq) == r // 2`.
      base: the RoPE base (theta), > 1.
      scaling: None for plain RoPE, a `rope_scaling` mapping (see above), or the
        `ParsedScaling` that `parse_rope_scaling` made of one.
      seq_len: the current sequence length, read by `dynamic` and `longrope` only. Static.

    Returns:
      `(inv_freq, attention_factor)`: a NumPy float64 array `[rotary_dim // 2]` (keep it a host
      constant: `apply_rope` then computes exact angles) and a Python float by which
      `apply_rope` scales cos and sin.

    Raises:
      ValueError: odd or non-positive `rotary_dim` (or below 4 for `ntk` and `dynamic`),
        `base <= 1`, an unknown `rope_type`, missing, unknown or invalid scaling keys, or a
        non-positive `seq_len`.

    Example:
      >>> inv_freq, attn = rope_frequencies(
      ...     128, base=500000.0, scaling={"rope_type": "llama3", "factor": 8.0,
      ...     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      ...     "original_max_position_embeddings": 8192})
      >>> inv_freq.shape, attn
      ((64,), 1.0)
    """
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    base = _checks.positive_float("base", base)
    if base <= 1.0:
        raise ValueError(f"base must be > 1, got {base}")
    if seq_len is not None:
        seq_len = _checks.positive_int("seq_len", seq_len)
    parsed = parse_rope_scaling(scaling)
    inv_freq = _SCALINGS[parsed.rope_type].inv_freq(rotary_dim, base, parsed, seq_len)
    return inv_freq, parsed.attention_factor
