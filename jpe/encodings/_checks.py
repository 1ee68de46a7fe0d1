"""Argument checks shared by the encodings.

Every public function validates what is static at trace time (Python numbers, shapes, dtypes)
and raises `ValueError` naming the argument and what is allowed. Values inside traced arrays
cannot be checked under `jit`; where that matters the docstring says so.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# dtypes whose every value fits in int32, so their range needs no check
_NARROW = tuple(np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.uint8, np.uint16))


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Returns `value` as an int, or raises if it is not an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """Returns `value` as a float, or raises if it is not a finite number > 0 (>= 0 if allowed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (np.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def one_of(name: str, value, allowed: Sequence) -> None:
    """Raises unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def concrete(x) -> np.ndarray | None:
    """`x`'s values as a NumPy array when they are known now, or None under tracing.

    Only a `jax` tracer hides its values; a constant that a jitted function closes over is
    concrete. Read values with this (NumPy), never with `jnp` ops, which would be traced.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def fits_int32(name: str, x) -> None:
    """Raises if concrete `x` holds a value that int32 cannot hold (it would wrap when cast).

    uint32, int64 and Python integers can exceed int32; with 64-bit mode off, `jnp.asarray`
    silently wraps an int64 NumPy array, so call this on the raw argument. Floating `x` must be
    finite with its floor in int32. Traced values are not checked.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and np.dtype(dtype) in _NARROW:
        return
    values = concrete(x)
    if values is None or values.size == 0:
        return
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite, got non-finite values")
        low, high = float(np.floor(values.min())), float(np.floor(values.max()))
    elif np.issubdtype(values.dtype, np.integer):
        low, high = int(values.min()), int(values.max())
    else:
        return
    if low < INT32_MIN or high > INT32_MAX:
        raise ValueError(
            f"{name} must fit in int32 [-2**31, 2**31 - 1]; got values in [{low}, {high}]"
        )


def integer_array(name: str, x) -> jnp.ndarray:
    """Returns `x` as a JAX array, or raises if its dtype is not an integer type or (when
    concrete) a value does not fit in int32."""
    if not hasattr(x, "dtype"):  # a Python number or (nested) list: check it as NumPy would
        try:
            as_numpy = np.asarray(x)
        except Exception:  # e.g. a list holding tracers; jnp.asarray below decides
            as_numpy = None
        if as_numpy is not None and as_numpy.dtype != object:
            x = as_numpy
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer):
        fits_int32(name, x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
    return x


def min_rank(name: str, x, rank: int, what: str) -> None:
    """Raises unless `x.ndim >= rank`; `what` names the expected trailing axes."""
    if jnp.ndim(x) < rank:
        raise ValueError(f"{name} must have shape {what}, got shape {jnp.shape(x)}")


def broadcastable(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Returns the broadcast of `shapes`, or raises naming the arguments that do not match."""
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        pairs = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"shapes do not broadcast: {pairs}") from None
