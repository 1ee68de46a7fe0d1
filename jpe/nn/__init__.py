"""Flax NNX modules: one per encoding that owns parameters, and the Transformer."""

from jpe.nn.config import TransformerConfig
from jpe.nn.encodings import Encoding

__all__ = ["Encoding", "TransformerConfig"]
