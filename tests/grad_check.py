"""A check shared by the attention tests (`test_attention.py`, `test_pallas_attention.py`)."""

import jax
import numpy as np


def assert_grad_outside_jit_equals_inside(loss, args, argnums):
    """`jax.grad(jax.jit(loss))` against `jax.jit(jax.grad(loss))` at `args`: equal to float32
    rounding, and no gradient all zero. Returns the gradients taken inside `jit`."""
    outside = jax.grad(jax.jit(loss), argnums=argnums)(*args)
    inside = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    for got, want in zip(jax.tree.leaves(outside), jax.tree.leaves(inside), strict=True):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    return inside
