"""A fused Pallas flash-attention kernel that evaluates the positional bias inside the kernel.

FlashAttention (Dao et al. 2022, arXiv 2205.14135) and FlashAttention-2 (Dao 2023, arXiv
2307.08691): queries are taken one block at a time, keys and values stream through in blocks,
and an online softmax keeps only `[bq, bk]` logits alive. What is added here is the encoding's
bias, computed from the block's positions inside the kernel, so no `[H, L, L]` bias ever exists
in HBM, in the forward pass or the backward pass, and the bias's own parameters get gradients.

Design:
  * forward, two layouts of the same block-pair update:
    - loop (GPU's Triton, and the CPU interpreter): grid `(B, Lq / bq)`; one program holds a
      query block of every head and loops over key blocks, read from its row's keys and
      values through pointers.
    - grid (TPU's Mosaic): grid `(B, Lq / bq, Lk / bk)`, key blocks on the last
      ("arbitrary") axis; the running maxima, denominators and accumulators live in VMEM
      scratch, so VMEM holds one block of each operand whatever L is. Whether a pair is live
      is read from per-block summaries prefetched to SMEM (`[B, n]`, not a pair table), and a
      dead pair's index maps point at a block already fetched.
    Each block pair evaluates `bias_fn` once, `[H or 1, bq, bk]`, for all heads,
    then does one `[bq, D] x [D, bk]` product per head (query head h reads key/value head
    h // (H // Hkv): grouped-query attention). It writes the output and the log-sum-exp.
  * block skipping: a `[B, nq, nk]` table of live block pairs is computed from per-block
    minima and maxima of positions and segment ids and the key mask (a pair is dead when
    causal and its smallest key position exceeds its largest query position, when the segment
    ranges do not overlap, or when it has no valid key). In the loop layout, the key loop of
    each query block runs only from its first to its last live block (the loop bounds: under
    a causal mask a query block never visits a block wholly above the diagonal), and dead
    blocks in between (packed rows) are skipped by a branch; in the grid layout, a dead
    pair's program computes nothing and fetches nothing new.
  * backward (`jax.custom_vjp`): two kernels, as FlashAttention-2's. The dq kernel (grid over
    query blocks, loop over key blocks; on TPU, key blocks on the grid's last axis)
    recomputes the probabilities from the log-sum-exp, forms dS = P * (dP - delta) and
    accumulates dq; dS is also the cotangent of the block's bias, so a `jax.vjp` of the bias
    function inside the kernel turns it into the gradient of the bias's parameters, summed
    over key blocks and written once per (row, query block); the partial sums are added
    outside. The dk/dv kernel (grid over key blocks, loop over the live query blocks; on TPU,
    query blocks on the grid's last axis) accumulates dk and dv, summing the query heads of
    each key/value head.
  * the bias: `bias_fn(q_positions, k_positions)` with `[1, bq]` and `[1, bk]` int32 positions,
    as `jpe.attention` calls it, is traced once to a jaxpr; the arrays it closes over (an
    encoding's parameters: the T5 table, KERPLE's r1 and r2, FIRE's and DPB's MLPs) become
    kernel inputs, and the floating ones are differentiated. A `bias_fn` that takes a
    `kernel` keyword (`jpe.Encoding.bias`) is asked for `kernel=True`: the form without
    gathers, slices, concatenates or batched products, which Triton and Mosaic lower.

Rows with no key to attend to give zeros (and zero gradients). Invalid and padding keys are
zeroed before use, so whatever an empty cache slot holds never reaches a row; unlike the XLA
path, a non-finite key or value inside a computed block may reach rows of that block that mask
it out. On CPU the kernel runs with `interpret=True`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.extend import core as jax_core

__all__ = ["default_block_size", "flash_attention"]

_MASKED = -1e30
# of v5e's and v6e's 128 MiB per core: room for every head's [bq, bk] temporaries
_TPU_VMEM_LIMIT = 100 * 2**20
BLOCK_SIZE = 512
GPU_BLOCK_SIZE = 128
_MIN_BLOCK_SIZE = 128
_BIAS_ELEMENTS = 2**20
_BIG = np.iinfo(np.int32).max
_SMALL = np.iinfo(np.int32).min


def _pad(x: jax.Array, axis: int, length: int, fill) -> jax.Array:
    pad = length - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _block_stats(x, valid, n, block):
    """`[B, n * block]` ints and validity -> per-block (min, max) over valid entries, `[B, n]`."""
    x = x.reshape(x.shape[0], n, block)
    valid = valid.reshape(valid.shape[0], n, block)
    low = jnp.where(valid, x, _BIG).min(-1)
    high = jnp.where(valid, x, _SMALL).max(-1)
    return low, high


def _block_summaries(qp, qs, kp, ks, kvalid, q_len, k_len, bq, bk):
    """What decides whether a block pair is live, per block: `(qp_max, qs_min, qs_max)` of
    each query block, `[B, nq]`, and `(kp_min, ks_min, ks_max, any_k)` of each key block,
    `[B, nk]` int32, over valid entries (padding and invalid keys left out)."""
    nq, nk = qp.shape[1] // bq, kp.shape[1] // bk
    qvalid = jnp.broadcast_to(jnp.arange(qp.shape[1])[None, :] < q_len, qp.shape)
    kvalid = kvalid & (jnp.arange(kp.shape[1])[None, :] < k_len)
    _, qp_max = _block_stats(qp, qvalid, nq, bq)
    kp_min, _ = _block_stats(kp, kvalid, nk, bk)
    qs_min, qs_max = _block_stats(qs, qvalid, nq, bq)
    ks_min, ks_max = _block_stats(ks, kvalid, nk, bk)
    any_k = kvalid.reshape(kvalid.shape[0], nk, bk).any(-1).astype(jnp.int32)
    return (qp_max, qs_min, qs_max), (kp_min, ks_min, ks_max, any_k)


def _pair_live(query_block, key_block, causal):
    """Whether a (query block, key block) pair may hold an allowed pair, from their
    `_block_summaries` (arrays that broadcast, or the scalars a kernel reads)."""
    qp_max, qs_min, qs_max = query_block
    kp_min, ks_min, ks_max, any_k = key_block
    live = (any_k != 0) & (qs_min <= ks_max) & (ks_min <= qs_max)
    if causal:
        live = live & (kp_min <= qp_max)
    return live


def _bounds(table):
    """`[B, n, m]` booleans -> the first and one past the last true index, `[B, n]` int32
    (0, 0 where none is true)."""
    m = table.shape[-1]
    anything = table.any(-1)
    first = jnp.argmax(table, -1)
    last = m - jnp.argmax(table[..., ::-1], -1)
    return (
        jnp.where(anything, first, 0).astype(jnp.int32),
        jnp.where(anything, last, 0).astype(jnp.int32),
    )


def _live_blocks(qp, qs, kp, ks, kvalid, q_len, k_len, bq, bk, causal, summaries=False):
    """The `[B, nq, nk]` table of block pairs that hold at least one allowed (query, key) pair
    (a superset: a live pair may still be wholly masked), and each row's and column's first
    and last live block; with `summaries`, also the `_block_summaries` it was built from."""
    qsum, ksum = _block_summaries(qp, qs, kp, ks, kvalid, q_len, k_len, bq, bk)
    live = _pair_live([x[:, :, None] for x in qsum], [x[:, None, :] for x in ksum], causal)
    k_lo, k_hi = _bounds(live)
    q_lo, q_hi = _bounds(jnp.swapaxes(live, 1, 2))
    out = (live.astype(jnp.int32), k_lo, k_hi, q_lo, q_hi)
    return out + (qsum, ksum) if summaries else out


_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr"}
_CUSTOM = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


def _eval_jaxpr(jaxpr, consts, *args):
    """`jax.core.eval_jaxpr` for a bias traced outside any `shard_map` and evaluated inside
    one: nested calls are inlined, and each equation's recorded context and sharding (the
    outer mesh, which would clash with the shard's) are dropped. Custom derivative rules are
    inlined too: the bias is differentiated through its primal definition."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, dict(eqn.params)
        inputs = [read(v) for v in eqn.invars]
        inner = params.get(_CALLS.get(name) or _CUSTOM.get(name) or "", None)
        if inner is not None:
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            outs = _eval_jaxpr(inner_jaxpr, getattr(inner, "consts", []), *inputs)
        else:
            if params.get("sharding") is not None:
                params["sharding"] = None
            params = eqn.primitive.get_bind_params(params)
            out = eqn.primitive.bind(*inputs, **params)
            outs = out if eqn.primitive.multiple_results else [out]
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _largest(jaxpr) -> int:
    """The most elements of any array a jaxpr (and the jaxprs it calls) computes."""
    most = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            most = max(most, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax_core.Jaxpr):
                most = max(most, _largest(inner))
    return most


