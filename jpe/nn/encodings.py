"""NNX modules, one per encoding: each declares its options, owns its parameters and calls the
pure functions of `jpe.encodings`.

The hooks and the registry are described in `jpe.nn.registry`. One instance serves every layer,
as T5 shares its bias table: the hooks see the same parameters in each block. Adding an encoding
touches two files: its pure function in `jpe/encodings/` and its class here, registered with
`@register(name)` and carrying its own `Options`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jpe.encodings import _checks, absolute, contextual, floater, relative, rope_scaling, rotary
from jpe.nn.registry import Encoding, Options, freeze, register

__all__ = [
    "ALiBi",
    "Binary",
    "CoPE",
    "DynamicPositionBias",
    "FIRE",
    "Floater",
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


@register("none")
class NoPE(Encoding):
    """No positional encoding (Kazemnejad et al. 2023, arXiv 2305.19466): the causal mask alone
    tells order."""


# ---------------------------------------------------------------------------------------------
# Absolute encodings: a table combined with the token embeddings
# ---------------------------------------------------------------------------------------------


class _Absolute(Encoding):
    shift_invariant = False

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """combine: how the table meets the token embeddings, "add", "multiply" or "concat"
        (concat gives the table half of d_model and the tokens the rest)."""

        combine: str = "add"

        def __post_init__(self):
            _checks.one_of("combine", self.combine, absolute.COMBINE_MODES)

    @classmethod
    def width(cls, config) -> int:
        """Features of the table: d_model, or half of it when concatenated."""
        concat = config.pe_options.combine == "concat"
        return config.d_model // 2 if concat else config.d_model

    @classmethod
    def token_width(cls, config) -> int:
        concat = config.pe_options.combine == "concat"
        return config.d_model - cls.width(config) if concat else config.d_model

    def table(self, positions: jax.Array) -> jax.Array:
        """`[B, L]` positions -> `[B, L, width]`."""
        raise NotImplementedError

    def embed(self, x, positions):
        pe = self.table(positions)  # [B, L, width]
        return absolute.combine(x, pe.astype(x.dtype), mode=self.options.combine)


@register("sinusoidal")
class Sinusoidal(_Absolute):
    """Vaswani et al. 2017 (arXiv 1706.03762), `jpe.encodings.absolute.sinusoidal`."""

    def table(self, positions):
        return absolute.sinusoidal(positions, self.width(self.config))


@register("scaled-sinusoidal")
class ScaledSinusoidal(_Absolute):
    """Sinusoidal table times one learned scalar (x-transformers), initialised to d^-1/2."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        width = self.width(config)
        self.scale = nnx.Param(jnp.asarray(absolute.scaled_sinusoidal_init(width)))

    def table(self, positions):
        return absolute.scaled_sinusoidal(positions, self.width(self.config), self.scale[...])


@register("learned")
class Learned(_Absolute):
    """A learned table of `max_len` rows (BERT, GPT-2); positions >= max_len are an error."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.table_ = nnx.Param(
            absolute.learned_init(rngs.params(), config.max_len, self.width(config))
        )

    @classmethod
    def position_limit(cls, config) -> int:
        return config.max_len

    def table(self, positions):
        return absolute.learned_lookup(self.table_[...], positions)


@register("binary")
class Binary(_Absolute):
    """The bits of each position as +-1 features, projected to the model width by a learned map."""

    @dataclasses.dataclass(frozen=True)
    class Options(_Absolute.Options):
        """bits: bits of the position fed to the projection."""

        bits: int = 16

        def __post_init__(self):
            super().__post_init__()
            _checks.positive_int("bits", self.bits)

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.proj = nnx.Linear(self.options.bits, self.width(config), use_bias=False, rngs=rngs)

    def table(self, positions):
        return self.proj(absolute.binary(positions, self.options.bits))


# ---------------------------------------------------------------------------------------------
# Rotary encodings: queries and keys turned by their positions
# ---------------------------------------------------------------------------------------------


def _thaw(value):
    """A frozen `rope_scaling` (pairs) back as a mapping, with lists for LongRoPE's factors."""
    if value is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value}


