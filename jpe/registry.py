"""Encoding names -> NNX encoding classes: the one list of names (`jpe.ENCODINGS`).

`--pe` and `TransformerConfig.pe` accept exactly these names. `register` enrols a new
encoding, which the contract test over `ENCODINGS` then covers.
"""

from __future__ import annotations

from jpe.nn import encodings as enc

__all__ = ["ENCODINGS", "encoding_class", "register"]

_REGISTRY: dict[str, type[enc.Encoding]] = {}


def register(name: str, cls: type[enc.Encoding]) -> type[enc.Encoding]:
    """Enrols `cls` under `name`; raises if the name is taken or `cls` is not an `Encoding`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, enc.Encoding)):
        raise ValueError(f"cls must be a subclass of jpe.nn.Encoding, got {cls!r}")
    if name in _REGISTRY:
        raise ValueError(f"an encoding named {name!r} is already registered")
    _REGISTRY[name] = cls
    ENCODINGS[:] = list(_REGISTRY)
    return cls


def encoding_class(name: str) -> type[enc.Encoding]:
    """The class registered as `name`; an unknown name raises listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown positional encoding {name!r}; valid names: {', '.join(_REGISTRY)}"
        ) from None


ENCODINGS: list[str] = []

for _name, _cls in {
    "none": enc.NoPE,
    "sinusoidal": enc.Sinusoidal,
    "scaled-sinusoidal": enc.ScaledSinusoidal,
    "learned": enc.Learned,
    "binary": enc.Binary,
    "rope": enc.RoPE,
    "xpos": enc.XPos,
    "alibi": enc.ALiBi,
    "t5": enc.T5Bias,
    "kerple": enc.Kerple,
    "sandwich": enc.Sandwich,
    "fire": enc.FIRE,
    "shaw": enc.Shaw,
    "transformer-xl": enc.TransformerXL,
    "dpb": enc.DynamicPositionBias,
    "cope": enc.CoPE,
}.items():
    register(_name, _cls)
