"""NNX modules, one per encoding: they own the parameters and call the pure functions.

Every encoding is an `Encoding` with up to three hooks, and the Transformer never asks which
one it has:

- `embed(x, positions)`: absolute encodings combine their table with the token embeddings;
- `rotate(x, positions, is_key=..., seq_len=..., anchor=...)`: rotary encodings turn queries
  and keys;
- `bias(q_positions, k_positions[, q])`: relative encodings give `[B, H, bq, bk]` for one
  attention block (with the query block when `bias_takes_query`), plus `value` for Shaw et al.'s
  relative value embeddings.

One instance serves every layer, as T5 shares its bias table: the hooks see the same
parameters in each block. Static hyperparameters come from the frozen `TransformerConfig`;
host constants (frequencies, slopes) are recomputed from it at trace time rather than stored,
since NNX would trace array attributes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jpe.encodings import absolute, contextual, relative, rotary
from jpe.nn.config import TransformerConfig

__all__ = [
    "ALiBi",
    "Binary",
    "CoPE",
    "DynamicPositionBias",
    "Encoding",
    "FIRE",
    "Kerple",
    "Learned",
    "NoPE",
    "RoPE",
    "Sandwich",
    "ScaledSinusoidal",
    "Shaw",
    "Sinusoidal",
    "T5Bias",
    "TransformerXL",
    "XPos",
]


class Encoding(nnx.Module):
    """Base class: every hook is the identity, and no bias."""

    has_bias: ClassVar[bool] = False
    bias_takes_query: ClassVar[bool] = False
    has_value: ClassVar[bool] = False
    #: the attention must see whole rows at once (CoPE's positions are cumulative over keys)
    dense: ClassVar[bool] = False
    #: an absolute encoding (embed hook); its width is half of d_model when concatenated
    absolute: ClassVar[bool] = False
    #: logits unchanged when every position shifts by the same constant
    shift_invariant: ClassVar[bool] = True

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config

    def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return x

    def rotate(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        is_key: bool,
        seq_len: jax.Array,
        anchor: jax.Array,
    ) -> jax.Array:
        """`x` `[B, L, H, D]` turned by `positions` `[B, L]`.

        The Transformer also passes, per row (int32 `[B]`, traced under `jit`):
          seq_len: the largest position in view plus one (the forward pass's positions, or a
            decoder's cache and new tokens), as Hugging Face's dynamic RoPE scalings read it;
            the same in a forward pass and in a prefill of the same tokens.
          anchor: a position shared by every query and key of the row (the smallest position
            of the forward pass or of the prefill, kept in the cache), for encodings that
            must measure positions from nearby to stay finite (xPos).
        """
        return x

    def bias(self, q_positions, k_positions, q=None) -> jax.Array:
        raise NotImplementedError

    def value(self, weights, q_positions, k_positions) -> jax.Array:
        raise NotImplementedError

    def dense_bias(self, q, logits, mask) -> jax.Array:
        raise NotImplementedError


def pe_width(config: TransformerConfig) -> int:
    """Features of an absolute encoding: d_model, or half of it when concatenated."""
    return config.d_model // 2 if config.pe_combine == "concat" else config.d_model


class NoPE(Encoding):
    """No positional encoding (Kazemnejad et al. 2023, arXiv 2305.19466): the causal mask alone
    tells order."""


class _Absolute(Encoding):
    absolute = True
    shift_invariant = False

    def table(self, positions: jax.Array) -> jax.Array:
        raise NotImplementedError

    def embed(self, x, positions):
        pe = self.table(positions)  # [B, L, d]
        return absolute.combine(x, pe.astype(x.dtype), mode=self.config.pe_combine)


class Sinusoidal(_Absolute):
    """Vaswani et al. 2017 (arXiv 1706.03762), `jpe.encodings.absolute.sinusoidal`."""

    def table(self, positions):
        return absolute.sinusoidal(positions, pe_width(self.config))


class ScaledSinusoidal(_Absolute):
    """Sinusoidal table times one learned scalar (x-transformers), initialised to d^-1/2."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.scale = nnx.Param(jnp.asarray(absolute.scaled_sinusoidal_init(pe_width(config))))

    def table(self, positions):
        return absolute.scaled_sinusoidal(positions, pe_width(self.config), self.scale[...])


class Learned(_Absolute):
    """A learned table of `max_len` rows (BERT, GPT-2); positions >= max_len are an error."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.table_ = nnx.Param(
            absolute.learned_init(rngs.params(), config.max_len, pe_width(config))
        )

    def table(self, positions):
        return absolute.learned_lookup(self.table_[...], positions)


class Binary(_Absolute):
    """The bits of each position as +-1 features, projected to the model width by a learned map."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.proj = nnx.Linear(config.binary_bits, pe_width(config), use_bias=False, rngs=rngs)

    def table(self, positions):
        return self.proj(absolute.binary(positions, self.config.binary_bits))


class RoPE(Encoding):
    """Rotary encoding (Su et al. 2021), with the config's scaling, layout and partial rotation.

    `dynamic` and `longrope` scalings read the sequence length as Hugging Face does, from the
    positions: each row's largest position in view plus one (`rotary.apply_rope_at_length`).
    A forward pass, a padded forward pass and a prefill of the same tokens therefore agree
    whatever the padding or the cache capacity. Keys are cached already turned, so a decoder
    that grows past `original_max_position_embeddings` token by token keeps the earlier keys'
    frequencies, as Hugging Face's cache does, and then differs from one forward pass over the
    whole sequence.
    """

    def rotate(self, x, positions, *, is_key, seq_len, anchor):
        c = self.config
        return rotary.apply_rope_at_length(
            x,
            positions,
            seq_len,
            c.rotary_dim,
            base=c.rope_base,
            scaling=c.scaling,
            layout=c.rope_layout,
        )


class XPos(Encoding):
    """xPos (Sun et al. 2022): RoPE with a per-pair exponential decay in distance.

    Scales are measured from the row's anchor (its first position), so only distances within
    `rotary.xpos_max_position` of it (32,695 with the defaults) stay finite: longer spans raise
    on concrete positions, and give inf or NaN under `jit`. `rope_scaling` does not apply.
    """

    def rotate(self, x, positions, *, is_key, seq_len, anchor):
        c = self.config
        inv_freq, _ = rotary.rope_frequencies(c.rotary_dim, base=c.rope_base)
        return rotary.apply_xpos(
            x,
            positions,
            inv_freq,
            is_key=is_key,
            scale_base=c.xpos_scale_base,
            layout=c.rope_layout,
            anchor=anchor,
        )


class _Bias(Encoding):
    has_bias = True


class ALiBi(_Bias):
    """Press et al. 2022: -m_h |i - j|, slopes from `alibi_slopes`."""

    def bias(self, q_positions, k_positions, q=None):
        return relative.alibi_bias(
            q_positions, k_positions, relative.alibi_slopes(self.config.num_heads)
        )


class T5Bias(_Bias):
    """T5's learned scalar per head and log-bucketed relative position (Raffel et al. 2020)."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        init = nnx.initializers.normal(stddev=0.02)
        self.table = nnx.Param(init(rngs.params(), (config.t5_num_buckets, config.num_heads)))

    def bias(self, q_positions, k_positions, q=None):
        return relative.t5_bias(
            q_positions,
            k_positions,
            self.table[...],
            bidirectional=not self.config.causal,
            max_distance=self.config.t5_max_distance,
        )


class Kerple(_Bias):
    """KERPLE (Chi et al. 2022, arXiv 2205.09921): per-head r1, r2, kept >= 0.01 as in the
    reference code (and r2 <= 2 for the power kernel).

    log:   bias = -r1 log(1 + r2 |m - n|),  r1 ~ U(0, 2) (the scale), r2 ~ U(0, 1);
    power: bias = -r1 |m - n|^r2,           r1 ~ U(0, 1) (the scale), r2 ~ U(0, 2) (the
    exponent, 0 < r2 <= 2). These are chijames/KERPLE's initialisations: its log kernel
    -p log(1 + a d) draws p ~ U(0, 2) and a ~ U(0, 1), its power kernel -a d^p the same p and
    a, so the scale and the exponent trade places between the two kinds.
    """

    _EPS = 0.01

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        k1, k2 = jax.random.split(rngs.params())
        r1_max, r2_max = (2.0, 1.0) if config.kerple_kind == "log" else (1.0, 2.0)
        heads = (config.num_heads,)
        self.r1 = nnx.Param(jax.random.uniform(k1, heads, minval=0.0, maxval=r1_max))
        self.r2 = nnx.Param(jax.random.uniform(k2, heads, minval=0.0, maxval=r2_max))

    def bias(self, q_positions, k_positions, q=None):
        r1 = jnp.maximum(self.r1[...], self._EPS)
        r2 = jnp.maximum(self.r2[...], self._EPS)
        if self.config.kerple_kind == "power":
            r2 = jnp.minimum(r2, 2.0)
        return relative.kerple_bias(q_positions, k_positions, r1, r2, kind=self.config.kerple_kind)


class Sandwich(_Bias):
    """Sandwich (Chi et al. 2023): the inner product of sinusoidal embeddings, parameter-free."""

    def bias(self, q_positions, k_positions, q=None):
        # The sinusoids are one head wide, as NeMo's `hidden_size // num_attention_heads`.
        return relative.sandwich_bias(
            q_positions, k_positions, self.config.num_heads, dim=self.config.head_dim
        )


class FIRE(_Bias):
    """FIRE (Li et al. 2023): an MLP over normalised log distance, parameters from `fire_init`.

    The distance is divided by a function of the query's position, so FIRE is not invariant
    to shifting every position.
    """

    shift_invariant = False

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        params = relative.fire_init(rngs.params(), config.num_heads, hidden=config.fire_hidden)
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})

    def bias(self, q_positions, k_positions, q=None):
        params = {k: v[...] for k, v in self.params.items()}
        return relative.fire_bias(q_positions, k_positions, params, causal=self.config.causal)


class DynamicPositionBias(_Bias):
    """Dynamic position bias (Wang et al. 2021, CrossFormer, arXiv 2108.00154; as in
    x-transformers): an MLP from the signed log distance to one bias per head."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.params = nnx.Dict(
            {
                k: nnx.Param(v)
                for k, v in relative.dpb_init(
                    rngs.params(), config.num_heads, hidden=config.dpb_hidden
                ).items()
            }
        )

    def bias(self, q_positions, k_positions, q=None):
        params = {k: v[...] for k, v in self.params.items()}
        return relative.dpb_bias(q_positions, k_positions, params)