class _Rotary(Encoding):
    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """base: the frequency base (RoFormer's 10000); layout: "half" (GPT-NeoX, LLaMA) or
        "interleaved" (GPT-J, RoFormer) pairs; rotary_fraction: the fraction of each head's
        features rotated (the rest pass through)."""

        base: float = 10000.0
        layout: str = "half"
        rotary_fraction: float = 1.0

        def __post_init__(self):
            _checks.one_of("layout", self.layout, rotary.LAYOUTS)
            if not 0 < self.rotary_fraction <= 1:
                raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")

    @classmethod
    def rotary_dim(cls, config) -> int:
        """Features rotated in each head: an even number, `rotary_fraction` of head_dim."""
        return 2 * int(config.head_dim * config.pe_options.rotary_fraction // 2)

    @classmethod
    def check_config(cls, config):
        if cls.rotary_dim(config) < 2:
            raise ValueError(
                f"rotary_fraction {config.pe_options.rotary_fraction} of head_dim "
                f"{config.head_dim} leaves fewer than 2 rotated features"
            )


@register("rope")
class RoPE(_Rotary):
    """Rotary encoding (Su et al. 2021, arXiv 2104.09864), with a scaling, layout and partial
    rotation from its options.

    `dynamic` and `longrope` scalings read the sequence length as Hugging Face does, from the
    positions: each row's largest position in view plus one (`rotary.apply_rope_at_length`).
    A forward pass, a padded forward pass and a prefill of the same tokens therefore agree
    whatever the padding or the cache capacity. Keys are cached already turned, so a decoder
    that grows past `original_max_position_embeddings` token by token keeps the earlier keys'
    frequencies, as Hugging Face's cache does, and then differs from one forward pass over the
    whole sequence.
    """

    @dataclasses.dataclass(frozen=True)
    class Options(_Rotary.Options):
        """scaling: a Hugging Face `rope_scaling` mapping (`rope_type` linear, ntk, dynamic,
        yarn, longrope or llama3, with HF's key names), stored frozen; None for plain RoPE."""

        scaling: tuple | None = None

        def __post_init__(self):
            super().__post_init__()
            object.__setattr__(self, "scaling", freeze(self.scaling))

        @property
        def scaling_mapping(self) -> dict | None:
            """`scaling` back as a mapping (lists for LongRoPE's factors)."""
            return _thaw(self.scaling)

        @functools.cached_property
        def parsed_scaling(self) -> rope_scaling.ParsedScaling:
            """`scaling` checked and parsed once (`jpe.encodings.rope_scaling`)."""
            return rope_scaling.parse_rope_scaling(self.scaling_mapping)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        o = config.pe_options
        try:
            rotary.rope_frequencies(cls.rotary_dim(config), base=o.base, scaling=o.parsed_scaling)
        except ValueError as error:
            raise ValueError(
                f"invalid rope options (base={o.base}, scaling={o.scaling_mapping}, "
                f"rotary_dim={cls.rotary_dim(config)}): {error}"
            ) from None

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        o = self.options
        turn = lambda x: rotary.apply_rope_at_length(
            x,
            positions,
            context.seq_len,
            self.rotary_dim(self.config),
            base=o.base,
            scaling=o.parsed_scaling,
            layout=o.layout,
        )
        return turn(q), turn(k), v


@register("xpos")
class XPos(_Rotary):
    """xPos (Sun et al. 2022, arXiv 2212.10554): RoPE with a per-pair exponential decay in
    distance.

    Scales are measured from the row's anchor (its first position), so only distances within
    `rotary.xpos_max_position` of it (32,695 with the defaults) stay finite: longer spans raise
    on concrete positions, and give inf or NaN under `jit`. RoPE's scalings do not apply.
    """

    @dataclasses.dataclass(frozen=True)
    class Options(_Rotary.Options):
        """scale_base: xPos's scale base (512 in the paper)."""

        scale_base: float = 512.0

        def __post_init__(self):
            super().__post_init__()
            _checks.positive_float("scale_base", self.scale_base)

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        o = self.options
        inv_freq, _ = rotary.rope_frequencies(self.rotary_dim(self.config), base=o.base)
        turn = lambda x, is_key: rotary.apply_xpos(
            x,
            positions,
            inv_freq,
            is_key=is_key,
            scale_base=o.scale_base,
            layout=o.layout,
            anchor=context.anchor,
        )
        return turn(q, False), turn(k, True), v


# ---------------------------------------------------------------------------------------------
# Relative encodings: a bias per attention block
# ---------------------------------------------------------------------------------------------


@register("alibi")
class ALiBi(Encoding):
    """Press et al. 2022 (arXiv 2108.12409): -m_h |i - j|, slopes from `alibi_slopes`."""

    def bias(self, q_positions, k_positions, *, kernel=False):
        return relative.alibi_bias(
            q_positions, k_positions, relative.alibi_slopes(self.config.num_heads)
        )


@register("t5")
class T5Bias(Encoding):
    """T5's learned scalar per head and log-bucketed relative position (Raffel et al. 2020,
    arXiv 1910.10683); bidirectional buckets in an encoder, one-directional in a decoder."""

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """num_buckets, max_distance: T5's buckets (32 and 128 in T5)."""

        num_buckets: int = 32
        max_distance: int = 128

    @classmethod
    def check_config(cls, config):
        o = config.pe_options
        try:
            relative.t5_check(o.num_buckets, o.max_distance, not config.causal)
        except ValueError as error:
            raise ValueError(
                f"invalid t5 options (num_buckets={o.num_buckets}, max_distance="
                f"{o.max_distance}, causal={config.causal}): {error}"
            ) from None

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        init = nnx.initializers.normal(stddev=0.02)
        shape = (self.options.num_buckets, config.num_heads)
        self.table = nnx.Param(init(rngs.params(), shape))

    def bias(self, q_positions, k_positions, *, kernel=False):
        return relative.t5_bias(
            q_positions,
            k_positions,
            self.table[...],
            bidirectional=not self.config.causal,
            max_distance=self.options.max_distance,
        )


@register("kerple")
class Kerple(Encoding):
    """KERPLE (Chi et al. 2022, arXiv 2205.09921): per-head r1, r2, kept >= 0.01 as in the
    reference code (and r2 <= 2 for the power kernel).

    log:   bias = -r1 log(1 + r2 |m - n|),  r1 ~ U(0, 2) (the scale), r2 ~ U(0, 1);
    power: bias = -r1 |m - n|^r2,           r1 ~ U(0, 1) (the scale), r2 ~ U(0, 2) (the
    exponent, 0 < r2 <= 2). These are chijames/KERPLE's initialisations: its log kernel
    -p log(1 + a d) draws p ~ U(0, 2) and a ~ U(0, 1), its power kernel -a d^p the same p and
    a, so the scale and the exponent trade places between the two kinds.
    """

    _EPS = 0.01

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """kind: the kernel, "log" or "power"."""

        kind: str = "log"

        def __post_init__(self):
            _checks.one_of("kind", self.kind, ("log", "power"))

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        k1, k2 = jax.random.split(rngs.params())
        r1_max, r2_max = (2.0, 1.0) if self.options.kind == "log" else (1.0, 2.0)
        heads = (config.num_heads,)
        self.r1 = nnx.Param(jax.random.uniform(k1, heads, minval=0.0, maxval=r1_max))
        self.r2 = nnx.Param(jax.random.uniform(k2, heads, minval=0.0, maxval=r2_max))

    def bias(self, q_positions, k_positions, *, kernel=False):
        r1 = jnp.maximum(self.r1[...], self._EPS)
        r2 = jnp.maximum(self.r2[...], self._EPS)
        if self.options.kind == "power":
            r2 = jnp.minimum(r2, 2.0)
        return relative.kerple_bias(q_positions, k_positions, r1, r2, kind=self.options.kind)


@register("sandwich")
class Sandwich(Encoding):
    """Sandwich (Chi et al. 2023, arXiv 2212.10356): the inner product of sinusoidal
    embeddings, parameter-free."""

    @classmethod
    def check_config(cls, config):
        if config.head_dim % 2:
            raise ValueError(
                f"pe='sandwich' needs an even head_dim (its sinusoids are one head wide), got "
                f"d_model / num_heads = {config.head_dim}"
            )

    def bias(self, q_positions, k_positions, *, kernel=False):
        # The sinusoids are one head wide, as NeMo's `hidden_size // num_attention_heads`.
        return relative.sandwich_bias(
            q_positions, k_positions, self.config.num_heads, dim=self.config.head_dim
        )


class _MLPBias(Encoding):
    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """hidden: the MLP's hidden width."""

        hidden: int = 32

        def __post_init__(self):
            _checks.positive_int("hidden", self.hidden)

    def _params(self) -> dict:
        return {k: v[...] for k, v in self.params.items()}


@register("fire")
class FIRE(_MLPBias):
    """FIRE (Li et al. 2023, arXiv 2310.04418): an MLP over normalised log distance,
    parameters from `fire_init`.

    The distance is divided by a function of the query's position, so FIRE is not invariant
    to shifting every position.
    """

    shift_invariant = False

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        params = relative.fire_init(rngs.params(), config.num_heads, hidden=self.options.hidden)
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})

    def bias(self, q_positions, k_positions, *, kernel=False):
        return relative.fire_bias(
            q_positions, k_positions, self._params(), causal=self.config.causal, kernel=kernel
        )


