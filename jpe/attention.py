"""Exact softmax attention over key blocks, asking the encoding for its bias one block at a time.

The logits of a query block against a key block are `scale * q . k + bias_fn(q_pos, k_pos)`,
masked (causal by position, same segment, valid key) and folded into a running softmax
(Milakov & Gimelshein 2018, arXiv 1805.02867; the form FlashAttention uses, arXiv 2205.14135).
Only `[B, H, bq, bk]` logits exist at any time, so memory is linear in the sequence length and
no `[H, L, L]` bias is ever built, in the forward pass and in the backward pass. The backward
pass is FlashAttention-2's (arXiv 2307.08691, Algorithm 2) as a `jax.custom_vjp`: it keeps only
the output and each row's log-sum-exp, recomputes a block's probabilities from them and asks
the encoding's bias for its own gradient (`jax.vjp` of `bias_fn` per block, so a T5 table or a
FIRE MLP trains), and a value term likewise (`value_fn`, linear in the weights: Shaw et al.'s
relative values). Block pairs that every mask rules out (above the causal diagonal) are skipped.
The custom VJP takes every array it reads as an argument (positions, segments and the key mask
included), so a gradient can be taken inside or outside `jax.jit` (`jax.grad(jax.jit(f))`),
under `jax.checkpoint` and under `jax.vmap`.
The hook that needs whole rows (`contextual_bias_fn`) takes the same loops differentiated by
JAX, with a checkpoint per block. A row with no key to
attend to (a padding query, say) gives zeros rather than NaN, and whatever a masked-out key or
value holds (NaN included) never reaches a row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jpe._fusion import materialized
from jpe.encodings import _checks

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "attention",
    "choose_implementation",
    "target_backend",
]

#: The values `implementation` accepts (besides None, which picks one for the backend).
IMPLEMENTATIONS = ("xla", "pallas", "cudnn")

DEFAULT_BLOCK_SIZE = 512
_MASKED = -1e30  # finite, so a fully masked row stays NaN-free
# The fused XLA path's running maximum starts here, above _MASKED: exp(_MASKED - max) is then
# exactly 0, so masked logits need no second select after the exponential (a row whose every
# key is masked sums to 0). Logits at or below it count as masked.
_FLOOR = -1e29

BiasFn = Callable[..., jnp.ndarray]

_TARGET: list[str] = []


@contextlib.contextmanager
def target_backend(backend: str):
    """Within it, attention is built for `backend` ("cpu", "gpu" or "tpu") rather than JAX's
    default backend: for compiling ahead of time for another platform (`train/compile.py`)."""
    if backend not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"backend must be one of 'cpu', 'gpu', 'tpu', got {backend!r}")
    _TARGET.append(backend)
    try:
        yield
    finally:
        _TARGET.pop()


def _backend() -> str:
    return _TARGET[-1] if _TARGET else jax.default_backend()


def _blocks(x: jnp.ndarray, block: int, fill) -> jnp.ndarray:
    """`[B, L, ...]` -> `[n, B, block, ...]`, padding L up to a multiple of `block`."""
    length = x.shape[1]
    n = -(-length // block)
    pad = n * block - length
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape((x.shape[0], n, block) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _batched(
    name: str, x, batch: int, length: int, default, kind: str = "int", *, share: bool = False
) -> jnp.ndarray:
    """`x` `[L]` or `[B, L]` (or None for `default`) as `[B, L]`; `kind` "int" needs an integer
    dtype, "mask" a boolean or integer one. With `share`, `[L]` and `[1, L]` stay `[1, L]`, so
    whatever is computed from them (biases, masks) is computed once for the whole batch and
    broadcast."""
    if x is None:
        x = default
    elif kind == "int":
        x = _checks.integer_array(name, x)
    else:
        x = jnp.asarray(x)
        if not (jnp.issubdtype(x.dtype, jnp.bool_) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"{name} must have a boolean dtype, got {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != length or x.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape [{length}] or [{batch}, {length}], got {x.shape}")
    if share and x.shape[0] == 1:
        return x
    return jnp.broadcast_to(x, (batch, length))


def attention(
    q,
    k,
    v,
    *,
    bias_fn: BiasFn | None = None,
    query_bias_fn: Callable[..., jnp.ndarray] | None = None,
    value_fn: Callable[..., jnp.ndarray] | None = None,
    contextual_bias_fn: Callable[..., jnp.ndarray] | None = None,
    causal: bool = False,
    q_positions=None,
    k_positions=None,
    segment_ids=None,
    kv_mask=None,
    block_size: int | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jnp.ndarray:
    """Softmax attention computed over key blocks with an online softmax.

    out_i = sum_j softmax_j(scale * q_i . k_j + bias(i, j) + mask(i, j)) (v_j + value terms).

    The three optional hooks after `bias_fn` carry the names of the `jpe.nn.Encoding` hooks
    that fill them (`query_bias`, `value`, `contextual_bias`).

    Args:
      q: `[B, Lq, H, D]` queries.
      k, v: `[B, Lk, Hkv, D]` keys and values; `H` must be a multiple of `Hkv` (grouped-query
        attention: query head h reads key/value head h // (H // Hkv)).
      bias_fn: `bias_fn(q_positions, k_positions)` with `[B, bq]` and `[B, bk]` int blocks
        returning a float bias `[B or 1, H or 1, bq, bk]` (or without the batch axis).
      query_bias_fn: `query_bias_fn(q_block, q_positions, k_positions)`, a bias that also reads
        the query block `[B, bq, H, D]` (Shaw et al., Transformer-XL); added like `bias_fn`'s.
      value_fn: optional `value_fn(weights, q_positions, k_positions)` with unnormalised weights
        `[B, H, bq, bk]`, returning `[B, bq, H, D]` added to the weighted values (Shaw et al.'s
        relative value embeddings). It must be linear in `weights`.
      contextual_bias_fn: optional `contextual_bias_fn(q, logits, mask)` with `q`
        `[B, bq, H, D]`, the scaled and biased logits `[B, H, bq, Lk]` and the boolean mask
        `[B, 1, bq, Lk]`, returning a term added to the logits. It sees whole rows, so all
        keys must fit in one block (`block_size >= Lk`); CoPE needs it.
      causal: mask keys whose position is greater than the query's.
      q_positions: `[Lq]` or `[B, Lq]` int positions; default `arange(Lq) + Lk - Lq` (queries
        are the last Lq of the keys, as in decoding).
      k_positions: `[Lk]` or `[B, Lk]`; default `arange(Lk)`.
      segment_ids: `[B, L]` int ids (queries and keys share them; needs Lq == Lk) or a tuple
        `(q_segment_ids, k_segment_ids)`: tokens attend only within their own segment, so packed
        rows never mix. Give padding a segment of its own. Only a tuple is read as a pair; a
        list is one array (a nested list of two rows is a batch of two).
      kv_mask: `[B, Lk]` bool, False for keys that must not be attended to (empty cache slots).
      block_size: block length for queries and keys (default 512; the Pallas kernel's own
        default is smaller on GPU and for large biases, see `jpe.pallas_attention`); L need
        not divide by it.
      scale: logit scale, default `1 / sqrt(D)`; biases are added unscaled.
      implementation: "xla" (this blocked path), "pallas" (`jpe.pallas_attention`: the fused
        kernel that evaluates `bias_fn` inside it; `bias_fn` only; interpret mode on CPU),
        "cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`: GPU only, no bias
        hooks; masks other than plain causal order are passed to it as a dense
        `[B, 1, Lq, Lk]` boolean mask), or None: the Pallas kernel on TPU and GPU when only
        `bias_fn` is given, cuDNN on GPU for bf16/fp16 without any bias, this XLA path
        otherwise and always on CPU (`choose_implementation`).
    Returns:
      `[B, Lq, H, D]` in `q.dtype`. A query row is NaN only if a key it attends to (allowed by
      every mask) has a non-finite key or value, or its own logits are; keys it does not attend
      to never reach it, whatever they hold (padding, empty cache slots, future tokens).

    Raises:
      ValueError: shapes that do not match, `H` not a multiple of `Hkv`, a bad `block_size`,
        positions or segment ids that are not integers, `segment_ids` given as one array
        while Lq != Lk, or an `implementation` that is unknown or cannot serve these
        arguments on this backend (never a silent fallback).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, L, H, D], got {x.shape}")
    batch, q_len, num_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must both have shape [B={batch}, Lk, Hkv, D={head_dim}], "
            f"got k {k.shape} and v {v.shape}"
        )
    k_len, kv_heads = k.shape[1], k.shape[2]
    if num_heads % kv_heads:
        raise ValueError(
            f"the number of query heads ({num_heads}) must be a multiple of the number of "
            f"key/value heads ({kv_heads})"
        )
    groups = num_heads // kv_heads
    if block_size is not None:
        _checks.positive_int("block_size", block_size)
    scale = float(1.0 / np.sqrt(head_dim)) if scale is None else float(scale)
    q_positions_given, k_positions_given = q_positions, k_positions

    q_positions = _batched(
        "q_positions", q_positions, batch, q_len, jnp.arange(q_len) + (k_len - q_len), share=True
    )
    k_positions = _batched("k_positions", k_positions, batch, k_len, jnp.arange(k_len), share=True)
    if segment_ids is None:
        q_seg = jnp.zeros((1, q_len), jnp.int32)
        k_seg = jnp.zeros((1, k_len), jnp.int32)
    elif isinstance(segment_ids, tuple):
        if len(segment_ids) != 2:
            raise ValueError(
                f"segment_ids must be one [B, L] array or a tuple (q_ids, k_ids), got a tuple "
                f"of {len(segment_ids)}"
            )
        q_seg = _batched("segment_ids[0]", segment_ids[0], batch, q_len, None)
        k_seg = _batched("segment_ids[1]", segment_ids[1], batch, k_len, None)
    else:
        if q_len != k_len:
            raise ValueError(
                f"segment_ids as one array needs Lq == Lk (got {q_len} and {k_len}); "
                "pass a pair (q_segment_ids, k_segment_ids)"
            )
        q_seg = k_seg = _batched("segment_ids", segment_ids, batch, q_len, None)
    kv_valid = (
        jnp.ones((1, k_len), bool)
        if kv_mask is None
        else _batched("kv_mask", kv_mask, batch, k_len, None, kind="mask").astype(bool)
    )

    implementation = choose_implementation(
        implementation,
        bias_fn=bias_fn,
        query_bias_fn=query_bias_fn,
        value_fn=value_fn,
        contextual_bias_fn=contextual_bias_fn,
        dtype=q.dtype,
    )
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if implementation == "pallas":
        from jpe import pallas_attention

        return pallas_attention.flash_attention(
            q,
            k,
            v,
            bias_fn=bias_fn,
            causal=causal,
            q_positions=q_positions,
            k_positions=k_positions,
            q_segment_ids=q_seg,
            k_segment_ids=k_seg,
            kv_valid=kv_valid,
            block_size=block_size,
            scale=scale,
            interpret=_backend() == "cpu",
            platform=_backend(),
        )
    if implementation == "cudnn":
        plain = q_positions_given is None and k_positions_given is None
        plain = plain and segment_ids is None and kv_mask is None
        return _cudnn(
            q, k, v, causal, plain, q_positions, k_positions, q_seg, k_seg, kv_valid, scale
        )

    bq, bk = min(block, q_len), min(block, k_len)
    if contextual_bias_fn is None:
        return _xla_fused(
            q, k, v, bias_fn, query_bias_fn, value_fn, causal, q_positions, k_positions, q_seg,
            k_seg, kv_valid, bq, bk, scale,
        )  # fmt: skip
    if contextual_bias_fn is not None and bk < k_len:
        raise ValueError(
            f"contextual_bias_fn needs every key in one block: block_size ({block}) must be >= "
            f"Lk ({k_len})"
        )
    # [n, B, b, ...] blocks; padded keys are invalid, padded queries are dropped at the end.
    q_blocks = _blocks(q, bq, 0)
    qp_blocks, qs_blocks = _blocks(q_positions, bq, 0), _blocks(q_seg, bq, 0)
    k_blocks, v_blocks = _blocks(k, bk, 0), _blocks(v, bk, 0)
    kp_blocks, ks_blocks = _blocks(k_positions, bk, 0), _blocks(k_seg, bk, 0)
    kvalid_blocks = _blocks(kv_valid, bk, False)

    def logits_block(qb, qp, qs, kb, kp, ks, kvalid):
        # qb [B, bq, H, D] -> [B, bq, Hkv, G, D]; logits [B, Hkv, G, bq, bk] -> [B, H, bq, bk]
        qg = qb.reshape(batch, qb.shape[1], kv_heads, groups, head_dim)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kb, preferred_element_type=jnp.float32)
        s = s.reshape(batch, num_heads, qb.shape[1], kb.shape[1]) * scale
        for bias in (
            None if bias_fn is None else bias_fn(qp, kp),
            None if query_bias_fn is None else query_bias_fn(qb, qp, kp),
        ):
            if bias is not None:
                bias = jnp.asarray(bias, jnp.float32)
                s = s + (bias[None] if bias.ndim == 3 else bias)
        mask = (qs[:, :, None] == ks[:, None, :]) & kvalid[:, None, :]
        if causal:
            mask = mask & (kp[:, None, :] <= qp[:, :, None])
        mask = mask[:, None, :, :]
        if contextual_bias_fn is not None:
            s = s + contextual_bias_fn(qb, s, mask).astype(jnp.float32)
        return s, mask

    def query_block(qb, qp, qs):
        def step(carry, kv):
            m, denom, acc, poisoned = carry  # [B, H, bq] x 2, [B, bq, H, D], bool [B, H, bq]
            kb, vb, kp, ks, kvalid = kv
            # A non-finite key or value must reach only the rows that attend to it. It is
            # zeroed and left out of the softmax (so a zero weight never meets it: 0 * NaN),
            # and the rows that attend to it are flagged and set to NaN at the end; all else
            # stays finite, the backward pass included.
            k_finite, v_finite = jnp.isfinite(kb), jnp.isfinite(vb)
            kbad = ~(k_finite.all(axis=-1) & v_finite.all(axis=-1))  # [B, bk, Hkv]
            kb, vb = jnp.where(k_finite, kb, 0), jnp.where(v_finite, vb, 0)
            s, mask = logits_block(qb, qp, qs, kb, kp, ks, kvalid)
            # kbad [B, bk, Hkv] -> [B, H, 1, bk]: query head h reads key/value head h // groups
            kbad = jnp.repeat(kbad, groups, axis=2).transpose(0, 2, 1)[:, :, None, :]
            poisoned = poisoned | (mask & kbad).any(axis=-1)
            mask = mask & ~kbad
            s = jnp.where(mask, s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            denom_new = denom * correction + p.sum(axis=-1)
            pg = p.reshape(batch, kv_heads, groups, p.shape[2], p.shape[3])
            pv = jnp.einsum(
                "bkgqs,bskd->bqkgd", pg.astype(vb.dtype), vb, preferred_element_type=jnp.float32
            ).reshape(batch, p.shape[2], num_heads, head_dim)
            if value_fn is not None:
                pv = pv + value_fn(p, qp, kp).astype(jnp.float32)
            acc_new = acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv
            return (m_new, denom_new, acc_new, poisoned), None

        init = (
            jnp.full((batch, num_heads, qb.shape[1]), _MASKED, jnp.float32),
            jnp.zeros((batch, num_heads, qb.shape[1]), jnp.float32),
            jnp.zeros((batch, qb.shape[1], num_heads, head_dim), jnp.float32),
            jnp.zeros((batch, num_heads, qb.shape[1]), bool),
        )
        kv = (k_blocks, v_blocks, kp_blocks, ks_blocks, kvalid_blocks)
        if k_blocks.shape[0] == 1:
            (_, denom, acc, poisoned), _ = step(init, jax.tree.map(lambda t: t[0], kv))
        else:
            # Recompute each block's logits in the backward pass instead of storing them all.
            (_, denom, acc, poisoned), _ = jax.lax.scan(jax.checkpoint(step), init, kv)
        denom = jnp.moveaxis(denom, 1, 2)[..., None]  # [B, bq, H, 1]
        # No key at all: zeros. A NaN denominator (a NaN logit, e.g. from a NaN query) stays NaN.
        empty = denom == 0
        out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom))
        return jnp.where(jnp.moveaxis(poisoned, 1, 2)[..., None], jnp.nan, out)

    if q_blocks.shape[0] == 1:
        out = query_block(q_blocks[0], qp_blocks[0], qs_blocks[0])[None]
    else:
        # Checkpointed per query block: the backward pass recomputes one block's forward at a
        # time, so training memory stays linear in L (without it, the map would keep every
        # block's per-key-block residuals, O(L^2) in all).
        out = jax.lax.map(
            jax.checkpoint(lambda xs: query_block(*xs)), (q_blocks, qp_blocks, qs_blocks)
        )
    # [nq, B, bq, H, D] -> [B, Lq, H, D]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, -1, num_heads, head_dim)[:, :q_len]
    return out.astype(q.dtype)


