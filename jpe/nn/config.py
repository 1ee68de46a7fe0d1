"""The Transformer's configuration: frozen, hashable, and the only source of static choices."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jpe.encodings import _checks, relative, rotary
from jpe.encodings.absolute import COMBINE_MODES
from jpe.encodings.rotary import LAYOUTS

__all__ = ["TransformerConfig"]

_DTYPES = ("float32", "bfloat16")


def _freeze(value):
    """Mappings and lists as nested tuples, so the config hashes."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw_scaling(items) -> dict | None:
    if items is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything static about a `jpe.Transformer`; hashable, so it can key `jit` caches.

    Attributes:
      pe: the positional encoding, one of `jpe.ENCODINGS`.
      vocab_size, d_model, num_heads, num_layers: the usual sizes.
      num_kv_heads: key/value heads for grouped-query attention (default `num_heads`).
      mlp_ratio: hidden width of the MLP as a multiple of `d_model`.
      causal: True for a decoder (causal attention), False for an encoder.
      max_len: the longest position a learned table holds (`learned`), and the bound checked
        for it; other encodings accept any position.
      num_classes: if set, a token-classification head with this many classes replaces the
        language-model head (encoder tasks).
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      block_size: attention block length (see `jpe.attention`).
      rope_base, rope_scaling, rope_layout, rotary_fraction: RoPE's base, Hugging Face style
        `rope_scaling` mapping, pair layout, and the fraction of each head's features rotated.
      xpos_scale_base: xPos's scale base (512 in the paper).
      pe_combine: how an absolute encoding meets the token embeddings: add, multiply or concat
        (concat gives the encoding half of `d_model`).
      binary_bits: bits of the position fed to the `binary` encoding's projection.
      t5_num_buckets, t5_max_distance: T5 bias buckets.
      kerple_kind: "log" or "power".
      shaw_max_distance: Shaw et al.'s clipping distance k.
      fire_hidden, dpb_hidden: hidden widths of FIRE's and the dynamic position bias's MLPs.
      cope_npos: CoPE's number of position embeddings (its positions saturate there).
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
    block_size: int = 512
    rope_base: float = 10000.0
    rope_scaling: tuple | None = None
    rope_layout: str = "half"
    rotary_fraction: float = 1.0
    xpos_scale_base: float = 512.0
    pe_combine: str = "add"
    binary_bits: int = 16
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    kerple_kind: str = "log"
    shaw_max_distance: int = 16
    fire_hidden: int = 32
    dpb_hidden: int = 32
    cope_npos: int = 64

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_ratio", "max_len"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("block_size", self.block_size)
        _checks.positive_int("binary_bits", self.binary_bits)
        _checks.positive_int("cope_npos", self.cope_npos)
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
        _checks.one_of("rope_layout", self.rope_layout, LAYOUTS)
        _checks.one_of("pe_combine", self.pe_combine, COMBINE_MODES)
        _checks.one_of("kerple_kind", self.kerple_kind, ("log", "power"))
        if not 0 < self.rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if self.rotary_dim < 2:
            raise ValueError(
                f"rotary_fraction {self.rotary_fraction} of head_dim {self.head_dim} leaves "
                "fewer than 2 rotated features"
            )
        self._check_encodings()

    def _check_encodings(self):
        """The encodings' settings, checked now by the pure functions that will read them."""
        if self.rope_scaling is not None and self.pe == "xpos":
            raise ValueError(
                "rope_scaling does not apply to pe='xpos' (xPos rotates with plain RoPE "
                "frequencies); set rope_scaling=None or use pe='rope'"
            )
        try:
            rotary.rope_frequencies(self.rotary_dim, base=self.rope_base, scaling=self.scaling)
        except ValueError as error:
            raise ValueError(
                f"invalid rope settings (rope_base={self.rope_base}, rope_scaling="
                f"{self.scaling}, rotary_dim={self.rotary_dim}): {error}"
            ) from None
        try:
            relative._t5_check(self.t5_num_buckets, self.t5_max_distance, not self.causal)
        except ValueError as error:
            raise ValueError(
                f"invalid T5 settings (t5_num_buckets={self.t5_num_buckets}, t5_max_distance="
                f"{self.t5_max_distance}, causal={self.causal}): {error}"
            ) from None
        _checks.positive_float("xpos_scale_base", self.xpos_scale_base)
        _checks.positive_int("shaw_max_distance", self.shaw_max_distance)
        _checks.positive_int("fire_hidden", self.fire_hidden)
        _checks.positive_int("dpb_hidden", self.dpb_hidden)
        if self.pe == "sandwich" and self.head_dim % 2:
            raise ValueError(
                f"pe='sandwich' needs an even head_dim (its sinusoids are one head wide), got "
                f"d_model / num_heads = {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        return 2 * int(self.head_dim * self.rotary_fraction // 2)

    @property
    def scaling(self) -> dict | None:
        """`rope_scaling` back as a mapping (lists for LongRoPE's factors)."""
        return _thaw_scaling(self.rope_scaling)

    def replace(self, **changes) -> TransformerConfig:
        return dataclasses.replace(self, **changes)
