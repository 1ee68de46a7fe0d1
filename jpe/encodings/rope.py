"""RoPE itself: rotation angles, their cos and sin, and rotating queries and keys by them.

RoPE (Su et al. 2021, arXiv 2104.09864) rotates each pair of query/key features by the angle
`p * inv_freq[i]`, so that `q_m . k_n` depends only on `m - n`. Two layouts pair the features
differently; both are supported everywhere:

- `"half"`: feature i pairs with i + r/2 (GPT-NeoX, LLaMA, Hugging Face `rotate_half`);
- `"interleaved"`: feature 2i pairs with 2i + 1 (GPT-J, RoFormer, torchscale).

Exact angles. `p * inv_freq` in float32 loses the phase at large positions (0.05 rad at 2^20).
`rope_frequencies` returns float64 NumPy constants, and `apply_rope` reduces each angle exactly
on the device from the bytes of the position (`jpe/encodings/_angles.py` gives the method and
its bound): the phase error is under 3e-6 rad for every int32 position. When `inv_freq` is a
traced array (for example a `jit` argument) the host constants cannot be formed, and the angle
falls back to the plain float32 product, which is exact only for small positions.

The frequencies and their scalings are in `jpe/encodings/rope_scaling.py`; xPos, which scales
these rotations, in `xpos.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpe._fusion import materialized
from jpe.encodings import _angles, _checks
from jpe.encodings.rope_scaling import ParsedScaling, parse_rope_scaling, rope_frequencies

__all__ = [
    "LAYOUTS",
    "apply_axial_rope",
    "apply_rope",
    "apply_rope_at_length",
    "rope_angles",
    "rope_cos_sin",
    "rope_cos_sin_at_length",
]

LAYOUTS = ("half", "interleaved")

# --------------------------------------------------------------------------------------------
# Angles (device, float32, exact range reduction)
# --------------------------------------------------------------------------------------------


def _host_inv_freq(inv_freq) -> np.ndarray | None:
    """`inv_freq` as a float64 host array, or None when it is traced."""
    if isinstance(inv_freq, jax.core.Tracer):
        return None
    return np.asarray(inv_freq, dtype=np.float64)


def _positions(positions) -> jnp.ndarray:
    """`positions` as a JAX array, after checking concrete values against int32 (an int64 or
    uint32 array would otherwise wrap silently)."""
    _checks.fits_int32("positions", positions)
    return jnp.asarray(positions)


def _floating(name: str, x: jnp.ndarray) -> jnp.ndarray:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must have a floating dtype (a rotation of integers is not an integer), "
            f"got {x.dtype}"
        )
    return x


def _check_inv_freq(inv_freq) -> None:
    if jnp.ndim(inv_freq) != 1 or jnp.shape(inv_freq)[0] < 1:
        raise ValueError(
            f"inv_freq must have shape [rotary_dim // 2] with at least one entry, "
            f"got shape {jnp.shape(inv_freq)}"
        )


def rope_angles(positions, inv_freq) -> jnp.ndarray:
    """Rotation angles `positions * inv_freq`, reduced to [-pi, pi], float32 `[..., L, n]`.

    With `inv_freq` a concrete (NumPy or JAX) array the reduction is exact to 3e-6 rad for every
    int32 position (`jpe/encodings/_angles.py` gives the method and its bound). With a traced
    `inv_freq` it is the plain float32 product.

    Args:
      positions: `[..., L]`, any integer dtype (int32 range), or floating point.
      inv_freq: `[n]` angular frequencies, e.g. from `rope_frequencies`.

    Returns:
      float32 `[..., L, n]`.

    Raises:
      ValueError: `inv_freq` not one-dimensional or not finite, `positions` neither integer nor
        floating, or (concrete `positions`) a position outside the int32 range.
    """
    _check_inv_freq(inv_freq)
    positions = _positions(positions)
    if not (
        jnp.issubdtype(positions.dtype, jnp.integer)
        or jnp.issubdtype(positions.dtype, jnp.floating)
    ):
        raise ValueError(f"positions must have an integer or floating dtype, got {positions.dtype}")
    host = _host_inv_freq(inv_freq)
    if host is None:
        return positions.astype(jnp.float32)[..., None] * jnp.reshape(
            inv_freq.astype(jnp.float32), (1,) * positions.ndim + (-1,)
        )
    return _angles.angles(positions, host)


def rope_cos_sin(positions, inv_freq, *, attention_factor: float = 1.0):
    """`(cos, sin)` of `rope_angles`, each scaled by `attention_factor`, float32 `[..., L, n]`."""
    angles = rope_angles(positions, inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


# --------------------------------------------------------------------------------------------
# Applying rotations
# --------------------------------------------------------------------------------------------


def _rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, layout: str) -> jnp.ndarray:
    """Rotates the first 2n features of `x` `[..., H, D]` by cos/sin `[..., 1, n]` (float32)."""
    n = cos.shape[-1]
    r = 2 * n
    # cos and sin are built once, not inside the product's loop: XLA would otherwise fuse the
    # (exact, several-op) angle computation into the rotation and redo it for every batch row
    # and head, in both passes. Measured on the reference train step (`train/bench.py train`).
    cos, sin = materialized((cos, sin))
    xr = x[..., :r].astype(jnp.float32)
    if layout == "half":
        x1, x2 = xr[..., :n], xr[..., n:]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        rotated = rotated.reshape(xr.shape)
    passthrough = jnp.broadcast_to(x[..., r:], rotated.shape[:-1] + (x.shape[-1] - r,))
    return jnp.concatenate([rotated.astype(x.dtype), passthrough], axis=-1)


def _align(x: jnp.ndarray, positions: jnp.ndarray, npos_axes: int, rotary_dim: int):
    """Checks shapes; returns the rank at which cos/sin `[..., L, 1, n]` meet `x`."""
    _checks.min_rank("x", x, 3, "[..., L, H, D]")
    if positions.ndim < npos_axes:
        raise ValueError(f"positions must have shape [..., L], got shape {positions.shape}")
    pos_shape = positions.shape[: positions.ndim - npos_axes + 1]
    if pos_shape[-1] != x.shape[-3]:
        raise ValueError(
            f"positions has length {pos_shape[-1]} but x has length {x.shape[-3]} "
            f"(x must be [..., L, H, D], positions [..., L])"
        )
    _checks.broadcastable(
        ("x leading dims", "positions leading dims"), (x.shape[:-3], pos_shape[:-1])
    )
    if rotary_dim > x.shape[-1]:
        raise ValueError(
            f"rotary_dim (2 * len(inv_freq) = {rotary_dim}) must be <= the head dim "
            f"x.shape[-1] = {x.shape[-1]}"
        )
    return max(x.ndim, len(pos_shape) + 2)


def _to_rank(a: jnp.ndarray, rank: int) -> jnp.ndarray:
    return a.reshape((1,) * (rank - a.ndim) + a.shape)


def apply_rope(
    x,
    positions,
    inv_freq,
    *,
    layout: str = "half",
    attention_factor: float = 1.0,
) -> jnp.ndarray:
    """Rotates queries or keys by their positions (RoPE, Su et al. 2021, arXiv 2104.09864).

    Each pair (x_a, x_b) with frequency theta_i turns by the angle t = p theta_i:
    (x_a, x_b) -> (x_a cos t - x_b sin t, x_b cos t + x_a sin t),
    so that `apply_rope(q, m) . apply_rope(k, n)` depends on m - n only (RoFormer eq. 16).

    Args:
      x: `[..., L, H, D]` queries or keys, any float dtype.
      positions: `[..., L]` integer (or floating) positions; leading dims broadcast with x's.
      inv_freq: `[n]` frequencies from `rope_frequencies` (NumPy float64 for exact angles); the
        first `r = 2n` features rotate and the rest pass through unchanged.
      layout: `"half"` (pairs i, i + n: GPT-NeoX, LLaMA) or `"interleaved"` (pairs 2i, 2i + 1:
        GPT-J, RoFormer).
      attention_factor: multiplies cos and sin (YaRN's and LongRoPE's temperature), as Hugging
        Face does; it scales q and k alike.

    Returns:
      `x` rotated, `[..., L, H, D]` (broadcast leading dims), in `x.dtype`.

    Raises:
      ValueError: unknown `layout`, `x` not floating, `2 * len(inv_freq) > D`, mismatched
        shapes, or (concrete `positions`) a position outside the int32 range.
    """
    _checks.one_of("layout", layout, LAYOUTS)
    _check_inv_freq(inv_freq)
    x, positions = _floating("x", jnp.asarray(x)), _positions(positions)
    rank = _align(x, positions, 1, 2 * jnp.shape(inv_freq)[0])
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor=attention_factor)
    cos, sin = (_to_rank(t[..., None, :], rank) for t in (cos, sin))
    return _rotate(_to_rank(x, rank), cos, sin, layout)


def _longrope_angles_at_length(positions, length, inv_freq, rotary_dim, base, scaling):
    # Both frequency sets are host constants (exact angles); each row picks one by its length.
    original = scaling["original_max_position_embeddings"]
    long_freq, _ = rope_frequencies(rotary_dim, base=base, scaling=scaling, seq_len=original + 1)
    short_angles = rope_angles(positions, inv_freq)
    return jnp.where(length > original, rope_angles(positions, long_freq), short_angles)


def _dynamic_angles_at_length(positions, length, inv_freq, rotary_dim, base, scaling):
    # theta_i' = theta_i alpha^(-2i / (d - 2)), the `dynamic` frequencies in closed form: the
    # exact p theta_i (host constants) minus the float32 p (theta_i - theta_i').
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    excess = jnp.maximum(length - original, 0).astype(jnp.float32)
    log_alpha = jnp.log1p(jnp.float32(factor / original) * excess)
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float64) / (rotary_dim - 2)
    shape = (1,) * positions.ndim + (-1,)
    exponent = jnp.asarray(exponent.reshape(shape), jnp.float32)
    theta = jnp.asarray(inv_freq.reshape(shape), jnp.float32)
    slower = theta * -jnp.expm1(-exponent * log_alpha)  # theta_i - theta_i'
    return rope_angles(positions, inv_freq) - positions.astype(jnp.float32)[..., None] * slower


# rope_type -> angles `[..., L, n]` from positions `[..., L]`, each row's length `[..., 1, 1]`,
# the frequencies `rope_frequencies` gives without a length, rotary_dim, base and the parsed
# scaling: the scalings that read the sequence length. Every other one ignores it.
_ANGLES_AT_LENGTH = {
    "dynamic": _dynamic_angles_at_length,
    "longrope": _longrope_angles_at_length,
}
LENGTH_DEPENDENT = tuple(_ANGLES_AT_LENGTH)


def rope_cos_sin_at_length(
    positions,
    seq_len,
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping | ParsedScaling | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(cos, sin)` `[..., L, rotary_dim // 2]` for a scaling that reads the sequence length,
    with `seq_len` an integer array that may be traced (one length per row).

    `dynamic` and `longrope` choose their frequencies from the sequence length. Hugging Face
    reads it from the positions at run time (`dynamic_rope_update`: seq_len = max position + 1);
    `rope_frequencies` needs it static. Here it is data, so one jitted function serves every
    length and a padded, packed or decoding batch can give each row its own:

    - `longrope`: both frequency sets are host constants (exact angles); each row takes
      `long_factor` where seq_len > original_max_position_embeddings, else `short_factor`.
    - `dynamic`: theta_i' = theta_i alpha^(-2i / (d - 2)), alpha = 1 + factor (L' - L) / L,
      L' = max(seq_len, L), the `dynamic` entry of `rope_frequencies` in closed form. The angle
      is the exact p theta_i (host constants) minus p theta_i (1 - alpha^(-2i / (d - 2))) in
      float32, so it is exact while seq_len <= L and the highest frequency (i = 0) is always
      exact. Past L the second term carries float32's error, as Hugging Face's float32
      frequencies do: about |p theta_i'| |ln alpha| 1e-7 rad (measured: 1.5e-3 rad at
      p = 123,457 with alpha = 1e5, 2e-2 rad at p = 2^20).
    - every other scaling ignores `seq_len` and equals `rope_cos_sin(positions,
      *rope_frequencies(...))`.

    Args:
      positions: `[..., L]` integer positions.
      seq_len: integer scalar or `[...]` (the leading axes of `positions`), the sequence length
        each row's frequencies follow; Hugging Face's choice is max(position) + 1.
      rotary_dim, base, scaling: as in `rope_frequencies` (parse `scaling` once with
        `parse_rope_scaling` to reuse it across calls).

    Returns:
      float32 `(cos, sin)`, each scaled by the scaling's attention factor.

    Raises:
      ValueError: as `rope_frequencies` and `rope_angles`, or a `seq_len` that is not an
        integer array matching the leading axes of `positions`.
    """
    positions = _positions(positions)
    seq_len = _checks.integer_array("seq_len", seq_len)
    if seq_len.ndim and seq_len.shape != positions.shape[:-1]:
        raise ValueError(
            f"seq_len must be a scalar or have the leading shape of positions "
            f"{positions.shape[:-1]}, got shape {seq_len.shape}"
        )
    scaling = parse_rope_scaling(scaling)  # once, for every use below
    inv_freq, attention_factor = rope_frequencies(rotary_dim, base=base, scaling=scaling)
    angles_at_length = _ANGLES_AT_LENGTH.get(scaling.rope_type)
    if angles_at_length is None:
        return rope_cos_sin(positions, inv_freq, attention_factor=attention_factor)
    # seq_len [...] -> [..., 1, 1], to meet angles [..., L, n]
    length = seq_len.astype(jnp.int32).reshape(
        positions.shape[:-1] + (1, 1) if seq_len.ndim else (1,) * (positions.ndim + 1)
    )
    angles = angles_at_length(positions, length, inv_freq, rotary_dim, base, scaling)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope_at_length(
    x,
    positions,
    seq_len,
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping | ParsedScaling | None = None,
    layout: str = "half",
) -> jnp.ndarray:
    """`apply_rope` with the frequencies a sequence of `seq_len` gets (`dynamic`, `longrope`),
    `seq_len` an integer array that may be traced; see `rope_cos_sin_at_length`.

    Raises:
      ValueError: as `apply_rope` and `rope_cos_sin_at_length`.
    """
    _checks.one_of("layout", layout, LAYOUTS)
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim, minimum=2)
    x, positions = _floating("x", jnp.asarray(x)), _positions(positions)
    rank = _align(x, positions, 1, rotary_dim)
    cos, sin = rope_cos_sin_at_length(positions, seq_len, rotary_dim, base=base, scaling=scaling)
    cos, sin = (_to_rank(t[..., None, :], rank) for t in (cos, sin))
    return _rotate(_to_rank(x, rank), cos, sin, layout)


