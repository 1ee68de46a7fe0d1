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


def test_flat_index_equals_the_per_axis_gather_with_gradients(monkeypatch):
    """The one-scalar-index gather (`relative._flat_rows`) against `take_along_axis`, which
    tables too large for an int32 index still use: values and the gradients of q, the logits
    and the embeddings, with positions past npos - 1 saturating (npos = 3)."""
    from jpe.encodings import relative

    kq, kk, ke, kg = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(kq, (2, 6, 2, 4))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, jax.random.normal(kk, (2, 6, 2, 4))) / 2.0
    e = jax.random.normal(ke, (3, 4))
    g = jax.random.normal(kg, (2, 2, 6, 6))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]

    def loss(q, logits, e):
        return jnp.sum(jnp.where(mask, cope_bias(q, logits, mask, e), 0.0) * g)

    calls = []
    original = relative._flat_rows
    monkeypatch.setattr(relative, "_flat_rows", lambda *a: calls.append(1) or original(*a))
    flat = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, logits, e)
    assert len(calls) == 2  # the lower and the upper neighbour
    monkeypatch.setattr(relative, "_FLAT_INDEX_LIMIT", 0)
    per_axis = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, logits, e)
    assert len(calls) == 2
    for got, want in zip(jax.tree.leaves(flat), jax.tree.leaves(per_axis), strict=True):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(cope_positions(logits, mask).max()) > 2  # some positions saturate at npos - 1


def test_a_nan_logit_stays_in_its_own_row():
    """A NaN logit makes NaN positions (and terms) only for the keys its count reaches, in its
    own row; every other row is unchanged."""
    kq, kk, ke = jax.random.split(jax.random.PRNGKey(4), 3)
    q = jax.random.normal(kq, (1, 5, 1, 4))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, jax.random.normal(kk, (1, 5, 1, 4)))
    e = jax.random.normal(ke, (8, 4))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    clean = jax.jit(cope_bias)(q, logits, mask, e)
    got = jax.jit(cope_bias)(q, logits.at[0, 0, 3, 2].set(jnp.nan), mask, e)
    assert np.isnan(got[0, 0, 3, :3]).all()  # keys j <= 2 count the NaN gate
    np.testing.assert_array_equal(got[0, 0, 3, 3:], clean[0, 0, 3, 3:])
    rows = np.array([0, 1, 2, 4])
    np.testing.assert_array_equal(got[0, 0, rows], clean[0, 0, rows])