def default_block_size(
    bias_fn: Callable | None, q_len: int, k_len: int, num_heads: int, platform: str
) -> int:
    """The kernel's block length when none is given: `BLOCK_SIZE` (512), or `GPU_BLOCK_SIZE`
    (128) on GPU, where a Triton program holds a block's logits in registers. It is halved,
    down to 128, while the bias (in its kernel form) computes an array larger than both its
    own output and 2**20 elements: FIRE's and DPB's `[hidden, bq, bk]` MLP activations,
    which at blocks of 512 pass TPU's VMEM (DPB's backward needed 164 MiB of 128 at 256)
    and Triton's limit of 2**20 elements a tensor."""
    block = GPU_BLOCK_SIZE if platform == "gpu" else BLOCK_SIZE
    if bias_fn is None:
        return block
    bias_fn = _kernel_form(bias_fn)
    while block > _MIN_BLOCK_SIZE:
        bq, bk = min(block, q_len), min(block, k_len)
        jaxpr = _trace_bias(bias_fn, bq, bk, num_heads)[0]
        output = max(int(np.prod(v.aval.shape)) for v in jaxpr.outvars)
        if _largest(jaxpr) <= max(output, _BIAS_ELEMENTS):
            break
        block //= 2
    return block


def _kernel_form(bias_fn: Callable) -> Callable:
    """`bias_fn(..., kernel=True)` where it takes that keyword (`jpe.Encoding.bias`: the form
    with no gather, slice, concatenate or batched product, which Triton and Mosaic lower),
    else `bias_fn`."""
    try:
        parameters = inspect.signature(bias_fn).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return bias_fn
    return functools.partial(bias_fn, kernel=True) if "kernel" in parameters else bias_fn


def _trace_bias(bias_fn: Callable, bq: int, bk: int, num_heads: int):
    """`bias_fn` traced once at one row's block shapes: `(jaxpr, heads, consts)`, its
    closed-over arrays (an encoding's parameters) hoisted out as `consts`."""
    qp = jax.ShapeDtypeStruct((1, bq), jnp.int32)
    kp = jax.ShapeDtypeStruct((1, bk), jnp.int32)
    closed = jax.make_jaxpr(bias_fn)(qp, kp)
    if len(closed.out_avals) != 1:
        raise ValueError("bias_fn must return one array")
    shape = tuple(closed.out_avals[0].shape)
    ok = shape[-2:] == (bq, bk) and (
        (len(shape) == 4 and shape[0] == 1 and shape[1] in (1, num_heads))
        or (len(shape) == 3 and shape[0] in (1, num_heads))
    )
    if not ok:
        raise ValueError(
            f"bias_fn must return [1, H or 1, bq, bk] or [H or 1, bq, bk] "
            f"(H={num_heads}, bq={bq}, bk={bk}) for one row's blocks, got {shape}"
        )
    return closed.jaxpr, shape[-3], [jnp.asarray(c) for c in closed.consts]


class _Bias:
    """A traced bias (`_trace_bias`) in a kernel: its arrays become kernel inputs, the
    floating ones differentiated."""

    def __init__(self, traced):
        self.present = traced is not None
        self.diff, self.fixed, self.diff_index = [], [], []
        if not self.present:
            return
        self.jaxpr, self.heads, consts = traced
        self.shapes = [c.shape for c in consts]
        for i, c in enumerate(consts):
            if jnp.issubdtype(c.dtype, jnp.inexact):
                self.diff_index.append(i)
                self.diff.append(c)
            else:
                self.fixed.append(c)

    def __call__(self, diff, fixed, qp, kp):
        """Evaluates the bias in a kernel: `[1, bq]`, `[1, bk]` int32 -> float32
        `[H or 1, bq, bk]`."""
        consts, d, f = [], iter(diff), iter(fixed)
        for i in range(len(self.shapes)):
            consts.append(next(d) if i in self.diff_index else next(f))
        (out,) = _eval_jaxpr(self.jaxpr, consts, qp, kp)
        out = out.astype(jnp.float32)
        return out.reshape(out.shape[1:]) if out.ndim == 4 else out


