"""Keeping XLA from recomputing small tables inside large loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["materialized"]


def materialized(arrays):
    """`arrays` (a pytree), computed once into buffers of their own rather than inside each
    consumer.

    XLA fuses a producer into its consumer's loop: a `[L, n]` cos or sin broadcast into a
    `[B, L, H, D]` rotation, or a `[1, H, bq, bk]` bias added to `[B, H, bq, bk]` logits, is then
    recomputed for every batch row (and head), in both passes; and XLA:CPU drops
    `jax.lax.optimization_barrier` before it fuses. A conditional's results are buffers, so the
    arrays pass through one whose two branches both return them unchanged; its predicate is
    data, so XLA cannot fold it away. Values and gradients are those of `arrays`.
    """
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        return arrays
    pred = jnp.isnan(jnp.ravel(leaves[0])[0])
    return jax.lax.cond(pred, _plus_zero, _identity, arrays)


# The branches are module-level functions, not closures made per call: JAX caches a branch's
# trace by the function object, so an eagerly run conditional (a model called outside `jit`)
# compiles once per shape instead of once per call.
def _plus_zero(arrays):
    return jax.tree.map(lambda t: t + jnp.zeros((), t.dtype), arrays)


def _identity(arrays):
    return arrays
