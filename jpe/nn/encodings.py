"""NNX modules, one per encoding: they own the parameters and call the pure functions.

Every encoding is an `Encoding` with up to three hooks, and the Transformer never asks which
one it has:

- `embed(x, positions)`: absolute encodings combine their table with the token embeddings;
- `rotate(x, positions, is_key=...)`: rotary encodings turn queries and keys;
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
        self, x: jax.Array, positions: jax.Array, *, is_key: bool, seq_len: int
    ) -> jax.Array:
        """`x` `[B, L, H, D]` turned by `positions` `[B, L]`; `seq_len` is the number of keys in
        view (static), which dynamic RoPE scalings read."""
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


def _rope_tables(config: TransformerConfig, seq_len: int):
    return rotary.rope_frequencies(
        config.rotary_dim, base=config.rope_base, scaling=config.scaling, seq_len=seq_len
    )


class RoPE(Encoding):
    """Rotary encoding (Su et al. 2021), with the config's scaling, layout and partial rotation.

    `dynamic` and `longrope` scalings read the sequence length, which is static under `jit`: the
    number of keys in view (the cache length when decoding).
    """

    def rotate(self, x, positions, *, is_key, seq_len):
        inv_freq, attention_factor = _rope_tables(self.config, seq_len)
        return rotary.apply_rope(
            x,
            positions,
            inv_freq,
            layout=self.config.rope_layout,
            attention_factor=attention_factor,
        )


class XPos(Encoding):
    """xPos (Sun et al. 2022): RoPE with a per-pair exponential decay in distance."""

    def rotate(self, x, positions, *, is_key, seq_len):
        inv_freq, _ = _rope_tables(self.config.replace(rope_scaling=None), seq_len)
        return rotary.apply_xpos(
            x,
            positions,
            inv_freq,
            is_key=is_key,
            scale_base=self.config.xpos_scale_base,
            layout=self.config.rope_layout,
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
    """KERPLE (Chi et al. 2022): per-head r1, r2, kept >= 0.01 as in the reference code
    (and r2 <= 2 for the power kernel)."""

    _EPS = 0.01

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        k1, k2 = jax.random.split(rngs.params())
        # chijames/KERPLE initialises r1 ~ U(0, 2) and r2 ~ U(0, 1).
        self.r1 = nnx.Param(jax.random.uniform(k1, (config.num_heads,), minval=0.0, maxval=2.0))
        self.r2 = nnx.Param(jax.random.uniform(k2, (config.num_heads,), minval=0.0, maxval=1.0))

    def bias(self, q_positions, k_positions, q=None):
        r1 = jnp.maximum(self.r1[...], self._EPS)
        r2 = jnp.maximum(self.r2[...], self._EPS)
        if self.config.kerple_kind == "power":
            r2 = jnp.minimum(r2, 2.0)
        return relative.kerple_bias(q_positions, k_positions, r1, r2, kind=self.config.kerple_kind)


class Sandwich(_Bias):
    """Sandwich (Chi et al. 2023): the inner product of sinusoidal embeddings, parameter-free."""

    def bias(self, q_positions, k_positions, q=None):
        return relative.sandwich_bias(q_positions, k_positions, self.config.num_heads)


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

    def rotate(self, x, positions, *, is_key, seq_len):
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
