"""A pre-norm Transformer (encoder or decoder) whose positional encoding is one config field.

Data flow, for tokens `[B, L]`:

    token embedding * sqrt(d_model) -> encoding.embed (absolute encodings)
    per block: x + attn(norm(x)), then x + mlp(norm(x)), where attn projects q, k, v
      `[B, L, H, D]`, changes q, k, v with encoding.transform_qkv (rotary encodings), and runs
      `jpe.attention` with the encoding's bias hooks (relative encodings), called per block
    norm -> head: logits `[B, L, vocab]` (or `[B, L, num_classes]`)

The Transformer never asks which encoding it has; it passes the hooks the encoding overrides
(`jpe.nn.registry`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.attention import attention
from jpe.encodings import _checks
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import Encoding, PositionContext

__all__ = ["Transformer", "generate", "init_cache"]


def _dtype(config: TransformerConfig):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]


def _rms(norm: nnx.RMSNorm, x: jax.Array) -> jax.Array:
    """`x / sqrt(mean(x^2) + eps)` over the last axis, in float32 (at least) as `nnx.RMSNorm`
    computes it, without its scale: `_dense` folds that into the next product's kernel."""
    x32 = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(ms + norm.epsilon)  # [..., d] * [..., 1]


def _dense(x, kernel, bias, scale, dtype) -> jax.Array:
    """`(x * scale) @ kernel + bias` as `(x @ (scale[:, None] * kernel)) + bias`: an RMSNorm's
    scale `[d_in]` folded into the kernel `[d_in, d_out]`, so no `[B, L, d_in]` product (or its
    broadcast scale, in the backward pass) is ever built. Computed in `dtype`, like
    `nnx.Linear`."""
    kernel = kernel * scale[:, None] if scale is not None else kernel
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        dense = lambda n_in, n_out: nnx.Linear(
            n_in, n_out, use_bias=False, dtype=_dtype(c), param_dtype=jnp.float32, rngs=rngs
        )
        self.config = config
        self.layer = layer  # the encoding's hooks may differ per layer (FLOATER)
        self.q = dense(c.d_model, c.num_heads * c.head_dim)
        self.k = dense(c.d_model, c.kv_heads * c.head_dim)
        self.v = dense(c.d_model, c.kv_heads * c.head_dim)
        self.o = dense(c.num_heads * c.head_dim, c.d_model)

    def __call__(
        self,
        x,
        encoding: Encoding,
        positions,
        segment_ids,
        context,
        cache=None,
        index=None,
        norm_scale=None,
    ):
        """`x` `[B, L, d_model]`, already divided by its RMS; `norm_scale` `[d_model]` (the
        pre-norm's scale) multiplies it, folded into the projection."""
        c = self.config
        batch, length, _ = x.shape
        # One product with the three kernels side by side rather than three (a wider GEMM, and in
        # the backward pass one product for dx instead of three and their sum), with the
        # pre-norm's scale folded into the kernel's rows: diag(s) W is [d, 3d], s * x is [B, L, d].
        kernel = jnp.concatenate(
            [self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]], axis=1
        )
        qkv = _dense(x, kernel, None, norm_scale, _dtype(c))
        widths = (c.num_heads * c.head_dim, c.kv_heads * c.head_dim)
        q, k, v = jnp.split(qkv, [widths[0], widths[0] + widths[1]], axis=-1)
        q = q.reshape(batch, length, c.num_heads, c.head_dim)
        k = k.reshape(batch, length, c.kv_heads, c.head_dim)
        v = v.reshape(batch, length, c.kv_heads, c.head_dim)
        q, k, v = encoding.transform_qkv(q, k, v, positions, layer=self.layer, context=context)
        if cache is None:
            k_positions, k_segments, kv_mask = positions, segment_ids, None
            new_cache = None
        else:
            # Keys are stored already turned, so each is rotated once, at its own position.
            k = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype), index, 1
            )
            v = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype), index, 1
            )
            k_positions, k_segments, kv_mask = cache["positions"], cache["segments"], cache["valid"]
            new_cache = {"k": k, "v": v}
        hooks = type(encoding).capabilities()
        keys = k.shape[1]
        out = attention(
            q,
            k,
            v,
            bias_fn=encoding.bias if hooks.bias else None,
            query_bias_fn=encoding.query_bias if hooks.query_bias else None,
            value_fn=encoding.value if hooks.value else None,
            contextual_bias_fn=encoding.contextual_bias if hooks.contextual_bias else None,
            causal=c.causal,
            q_positions=positions,
            k_positions=k_positions,
            segment_ids=(segment_ids, k_segments),
            kv_mask=kv_mask,
            # A contextual bias reads whole rows: one block of every key.
            block_size=max(keys, length) if hooks.contextual_bias else c.block_size,
            implementation=c.attention,
        )
        return self.o(out.reshape(batch, length, c.num_heads * c.head_dim)), new_cache


