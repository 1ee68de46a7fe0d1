"""The Transformer's configuration: frozen, hashable, and the only source of static choices."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jpe.attention import IMPLEMENTATIONS
from jpe.encodings import _checks
from jpe.nn import encodings as _encodings  # noqa: F401  (registers the built-in encodings)
from jpe.nn import encodings_2d as _encodings_2d  # noqa: F401  (and the 2-D ones)
from jpe.nn.registry import Options, encoding_class

__all__ = ["TransformerConfig"]

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything static about a `jpe.Transformer`; hashable, so it can key `jit` caches.

    Attributes:
      pe: the positional encoding, one of `jpe.ENCODINGS`.
      pe_options: the encoding's own options, as a mapping (e.g. `{"num_buckets": 64}` for
        `t5`, `{"scaling": {"rope_type": "yarn", ...}}` for `rope`) or the encoding's `Options`;
        stored as that frozen `Options` instance, with defaults for what is not given. Each
        encoding class lists its options (`jpe.nn.encoding_class(pe).Options`), and an unknown
        one is an error.
      vocab_size, d_model, num_heads, num_layers: the usual sizes.
      num_kv_heads: key/value heads for grouped-query attention (default `num_heads`).
      mlp_ratio: hidden width of the MLP as a multiple of `d_model`.
      causal: True for a decoder (causal attention), False for an encoder.
      max_len: the longest position a bounded encoding holds (the rows of `learned`'s table;
        see `Encoding.position_limit`); other encodings accept any position.
      num_classes: if set, a token-classification head with this many classes replaces the
        language-model head (encoder tasks).
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      block_size: attention block length; None: the implementation's default (512; the
        Pallas kernel's is smaller on GPU and for large biases, see `jpe.pallas_attention`).
      attention: the attention implementation, None (picked for the backend), "xla",
        "pallas" or "cudnn" (see `jpe.attention`); it must be one the encoding supports
        (`Encoding.supported_attention()`).
    """

    pe: str = "rope"
    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    num_kv_heads: int | None = None
    mlp_ratio: int = 4
    causal: bool = True
    max_len: int = 2048
    num_classes: int | None = None
    dtype: str = "float32"
    block_size: int | None = None
    attention: str | None = None
    pe_options: Options | Mapping | None = None

    def __post_init__(self):
        cls = encoding_class(self.pe)
        object.__setattr__(self, "pe_options", cls.Options.build(self.pe, self.pe_options))
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_ratio", "max_len"):
            _checks.positive_int(name, getattr(self, name))
        if self.block_size is not None:
            _checks.positive_int("block_size", self.block_size)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})"
            )
        kv = self.kv_heads
        _checks.positive_int("num_kv_heads", kv)
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})"
            )
        if self.num_classes is not None:
            _checks.positive_int("num_classes", self.num_classes)
        _checks.one_of("dtype", self.dtype, _DTYPES)
        if self.attention is not None:
            _checks.one_of("attention", self.attention, IMPLEMENTATIONS)
            supported = cls.supported_attention()
            if self.attention not in supported:
                raise ValueError(
                    f"attention={self.attention!r} does not serve pe={self.pe!r}; it supports "
                    f"{', '.join(supported)}"
                )
        cls.check_config(self)

    @property
    def encoding(self):
        """The encoding's class (`jpe.nn.encoding_class(pe)`), to ask it for facts."""
        return encoding_class(self.pe)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def replace(self, **changes) -> TransformerConfig:
        """A copy with `changes`. Changing `pe` alone keeps the options that differ from their
        defaults, which must then exist for the new encoding."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """A JSON-ready dict (the options as a dict of the non-default ones)."""
        out = dataclasses.asdict(self)
        out["pe_options"] = self.pe_options.non_default()
        return out
