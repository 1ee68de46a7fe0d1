"""Contextual position encoding (CoPE): positions counted by the content.

Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important",
arXiv 2405.18719, Section 3 (reference code: facebookresearch/RAM, projects/cope). A gate
g_ij = sigmoid(q_i . k_j / sqrt(D)) decides whether key j counts; the position of key j
seen from query i is p_ij = sum_{t=j..i} g_it, a fraction in general, and the logit gains
q_i . e[p_ij] with e interpolated linearly between the integer position embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpe.encodings import _checks, relative

__all__ = ["cope_bias", "cope_positions"]


def cope_positions(logits, mask) -> jax.Array:
    """p_ij = sum over keys t >= j (and allowed by `mask`) of sigmoid(logits_it).

    Args:
      logits: `[..., Lq, Lk]` attention logits (already scaled by 1/sqrt(D)).
      mask: bool, broadcastable to `logits`: keys a query may attend to (causal: t <= i), so
        the sum runs over j..i.

    Returns:
      float32 `[..., Lq, Lk]`, non-increasing in j along each row of allowed keys.
    """
    logits = jnp.asarray(logits, jnp.float32)
    gates = jnp.where(mask, jax.nn.sigmoid(logits), 0.0)
    # A reversed cumulative sum over keys: sum_{t >= j}.
    return jnp.flip(jnp.cumsum(jnp.flip(gates, axis=-1), axis=-1), axis=-1)


def cope_bias(q, logits, mask, pos_emb) -> jax.Array:
    """CoPE's logit term q_i . e[p_ij], `[B, H, Lq, Lk]` float32.

    Positions above `npos - 1` saturate there (the paper's p_max; the reference code clamps
    likewise), so `npos` bounds how far the model can count.

    Args:
      q: `[B, Lq, H, D]` queries.
      logits: `[B, H, Lq, Lk]` scaled logits q . k / sqrt(D) (plus any bias).
      mask: bool `[B, 1 or H, Lq, Lk]`, the keys each query may attend to.
      pos_emb: `[npos, D]` learned position embeddings e[0 .. npos - 1].

    Raises:
      ValueError: mismatched shapes.
    """
    q, pos_emb = jnp.asarray(q), jnp.asarray(pos_emb)
    _checks.min_rank("q", q, 4, "[B, Lq, H, D]")
    if pos_emb.ndim != 2 or pos_emb.shape[1] != q.shape[-1]:
        raise ValueError(f"pos_emb must have shape [npos, D={q.shape[-1]}], got {pos_emb.shape}")
    if jnp.ndim(logits) != 4 or jnp.shape(logits)[2] != q.shape[1]:
        raise ValueError(
            f"logits must have shape [B, H, Lq={q.shape[1]}, Lk], got {jnp.shape(logits)}"
        )
    npos = pos_emb.shape[0]
    pos = jnp.minimum(cope_positions(logits, mask), npos - 1)  # [B, H, Lq, Lk], >= 0
    # q . e[n] for every integer n: [B, H, Lq, npos]
    at_int = jnp.einsum("bqhd,nd->bhqn", q.astype(jnp.float32), pos_emb.astype(jnp.float32))
    lead = jnp.broadcast_shapes(at_int.shape[:-1], pos.shape[:-1])
    at_int = jnp.broadcast_to(at_int, lead + (npos,))
    pos = jnp.broadcast_to(pos, lead + pos.shape[-1:])
    lower = jnp.floor(pos)
    frac = pos - lower  # NaN where a NaN logit reached the count, and so is the term
    # Clipped: a NaN position casts to an arbitrary integer, which must still index in bounds.
    lower = jnp.clip(lower.astype(jnp.int32), 0, npos - 1)
    upper = jnp.minimum(lower + 1, npos - 1)
    # One int32 index per element into the flattened table, not a tuple of every axis's
    # (`take_along_axis`): XLA:CPU's gather and its scatter-add gradient cost less, as for
    # Shaw (`relative._take_along_last`). `python train/bench.py train --pe none,cope
    # --rounds 5 --steps 5`, two runs each, alternating with the previous commit (e27df3b):
    # CoPE's step 507.5 and 509.4 ms before, 377.5 and 479.8 ms after.
    take = lambda idx: relative._take_along_last(at_int, idx)
    return take(lower) * (1.0 - frac) + take(upper) * frac