# ---------------------------------------------------------------------------------------------
# Relative encodings that read the queries
# ---------------------------------------------------------------------------------------------


@register("shaw")
class Shaw(Encoding):
    """Shaw et al. 2018 (arXiv 1803.02155): learned key and value vectors per clipped distance,
    shared by heads."""

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """max_distance: the clipping distance k."""

        max_distance: int = 16

        def __post_init__(self):
            _checks.positive_int("max_distance", self.max_distance)

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        rows, init = 2 * self.options.max_distance + 1, nnx.initializers.normal(stddev=0.02)
        self.keys = nnx.Param(init(rngs.params(), (rows, config.head_dim)))
        self.values = nnx.Param(init(rngs.params(), (rows, config.head_dim)))

    def query_bias(self, q, q_positions, k_positions):
        # The attention scales q.k by 1/sqrt(D); Shaw's eq. 4 scales the relative term alike.
        logits = relative.shaw_logits(
            q, self.keys[...], q_positions, k_positions, self.options.max_distance
        )
        return logits / math.sqrt(self.config.head_dim)

    def value(self, weights, q_positions, k_positions):
        return relative.shaw_values(
            weights, self.values[...], q_positions, k_positions, self.options.max_distance
        )


@register("transformer-xl")
class TransformerXL(Encoding):
    """Transformer-XL's relative terms (Dai et al. 2019, arXiv 1901.02860, Section 3.3).

    score = (q + u) . k + (q + v) . W_R R_{i-j}: `transform_qkv` shifts the queries by the
    content bias u, so `query_bias`, which then sees q + u, uses v - u.
    """

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        c = config
        init = nnx.initializers.normal(stddev=c.d_model**-0.5)
        self.w_r = nnx.Param(init(rngs.params(), (c.d_model, c.num_heads, c.head_dim)))
        self.u = nnx.Param(jnp.zeros((c.num_heads, c.head_dim)))
        self.v = nnx.Param(jnp.zeros((c.num_heads, c.head_dim)))

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        return q + self.u[...].astype(q.dtype)[None, None], k, v

    def query_bias(self, q, q_positions, k_positions):
        terms = relative.transformer_xl_bias(
            q, q_positions, k_positions, self.w_r[...], self.v[...] - self.u[...]
        )
        return terms / math.sqrt(self.config.head_dim)