class Shaw(_Bias):
    """Shaw et al. 2018: learned key and value vectors per clipped distance, shared by heads."""

    bias_takes_query = True
    has_value = True

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        rows, init = 2 * config.shaw_max_distance + 1, nnx.initializers.normal(stddev=0.02)
        self.keys = nnx.Param(init(rngs.params(), (rows, config.head_dim)))
        self.values = nnx.Param(init(rngs.params(), (rows, config.head_dim)))

    def bias(self, q_positions, k_positions, q=None):
        # The attention scales q.k by 1/sqrt(D); Shaw's eq. 4 scales the relative term alike.
        logits = relative.shaw_logits(
            q, self.keys[...], q_positions, k_positions, self.config.shaw_max_distance
        )
        return logits / math.sqrt(self.config.head_dim)

    def value(self, weights, q_positions, k_positions):
        return relative.shaw_values(
            weights, self.values[...], q_positions, k_positions, self.config.shaw_max_distance
        )


class TransformerXL(_Bias):
    """Transformer-XL's relative terms (Dai et al. 2019, eq. in Section 3.3).

    score = (q + u) . k + (q + v) . W_R R_{i-j}: the content bias u is added to the queries in
    `rotate`, so the bias hook, which then sees q + u, uses v - u.
    """

    bias_takes_query = True

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        c = config
        init = nnx.initializers.normal(stddev=c.d_model**-0.5)
        self.w_r = nnx.Param(init(rngs.params(), (c.d_model, c.num_heads, c.head_dim)))
        self.u = nnx.Param(jnp.zeros((c.num_heads, c.head_dim)))
        self.v = nnx.Param(jnp.zeros((c.num_heads, c.head_dim)))

    def rotate(self, x, positions, *, is_key, seq_len, anchor):
        return x if is_key else x + self.u[...].astype(x.dtype)[None, None]

    def bias(self, q_positions, k_positions, q=None):
        terms = relative.transformer_xl_bias(
            q, q_positions, k_positions, self.w_r[...], self.v[...] - self.u[...]
        )
        return terms / math.sqrt(self.config.head_dim)


class CoPE(Encoding):
    """Contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719).

    Positions are counted by gates sigma(q_i . k_t) over the keys between j and i, so they depend
    on whole rows of logits: CoPE runs with dense attention (one block of the full length),
    which builds `[B, H, L, L]` logits. It is the one encoding without blocked attention.
    """

    dense = True

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.pos_emb = nnx.Param(jnp.zeros((config.cope_npos, config.head_dim)))

    def dense_bias(self, q, logits, mask):
        return contextual.cope_bias(q, logits, mask, self.pos_emb[...])
