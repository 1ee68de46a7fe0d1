"""Exact angles `positions * inv_freq` modulo 2 pi, shared by RoPE and the sinusoidal tables.

A float32 product `p * w` loses the phase at large positions: float32's spacing at 1e6 is
0.06 rad, and rounding `w` itself to float32 costs as much (a relative 6e-8 times 1e6 rad).
Here the frequencies stay float64 on the host and the angle is reduced in *turns* (cycles),
t = w / 2 pi, without ever forming a large product:

    p = b0 + 2^8 b1 + 2^16 b2 + 2^24 b3      (bytes of the int32 position; b3 signed)
    p t = sum_j b_j g_j  (mod 1),   g_j = frac(t 2^(8j)) in [-1/2, 1/2]   (host)
    g_j = h_j + r_j,   h_j with 16 significant bits, |r_j| <= 2^-17 |g_j|

The constants g_j are computed on the host from the float64 `w` *exactly*: `w` is a dyadic
rational, and 1 / (2 pi) is held as a 1,200-bit fixed-point integer (Machin's formula in
integer arithmetic), so frac(w 2^(8j) / (2 pi)) is correct to float64 rounding for every
finite float64 `w`, however large (a float64 t = w / (2 pi) would carry an error of
|t| 2^-53 that the factor 2^24 b3 multiplies: 2e-4 rad at w = 1000).

On the device, `b_j * h_j` has at most 8 + 16 = 24 significant bits, so the float32 product
is exact and so is its distance to the nearest integer; `b_j * r_j` is below 2^-9 turns, so
its rounding is below 2^-33. The pieces are summed with a reduction to [-1/2, 1/2] after each
addition (rounding at most 2^-25 turns each), then multiplied by 2 pi. Bound: under 3e-6 rad
for every int32 position and every finite float64 `w` (measured: 6e-7 rad over positions
up to +-2^31 and w from 1e-300 to 1.7e308).

Floating-point positions x are split exactly into the nearest integer (as above) and a
fraction f = x - round(x) in [-1/2, 1/2], whose bits down to 2^-24, c = floor(f 2^24) (a
signed integer), go through the same byte sums with the constants frac(t 2^(8j - 24)); the
bits of f below 2^-24 (nonzero only for |x| < 1/2) add (f 2^24 - c) (t 2^-24) in float32,
an error below |t| 2^-47 turns. Frequencies must then satisfy |w| <= 2^32, which keeps that
error below 4e-5 rad.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jpe.encodings import _checks

_BYTE = 8
_NUM_BYTES = 4  # int32 positions
_HEAD_BITS = 16  # b_j (8 bits) * h_j (16 bits) fits float32's 24-bit significand
_FRACTION_BITS = 24  # bits of a floating position's fraction reduced exactly
MAX_FLOAT_POSITION_FREQ = 2.0**32  # |inv_freq| bound for floating positions
# 1 / (2 pi) as floor(2^_PI_BITS / (2 pi)): enough bits for w * 2^24 with w up to 2^1024.
_PI_BITS = 1200


@functools.cache
def _inv_two_pi() -> int:
    """floor(2**_PI_BITS / (2 pi)), off by at most 1, in exact integer arithmetic."""
    work = _PI_BITS + 64  # guard bits for the series' truncations
    one = 1 << work

    def arctan_inv(x: int) -> int:  # arctan(1 / x) * one, alternating series
        total, term, k, sign = 0, one // x, 1, 1
        while term:
            total += sign * (term // k)
            term //= x * x
            k, sign = k + 2, -sign
        return total

    pi = 4 * (4 * arctan_inv(5) - arctan_inv(239))  # Machin: pi * 2^work, to a few units
    return (1 << (_PI_BITS + work)) // (2 * pi)


def _centered_turns(w: float, shift: int) -> float:
    """frac(w * 2^shift / (2 pi)) in [-1/2, 1/2], correctly rounded to float64 (error <2^-150)."""
    if w == 0.0:
        return 0.0
    numerator, denominator = float(w).as_integer_ratio()  # denominator: a power of two
    den_bits = denominator.bit_length() - 1 + _PI_BITS + max(-shift, 0)
    x = numerator * _inv_two_pi() << max(shift, 0)  # x / 2^den_bits = w 2^shift / (2 pi)
    modulus = 1 << den_bits
    r = x % modulus  # Python's % is non-negative for a positive modulus
    if r >= modulus >> 1:
        r -= modulus
    return r / modulus  # int / int: correctly rounded


def _split(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 `x` -> (head with `bits` significant bits, remainder), head + remainder == x."""
    mantissa, exponent = np.frexp(x)
    head = np.ldexp(np.round(mantissa * 2.0**bits), exponent - bits)
    return head, x - head