@register("dpb")
class DynamicPositionBias(_MLPBias):
    """Dynamic position bias (Wang et al. 2021, CrossFormer, arXiv 2108.00154; as in
    x-transformers): an MLP from the signed log distance to one bias per head."""

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        params = relative.dpb_init(rngs.params(), config.num_heads, hidden=self.options.hidden)
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})

    def bias(self, q_positions, k_positions, *, kernel=False):
        return relative.dpb_bias(q_positions, k_positions, self._params(), kernel=kernel)


@register("cope")
class CoPE(Encoding):
    """Contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719).

    Positions are counted by gates sigma(q_i . k_t) over the keys between j and i, so they depend
    on whole rows of logits: CoPE runs with dense attention (one block of the full length),
    which builds `[B, H, L, L]` logits. It is the one encoding without blocked attention.
    """

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """npos: the number of position embeddings (CoPE's positions saturate there)."""

        npos: int = 64

        def __post_init__(self):
            _checks.positive_int("npos", self.npos)

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.pos_emb = nnx.Param(jnp.zeros((self.options.npos, config.head_dim)))

    def contextual_bias(self, q, logits, mask):
        return contextual.cope_bias(q, logits, mask, self.pos_emb[...])


# ---------------------------------------------------------------------------------------------
# A learned continuous dynamical system (FLOATER)
# ---------------------------------------------------------------------------------------------


