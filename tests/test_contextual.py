"""CoPE against a loop written from Golovneva et al. 2024 (arXiv 2405.18719), Section 3."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpe.encodings.contextual import cope_bias, cope_positions


def reference(q, k, pos_emb):
    """Causal CoPE term for one batch row, float64 loops: [H, L, L] (zero where masked)."""
    q, k, e = (np.asarray(t, np.float64) for t in (q, k, pos_emb))
    length, heads, d = q.shape
    npos = e.shape[0]
    out = np.zeros((heads, length, length))
    for h in range(heads):
        for i in range(length):
            gates = [1 / (1 + np.exp(-q[i, h] @ k[t, h] / np.sqrt(d))) for t in range(i + 1)]
            for j in range(i + 1):
                p = min(sum(gates[j : i + 1]), npos - 1)
                lo = int(np.floor(p))
                hi = min(lo + 1, npos - 1)
                w = p - lo
                out[h, i, j] = (1 - w) * q[i, h] @ e[lo] + w * q[i, h] @ e[hi]
    return out


@pytest.mark.parametrize("npos", [3, 16])
def test_matches_loop_reference(npos):
    kq, kk, ke = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (2, 7, 2, 4))
    k = jax.random.normal(kk, (2, 7, 2, 4))
    e = jax.random.normal(ke, (npos, 4))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    got = jax.jit(cope_bias)(q, logits, mask, e)
    chex.assert_shape(got, (2, 2, 7, 7))
    for b in range(2):
        want = reference(q[b], k[b], e)
        np.testing.assert_allclose(np.where(mask[0], got[b], 0), want, atol=1e-5, rtol=1e-5)


def test_positions_count_gates_and_decrease_along_keys():
    logits = jnp.zeros((1, 1, 4, 4))  # every gate is 1/2
    mask = jnp.tril(jnp.ones((4, 4), bool))[None, None]
    pos = cope_positions(logits, mask)[0, 0]
    # p_ij = (i - j + 1) / 2 for j <= i
    want = np.tril((np.arange(4)[:, None] - np.arange(4)[None, :] + 1) / 2)
    np.testing.assert_allclose(pos, want)
    # with gates saturated to 1 the positions are the relative distances + 1
    pos = cope_positions(jnp.full((1, 1, 4, 4), 50.0), mask)[0, 0]
    np.testing.assert_allclose(pos, np.tril(np.arange(4)[:, None] - np.arange(4)[None, :] + 1))


def test_errors():
    q = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="pos_emb"):
        cope_bias(q, jnp.zeros((1, 2, 3, 3)), True, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="logits"):
        cope_bias(q, jnp.zeros((1, 2, 4, 3)), True, jnp.zeros((5, 4)))
