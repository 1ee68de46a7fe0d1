"""Exact angles `positions * inv_freq` modulo 2 pi, shared by RoPE and the sinusoidal tables.

A float32 product `p * w` loses the phase at large positions: float32's spacing at 1e6 is
0.06 rad, and rounding `w` itself to float32 costs as much (a relative 6e-8 times 1e6 rad).
Here the frequencies stay float64 on the host and the angle is reduced in *turns* (cycles),
t = w / 2 pi, without ever forming a large product:

    p = b0 + 2^8 b1 + 2^16 b2 + 2^24 b3      (bytes of the int32 position; b3 signed)
    p t = sum_j b_j g_j  (mod 1),   g_j = frac(t 2^(8j)) in [-1/2, 1/2]   (float64, host)
    g_j = h_j + r_j,   h_j with 16 significant bits, |r_j| <= 2^-17 |g_j|

On the device, `b_j * h_j` has at most 8 + 16 = 24 significant bits, so the float32 product
is exact and so is its distance to the nearest integer; `b_j * r_j` is below 2^-9 turns, so
its rounding is below 2^-33. The eight pieces are summed with a reduction to [-1/2, 1/2]
after each addition (rounding at most 2^-25 turns each), then multiplied by 2 pi. Bound:
under 3e-6 rad for every int32 position (measured: 1.0e-6 over 33,000 positions,
bases 1e4 to 1e6). Floating-point positions are split
into an exact integer part (as above) and a fraction whose product with t is below 1/2 turn.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_BYTE = 8
_NUM_BYTES = 4  # int32 positions
_HEAD_BITS = 16  # b_j (8 bits) * h_j (16 bits) fits float32's 24-bit significand


def _centered_frac(x: np.ndarray) -> np.ndarray:
    return x - np.round(x)


def _split(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 `x` -> (head with `bits` significant bits, remainder), head + remainder == x."""
    mantissa, exponent = np.frexp(x)
    head = np.ldexp(np.round(mantissa * 2.0**bits), exponent - bits)
    return head, x - head


def _reduce(x: jnp.ndarray) -> jnp.ndarray:
    return x - jnp.round(x)  # exact in floating point


def angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """`positions[..., None] * inv_freq` modulo 2 pi, in [-pi, pi], float32 `[..., L, n]`.

    Args:
      positions: `[..., L]`, integer (int32 range) or floating point.
      inv_freq: NumPy float64 `[n]` angular frequencies (radians per position).
    """
    turns = np.asarray(inv_freq, np.float64) / (2 * np.pi)
    shape = (1,) * positions.ndim + turns.shape  # ranks kept equal: no rank promotion

    def const(c: np.ndarray) -> jnp.ndarray:
        return jnp.asarray(c.reshape(shape), jnp.float32)

    if jnp.issubdtype(positions.dtype, jnp.floating):
        whole = jnp.floor(positions.astype(jnp.float32))
        fraction = positions.astype(jnp.float32) - whole  # exact
        total = _reduce(fraction[..., None] * const(turns))
        ints = whole.astype(jnp.int32)
    else:
        total = None
        ints = positions.astype(jnp.int32)
    for j in range(_NUM_BYTES):
        shifted = ints >> (_BYTE * j)
        count = shifted if j == _NUM_BYTES - 1 else shifted & 0xFF  # the top byte keeps the sign
        count = count.astype(jnp.float32)[..., None]
        head, rest = _split(_centered_frac(turns * 2.0 ** (_BYTE * j)), _HEAD_BITS)
        piece = _reduce(count * const(head)) + count * const(rest)
        total = piece if total is None else _reduce(total + piece)
    return _reduce(total) * jnp.float32(2 * np.pi)