def apply_axial_rope(x, positions, inv_freqs: Sequence, *, layout: str = "half") -> jnp.ndarray:
    """Axial RoPE for grids (image patches, video): each axis rotates its own feature pairs.

    Axis a's positions rotate the a-th section of the pairs with `inv_freqs[a]`, so the rotary
    dim is `2 * sum(len(f) for f in inv_freqs)`; holding the other axes at 0 reduces it to 1-D
    RoPE on that section. The 2-D case is the axial RoPE of Heo et al. 2024 (arXiv 2403.13298),
    who use `rope_frequencies(D // 2, base=100.0)` for each of the two axes.

    Args:
      x: `[..., L, H, D]`.
      positions: `[..., L, A]` integer coordinates of each token on A axes (e.g. row, column).
      inv_freqs: A frequency arrays, one per axis.
      layout: as in `apply_rope`.

    Returns:
      `x` rotated, in `x.dtype`.

    Raises:
      ValueError: as `apply_rope`, or when `positions.shape[-1] != len(inv_freqs)`.
    """
    _checks.one_of("layout", layout, LAYOUTS)
    x, positions = _floating("x", jnp.asarray(x)), _positions(positions)
    if positions.ndim < 2 or positions.shape[-1] != len(inv_freqs) or not inv_freqs:
        raise ValueError(
            f"positions must have shape [..., L, A] with A = len(inv_freqs) = {len(inv_freqs)} "
            f"(A >= 1), got shape {positions.shape}"
        )
    for f in inv_freqs:
        _check_inv_freq(f)
    rotary_dim = 2 * sum(jnp.shape(f)[0] for f in inv_freqs)
    rank = _align(x, positions, 2, rotary_dim)
    angles = jnp.concatenate(
        [rope_angles(positions[..., a], f) for a, f in enumerate(inv_freqs)], axis=-1
    )
    cos, sin = (_to_rank(t[..., None, :], rank) for t in (jnp.cos(angles), jnp.sin(angles)))
    return _rotate(_to_rank(x, rank), cos, sin, layout)