class Block(nnx.Module):
    def __init__(self, config: TransformerConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.norm1 = nnx.RMSNorm(c.d_model, dtype=_dtype(c), rngs=rngs)
        self.attn = Attention(c, layer, rngs=rngs)
        self.norm2 = nnx.RMSNorm(c.d_model, dtype=_dtype(c), rngs=rngs)
        hidden = c.mlp_ratio * c.d_model
        self.up = nnx.Linear(c.d_model, hidden, dtype=_dtype(c), rngs=rngs)
        self.down = nnx.Linear(hidden, c.d_model, dtype=_dtype(c), rngs=rngs)

    def __call__(self, x, encoding, positions, segment_ids, context, cache=None, index=None):
        # Each RMSNorm's scale is folded into the product after it (`_dense`).
        h, new_cache = self.attn(
            _rms(self.norm1, x), encoding, positions, segment_ids, context, cache, index,
            norm_scale=self.norm1.scale[...],
        )  # fmt: skip
        x = x + h
        up = _dense(
            _rms(self.norm2, x), self.up.kernel[...], self.up.bias[...], self.norm2.scale[...],
            self.up.dtype,
        )  # fmt: skip
        x = x + self.down(jax.nn.gelu(up))
        return x, new_cache


class Transformer(nnx.Module):
    """A Transformer encoder (`causal=False`) or decoder with any registered encoding.

    Example:
      >>> model = Transformer(TransformerConfig(pe="alibi", num_layers=2), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 256)
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a jpe.TransformerConfig, got {type(config).__name__}")
        c = self.config = config
        self.encoding = c.encoding(c, rngs=rngs)
        token_width = c.encoding.token_width(c)
        self.embed = nnx.Embed(
            c.vocab_size,
            token_width,
            embedding_init=nnx.initializers.normal(stddev=token_width**-0.5),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.norm = nnx.RMSNorm(c.d_model, dtype=_dtype(c), rngs=rngs)
        self.head = nnx.Linear(c.d_model, c.num_classes or c.vocab_size, dtype=_dtype(c), rngs=rngs)

    # -- inputs ------------------------------------------------------------------------------

    def _inputs(self, tokens, positions, segment_ids):
        tokens = _checks.integer_array("tokens", tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, L], got {tokens.shape}")
        values = _checks.concrete(tokens)
        if values is not None and values.size:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"tokens must be in [0, vocab_size) = [0, {self.config.vocab_size}); got "
                    f"values in [{low}, {high}]"
                )
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)
        positions = _checks.integer_array("positions", positions)
        self._check_max_len(positions)  # before any jnp op, which would trace a constant
        if positions.ndim == 1:
            positions = positions[None, :]
        if positions.shape[-1] != length or positions.shape[0] not in (1, batch):
            raise ValueError(
                f"positions must have shape [{batch}, {length}], got {positions.shape}"
            )
        # [1, L] positions stay shared by the batch: rotations, tables and biases are then
        # computed once and broadcast, not once per row.
        positions = positions.astype(jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones((1, length), jnp.int32)
        segment_ids = _checks.integer_array("segment_ids", segment_ids)
        if segment_ids.ndim == 1:
            segment_ids = segment_ids[None, :]
        if segment_ids.shape not in ((batch, length), (1, length)):
            raise ValueError(
                f"segment_ids must have shape [{batch}, {length}], got {segment_ids.shape}"
            )
        return tokens, positions, segment_ids

    def _check_max_len(self, positions):
        """A bounded encoding (a learned table of max_len rows) takes positions in
        [0, limit): a longer position is an error, never clamped."""
        limit = self.config.encoding.position_limit(self.config)
        if limit is None:
            return
        values = _checks.concrete(positions)
        if values is None or not values.size:
            # Values are unknown under jit; positions >= max_len read NaN rows (never a clamped
            # row). The static length is checked where `positions` defaulted to arange.
            return
        low, high = int(values.min()), int(values.max())
        if high >= limit or low < 0:
            raise ValueError(
                f"positions must be in [0, max_len) = [0, {limit}) for pe={self.config.pe!r}; "
                f"got values in [{low}, {high}]. Raise TransformerConfig.max_len or use a "
                "relative encoding."
            )

    def _embed(self, tokens, positions):
        c = self.config
        x = self.embed(tokens).astype(_dtype(c)) * math.sqrt(c.d_model)
        return self.encoding.embed(x, positions)

    def _output(self, x):
        head = self.head
        bias = None if head.bias is None else head.bias[...]
        out = _dense(_rms(self.norm, x), head.kernel[...], bias, self.norm.scale[...], head.dtype)
        return out.astype(jnp.float32)

    # -- forward -----------------------------------------------------------------------------

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """Logits `[B, L, vocab]` (or `[B, L, num_classes]`), float32.

        Args:
          tokens: `[B, L]` integer token ids.
          positions: `[B, L]` or `[L]` integer positions; default `arange(L)`. Packed rows,
            left padding, decoding offsets and randomized positions are all just positions.
          segment_ids: `[B, L]` ids; tokens attend only within their segment (packing), and
            padding should get a segment of its own (0). Default: one segment.

        Raises:
          ValueError: bad shapes or dtypes; token ids outside [0, vocab_size) when concrete
            (under `jit` they are not checked: an id >= vocab_size embeds as NaN, a negative
            one wraps around); for a bounded encoding (`learned`), a position >= max_len
            (from the static length when `positions` is None, from the values when they are
            concrete).
        """
        limit = self.config.encoding.position_limit(self.config)
        if positions is None and limit is not None:
            length = jnp.shape(tokens)[-1]
            if length > limit:
                raise ValueError(
                    f"sequence length {length} exceeds max_len {limit} of pe={self.config.pe!r} "
                    "(the positions it holds: Encoding.position_limit)"
                )
        tokens, positions, segment_ids = self._inputs(tokens, positions, segment_ids)
        context = PositionContext(
            seq_len=positions.max(axis=1) + 1,
            anchor=positions.min(axis=1),
            prepared=self.encoding.prepare(positions),
        )
        x = self._embed(tokens, positions)
        for block in self.blocks:
            x, _ = block(x, self.encoding, positions, segment_ids, context)
        return self._output(x)

    def decode(self, tokens, cache: dict, positions=None, segment_ids=None):
        """Runs `tokens` `[B, T]` against a KV cache; returns `(logits [B, T, V], cache)`.

        Prefill with T = the prompt length, then decode with T = 1. Positions default to the
        cache's next position per row; segment ids to 1. The first call (an empty cache) fixes
        each row's anchor (its smallest position), which later calls reuse.

        Raises:
          ValueError: as `__call__`, or T tokens that do not fit in the cache: T > its
            capacity, or (index concrete) index + T > capacity. Under `jit` only the first is
            checked, and writing past the end would overwrite the last slots.
        """
        if jnp.ndim(tokens) != 2:
            raise ValueError(f"tokens must have shape [B, T], got {jnp.shape(tokens)}")
        batch, length = jnp.shape(tokens)
        if cache["positions"].shape[0] != batch:
            raise ValueError(
                f"tokens have {batch} rows but the cache holds {cache['positions'].shape[0]} "
                "(init_cache's batch)"
            )
        capacity = cache["positions"].shape[1]
        index = cache["index"]
        filled = _checks.concrete(index)
        if length > capacity or (filled is not None and int(filled) + length > capacity):
            held = "" if filled is None else f" already holding {int(filled)}"
            raise ValueError(
                f"tokens ({length}) do not fit in the KV cache of capacity {capacity}{held}; "
                "make the cache longer (init_cache's max_len)"
            )
        if positions is None:
            positions = cache["next_position"][:, None] + jnp.arange(length, dtype=jnp.int32)[None]
        tokens, positions, segment_ids = self._inputs(tokens, positions, segment_ids)
        # The cache keeps one row per sequence.
        positions = jnp.broadcast_to(positions, (batch, length))
        segment_ids = jnp.broadcast_to(segment_ids, (batch, length))
        update = lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), index, 1)
        shared = {
            "positions": update(cache["positions"], positions),
            "segments": update(cache["segments"], segment_ids),
            "valid": update(cache["valid"], jnp.ones((batch, length), bool)),
        }
        in_view = jnp.where(shared["valid"], shared["positions"], _checks.INT32_MIN)
        anchor = jnp.where(index == 0, positions.min(axis=1), cache["anchor"])
        context = PositionContext(
            seq_len=in_view.max(axis=1) + 1,
            anchor=anchor,
            prepared=self.encoding.prepare(positions),
        )
        x = self._embed(tokens, positions)
        layers = []
        for block, layer in zip(self.blocks, cache["layers"], strict=True):
            x, new_layer = block(
                x, self.encoding, positions, segment_ids, context, {**layer, **shared}, index
            )
            layers.append(new_layer)
        new_cache = {
            **shared,
            "layers": layers,
            "index": index + length,
            "next_position": positions[:, -1] + 1,
            "anchor": anchor,
        }
        return self._output(x), new_cache


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (a pytree of arrays)."""
    batch = _checks.positive_int("batch", batch)
    max_len = _checks.positive_int("max_len", max_len)
    dtype = _dtype(config) if dtype is None else dtype
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    return {
        "layers": [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(config.num_layers)
        ],
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "segments": jnp.zeros((batch, max_len), jnp.int32),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
        "next_position": jnp.zeros((batch,), jnp.int32),
        "anchor": jnp.zeros((batch,), jnp.int32),
    }


def generate(
    model: Transformer,
    prompt,
    num_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    prompt_mask=None,
) -> jax.Array:
    """Samples `num_tokens` tokens after `prompt` `[B, P]` with a KV cache; returns `[B, N]`.

    `temperature == 0` is greedy; otherwise tokens are drawn from softmax(logits / temperature)
    with `rng`. `prompt_mask` `[B, P]` marks real tokens of left-padded prompts (padding gets
    segment 0 and no position). Each step is jitted once and reused.

    Raises:
      ValueError: an encoder config, `prompt` not an integer `[B, P]` array (or, concrete,
        holding ids outside [0, vocab_size)), a `prompt_mask` of another shape or (concrete)
        not left-padded, a bad `num_tokens` or `temperature`, or `temperature > 0` without
        `rng`.
    """
    if not model.config.causal:
        raise ValueError("generate needs a decoder: TransformerConfig(causal=True)")
    num_tokens = _checks.positive_int("num_tokens", num_tokens)
    temperature = _checks.positive_float("temperature", temperature, allow_zero=True)
    if temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0")
    prompt = _checks.integer_array("prompt", prompt)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must have shape [B, P] (a batch of token rows, P >= 1), got shape "
            f"{prompt.shape}; add a batch axis with prompt[None]"
        )
    batch, plen = prompt.shape
    if prompt_mask is None:
        mask = jnp.ones((batch, plen), bool)
    else:
        mask = jnp.asarray(prompt_mask)
        if mask.shape != prompt.shape or not (
            jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)
        ):
            raise ValueError(
                f"prompt_mask must be a boolean [B, P] = {list(prompt.shape)} array, got "
                f"{mask.dtype} with shape {mask.shape}"
            )
        mask = mask != 0
        values = _checks.concrete(mask)
        if values is not None and np.any(values[:, :-1] & ~values[:, 1:]):
            raise ValueError(
                "prompt_mask must mark left-padded prompts (padding, then real tokens); a "
                "real token followed by padding would be generated after"
            )
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    segments = mask.astype(jnp.int32)
    graphdef, state = nnx.split(model)

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    # Data are arguments, not closed-over constants: one compilation serves every prompt of
    # this shape, and the model's checks see tracers rather than baked-in values.
    @jax.jit
    def prefill(state, cache, prompt, positions, segments):
        logits, cache = nnx.merge(graphdef, state).decode(prompt, cache, positions, segments)
        return logits[:, -1], cache

    @jax.jit
    def step(state, cache, token):
        logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
        return logits[:, -1], cache

    limit = model.config.encoding.position_limit(model.config)
    if limit is not None:
        known = _checks.concrete(positions)
        last = (plen if known is None else int(known.max()) + 1) + num_tokens - 1
        if last >= limit:
            raise ValueError(
                f"generating {num_tokens} tokens after this prompt reaches position {last}, "
                f"past max_len {limit} of pe={model.config.pe!r} (the positions it holds: "
                "Encoding.position_limit)"
            )
    model._inputs(prompt, positions, segments)  # concrete checks (token ids), before jit
    cache = init_cache(model.config, batch, plen + num_tokens)
    logits, cache = prefill(state, cache, prompt, positions, segments)
    keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0), num_tokens)
    out = []
    for i in range(num_tokens):
        token = pick(logits, keys[i])
        out.append(token)
        if i + 1 < num_tokens:
            logits, cache = step(state, cache, token)
    return jnp.stack(out, axis=1)
