"""Flax NNX: the encoding interface and registry, one module per encoding, and the Transformer."""

from jpe.nn import encodings, encodings_2d
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import ENCODINGS, Capabilities, Encoding, Options, encoding_class, register
from jpe.nn.transformer import Transformer, generate, init_cache

__all__ = [
    "ENCODINGS",
    "Capabilities",
    "Encoding",
    "Options",
    "Transformer",
    "TransformerConfig",
    "encoding_class",
    "encodings",
    "encodings_2d",
    "generate",
    "init_cache",
    "register",
]