def _xla_fused(
    q, k, v, bias_fn, query_bias_fn, value_fn, causal, q_positions, k_positions, q_seg, k_seg,
    kv_valid, bq, bk, scale,
):  # fmt: skip
    """The XLA path without `contextual_bias_fn`: `_flash_xla` on finite keys and
    values, then NaN for the rows that attend to a non-finite one (the contract of
    `attention`); the search for those rows runs only when there is one."""
    num_heads, kv_heads = q.shape[2], k.shape[2]
    k_finite, v_finite = jnp.isfinite(k), jnp.isfinite(v)
    kbad = ~(k_finite.all(axis=-1) & v_finite.all(axis=-1))  # [B, Lk, Hkv]
    k, v = jnp.where(k_finite, k, 0), jnp.where(v_finite, v, 0)
    out = _flash_xla(
        q, k, v, bias_fn, query_bias_fn, value_fn, causal, q_positions, k_positions, q_seg,
        k_seg, kv_valid, bq, bk, scale,
    )  # fmt: skip

    xs = (
        _blocks(k_positions, bk, 0),
        _blocks(k_seg, bk, 0),
        _blocks(kv_valid, bk, False),
        _blocks(kbad, bk, False),
    )
    operands = (q_positions, q_seg, jnp.asarray(bool(causal)), xs)
    hits = jax.lax.cond(kbad.any(), _poisoned_rows, _no_poisoned_rows, operands)
    hits = jnp.repeat(hits, num_heads // kv_heads, axis=2)[..., None]  # [B, Lq, H, 1]
    return jnp.where(hits, jnp.nan, out).astype(q.dtype)


# The branches of `_xla_fused`'s search are module-level functions of their operands, not
# closures made per call: JAX caches a branch's trace by the function object, so attention run
# outside `jit` compiles the search once per shape rather than once per call.
def _poisoned_rows(operands):
    """`[B, Lq, Hkv]`: does a row attend to a non-finite key or value, key block by key block."""
    q_positions, q_seg, causal, xs = operands  # [B', Lq] x 2, bool, blocked keys' arrays
    batch = xs[3].shape[1]

    def step(hits, x):
        kp, ks, kval, bad = x  # [B', bk] x 3, [B, bk, Hkv]
        mask = (q_seg[:, :, None] == ks[:, None, :]) & kval[:, None, :]
        mask = mask & ((kp[:, None, :] <= q_positions[:, :, None]) | ~causal)
        mask = jnp.broadcast_to(mask, (batch,) + mask.shape[1:]).astype(jnp.float32)
        n = jnp.einsum("bqk,bkh->bqh", mask, bad.astype(jnp.float32))
        return hits | (n > 0), None

    hits, _ = jax.lax.scan(step, _no_poisoned_rows(operands), xs)
    return hits


def _no_poisoned_rows(operands):
    _, q_seg, _, xs = operands
    return jnp.zeros((xs[3].shape[1], q_seg.shape[-1], xs[3].shape[3]), bool)


# ---------------------------------------------------------------------------------------------
# The XLA path's fused form: a custom VJP (FlashAttention-2's backward, arXiv 2307.08691, Alg. 2)
# so that the backward pass recomputes each block's probabilities from the saved log-sum-exp
# instead of differentiating the online softmax step by step. Used whenever no hook needs whole
# rows (`contextual_bias_fn`).


def _unbroadcast(x: jnp.ndarray, shape: tuple) -> jnp.ndarray:
    """Sums `x` down to `shape` (numpy broadcasting in reverse): the cotangent of a broadcast."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes == (0,):
        # The batch sum of a shared bias's gradient, as a product with ones: XLA:CPU's reduce
        # over the outermost axis ran at a quarter of the speed (measured, `bench.py train`).
        ones = jnp.ones((x.shape[0],), x.dtype)
        return jnp.tensordot(ones, x, axes=(0, 0))[None]
    return x.sum(axis=axes, keepdims=True) if axes else x


def _hoisted(fn: Callable, *examples):
    """`fn` traced once at `examples`, with the arrays it closes over hoisted out:
    `(call, consts, fixed)` where `call(args, consts, fixed) == fn(*args)`.

    Traced floating arrays (an encoding's parameters, or anything a gradient may flow into)
    are `consts`; other traced arrays (integer or boolean, built under the same `jit`) are
    `fixed`; concrete constants stay closed over. `jax.closure_convert` hoists only the
    first kind, so a hook that closed over an integer array of a `jit`'s trace left it in the
    custom VJP's closure, and `jax.grad(jax.jit(f))` failed."""
    closed = jax.make_jaxpr(fn)(*examples)
    values = list(closed.consts)
    traced = [i for i, c in enumerate(values) if isinstance(c, jax.core.Tracer)]
    floating = [i for i in traced if jnp.issubdtype(values[i].dtype, jnp.inexact)]
    others = [i for i in traced if i not in floating]
    kept = [None if i in traced else c for i, c in enumerate(values)]

    def call(args, consts, fixed):
        env = list(kept)
        for i, c in zip(floating, consts, strict=True):
            env[i] = c
        for i, c in zip(others, fixed, strict=True):
            env[i] = c
        (out,) = jax.core.eval_jaxpr(closed.jaxpr, env, *args)
        return out

    return call, [values[i] for i in floating], [values[i] for i in others]


def _flash_xla(
    q, k, v, bias_fn, query_bias_fn, value_fn, causal, q_positions, k_positions, q_seg, k_seg,
    kv_valid, bq, bk, scale,
):  # fmt: skip
    """The blocked attention of `attention` with a custom VJP; inputs as there (k and v already
    finite), `[B, Lq, H, D]` out. Layout inside: heads first, `[B, Hkv, G, L, D]` for queries
    and `[B, Hkv, L, D]` for keys and values, so every block product is a plain batched
    matrix product.

    A value term F(P) (`value_fn`, linear in the weights P) adds to P V. In the backward pass
    it adds F's transpose applied to dO to dP (its `jax.vjp` with respect to the weights) and
    returns its parameters' gradients; the softmax's row term, rowsum(dO * O), already holds
    it, since rowsum(P * F^T(dO)) = rowsum(dO * F(P)) for a linear F."""
    batch, q_len, num_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // kv_heads
    nq, nk = -(-q_len // bq), -(-k_len // bk)

    def heads_first(x, n, block, fill):  # [B, L, Hkv(, G), D] -> [n, B, Hkv(, G), block, D]
        x = _blocks(x, block, fill)  # [n, B, block, ...]
        return jnp.moveaxis(x, 2, -2)

    # Queries are scaled once here rather than every block's logits: [L, D], not [L, L].
    q = q * jnp.asarray(scale, q.dtype)
    qg = heads_first(q.reshape(batch, q_len, kv_heads, groups, head_dim), nq, bq, 0)
    kb, vb = heads_first(k, nk, bk, 0), heads_first(v, nk, bk, 0)
    qp, qs = _blocks(q_positions, bq, 0), _blocks(q_seg, bq, 0)  # [nq, B', bq]
    kp, ks = _blocks(k_positions, bk, 0), _blocks(k_seg, bk, 0)
    kval = _blocks(kv_valid, bk, False)

    def mask_of(qp, qs, kp, ks, kval):  # -> [B', 1, 1, bq, bk]
        mask = (qs[:, :, None] == ks[:, None, :]) & kval[:, None, :]
        if causal:
            mask = mask & (kp[:, None, :] <= qp[:, :, None])
        return mask[:, None, None]

    # The bias as a function of explicit arrays: what its hook closes over becomes arguments,
    # an encoding's parameters (`consts`) so that the backward pass can return their gradients,
    # and any integer or boolean array the same jit built (`fixed`) so that the custom VJP
    # closes over nothing of that trace (`_hoisted`).
    def total_bias(qb, qp, kp):
        out = None
        for bias in (
            None if bias_fn is None else bias_fn(qp, kp),
            None if query_bias_fn is None else query_bias_fn(qb, qp, kp),
        ):
            if bias is not None:
                bias = jnp.asarray(bias, jnp.float32)
                bias = bias[None] if bias.ndim == 3 else bias
                out = bias if out is None else out + bias
        return out

    has_bias = bias_fn is not None or query_bias_fn is not None
    if has_bias:
        qb0 = jax.ShapeDtypeStruct((batch, bq, num_heads, head_dim), q.dtype)
        bias_closed, consts, fixed = _hoisted(total_bias, qb0, qp[0], kp[0])
    else:
        bias_closed, consts, fixed = None, [], []
    # consts[:n_bias] and fixed[:n_fixed] are the bias's, the rest the value term's
    n_bias, n_fixed = len(consts), len(fixed)
    if value_fn is not None:
        p0 = jax.ShapeDtypeStruct((batch, num_heads, bq, bk), jnp.float32)
        value_closed, value_consts, value_fixed = _hoisted(value_fn, p0, qp[0], kp[0])
        consts, fixed = [*consts, *value_consts], [*fixed, *value_fixed]

        def value_of(consts, fixed, p, qp, kp):  # [B, Hkv, G, bq, bk] -> [B, Hkv, G, bq, D]
            weights = p.reshape(batch, num_heads, bq, bk)
            out = value_closed((weights, qp, kp), consts[n_bias:], fixed[n_fixed:])
            if out.shape != (batch, bq, num_heads, head_dim):
                raise ValueError(
                    f"value_fn must return [B, bq, H, D] = {(batch, bq, num_heads, head_dim)}; "
                    f"got {out.shape}"
                )
            out = out.astype(jnp.float32).reshape(batch, bq, kv_heads, groups, head_dim)
            return jnp.moveaxis(out, 1, 3)

    def bias_of(consts, fixed, qg_block, qp, kp):  # -> [B or 1, Hkv or 1, G or 1, bq, bk]
        qb = None
        if query_bias_fn is not None:  # [B, Hkv, G, bq, D] -> [B, bq, H, D], unscaled
            qb = jnp.moveaxis(qg_block, 3, 1).reshape(batch, bq, num_heads, head_dim) / scale
        else:
            qb = jnp.zeros((batch, bq, num_heads, head_dim), q.dtype)  # unread
        # Built once per block, not fused into the consumers of `[B, H, bq, bk]`: XLA would
        # redo a shared `[1, H, bq, bk]` bias (logs, buckets) for every batch row, in both passes.
        bias = materialized(bias_closed((qb, qp, kp), consts[:n_bias], fixed[:n_fixed]))
        if bias.ndim != 4 or bias.shape[-2:] != (bq, bk) or bias.shape[1] not in (1, num_heads):
            raise ValueError(
                f"bias_fn must return [B or 1, H or 1, bq, bk] or [H or 1, bq, bk] with "
                f"H={num_heads}, bq={bq}, bk={bk}; got {bias.shape}"
            )
        if bias.shape[1] == 1:
            return bias[:, :, None]
        return bias.reshape(bias.shape[0], kv_heads, groups, bq, bk)

    def logits(consts, fixed, qg_block, kb_block, qp, kp, mask):
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg_block, kb_block, preferred_element_type=jnp.float32)
        if has_bias:
            s = s + bias_of(consts, fixed, qg_block, qp, kp)
        return jnp.where(mask, s, _MASKED)

    def forward_row(consts, fixed, k_blocks, v_blocks, qg_i, qp_i, qs_i, kp, ks, kval):
        def step(carry, kv):
            m, denom, acc = carry
            kb_j, vb_j, kp_j, ks_j, kval_j = kv
            mask = mask_of(qp_i, qs_i, kp_j, ks_j, kval_j)

            def visit(carry):
                m, denom, acc = carry
                s = logits(consts, fixed, qg_i, kb_j, qp_i, kp_j, mask)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.exp(s - m_new[..., None])  # masked: exp(_MASKED - m_new) == 0
                correction = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bhgqk,bhkd->bhgqd", p.astype(vb_j.dtype), vb_j,
                    preferred_element_type=jnp.float32,
                )  # fmt: skip
                if value_fn is not None:
                    pv = pv + value_of(consts, fixed, p, qp_i, kp_j)
                return (
                    m_new,
                    denom * correction + p.sum(axis=-1),
                    acc * correction[..., None] + pv,
                )

            if nk == 1:
                return visit(carry), None
            # A block that every mask rules out (above the causal diagonal, another segment)
            # is skipped, not computed.
            return jax.lax.cond(mask.any(), visit, lambda c: c, carry), None

        shape = (batch, kv_heads, groups, bq)
        init = (
            jnp.full(shape, _FLOOR, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32),
        )
        kv = (k_blocks, v_blocks, kp, ks, kval)
        if nk == 1:
            (m, denom, acc), _ = step(init, jax.tree.map(lambda t: t[0], kv))
        else:
            (m, denom, acc), _ = jax.lax.scan(step, init, kv)
        empty = denom == 0  # no key at all: zeros
        out = jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, denom)[..., None])
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, denom)))
        return out, lse

    def forward(q_blocks, k_blocks, v_blocks, consts, where):
        qp, qs, kp, ks, kval, fixed = where
        if nq == 1:
            out, lse = forward_row(
                consts, fixed, k_blocks, v_blocks, q_blocks[0], qp[0], qs[0], kp, ks, kval
            )
            return out[None], lse[None]
        return jax.lax.map(
            lambda xs: forward_row(consts, fixed, k_blocks, v_blocks, *xs, kp, ks, kval),
            (q_blocks, qp, qs),
        )

    def pair_grads(consts, fixed, qg_i, qp_i, qs_i, do_i, lse_i, delta_i, kb_j, vb_j, kp_j, ks_j,
                   kval_j):  # fmt: skip
        """Gradients from one (query block, key block) pair: dq_i, dk_j, dv_j, dconsts."""
        mask = mask_of(qp_i, qs_i, kp_j, ks_j, kval_j)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg_i, kb_j, preferred_element_type=jnp.float32)
        bias_vjp = None
        if has_bias:
            bias, bias_vjp = jax.vjp(lambda c, g: bias_of(c, fixed, g, qp_i, kp_j), consts, qg_i)
            s = s + bias
        # lse >= _FLOOR (0 for a row with no key), so a masked logit gives exactly 0.
        p = jnp.exp(jnp.where(mask, s, _MASKED) - lse_i[..., None])  # [B, Hkv, G, bq, bk]
        dtype = vb_j.dtype
        dv = jnp.einsum(
            "bhgqk,bhgqd->bhkd", p.astype(dtype), do_i, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_i, vb_j, preferred_element_type=jnp.float32)
        dconsts_value = None
        if value_fn is not None:
            _, value_vjp = jax.vjp(lambda c, w: value_of(c, fixed, w, qp_i, kp_j), consts, p)
            dconsts_value, dp_value = value_vjp(do_i.astype(jnp.float32))
            dp = dp + dp_value
        ds = p * (dp - delta_i[..., None])
        dq = jnp.einsum(
            "bhgqk,bhkd->bhgqd", ds.astype(dtype), kb_j, preferred_element_type=jnp.float32
        )
        dk = jnp.einsum(
            "bhgqk,bhgqd->bhkd", ds.astype(dtype), qg_i, preferred_element_type=jnp.float32
        )
        dconsts = [jnp.zeros_like(c) for c in consts]
        if bias_vjp is not None:
            dconsts, dqg = bias_vjp(_unbroadcast(ds, bias.shape).astype(bias.dtype))
            if query_bias_fn is not None:
                dq = dq + dqg.astype(jnp.float32)
        if dconsts_value is not None:
            dconsts = [a + b for a, b in zip(dconsts, dconsts_value, strict=True)]
        return dq, dk, dv, list(dconsts)

    def backward(res, do):
        q_blocks, k_blocks, v_blocks, consts, where, out, lse = res
        qp, qs, kp, ks, kval, fixed = where
        do = do.astype(jnp.float32)
        delta = (do * out).sum(axis=-1)  # [nq, B, Hkv, G, bq]
        do = do.astype(q_blocks.dtype)
        if nq == 1 and nk == 1:
            dq, dk, dv, dconsts = pair_grads(
                consts, fixed, q_blocks[0], qp[0], qs[0], do[0], lse[0], delta[0],
                k_blocks[0], v_blocks[0], kp[0], ks[0], kval[0],
            )  # fmt: skip
            dq, dk, dv = dq[None], dk[None], dv[None]
        else:
            rows = (q_blocks, qp, qs, do, lse, delta)

            def key_block(carry, kv):  # one key block against every query block
                dq_all, dconsts = carry
                kb_j, vb_j, kp_j, ks_j, kval_j = kv

                def query_block(acc, xs):
                    dk_j, dv_j, dconsts = acc
                    qg_i, qp_i, qs_i, do_i, lse_i, delta_i = xs
                    mask = mask_of(qp_i, qs_i, kp_j, ks_j, kval_j)

                    def visit(_):
                        return pair_grads(
                            consts, fixed, qg_i, qp_i, qs_i, do_i, lse_i, delta_i,
                            kb_j, vb_j, kp_j, ks_j, kval_j,
                        )  # fmt: skip

                    def skip(_):
                        return (
                            jnp.zeros(qg_i.shape, jnp.float32),
                            jnp.zeros(kb_j.shape, jnp.float32),
                            jnp.zeros(vb_j.shape, jnp.float32),
                            [jnp.zeros_like(c) for c in consts],
                        )

                    dq_i, dk_ij, dv_ij, dc = jax.lax.cond(mask.any(), visit, skip, None)
                    dconsts = [a + b for a, b in zip(dconsts, dc, strict=True)]
                    return (dk_j + dk_ij, dv_j + dv_ij, dconsts), dq_i

                init = (
                    jnp.zeros(kb_j.shape, jnp.float32),
                    jnp.zeros(vb_j.shape, jnp.float32),
                    dconsts,
                )
                (dk_j, dv_j, dconsts), dq_parts = jax.lax.scan(query_block, init, rows)
                return (dq_all + dq_parts, dconsts), (dk_j, dv_j)

            init = (jnp.zeros(q_blocks.shape, jnp.float32), [jnp.zeros_like(c) for c in consts])
            (dq, dconsts), (dk, dv) = jax.lax.scan(
                key_block, init, (k_blocks, v_blocks, kp, ks, kval)
            )
        return (
            dq.astype(q_blocks.dtype),
            dk.astype(k_blocks.dtype),
            dv.astype(v_blocks.dtype),
            [d.astype(c.dtype) for d, c in zip(dconsts, consts, strict=True)],
            None,  # positions, segments, the key mask and `fixed`: integers and booleans
        )

    # Every array the passes read is an argument (`where`: the blocked positions, segments,
    # key mask and the hooks' `fixed` arrays), none a closure: a custom VJP that closed over the
    # arrays of a jit's trace would fail when the gradient is taken outside that jit
    # (`jax.grad(jax.jit(f))`).
    @jax.custom_vjp
    def fused(q_blocks, k_blocks, v_blocks, consts, where):
        return forward(q_blocks, k_blocks, v_blocks, consts, where)[0]

    def fused_fwd(q_blocks, k_blocks, v_blocks, consts, where):
        out, lse = forward(q_blocks, k_blocks, v_blocks, consts, where)
        return out, (q_blocks, k_blocks, v_blocks, consts, where, out, lse)

    fused.defvjp(fused_fwd, backward)
    out = fused(qg, kb, vb, list(consts), (qp, qs, kp, ks, kval, list(fixed)))
    # -> [B, nq, bq, Hkv, G, D] -> [B, Lq, H, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, nq * bq, num_heads, head_dim)[:, :q_len]
    return out