@functools.lru_cache(maxsize=256)
def _constants(inv_freq_bytes: bytes, first_shift: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """((head_j, rest_j) for byte j = 0..3) of frac(t 2^(first_shift + 8j)), float64 `[n]`."""
    inv_freq = np.frombuffer(inv_freq_bytes, np.float64)
    out = []
    for j in range(_NUM_BYTES):
        shift = first_shift + _BYTE * j
        g = np.array([_centered_turns(w, shift) for w in inv_freq], np.float64)
        out.append(_split(g, _HEAD_BITS))
    return tuple(out)


def _reduce(x: jnp.ndarray) -> jnp.ndarray:
    return x - jnp.round(x)  # exact in floating point


def _byte_turns(ints: jnp.ndarray, inv_freq: np.ndarray, first_shift: int, const) -> jnp.ndarray:
    """sum_j b_j frac(t 2^(first_shift + 8j)), reduced to [-1/2, 1/2], for int32 `ints`."""
    total = None
    constants = _constants(inv_freq.tobytes(), first_shift)
    for j, (head, rest) in enumerate(constants):
        shifted = ints >> (_BYTE * j)
        count = shifted if j == _NUM_BYTES - 1 else shifted & 0xFF  # the top byte keeps the sign
        count = count.astype(jnp.float32)[..., None]
        piece = _reduce(count * const(head)) + count * const(rest)
        total = piece if total is None else _reduce(total + piece)
    return total


def angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """`positions[..., None] * inv_freq` modulo 2 pi, in [-pi, pi], float32 `[..., L, n]`.

    Args:
      positions: `[..., L]`, integer (int32 range) or floating point (floor in int32 range).
      inv_freq: NumPy float64 `[n]` finite angular frequencies (radians per position); with
        floating positions, |inv_freq| <= 2**32.

    Raises:
      ValueError: a non-finite frequency, or (floating positions) one above 2**32; concrete
        positions outside the int32 range (a uint32 or int64 array would wrap).
    """
    inv_freq = np.ascontiguousarray(inv_freq, np.float64)
    if not np.all(np.isfinite(inv_freq)):
        raise ValueError(f"inv_freq must be finite, got {inv_freq}")
    _checks.fits_int32("positions", positions)
    shape = (1,) * positions.ndim + inv_freq.shape  # ranks kept equal: no rank promotion

    def const(c: np.ndarray) -> jnp.ndarray:
        return jnp.asarray(c.reshape(shape), jnp.float32)

    if not jnp.issubdtype(positions.dtype, jnp.floating):
        total = _byte_turns(positions.astype(jnp.int32), inv_freq, 0, const)
        return _reduce(total) * jnp.float32(2 * np.pi)

    if np.max(np.abs(inv_freq), initial=0.0) > MAX_FLOAT_POSITION_FREQ:
        raise ValueError(
            f"inv_freq must be at most 2**32 in magnitude with floating-point positions, got "
            f"a maximum of {np.max(np.abs(inv_freq))}; use integer positions"
        )
    x = positions.astype(jnp.float32)
    whole = jnp.round(x)
    scaled = (x - whole) * jnp.float32(2.0**_FRACTION_BITS)  # exact, in [-2^23, 2^23]
    count = jnp.floor(scaled)  # a signed 24-bit integer; scaled - count in [0, 1), exact
    residual = (scaled - count)[..., None] * const(inv_freq / (2 * np.pi) * 2.0**-_FRACTION_BITS)
    total = _reduce(_byte_turns(whole.astype(jnp.int32), inv_freq, 0, const) + residual)
    total = _reduce(total + _byte_turns(count.astype(jnp.int32), inv_freq, -_FRACTION_BITS, const))
    return _reduce(total) * jnp.float32(2 * np.pi)