def _pallas_call(
    kernel,
    *,
    grid,
    in_specs,
    out_specs,
    out_shape,
    n_replicated,
    num_scalar_prefetch=0,
    scratch_shapes=(),
    **kwargs,
):
    """`pl.pallas_call` whose inputs and outputs lead with the batch (except the last
    `n_replicated` inputs); under a mesh with a "data" axis that divides the batch, it runs per
    shard in `jax.shard_map`, with the grid, the outputs and whole-array blocks cut to the
    shard's rows. With `num_scalar_prefetch` (the first inputs, read by the index maps too) or
    `scratch_shapes`, the grid is a `PrefetchScalarGridSpec` (TPU's)."""

    def build(grid, in_specs, out_specs, out_shape):
        if num_scalar_prefetch or scratch_shapes:
            from jax.experimental.pallas import tpu as pltpu

            spec = pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=num_scalar_prefetch,
                grid=grid,
                in_specs=in_specs,
                out_specs=out_specs,
                scratch_shapes=list(scratch_shapes),
            )
            return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape, **kwargs)
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kwargs
        )

    def call(*args):
        mesh = jax.sharding.get_abstract_mesh()
        batch = grid[0]
        shards = 1 if mesh.empty else dict(mesh.shape).get("data", 1)
        if shards == 1 or batch % shards:
            return build(grid, in_specs, out_specs, out_shape)(*args)
        local = batch // shards

        def cut_spec(spec):
            shape = spec.block_shape
            if shape is None or shape[0] != batch:
                return spec
            return pl.BlockSpec((local,) + tuple(shape[1:]), spec.index_map)

        def cut_shape(x):
            return jax.ShapeDtypeStruct((local,) + tuple(x.shape[1:]), x.dtype)

        run = build(
            (local,) + tuple(grid[1:]),
            [cut_spec(s) for s in in_specs],
            [cut_spec(s) for s in out_specs],
            [cut_shape(x) for x in out_shape],
        )
        split = len(args) - n_replicated
        data, replicated = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
        return jax.shard_map(
            lambda b, r: run(*b, *r),
            mesh=mesh,
            in_specs=(data, replicated),
            out_specs=data,
            check_vma=False,
        )(list(args[:split]), list(args[split:]))

    return call


def _triton_params():
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _as_2d(x):
    """A kernel input of at least two dimensions: a scalar or vector becomes one row."""
    if x.ndim >= 2:
        return x
    return x.reshape(1, max(int(np.prod(x.shape)), 1))


def _read_consts(refs, shapes):
    return [r[...].reshape(s) for r, s in zip(refs, shapes, strict=True)]


def _full_spec(shape):
    zeros = (0,) * len(shape)
    return pl.BlockSpec(shape, lambda *_: zeros)


