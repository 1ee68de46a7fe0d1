"""Position ids: packed segments, decoding offsets, padding masks and randomized positions.

Every encoding reads integer `positions` `[..., L]`; packed rows, left padding, decoding with
a cache and randomized training positions are only different ways of building that array, so
no encoding special-cases them. All outputs are int32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jpe.encodings import _checks

__all__ = [
    "offset_positions",
    "positions_from_mask",
    "positions_from_segments",
    "randomized_positions",
]

_INT32_MAX = 2**31 - 1


def _last_axis_index(ndim: int, length: int) -> jax.Array:
    """arange(length) as int32, shaped `[1, ..., 1, length]` with `ndim` axes."""
    return jnp.arange(length, dtype=jnp.int32).reshape((1,) * (ndim - 1) + (length,))


def positions_from_segments(segment_ids) -> jax.Array:
    """Positions that restart at 0 at the start of every segment of a packed row.

    A segment starts at t = 0 and wherever segment_ids[t] != segment_ids[t - 1]; then
    position[t] = t - (start of the segment holding t). The start is a running maximum over
    the row (`lax.cummax`, an associative scan), so there is no Python or sequential loop.
    Padding packed as its own segment id gets positions like any other segment.

    Example:
      >>> positions_from_segments(jnp.array([1, 1, 1, 2, 2, 0]))
      Array([0, 1, 2, 0, 1, 0], dtype=int32)

    Args:
      segment_ids: integer array `[..., L]`.

    Returns:
      int32 `[..., L]`.

    Raises:
      ValueError: if `segment_ids` is not an integer array of rank >= 1.
    """
    segment_ids = _checks.integer_array("segment_ids", segment_ids)
    _checks.min_rank("segment_ids", segment_ids, 1, "[..., L]")
    length = segment_ids.shape[-1]
    if length == 0:
        return jnp.zeros(segment_ids.shape, jnp.int32)
    first = jnp.ones(segment_ids.shape[:-1] + (1,), bool)
    starts = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    index = _last_axis_index(segment_ids.ndim, length)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - segment_start


def offset_positions(length: int, offset=0) -> jax.Array:
    """Positions offset + 0, offset + 1, ..., offset + length - 1, per row.

    position[..., t] = offset[...] + t. A scalar offset gives `[L]`; an offset of shape
    `[...]` (one per row) gives `[..., L]`. Offsets may be negative: decoding continues at the
    cache length, and a left-padded row can start below 0 so that its first real token is 0.

    Args:
      length: number of positions L, an integer >= 0 (static).
      offset: integer scalar or integer array `[...]`.

    Returns:
      int32 `[..., L]`.

    Raises:
      ValueError: if `length` is not an integer >= 0 or `offset` is not an integer.
    """
    length = _checks.positive_int("length", length, minimum=0)
    offset = _checks.integer_array("offset", offset).astype(jnp.int32)
    return offset[..., None] + _last_axis_index(offset.ndim + 1, length)


def positions_from_mask(mask) -> jax.Array:
    """Positions that count only real tokens: cumsum(mask) - 1, and 0 on padding.

    position[..., t] = (number of real tokens in [0, t]) - 1 where mask[..., t], else 0.
    A left-padded row [0, 0, 1, 1, 1] gets [0, 0, 0, 1, 2], the same positions its real
    tokens have unpadded; a right-padded row [1, 1, 1, 0, 0] gets [0, 1, 2, 0, 0]. Holes in
    the middle of a row are skipped. The 0 on padding is a placeholder: padding must still
    be masked out of attention.

    Args:
      mask: boolean or integer array `[..., L]`, true (nonzero) on real tokens.

    Returns:
      int32 `[..., L]`.

    Raises:
      ValueError: if `mask` is not boolean or integer, or has rank 0.
    """
    mask = jnp.asarray(mask)
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"mask must have a boolean or integer dtype, got {mask.dtype}")
    _checks.min_rank("mask", mask, 1, "[..., L]")
    real = mask != 0
    count = jnp.cumsum(real.astype(jnp.int32), axis=-1)
    return jnp.where(real, count - 1, 0)


def randomized_positions(key: jax.Array, shape: Sequence[int], max_position: int) -> jax.Array:
    """Sorted random positions: per row, L distinct integers drawn uniformly from [0, max_position).

    Ruoss et al. 2023, "Randomized Positional Encodings Boost Length Generalization of
    Transformers" (arXiv 2305.16843; google-deepmind/randomized_positional_encodings,
    `noisy_fixed_positional_encodings`): train with positions sampled without replacement
    from a range much longer than any test length (the paper's example uses 2048) and sorted,
    so that at test time longer inputs still use positions seen in training.

    Each row draws max_position independent random 32-bit keys and keeps the indices of the L
    largest (`lax.top_k`), which is a uniform L-subset, then sorts them: O(max_position) work
    and memory per row, static shapes, fit for `jit`. (Equal keys, probability about
    L * max_position * 2**-32 per row, are broken towards lower indices.)

    Args:
      key: a JAX PRNG key.
      shape: the static output shape `(..., L)`, integers >= 0.
      max_position: the exclusive upper bound, an integer with L <= max_position < 2**31.

    Returns:
      int32 `shape`, strictly increasing along the last axis.

    Raises:
      ValueError: if `shape` is not a non-empty sequence of integers >= 0, `max_position` is
        not an integer >= 1 that fits in int32, or L > max_position.
    """
    if isinstance(shape, int) or not isinstance(shape, Sequence) or not shape:
        raise ValueError(f"shape must be a non-empty sequence of integers (..., L), got {shape!r}")
    shape = tuple(_checks.positive_int("shape", n, minimum=0) for n in shape)
    max_position = _checks.positive_int("max_position", max_position)
    if max_position > _INT32_MAX:
        raise ValueError(f"max_position must be at most 2**31 - 1, got {max_position}")
    length = shape[-1]
    if length > max_position:
        raise ValueError(
            f"shape[-1] (L = {length}) must be <= max_position ({max_position}) to draw "
            "L distinct positions"
        )
    if length == 0:
        return jnp.zeros(shape, jnp.int32)
    scores = jax.random.bits(key, shape[:-1] + (max_position,), jnp.uint32)
    _, chosen = jax.lax.top_k(scores, length)  # distinct indices of the L largest keys
    return jnp.sort(chosen, axis=-1).astype(jnp.int32)
