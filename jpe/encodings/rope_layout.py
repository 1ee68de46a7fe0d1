"""Converting q/k projection weights between the `half` and `interleaved` RoPE layouts.

A checkpoint trained with one layout runs under the other once its q and k output features
are permuted (`rope_permutation`, `permute_rope_weights`): both layouts rotate pair i by the
same angle and differ only in where the pair's two features sit.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from jpe.encodings import _checks
from jpe.encodings.rope import LAYOUTS

__all__ = ["permute_rope_weights", "rope_permutation"]


def rope_permutation(head_dim: int, rotary_dim: int, *, source: str, target: str) -> np.ndarray:
    """Feature permutation `perm` with `w_target = w_source[..., perm]` for one head.

    Converting the q and k projections' output features with this permutation leaves every
    attention logit unchanged: `half` feature i pairs with i + r/2 and `interleaved` feature 2i
    with 2i + 1, and both rotate pair i by the same angle. Pass-through features keep their
    places.

    Raises:
      ValueError: unknown layouts, odd `rotary_dim` or `rotary_dim > head_dim`.
    """
    _checks.one_of("source", source, LAYOUTS)
    _checks.one_of("target", target, LAYOUTS)
    head_dim = _checks.positive_int("head_dim", head_dim)
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}")
    n = rotary_dim // 2
    perm = np.arange(head_dim)
    if source == target:
        return perm
    # interleaved slot 2i + k (k = 0, 1) holds half feature i + k n.
    half_of_interleaved = (np.arange(rotary_dim) // 2) + (np.arange(rotary_dim) % 2) * n
    if target == "interleaved":
        perm[:rotary_dim] = half_of_interleaved
    else:
        perm[:rotary_dim] = np.argsort(half_of_interleaved)
    return perm


def permute_rope_weights(
    w,
    *,
    head_dim: int,
    rotary_dim: int | None = None,
    source: str,
    target: str,
    axis: int = -1,
):
    """Converts q/k projection weights between the `half` and `interleaved` RoPE layouts.

    `w`'s `axis` holds the output features, `num_heads * head_dim` of them (a kernel
    `[d_model, H * D]`, a bias `[H * D]`, or `[..., D]` per head); each head's features are
    permuted by `rope_permutation`. A pure gather: converting there and back is bit-exact.

    Raises:
      ValueError: `w.shape[axis]` not a multiple of `head_dim`, or as `rope_permutation`.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    perm = rope_permutation(head_dim, rotary_dim, source=source, target=target)
    w = jnp.asarray(w)
    if not isinstance(axis, numbers.Integral) or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis must be an integer in [-{w.ndim}, {w.ndim}), got {axis!r}")
    size = w.shape[axis]
    if size % head_dim:
        raise ValueError(
            f"w.shape[{axis}] = {size} must be a multiple of head_dim = {head_dim} "
            "(the projection's output features, num_heads * head_dim)"
        )
    full = (np.arange(size // head_dim)[:, None] * head_dim + perm[None, :]).reshape(-1)
    return jnp.take(w, full, axis=axis)