def _logits(q, k, scale):
    return jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    ) * jnp.float32(scale)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias_fn: Callable | None,
    causal: bool,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segment_ids: jax.Array,
    k_segment_ids: jax.Array,
    kv_valid: jax.Array,
    block_size: int | None,
    scale: float,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Flash attention with an in-kernel positional bias; `jpe.attention(implementation=
    "pallas")` calls it after checking its arguments.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, Hkv, D]` with H a multiple of Hkv.
      bias_fn: None, or `bias_fn(q_positions, k_positions)` with `[1, bq]` and `[1, bk]` int32
        positions returning `[1, H or 1, bq, bk]` (or `[H or 1, bq, bk]`) float; it must read
        nothing but the positions and arrays it closes over. If it takes a `kernel` keyword
        (`jpe.Encoding.bias`), it is called with `kernel=True`.
      causal: mask keys whose position exceeds the query's.
      q_positions, q_segment_ids: `[B or 1, Lq]` ints; k_positions, k_segment_ids, kv_valid:
        `[B or 1, Lk]` (kv_valid boolean).
      block_size: the query and key block length (each capped at its sequence length); L need
        not divide by it. None: `default_block_size`.
      scale: logit scale; the bias is added unscaled.
      interpret: run the kernels in Pallas's interpret mode (CPU).
      platform: "gpu" selects the Triton backend (`pltriton.CompilerParams`); anything else
        leaves Pallas's default (Mosaic on TPU). Default: JAX's default backend.
    Returns:
      `[B, Lq, H, D]` in q.dtype; differentiable in q, k, v and the bias's closed-over arrays.

    Under a mesh (`jax.set_mesh`) with a "data" axis that divides B, each kernel runs on its
    shard of the batch inside `jax.shard_map` (a Pallas call is not partitioned
    automatically); the heads are not split, and the bias's arrays are replicated.
    """
    q_len, num_heads = q.shape[1], q.shape[2]
    k_len = k.shape[1]
    platform = jax.default_backend() if platform is None else platform
    traced = None
    if bias_fn is not None:
        bias_fn = _kernel_form(bias_fn)
    if block_size is None:
        block_size = default_block_size(bias_fn, q_len, k_len, num_heads, platform)
    if bias_fn is not None:
        bq, bk = min(block_size, q_len), min(block_size, k_len)
        traced = _trace_bias(bias_fn, bq, bk, num_heads)
    kwargs = dict(
        causal=causal, block_size=block_size, scale=scale, interpret=interpret, platform=platform
    )
    return _flash_local(
        q,
        k,
        v,
        traced=traced,
        q_positions=q_positions,
        k_positions=k_positions,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        kv_valid=kv_valid,
        **kwargs,
    )


def _flash_local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    traced,
    causal: bool,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segment_ids: jax.Array,
    k_segment_ids: jax.Array,
    kv_valid: jax.Array,
    block_size: int,
    scale: float,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """`flash_attention` on one device's arrays."""
    batch, q_len, num_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // kv_heads
    bq, bk = min(block_size, q_len), min(block_size, k_len)
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    lq, lk = nq * bq, nk * bk

    def rows(x, length, padded, fill):
        x = jnp.broadcast_to(jnp.asarray(x).astype(jnp.int32), (batch, length))
        return _pad(x, 1, padded, fill)

    qp, qs = rows(q_positions, q_len, lq, 0), rows(q_segment_ids, q_len, lq, 0)
    kp, ks = rows(k_positions, k_len, lk, 0), rows(k_segment_ids, k_len, lk, 0)
    kval = rows(kv_valid, k_len, lk, 0)
    live, k_lo, k_hi, q_lo, q_hi, qsum, ksum = _live_blocks(
        qp, qs, kp, ks, kval != 0, q_len, k_len, bq, bk, causal, summaries=True
    )
    # Invalid and padding keys are zeroed here, so whatever they hold never reaches a row.
    kv_keep = (kval != 0)[:, :, None, None]
    k = jnp.where(kv_keep[:, :k_len], k, jnp.zeros_like(k))
    v = jnp.where(kv_keep[:, :k_len], v, jnp.zeros_like(v))
    # Key positions and the query positions the bias reads as rows [B, 1, L]; the query
    # positions and segments the masks read as columns [B, L, 1]: every mask is then a
    # broadcast of a column against a row, with no reshape inside the kernel.
    qpc, qs = qp[:, :, None], qs[:, :, None]
    qp, kp, ks, kval = (x[:, None, :] for x in (qp, kp, ks, kval))
    rows_in = (qp, qpc, qs, kp, ks, kval)
    bias = _Bias(traced)
    fixed = [_as_2d(c) for c in bias.fixed]
    diff_shapes = [c.shape for c in bias.diff]
    fixed_shapes = [c.shape for c in bias.fixed]
    n_diff, n_fixed = len(bias.diff), len(bias.fixed)

    # [B, L, H, D] -> [B, H, L, D], padded to whole blocks.
    qt = _pad(jnp.swapaxes(q, 1, 2), 2, lq, 0)
    kt = _pad(jnp.swapaxes(k, 1, 2), 2, lk, 0)
    vt = _pad(jnp.swapaxes(v, 1, 2), 2, lk, 0)
    out_dtype = q.dtype
    platform = jax.default_backend() if platform is None else platform
    # TPU (Mosaic) walks key blocks on the grid, so VMEM holds one block of each operand;
    # GPU (Triton) and the CPU interpreter loop over key blocks inside a program. Triton: its
    # pointer-based blocks let one program read any key block of a row (the loop bounds are
    # data), while Mosaic GPU stages each whole block in shared memory.
    on_grid = platform == "tpu"
    params = None
    if platform == "gpu" and not interpret:
        params = _triton_params()

    def tpu_params(semantics):
        if interpret:
            return None
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_TPU_VMEM_LIMIT)

    def mask_of(qp_col, qs_col, kp_row, ks_row, kval_row):  # [bq, 1] x 2, [1, bk] x 3
        mask = (qs_col == ks_row) & kval_row
        if causal:
            mask = mask & (kp_row <= qp_col)
        return mask

    def evaluate(diff, fixed_consts, qp_b, kp_b):
        return bias(diff, fixed_consts, qp_b, kp_b) if bias.present else None

    def head_bias(b, h):
        if b is None:
            return None
        if bias.heads == 1:
            return b.reshape(b.shape[1:])
        if params is not None:  # Triton cannot slice a value: select head h by a masked sum
            heads = jax.lax.broadcasted_iota(jnp.int32, b.shape, 0)
            return jnp.where(heads == h, b, 0.0).sum(0)
        return b[h]

    def biased_logits(qb, kb, bias_b, h, mask):
        s = _logits(qb, kb, scale)
        hb = head_bias(bias_b, h)
        if hb is not None:
            s = s + hb
        return jnp.where(mask, s, _MASKED)

    # ------------------------------------------------ one block pair, shared by both layouts

    def fwd_pair(qh, load_kv, mask, bias_b, carry):
        """The online-softmax update of every head's `(max, denominator, accumulator)`."""
        out = []
        for g in range(kv_heads):
            kb, vb = load_kv(g)
            for h in range(g * groups, (g + 1) * groups):
                m, denom, acc = carry[h]
                s = biased_logits(qh[h], kb, bias_b, h, mask)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
                correction = jnp.exp(m - m_new)
                pv = jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
                out.append((m_new, denom * correction + p.sum(-1), acc * correction[:, None] + pv))
        return tuple(out)

    def fwd_finish(carry, o_ref, lse_ref):
        for h, (m, denom, acc) in enumerate(carry):
            # Columns are made of floats, not of booleans: Mosaic cannot reshape a boolean
            # vector read back from VMEM into a column.
            column = denom[:, None]
            safe = jnp.where(column == 0, 1.0, column)
            o_ref[0, h] = jnp.where(column == 0, 0.0, acc / safe).astype(o_ref.dtype)
            lse_ref[0, h] = jnp.where(
                denom == 0, 0.0, m + jnp.log(jnp.where(denom == 0, 1.0, denom))
            )

    def dq_pair(qh, doh, lse, delta, load_kv, mask, diff, fixed_consts, qp_b, kp_b, carry):
        """dq of every head for one key block, and the bias's parameter gradients: dS is the
        cotangent of the block's bias."""
        dq, dparams = carry
        if bias.present:
            bias_b, bias_vjp = jax.vjp(lambda d: evaluate(d, fixed_consts, qp_b, kp_b), list(diff))
        else:
            bias_b = None
        new_dq, ds_all = [], []
        for g in range(kv_heads):
            kb, vb = load_kv(g)
            for h in range(g * groups, (g + 1) * groups):
                s = biased_logits(qh[h], kb, bias_b, h, mask)
                p = jnp.where(mask, jnp.exp(s - lse[h][:, None]), 0.0)
                dp = _logits(doh[h], vb, 1.0)
                ds = p * (dp - delta[h][:, None])
                ds_all.append(ds)
                new_dq.append(
                    dq[h]
                    + jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
                    * jnp.float32(scale)
                )
        if bias.present and n_diff:
            if bias.heads == 1:
                dbias = sum(ds_all)[None]
            elif params is None:
                dbias = jnp.stack(ds_all)
            else:  # Triton stacks two arrays at most: place each head by a select
                heads = jax.lax.broadcasted_iota(jnp.int32, (num_heads, bq, bk), 0)
                dbias = jnp.zeros((num_heads, bq, bk), jnp.float32)
                for h, ds in enumerate(ds_all):
                    dbias = jnp.where(heads == h, ds[None], dbias)
            (grads,) = bias_vjp(dbias)
            pairs = zip(dparams, grads, strict=True)
            dparams = tuple(a + g_.astype(jnp.float32) for a, g_ in pairs)
        return tuple(new_dq), dparams

    def dkv_pair(load_q, kh, vh, mask, bias_b, carry):
        """dk and dv of every key/value head for one query block (query heads summed)."""
        dk, dv = carry
        new_dk, new_dv = list(dk), list(dv)
        for h in range(num_heads):
            g = h // groups
            qb, dob, lse, delta = load_q(h)
            s = biased_logits(qb, kh[g], bias_b, h, mask)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            new_dv[g] = new_dv[g] + jax.lax.dot_general(
                p.astype(dob.dtype),
                dob,
                (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            dp = _logits(dob, vh[g], 1.0)
            ds = p * (dp - delta[:, None])
            new_dk[g] = new_dk[g] + jax.lax.dot_general(
                ds.astype(qb.dtype),
                qb,
                (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            ) * jnp.float32(scale)
        return tuple(new_dk), tuple(new_dv)

    def split_refs(refs, n_lead):
        """Kernel refs -> (leading inputs, differentiated consts, fixed consts, the rest)."""
        lead = refs[:n_lead]
        diff_refs = refs[n_lead : n_lead + n_diff]
        fixed_refs = refs[n_lead + n_diff : n_lead + n_diff + n_fixed]
        rest = refs[n_lead + n_diff + n_fixed :]
        return (
            lead,
            _read_consts(diff_refs, diff_shapes),
            _read_consts(fixed_refs, fixed_shapes),
            rest,
        )

    # ------------------------------------------------- loop layout: a program loops over blocks

    block_specs = dict(
        q_rows=pl.BlockSpec((1, 1, bq), lambda b, i: (b, 0, i)),
        q_cols=pl.BlockSpec((1, bq, 1), lambda b, i: (b, i, 0)),
        q_cols_all=pl.BlockSpec((1, lq, 1), lambda b, j: (b, 0, 0)),
        k_all=pl.BlockSpec((1, 1, lk), lambda b, i: (b, 0, 0)),
        q_all=pl.BlockSpec((1, 1, lq), lambda b, j: (b, 0, 0)),
        k_rows=pl.BlockSpec((1, 1, bk), lambda b, j: (b, 0, j)),
    )

    def key_block_of(kp_ref, ks_ref, kval_ref, start):
        kp_b, ks_b = kp_ref[0, :, pl.ds(start, bk)], ks_ref[0, :, pl.ds(start, bk)]
        return kp_b, ks_b, kval_ref[0, :, pl.ds(start, bk)] != 0

    def loop_kv(k_ref, v_ref, start):
        return lambda g: (k_ref[0, g, pl.ds(start, bk), :], v_ref[0, g, pl.ds(start, bk), :])

    def fwd_loop_kernel(*refs):
        lead, diff, fixed_consts, (o_ref, lse_ref) = split_refs(refs, 12)
        q_ref, k_ref, v_ref, qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead[:9]
        live_ref, lo_ref, hi_ref = lead[9:]
        b, i = pl.program_id(0), pl.program_id(1)
        qp_b, qpc_b, qs_b = qp_ref[0], qpc_ref[0], qs_ref[0]
        qh = [q_ref[0, h] for h in range(num_heads)]

        def visit(j, carry):
            start = j * bk
            kp_b, ks_b, kval_b = key_block_of(kp_ref, ks_ref, kval_ref, start)
            mask = mask_of(qpc_b, qs_b, kp_b, ks_b, kval_b)
            bias_b = evaluate(diff, fixed_consts, qp_b, kp_b)
            return fwd_pair(qh, loop_kv(k_ref, v_ref, start), mask, bias_b, carry)

        def body(j, carry):
            return jax.lax.cond(live_ref[b, i, j] != 0, lambda c: visit(j, c), lambda c: c, carry)

        carry = jax.lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, fwd_init())
        fwd_finish(carry, o_ref, lse_ref)

    def fwd_init():
        return tuple(
            (
                jnp.full((bq,), _MASKED, jnp.float32),
                jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, head_dim), jnp.float32),
            )
            for _ in range(num_heads)
        )

    def dq_loop_kernel(*refs):
        lead, diff, fixed_consts, (dq_ref, *dparam_refs) = split_refs(refs, 15)
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead[:6]
        qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead[6:12]
        live_ref, lo_ref, hi_ref = lead[12:]
        b, i = pl.program_id(0), pl.program_id(1)
        qp_b, qpc_b, qs_b = qp_ref[0], qpc_ref[0], qs_ref[0]
        qh = [q_ref[0, h] for h in range(num_heads)]
        doh = [do_ref[0, h] for h in range(num_heads)]
        lse = [lse_ref[0, h] for h in range(num_heads)]
        delta = [delta_ref[0, h] for h in range(num_heads)]

        def visit(j, carry):
            start = j * bk
            kp_b, ks_b, kval_b = key_block_of(kp_ref, ks_ref, kval_ref, start)
            mask = mask_of(qpc_b, qs_b, kp_b, ks_b, kval_b)
            load_kv = loop_kv(k_ref, v_ref, start)
            return dq_pair(
                qh, doh, lse, delta, load_kv, mask, diff, fixed_consts, qp_b, kp_b, carry
            )

        def body(j, carry):
            return jax.lax.cond(live_ref[b, i, j] != 0, lambda c: visit(j, c), lambda c: c, carry)

        init = (
            tuple(jnp.zeros((bq, head_dim), jnp.float32) for _ in range(num_heads)),
            tuple(jnp.zeros(s, jnp.float32) for s in diff_shapes),
        )
        dq, dparams = jax.lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, init)
        for h in range(num_heads):
            dq_ref[0, h] = dq[h].astype(dq_ref.dtype)
        for ref, g_ in zip(dparam_refs, dparams, strict=True):
            ref[0, 0] = _as_2d(g_)

    def dkv_loop_kernel(*refs):
        lead, diff, fixed_consts, (dk_ref, dv_ref) = split_refs(refs, 15)
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead[:6]
        qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead[6:12]
        live_ref, lo_ref, hi_ref = lead[12:]
        b, j = pl.program_id(0), pl.program_id(1)
        kp_b, ks_b = kp_ref[0], ks_ref[0]
        kval_b = kval_ref[0] != 0
        kh = [k_ref[0, g] for g in range(kv_heads)]
        vh = [v_ref[0, g] for g in range(kv_heads)]

        def visit(i, carry):
            start = i * bq
            qp_b = qp_ref[0, :, pl.ds(start, bq)]
            qpc_b, qs_b = qpc_ref[0, pl.ds(start, bq), :], qs_ref[0, pl.ds(start, bq), :]
            mask = mask_of(qpc_b, qs_b, kp_b, ks_b, kval_b)
            bias_b = evaluate(diff, fixed_consts, qp_b, kp_b)

            def load_q(h):
                rows_ = pl.ds(start, bq)
                return (
                    q_ref[0, h, rows_, :],
                    do_ref[0, h, rows_, :],
                    lse_ref[0, h, rows_],
                    delta_ref[0, h, rows_],
                )

            return dkv_pair(load_q, kh, vh, mask, bias_b, carry)

        def body(i, carry):
            return jax.lax.cond(live_ref[b, i, j] != 0, lambda c: visit(i, c), lambda c: c, carry)

        zeros = tuple(jnp.zeros((bk, head_dim), jnp.float32) for _ in range(kv_heads))
        dk, dv = jax.lax.fori_loop(lo_ref[b, j], hi_ref[b, j], body, (zeros, zeros))
        for g in range(kv_heads):
            dk_ref[0, g] = dk[g].astype(dk_ref.dtype)
            dv_ref[0, g] = dv[g].astype(dv_ref.dtype)

    # ----------------------------------- grid layout (TPU): key blocks are the grid's last axis
    # The scalar-prefetched tables (SMEM on TPU): per query block [B, 5 * nq] (k_lo, k_hi and
    # the query block's summaries), per key block [B, 6 * nk] (q_lo, q_hi and the summaries).
    # A program whose pair is dead computes nothing; its index maps clamp the block they fetch
    # into the live range, so a block outside it is not fetched again.
    q_table = jnp.concatenate([k_lo, k_hi, *qsum], axis=1)
    k_table = jnp.concatenate([q_lo, q_hi, *ksum], axis=1)

    def q_entry(ref, b, field, i):
        return ref[b, field * nq + i]

    def k_entry(ref, b, field, j):
        return ref[b, field * nk + j]

    def grid_live(qt_ref, kt_ref, b, i, j):
        query_block = [q_entry(qt_ref, b, 2 + f, i) for f in range(3)]
        key_block = [k_entry(kt_ref, b, 2 + f, j) for f in range(4)]
        return _pair_live(query_block, key_block, causal)

    def clamp(x, lo, hi):
        return jnp.minimum(jnp.maximum(x, lo), jnp.maximum(hi - 1, 0))

    def kv_index(b, i, j, qt_ref, kt_ref):  # the key block a (query block i, step j) reads
        return clamp(j, q_entry(qt_ref, b, 0, i), q_entry(qt_ref, b, 1, i))

    def q_index(b, j, i, qt_ref, kt_ref):  # the query block a (key block j, step i) reads
        return clamp(i, k_entry(kt_ref, b, 0, j), k_entry(kt_ref, b, 1, j))

    grid_specs = dict(
        q=pl.BlockSpec((1, num_heads, bq, head_dim), lambda b, i, j, *_: (b, 0, i, 0)),
        q_lse=pl.BlockSpec((1, num_heads, bq), lambda b, i, j, *_: (b, 0, i)),
        q_rows=pl.BlockSpec((1, 1, bq), lambda b, i, j, *_: (b, 0, i)),
        q_cols=pl.BlockSpec((1, bq, 1), lambda b, i, j, *_: (b, i, 0)),
        kv=pl.BlockSpec(
            (1, kv_heads, bk, head_dim), lambda b, i, j, *t: (b, 0, kv_index(b, i, j, *t), 0)
        ),
        k_rows=pl.BlockSpec((1, 1, bk), lambda b, i, j, *t: (b, 0, kv_index(b, i, j, *t))),
        # the dk/dv grid: (b, key block j, step i)
        t_q=pl.BlockSpec(
            (1, num_heads, bq, head_dim), lambda b, j, i, *t: (b, 0, q_index(b, j, i, *t), 0)
        ),
        t_q_lse=pl.BlockSpec((1, num_heads, bq), lambda b, j, i, *t: (b, 0, q_index(b, j, i, *t))),
        t_q_rows=pl.BlockSpec((1, 1, bq), lambda b, j, i, *t: (b, 0, q_index(b, j, i, *t))),
        t_q_cols=pl.BlockSpec((1, bq, 1), lambda b, j, i, *t: (b, q_index(b, j, i, *t), 0)),
        t_kv=pl.BlockSpec((1, kv_heads, bk, head_dim), lambda b, j, i, *_: (b, 0, j, 0)),
        t_k_rows=pl.BlockSpec((1, 1, bk), lambda b, j, i, *_: (b, 0, j)),
    )

    def vmem(shape):
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.VMEM(shape, jnp.float32)

    def fwd_grid_kernel(qt_ref, kt_ref, *refs):
        lead, diff, fixed_consts, rest = split_refs(refs, 9)
        q_ref, k_ref, v_ref, qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead
        o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
        b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(j == 0)
        def _():
            m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(grid_live(qt_ref, kt_ref, b, i, j))
        def _():
            mask = mask_of(qpc_ref[0], qs_ref[0], kp_ref[0], ks_ref[0], kval_ref[0] != 0)
            bias_b = evaluate(diff, fixed_consts, qp_ref[0], kp_ref[0])
            qh = [q_ref[0, h] for h in range(num_heads)]
            carry = tuple((m_sc[h], l_sc[h], acc_sc[h]) for h in range(num_heads))
            load_kv = lambda g: (k_ref[0, g], v_ref[0, g])  # noqa: E731
            for h, (m, denom, acc) in enumerate(fwd_pair(qh, load_kv, mask, bias_b, carry)):
                m_sc[h], l_sc[h], acc_sc[h] = m, denom, acc

        @pl.when(j == nk - 1)
        def _():
            carry = tuple((m_sc[h], l_sc[h], acc_sc[h]) for h in range(num_heads))
            fwd_finish(carry, o_ref, lse_ref)

    def dq_grid_kernel(qt_ref, kt_ref, *refs):
        lead, diff, fixed_consts, rest = split_refs(refs, 12)
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead[:6]
        qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead[6:]
        dq_ref = rest[0]
        dparam_refs = rest[1 : 1 + n_diff]
        dq_sc = rest[1 + n_diff]
        dparam_sc = rest[2 + n_diff :]
        b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(j == 0)
        def _():
            dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
            for ref in dparam_sc:
                ref[...] = jnp.zeros(ref.shape, jnp.float32)

        @pl.when(grid_live(qt_ref, kt_ref, b, i, j))
        def _():
            mask = mask_of(qpc_ref[0], qs_ref[0], kp_ref[0], ks_ref[0], kval_ref[0] != 0)
            heads = range(num_heads)
            qh, doh = [q_ref[0, h] for h in heads], [do_ref[0, h] for h in heads]
            lse, delta = [lse_ref[0, h] for h in heads], [delta_ref[0, h] for h in heads]
            carry = (
                tuple(dq_sc[h] for h in heads),
                tuple(r[...].reshape(s) for r, s in zip(dparam_sc, diff_shapes, strict=True)),
            )
            load_kv = lambda g: (k_ref[0, g], v_ref[0, g])  # noqa: E731
            dq, dparams = dq_pair(
                qh, doh, lse, delta, load_kv, mask, diff, fixed_consts, qp_ref[0], kp_ref[0], carry
            )
            for h in heads:
                dq_sc[h] = dq[h]
            for ref, g_ in zip(dparam_sc, dparams, strict=True):
                ref[...] = _as_2d(g_)

        @pl.when(j == nk - 1)
        def _():
            for h in range(num_heads):
                dq_ref[0, h] = dq_sc[h].astype(dq_ref.dtype)
            for ref, acc in zip(dparam_refs, dparam_sc, strict=True):
                ref[0, 0] = acc[...]

    def dkv_grid_kernel(qt_ref, kt_ref, *refs):
        lead, diff, fixed_consts, rest = split_refs(refs, 12)
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = lead[:6]
        qp_ref, qpc_ref, qs_ref, kp_ref, ks_ref, kval_ref = lead[6:]
        dk_ref, dv_ref, dk_sc, dv_sc = rest
        b, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(i == 0)
        def _():
            dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
            dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

        @pl.when(grid_live(qt_ref, kt_ref, b, i, j))
        def _():
            mask = mask_of(qpc_ref[0], qs_ref[0], kp_ref[0], ks_ref[0], kval_ref[0] != 0)
            bias_b = evaluate(diff, fixed_consts, qp_ref[0], kp_ref[0])
            kh = [k_ref[0, g] for g in range(kv_heads)]
            vh = [v_ref[0, g] for g in range(kv_heads)]
            load_q = lambda h: (q_ref[0, h], do_ref[0, h], lse_ref[0, h], delta_ref[0, h])  # noqa: E731
            carry = (
                tuple(dk_sc[g] for g in range(kv_heads)),
                tuple(dv_sc[g] for g in range(kv_heads)),
            )
            dk, dv = dkv_pair(load_q, kh, vh, mask, bias_b, carry)
            for g in range(kv_heads):
                dk_sc[g], dv_sc[g] = dk[g], dv[g]

        @pl.when(i == nq - 1)
        def _():
            for g in range(kv_heads):
                dk_ref[0, g] = dk_sc[g].astype(dk_ref.dtype)
                dv_ref[0, g] = dv_sc[g].astype(dv_ref.dtype)

    # ---------------------------------------------------------------------------- the calls

    fixed_specs = [_full_spec(c.shape) for c in fixed]

    def consts_of(diff):
        diff2d = [_as_2d(c) for c in diff]
        return diff2d, [_full_spec(c.shape) for c in diff2d] + fixed_specs

    # Every array the kernels read is an argument of the custom VJP (`where`), none a closure:
    # one that closed over the arrays of a jit's trace would fail when the gradient is taken
    # outside that jit (`jax.grad(jax.jit(f))`).
    where = (q_table, k_table, rows_in, live, k_lo, k_hi, q_lo, q_hi, fixed)

    def forward(q_t, k_t, v_t, diff, where):
        q_table, k_table, rows_in, live, k_lo, k_hi, _, _, fixed = where
        diff2d, consts_specs = consts_of(diff)
        out_shape = [
            jax.ShapeDtypeStruct((batch, num_heads, lq, head_dim), out_dtype),
            jax.ShapeDtypeStruct((batch, num_heads, lq), jnp.float32),
        ]
        n_replicated = len(diff2d) + len(fixed)
        if on_grid:
            s = grid_specs
            return _pallas_call(
                fwd_grid_kernel,
                grid=(batch, nq, nk),
                in_specs=[
                    s["q"],
                    s["kv"],
                    s["kv"],
                    s["q_rows"],
                    s["q_cols"],
                    s["q_cols"],
                    s["k_rows"],
                    s["k_rows"],
                    s["k_rows"],
                    *consts_specs,
                ],
                out_specs=[s["q"], s["q_lse"]],
                out_shape=out_shape,
                num_scalar_prefetch=2,
                scratch_shapes=[
                    vmem((num_heads, bq)),
                    vmem((num_heads, bq)),
                    vmem((num_heads, bq, head_dim)),
                ],
                interpret=interpret,
                compiler_params=tpu_params(("parallel", "parallel", "arbitrary")),
                name="jpe_flash_fwd",
                n_replicated=n_replicated,
            )(q_table, k_table, q_t, k_t, v_t, *rows_in, *diff2d, *fixed)
        s = block_specs
        kv_full = pl.BlockSpec((1, kv_heads, lk, head_dim), lambda b, i: (b, 0, 0, 0))
        q_block = pl.BlockSpec((1, num_heads, bq, head_dim), lambda b, i: (b, 0, i, 0))
        return _pallas_call(
            fwd_loop_kernel,
            grid=(batch, nq),
            in_specs=[
                q_block,
                kv_full,
                kv_full,
                s["q_rows"],
                s["q_cols"],
                s["q_cols"],
                s["k_all"],
                s["k_all"],
                s["k_all"],
                _full_spec(live.shape),
                _full_spec(k_lo.shape),
                _full_spec(k_hi.shape),
                *consts_specs,
            ],
            out_specs=[q_block, pl.BlockSpec((1, num_heads, bq), lambda b, i: (b, 0, i))],
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=params,
            name="jpe_flash_fwd",
            n_replicated=n_replicated,
        )(q_t, k_t, v_t, *rows_in, live, k_lo, k_hi, *diff2d, *fixed)

    def backward_kernels(q_t, k_t, v_t, diff, where, o_t, lse, do_t):
        q_table, k_table, rows_in, live, k_lo, k_hi, q_lo, q_hi, fixed = where
        delta = jnp.sum(o_t.astype(jnp.float32) * do_t.astype(jnp.float32), -1)  # [B, H, Lq]
        diff2d, consts_specs = consts_of(diff)
        n_replicated = len(diff2d) + len(fixed)
        dq_shapes = [
            jax.ShapeDtypeStruct(q_t.shape, q_t.dtype),
            *[jax.ShapeDtypeStruct((batch, nq) + c.shape, jnp.float32) for c in diff2d],
        ]
        dkv_shapes = [
            jax.ShapeDtypeStruct(k_t.shape, k_t.dtype),
            jax.ShapeDtypeStruct(v_t.shape, v_t.dtype),
        ]
        if on_grid:
            s = grid_specs
            semantics = tpu_params(("parallel", "parallel", "arbitrary"))
            dq_and_params = _pallas_call(
                dq_grid_kernel,
                grid=(batch, nq, nk),
                in_specs=[
                    s["q"],
                    s["kv"],
                    s["kv"],
                    s["q"],
                    s["q_lse"],
                    s["q_lse"],
                    s["q_rows"],
                    s["q_cols"],
                    s["q_cols"],
                    s["k_rows"],
                    s["k_rows"],
                    s["k_rows"],
                    *consts_specs,
                ],
                out_specs=[
                    s["q"],
                    *[
                        pl.BlockSpec((1, 1) + c.shape, lambda b, i, j, *_: (b, i, 0, 0))
                        for c in diff2d
                    ],
                ],
                out_shape=dq_shapes,
                num_scalar_prefetch=2,
                scratch_shapes=[vmem((num_heads, bq, head_dim)), *[vmem(c.shape) for c in diff2d]],
                interpret=interpret,
                compiler_params=semantics,
                name="jpe_flash_dq",
                n_replicated=n_replicated,
            )(q_table, k_table, q_t, k_t, v_t, do_t, lse, delta, *rows_in, *diff2d, *fixed)
            dk, dv = _pallas_call(
                dkv_grid_kernel,
                grid=(batch, nk, nq),
                in_specs=[
                    s["t_q"],
                    s["t_kv"],
                    s["t_kv"],
                    s["t_q"],
                    s["t_q_lse"],
                    s["t_q_lse"],
                    s["t_q_rows"],
                    s["t_q_cols"],
                    s["t_q_cols"],
                    s["t_k_rows"],
                    s["t_k_rows"],
                    s["t_k_rows"],
                    *consts_specs,
                ],
                out_specs=[s["t_kv"], s["t_kv"]],
                out_shape=dkv_shapes,
                num_scalar_prefetch=2,
                scratch_shapes=[vmem((kv_heads, bk, head_dim)), vmem((kv_heads, bk, head_dim))],
                interpret=interpret,
                compiler_params=semantics,
                name="jpe_flash_dkv",
                n_replicated=n_replicated,
            )(q_table, k_table, q_t, k_t, v_t, do_t, lse, delta, *rows_in, *diff2d, *fixed)
        else:
            s = block_specs
            q_block = pl.BlockSpec((1, num_heads, bq, head_dim), lambda b, i: (b, 0, i, 0))
            q_rows3 = pl.BlockSpec((1, num_heads, bq), lambda b, i: (b, 0, i))
            kv_full = pl.BlockSpec((1, kv_heads, lk, head_dim), lambda b, i: (b, 0, 0, 0))
            dq_and_params = _pallas_call(
                dq_loop_kernel,
                grid=(batch, nq),
                in_specs=[
                    q_block,
                    kv_full,
                    kv_full,
                    q_block,
                    q_rows3,
                    q_rows3,
                    s["q_rows"],
                    s["q_cols"],
                    s["q_cols"],
                    s["k_all"],
                    s["k_all"],
                    s["k_all"],
                    _full_spec(live.shape),
                    _full_spec(k_lo.shape),
                    _full_spec(k_hi.shape),
                    *consts_specs,
                ],
                out_specs=[
                    q_block,
                    *[pl.BlockSpec((1, 1) + c.shape, lambda b, i: (b, i, 0, 0)) for c in diff2d],
                ],
                out_shape=dq_shapes,
                interpret=interpret,
                compiler_params=params,
                name="jpe_flash_dq",
                n_replicated=n_replicated,
            )(q_t, k_t, v_t, do_t, lse, delta, *rows_in, live, k_lo, k_hi, *diff2d, *fixed)
            q_full = pl.BlockSpec((1, num_heads, lq, head_dim), lambda b, j: (b, 0, 0, 0))
            q_rows_full = pl.BlockSpec((1, num_heads, lq), lambda b, j: (b, 0, 0))
            kv_block_spec = pl.BlockSpec((1, kv_heads, bk, head_dim), lambda b, j: (b, 0, j, 0))
            dk, dv = _pallas_call(
                dkv_loop_kernel,
                grid=(batch, nk),
                in_specs=[
                    q_full,
                    kv_block_spec,
                    kv_block_spec,
                    q_full,
                    q_rows_full,
                    q_rows_full,
                    s["q_all"],
                    s["q_cols_all"],
                    s["q_cols_all"],
                    s["k_rows"],
                    s["k_rows"],
                    s["k_rows"],
                    _full_spec(live.shape),
                    _full_spec(q_lo.shape),
                    _full_spec(q_hi.shape),
                    *consts_specs,
                ],
                out_specs=[kv_block_spec, kv_block_spec],
                out_shape=dkv_shapes,
                interpret=interpret,
                compiler_params=params,
                name="jpe_flash_dkv",
                n_replicated=n_replicated,
            )(q_t, k_t, v_t, do_t, lse, delta, *rows_in, live, q_lo, q_hi, *diff2d, *fixed)
        dq, dparams = dq_and_params[0], dq_and_params[1:]
        dparams = [
            p.sum((0, 1)).reshape(c.shape).astype(c.dtype)
            for p, c in zip(dparams, diff, strict=True)
        ]
        return dq, dk, dv, dparams

    @jax.custom_vjp
    def fused(q_t, k_t, v_t, diff, where):
        return forward(q_t, k_t, v_t, diff, where)[0]

    def fused_fwd(q_t, k_t, v_t, diff, where):
        o_t, lse = forward(q_t, k_t, v_t, diff, where)
        return o_t, (q_t, k_t, v_t, diff, where, o_t, lse)

    def fused_bwd(residuals, do_t):
        q_t, k_t, v_t, diff, where, o_t, lse = residuals
        dq, dk, dv, dparams = backward_kernels(q_t, k_t, v_t, diff, where, o_t, lse, do_t)
        return dq, dk, dv, list(dparams), None  # `where` holds integers and masks

    fused.defvjp(fused_fwd, fused_bwd)
    out = fused(qt, kt, vt, list(bias.diff), where)  # [B, H, Lq_padded, D]
    return jnp.swapaxes(out[:, :, :q_len], 1, 2)
