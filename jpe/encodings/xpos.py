"""xPos (Sun et al. 2022, arXiv 2212.10554): RoPE times a per-pair exponential decay.

Queries are scaled by zeta_i^(p / scale_base) and keys by its reciprocal, so each pair's term in
q . k decays as zeta_i^((n - m) / scale_base) while staying a function of n - m. The rotation is
RoPE's (`jpe/encodings/rope.py`); this module adds the scales and the bound on positions that
keeps them finite in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpe.encodings import _checks
from jpe.encodings.rope import (
    LAYOUTS,
    _align,
    _check_inv_freq,
    _floating,
    _positions,
    _rotate,
    _to_rank,
    rope_cos_sin,
)

__all__ = ["apply_xpos", "xpos_max_position", "xpos_scale"]

# |exponent| of an xPos scale: exp(80) = 5.5e34 leaves float32 (max 3.4e38) room for the
# features it multiplies, and exp(-80) is still a normal float32.
XPOS_MAX_EXPONENT = 80.0


def _xpos_log_zeta(rotary_dim: int, gamma: float) -> np.ndarray:
    zeta = (np.arange(0, rotary_dim, 2, dtype=np.float64) + gamma * rotary_dim) / (
        (1 + gamma) * rotary_dim
    )
    return np.log(zeta)


def xpos_max_position(rotary_dim: int, *, scale_base: float = 512.0, gamma: float = 0.4) -> int:
    """The largest |position| (measured from the anchor) whose xPos scales stay finite.

    Every scale zeta_i^(p / scale_base) lies in [exp(-80), exp(80)] for |p| up to
    80 * scale_base / ln(1 / zeta_0): 32,695 at d = 128 (any d, in fact: zeta_0 = gamma /
    (1 + gamma)), scale_base 512, gamma 0.4. Not far past it (exp(88.7)) the key scales
    overflow float32 to inf, the query scales underflow, and the logits turn NaN.
    """
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim, minimum=2)
    scale_base = _checks.positive_float("scale_base", scale_base)
    gamma = _checks.positive_float("gamma", gamma)
    worst = float(np.max(np.abs(_xpos_log_zeta(rotary_dim, gamma))))
    return int(XPOS_MAX_EXPONENT * scale_base / worst) if worst > 0 else _checks.INT32_MAX


def xpos_scale(positions, rotary_dim: int, *, scale_base: float = 512.0, gamma: float = 0.4):
    """xPos per-pair scales zeta_i^(p / scale_base), float32 `[..., L, rotary_dim // 2]`.

    zeta_i = (2i + gamma d) / ((1 + gamma) d), i = 0 .. d/2 - 1 (Sun et al. 2022,
    arXiv 2212.10554, eq. 9; torchscale `XPOS` with gamma = 0.4), computed as
    exp(p ln(zeta_i) / scale_base). Only differences of positions reach the logits, so pass
    positions measured from an anchor (`apply_xpos`'s `anchor`; torchscale centres them the
    same way): |p| must stay within `xpos_max_position` (32,695 with the defaults), beyond
    which the scales over- or underflow float32.

    Raises:
      ValueError: odd or non-positive `rotary_dim`, non-positive `scale_base` or `gamma`, or
        (concrete `positions` only) a |position| above `xpos_max_position`. Under `jit` the
        values are not checked and such positions give inf or NaN.
    """
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    scale_base = _checks.positive_float("scale_base", scale_base)
    gamma = _checks.positive_float("gamma", gamma)
    positions = _positions(positions)
    values = _checks.concrete(positions)
    if values is not None and values.size:
        limit = xpos_max_position(rotary_dim, scale_base=scale_base, gamma=gamma)
        high = float(np.max(np.abs(values.astype(np.float64))))
        if high > limit:
            raise ValueError(
                f"positions must lie within +-{limit} of the anchor for xPos (rotary_dim "
                f"{rotary_dim}, scale_base {scale_base}): its scales overflow float32 beyond; "
                f"got |position| up to {high:.0f}. Measure positions from an anchor (apply_xpos's "
                "`anchor`), or raise scale_base."
            )
    log_zeta = _xpos_log_zeta(rotary_dim, gamma) / scale_base
    log_zeta = jnp.asarray(log_zeta.reshape((1,) * positions.ndim + (-1,)), jnp.float32)
    return jnp.exp(positions.astype(jnp.float32)[..., None] * log_zeta)


def apply_xpos(
    x,
    positions,
    inv_freq,
    *,
    is_key: bool,
    scale_base: float = 512.0,
    gamma: float = 0.4,
    layout: str = "half",
    anchor=None,
) -> jnp.ndarray:
    """xPos (Sun et al. 2022, arXiv 2212.10554): RoPE times a per-pair exponential scale.

    Queries are multiplied by zeta^((n - a) / scale_base) and keys by zeta^(-(m - a) /
    scale_base), so each pair's contribution to q_n . k_m gains zeta_i^((n - m) / scale_base):
    it decays with distance and stays a function of n - m, whatever the anchor a. The anchor
    only keeps the separate scales finite: every |p - a| must stay within `xpos_max_position`
    (32,695 with the defaults). The rotation itself uses the positions as they are.

    Args:
      x: `[..., L, H, D]` queries (`is_key=False`) or keys (`is_key=True`).
      positions: `[..., L]` integer positions.
      inv_freq: `[n]`, as in `apply_rope`.
      is_key: keys use the reciprocal scale.
      scale_base, gamma: xPos's constants (512 and 0.4 in torchscale).
      layout: as in `apply_rope` (torchscale uses `"interleaved"`).
      anchor: integer scalar or `[...]` (one per row of `positions`), the same for the queries
        and the keys that meet them (a decoder keeps it with its cache); default 0.

    Returns:
      `x` scaled and rotated, in `x.dtype`.

    Raises:
      ValueError: as `apply_rope` and `xpos_scale`, or an `anchor` that is not an integer
        array matching the leading axes of `positions`.
    """
    _checks.one_of("layout", layout, LAYOUTS)
    _check_inv_freq(inv_freq)
    x, positions = _floating("x", jnp.asarray(x)), _positions(positions)
    rotary_dim = 2 * jnp.shape(inv_freq)[0]
    rank = _align(x, positions, 1, rotary_dim)
    relative = positions
    if anchor is not None:
        anchor = _checks.integer_array("anchor", anchor)
        if anchor.ndim and anchor.shape != positions.shape[:-1]:
            raise ValueError(
                f"anchor must be a scalar or have the leading shape of positions "
                f"{positions.shape[:-1]}, got shape {anchor.shape}"
            )
        anchor = anchor.astype(jnp.int32).reshape(
            positions.shape[:-1] + (1,) if anchor.ndim else (1,) * positions.ndim
        )
        relative = positions.astype(jnp.int32) - anchor
    scale = xpos_scale(
        -relative if is_key else relative, rotary_dim, scale_base=scale_base, gamma=gamma
    )
    cos, sin = rope_cos_sin(positions, inv_freq)
    cos, sin = (_to_rank((t * scale)[..., None, :], rank) for t in (cos, sin))
    return _rotate(_to_rank(x, rank), cos, sin, layout)