def choose_implementation(
    implementation: str | None,
    *,
    bias_fn=None,
    query_bias_fn=None,
    value_fn=None,
    contextual_bias_fn=None,
    dtype=jnp.float32,
    backend: str | None = None,
) -> str:
    """The attention implementation that serves these hooks on `backend` (default: JAX's, or
    the one `target_backend` names).

    None picks: "pallas" on TPU and GPU when no hook but `bias_fn` is given ("cudnn" instead
    on GPU when there is no bias at all and `dtype` is bfloat16 or float16), "xla" otherwise
    and on CPU. An explicit choice that cannot be served raises.

    Raises:
      ValueError: `implementation` not None or one of `IMPLEMENTATIONS`; "pallas" with
        `query_bias_fn`, `value_fn` or `contextual_bias_fn` (they need the query vectors or
        whole rows: only "xla" serves them); "cudnn" off a GPU or with any bias hook.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {', '.join(IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )
    backend = _backend() if backend is None else backend
    xla_only = [
        name
        for name, fn in (
            ("query_bias_fn", query_bias_fn),
            ("value_fn", value_fn),
            ("contextual_bias_fn", contextual_bias_fn),
        )
        if fn is not None
    ]
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if implementation is None:
        if backend not in ("gpu", "tpu") or xla_only:
            return "xla"
        if backend == "gpu" and bias_fn is None and half:
            return "cudnn"
        return "pallas"
    if implementation == "pallas" and xla_only:
        raise ValueError(
            f"implementation='pallas' serves bias_fn alone; {', '.join(xla_only)} "
            f"need implementation='xla' (supported here: xla)"
        )
    if implementation == "cudnn":
        if backend != "gpu":
            raise ValueError(
                f"implementation='cudnn' needs a GPU (the backend is {backend!r}); "
                f"use 'xla' or 'pallas'"
            )
        hooks = xla_only + (["bias_fn"] if bias_fn is not None else [])
        if hooks:
            supported = "xla" if xla_only else "xla, pallas"
            raise ValueError(
                f"implementation='cudnn' takes no bias; {', '.join(hooks)} given "
                f"(supported here: {supported})"
            )
    return implementation


def _cudnn(q, k, v, causal, plain, q_positions, k_positions, q_seg, k_seg, kv_valid, scale):
    """`jax.nn.dot_product_attention(implementation="cudnn")` with this module's masks: plain
    causal order when no positions, segments or key mask were given, else a dense boolean
    `[B, 1, Lq, Lk]` mask. Rows with no key give zeros."""
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & kv_valid[:, None, :]
    if causal:
        mask = mask & (k_positions[:, None, :] <= q_positions[:, :, None])
    mask = jnp.broadcast_to(mask[:, None], (q.shape[0], 1, q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if plain else mask,
        is_causal=causal and plain,
        scale=scale,
        implementation="cudnn",
    )
    keep = mask.any(-1)[:, 0, :, None, None]  # [B, Lq, 1, 1]
    return jnp.where(keep, out, 0).astype(q.dtype)
