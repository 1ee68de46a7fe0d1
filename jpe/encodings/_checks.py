"""Argument checks shared by the encodings.

Every public function validates what is static at trace time (Python numbers, shapes, dtypes)
and raises `ValueError` naming the argument and what is allowed. Values inside traced arrays
cannot be checked under `jit`; where that matters the docstring says so.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


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


def integer_array(name: str, x) -> jnp.ndarray:
    """Returns `x` as a JAX array, or raises if its dtype is not an integer type."""
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