@register("floater")
class Floater(Encoding):
    """FLOATER (Liu, Yu, Dhillon and Hsieh, ICML 2020, arXiv 2003.09229): positions read off the
    trajectory of a learned ODE, `jpe.encodings.floater`.

    One dynamics h(t, p; theta) (`floater_dynamics`: Linear(D + 1 -> hidden) -> ReLU ->
    Linear(hidden + 1 -> D), time appended to each layer's input) is shared by every block.

    variant "every-block" (default; sec. 3.3, Eqs. 12-13): block n's query, key and value
    projections get position-dependent biases, each a trajectory of h from the block's own
    initial value (Eq. 10),

        b^(n)_j(t) = b^(n)_j(0) + integral_0^t h(tau, b^(n)_j(tau); theta) dtau,   j in {q, k, v},

    read at t_i = i * delta. `prepare` solves all N * 3 trajectories together, once per forward
    pass (or decoding call), `[B or 1, L, N, 3, D]` with D = num_heads * head_dim;
    `transform_qkv` adds block `layer`'s three to q, k and v, split into heads. With
    grouped-query attention (kv_heads < num_heads) the k and v states are still D wide, as h
    needs, and their first kv_heads * head_dim features are the biases. Keys and values are
    cached with their bias, so a decoder adds each once, at its own position.

    variant "input-only" (Eq. 8, the form without the bias reparametrisation): one trajectory
    p(t) of width d_model from a learned p(0), added once to the token embeddings (`embed`).

    Initialisation: the initial values are zero, and h's output layer is Glorot times
    `init_scale` (default 0.1): the model starts near the plain Transformer (`none`, whose
    projections have no bias) but h is not zero, so its first layer gets a gradient from the
    first step. `init_scale=0` gives h = 0 and a model that computes exactly what `none` does
    with the same other weights (the paper's warm start).

    The bound under jit: under `jax.jit` the positions are traced, so the solve needs a static
    range to size diffrax's step budget. It is [0, max_position), max_position defaulting to
    `TransformerConfig.max_len`, and `position_limit` reports it, so the Transformer refuses
    concrete positions outside it with a ValueError naming max_len; under jit such a position's
    row is NaN (never another position's value), as for `learned`. The cost of a pass grows
    with its largest position (steps_per_delta solver steps per position), not with max_len.
    """

    shift_invariant = False

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """delta: time between neighbouring positions, finite > 0 (the paper's text says 0.1,
        its code 0.01); solver: "rk4", "midpoint" or "tsit5"; steps_per_delta: solver steps
        per delta (the paper's is 5); hidden: h's hidden width (default: D, as in the paper);
        variant: "every-block" or "input-only"; max_position: positions must lie in
        [0, max_position) (default `TransformerConfig.max_len`); init_scale: h's output layer
        is Glorot times this, finite >= 0 (0: h = 0)."""

        delta: float = 0.1
        solver: str = "rk4"
        steps_per_delta: int = 5
        hidden: int | None = None
        variant: str = "every-block"
        max_position: int | None = None
        init_scale: float = 0.1

        def __post_init__(self):
            _checks.positive_float("delta", self.delta)
            _checks.one_of("solver", self.solver, ("rk4", "midpoint", "tsit5"))
            _checks.positive_int("steps_per_delta", self.steps_per_delta)
            if self.hidden is not None:
                _checks.positive_int("hidden", self.hidden)
            _checks.one_of("variant", self.variant, ("every-block", "input-only"))
            if self.max_position is not None:
                _checks.positive_int("max_position", self.max_position)
            _checks.positive_float("init_scale", self.init_scale, allow_zero=True)

    @classmethod
    def width(cls, config) -> int:
        """D, the width of a trajectory: q's projection (every-block) or d_model (input-only)."""
        if config.pe_options.variant == "input-only":
            return config.d_model
        return config.num_heads * config.head_dim

    @classmethod
    def position_limit(cls, config) -> int:
        return config.pe_options.max_position or config.max_len

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        o, width = self.options, self.width(config)
        params = floater.floater_init(
            rngs.params(), width, hidden=o.hidden, zero_output=o.init_scale == 0
        )
        params["w_out"] = params["w_out"] * o.init_scale
        self.dynamics = nnx.Dict({k: nnx.Param(v) for k, v in params.items()})
        if o.variant == "input-only":
            self.initial = nnx.Param(jnp.zeros((width,), jnp.float32))
        else:
            self.initial = nnx.Param(jnp.zeros((config.num_layers, 3, width), jnp.float32))

    def _solve_kwargs(self) -> dict:
        o = self.options
        return dict(
            delta=o.delta,
            solver=o.solver,
            steps_per_delta=o.steps_per_delta,
            position_range=(0, self.position_limit(self.config) - 1),
        )

    def prepare(self, positions):
        """Every block's q, k and v biases, `[B or 1, L, N, 3, D]` (every-block; else None)."""
        if self.options.variant != "every-block":
            return None
        params = {k: v[...] for k, v in self.dynamics.items()}
        return floater.floater_qkv_bias(
            positions, params, self.initial[...], **self._solve_kwargs()
        )

    def embed(self, x, positions):
        if self.options.variant != "input-only":
            return x
        params = {k: v[...] for k, v in self.dynamics.items()}
        table = floater.floater_encoding(
            positions, params, self.initial[...], **self._solve_kwargs()
        )
        return x + table.astype(x.dtype)

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        if self.options.variant != "every-block":
            return q, k, v
        bias = context.prepared[:, :, layer]  # [B or 1, L, 3, D]
        lead = bias.shape[:2]
        q_bias = bias[..., 0, :].reshape(*lead, *q.shape[2:])
        kv_width = k.shape[2] * k.shape[3]
        k_bias = bias[..., 1, :kv_width].reshape(*lead, *k.shape[2:])
        v_bias = bias[..., 2, :kv_width].reshape(*lead, *v.shape[2:])
        return q + q_bias.astype(q.dtype), k + k_bias.astype(k.dtype), v + v_bias.astype(v.dtype)
