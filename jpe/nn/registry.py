"""The encoding interface (`Encoding`, `Options`) and the registry of names (`jpe.ENCODINGS`).

An encoding is one NNX module with up to five hooks. The Transformer calls whichever the class
overrides and never asks which encoding it has; what a class can do is read off the methods it
overrides (`Encoding.capabilities`), not restated as flags.

=====================  ===========================================================  =========
hook                   what it does                                                 used by
=====================  ===========================================================  =========
`prepare`              once per forward pass: what every layer's hooks share        FLOATER
`embed`                combines an absolute table with the token embeddings         absolute
`transform_qkv`        changes one layer's queries, keys and values before          rotary,
                       attention (turns q and k; shifts q; adds position terms)     T-XL, ...
`bias`                 a bias from one block's positions alone, `[B, H, bq, bk]`    relative
`query_bias`           a bias that also reads the block's queries                   Shaw, T-XL
`value`                terms added to the weighted values                           Shaw
`contextual_bias`      a bias that reads whole rows of logits (no key blocking)     CoPE
=====================  ===========================================================  =========

Each encoding declares its options as a frozen dataclass, `Options`, on the class; a
`TransformerConfig` carries them in one field (`pe_options`) and the class checks them
(`Options.__post_init__` for the options alone, `Encoding.check_config` for what depends on the
model's sizes). Facts that the model or the lab need are asked of the class (`position_limit`,
`token_width`), never derived from its name.

Registration is a decorator next to the class::

    @jpe.register("my-bias")
    class MyBias(jpe.nn.Encoding):
        @dataclasses.dataclass(frozen=True)
        class Options(jpe.nn.Options):
            scale: float = 1.0

        def bias(self, q_positions, k_positions):
            return -self.options.scale * jnp.abs(q_positions[:, None, :, None] - ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import jax
from flax import nnx

if TYPE_CHECKING:
    from jpe.nn.config import TransformerConfig

__all__ = [
    "ENCODINGS",
    "Capabilities",
    "Encoding",
    "Options",
    "PositionContext",
    "encoding_class",
    "register",
]


def freeze(value):
    """Mappings as sorted tuples of pairs and lists as tuples, recursively, so they hash."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """An encoding's options: a frozen, hashable dataclass. The base has none.

    Subclasses declare fields with defaults and check each in `__post_init__`, raising
    `ValueError` that names the option. Checks that need the model's sizes belong in
    `Encoding.check_config`.
    """

    @classmethod
    def build(cls, pe: str, values: Mapping | Options | None) -> Options:
        """The options of encoding `pe` from a mapping (unknown keys are an error), or from
        another class's `Options` (its non-default values carry over, and must exist here)."""
        if values is None:
            values = {}
        elif isinstance(values, Options):
            if type(values) is cls:
                return values
            values = values.non_default()
        elif not isinstance(values, Mapping):
            raise ValueError(
                f"pe_options must be a mapping of option names to values, got "
                f"{type(values).__name__}"
            )
        values = dict(values)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            allowed = ", ".join(known) if known else "none"
            raise ValueError(
                f"pe_options: unknown option(s) {', '.join(map(repr, unknown))} for pe={pe!r}; "
                f"its options are: {allowed}"
            )
        return cls(**values)

    def non_default(self) -> dict:
        """The options that differ from their defaults, as a dict."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if value != default:
                out[f.name] = value
        return out


class PositionContext(NamedTuple):
    """What the Transformer knows of a forward pass's positions, per row, for the hooks.

    Attributes:
      seq_len: int32 `[B]`, each row's largest position in view plus one (a forward pass's
        positions, or a decoder's cache and new tokens), as Hugging Face's dynamic RoPE
        scalings read it; the same in a forward pass and a prefill of the same tokens.
      anchor: int32 `[B]`, a position shared by every query and key of the row (the smallest
        position of the forward pass or the prefill, kept in the cache), for encodings that
        must measure positions from nearby to stay finite (xPos).
      prepared: what the encoding's `prepare` returned for this pass.
    """

    seq_len: jax.Array
    anchor: jax.Array
    prepared: Any = None


class Capabilities(NamedTuple):
    """What an encoding class does, read off the hooks it overrides."""

    prepare: bool
    embed: bool
    transform_qkv: bool
    bias: bool
    query_bias: bool
    value: bool
    contextual_bias: bool

    @property
    def absolute(self) -> bool:
        return self.embed


_HOOKS = Capabilities._fields


class Encoding(nnx.Module):
    """Base class of every encoding: each hook is the identity, and no bias.

    Subclasses override only the hooks they need. `self.config` is the model's frozen
    `TransformerConfig` and `self.options` its `pe_options` (an instance of the class's
    `Options`). Static hyperparameters are recomputed from them at trace time rather than
    stored as arrays, which NNX would trace.
    """

    Options: ClassVar[type[Options]] = Options
    #: logits unchanged when every position shifts by the same constant (a claim the
    #: contract test checks)
    shift_invariant: ClassVar[bool] = True
    #: axes of the positions the encoding reads: 1 for sequences, 2 for image grids (a patch's
    #: (row, col) packed into one int, `jpe.encodings.two_d`); the language labs train the 1-D
    #: ones by default, the vision lab the 2-D ones
    position_axes: ClassVar[int] = 1

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.options = config.pe_options

    # -- facts asked of the class ---------------------------------------------------------------

    @classmethod
    def capabilities(cls) -> Capabilities:
        """Which hooks this class overrides."""
        return Capabilities(*(getattr(cls, h) is not getattr(Encoding, h) for h in _HOOKS))

    @classmethod
    def supported_attention(cls) -> tuple[str, ...]:
        """The attention implementations that serve this encoding (`jpe.attention`'s
        `implementation`), read off its hooks: "xla" always; "pallas" (the fused kernel that
        evaluates `bias` inside it) unless a hook needs the queries or whole rows
        (`query_bias`, `value`, `contextual_bias`); "cudnn" only without any bias hook."""
        hooks = cls.capabilities()
        if hooks.query_bias or hooks.value or hooks.contextual_bias:
            return ("xla",)
        if hooks.bias:
            return ("xla", "pallas")
        return ("xla", "pallas", "cudnn")

    @classmethod
    def check_config(cls, config: TransformerConfig) -> None:
        """Raises `ValueError` if the options do not fit the model (its sizes, causality)."""

    @classmethod
    def position_limit(cls, config: TransformerConfig) -> int | None:
        """Positions must lie in [0, limit) (a learned table's rows); None if any int works."""
        return None

    @classmethod
    def token_width(cls, config: TransformerConfig) -> int:
        """Width of the token embedding (all of d_model unless an encoding is concatenated)."""
        return config.d_model

    # -- hooks ----------------------------------------------------------------------------------

    def prepare(self, positions: jax.Array):
        """Computed once per forward pass (or decoding call) from `positions` `[B or 1, L]`
        and handed to every layer's `transform_qkv` as `context.prepared`: work that all
        layers share, such as one ODE solve for every block (FLOATER). Default None."""
        return None

    def embed(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Token embeddings `x` `[B, L, width]` with the encoding of `positions` `[B, L]`
        combined in, `[B, L, d_model]`."""
        return x

    def transform_qkv(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        positions: jax.Array,
        *,
        layer: int,
        context: PositionContext,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Layer `layer`'s queries `[B, L, H, D]`, keys and values `[B, L, Hkv, D]` at
        `positions` `[B, L]`, changed before attention (rotary encodings turn q and k). Keys
        and values are cached as returned, so each is changed once, at its own position.
        """
        return q, k, v

    def bias(
        self, q_positions: jax.Array, k_positions: jax.Array, *, kernel: bool = False
    ) -> jax.Array:
        """The bias of one attention block: `[B or 1, bq]` and `[B or 1, bk]` int positions
        -> `[B or 1, H or 1, bq, bk]` float. Called once per block. `kernel=True` asks for
        the form the fused Pallas kernel lowers (Triton, Mosaic: no gathers, slices,
        concatenates or batched products), where it differs from the fastest form under XLA;
        the two agree up to float rounding."""
        raise NotImplementedError

    def query_bias(self, q: jax.Array, q_positions: jax.Array, k_positions: jax.Array):
        """Like `bias`, reading the block's queries `q` `[B, bq, H, D]` too."""
        raise NotImplementedError

    def value(self, weights: jax.Array, q_positions: jax.Array, k_positions: jax.Array):
        """Terms `[B, bq, H, D]` added to the weighted values, from the unnormalised weights
        `[B, H, bq, bk]` (linear in them)."""
        raise NotImplementedError

    def contextual_bias(self, q: jax.Array, logits: jax.Array, mask: jax.Array) -> jax.Array:
        """A term added to whole rows of logits `[B, H, bq, Lk]` from the queries and the
        mask `[B, 1, bq, Lk]`; the attention then sees every key in one block."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Encoding]] = {}

#: The registered encoding names: the values `--pe` and `TransformerConfig.pe` accept.
ENCODINGS: list[str] = []


def register(name: str, cls: type[Encoding] | None = None):
    """Enrols an encoding class under `name`; the contract test then covers it.

    Use as a decorator, `@register("name")`, or call `register("name", cls)`.

    Raises:
      ValueError: `name` empty or taken, `cls` not an `Encoding` subclass, or its `Options`
        not a dataclass deriving from `jpe.nn.Options`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def enrol(cls):
        if not (isinstance(cls, type) and issubclass(cls, Encoding)):
            raise ValueError(f"cls must be a subclass of jpe.nn.Encoding, got {cls!r}")
        options = cls.Options
        if not (
            isinstance(options, type)
            and issubclass(options, Options)
            and dataclasses.is_dataclass(options)
            and options.__dataclass_params__.frozen
        ):
            raise ValueError(
                f"{cls.__name__}.Options must be a frozen dataclass deriving from jpe.nn.Options"
            )
        if name in _REGISTRY:
            raise ValueError(f"an encoding named {name!r} is already registered")
        _REGISTRY[name] = cls
        ENCODINGS.append(name)
        return cls

    return enrol if cls is None else enrol(cls)


def encoding_class(name: str) -> type[Encoding]:
    """The class registered as `name`; an unknown name raises listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown positional encoding pe={name!r}; valid names: {', '.join(_REGISTRY)}"
        ) from None
