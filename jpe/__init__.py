"""jpe: Transformer positional encodings for JAX, and a lab for length extrapolation.

The pure functions live in `jpe.encodings` and are re-exported here, with `jpe.attention`, the
registry of encoding names (`jpe.ENCODINGS`) and the NNX Transformer.
"""

from jpe import encodings
from jpe.attention import attention
from jpe.encodings import *  # noqa: F403
from jpe.nn.config import TransformerConfig
from jpe.nn.transformer import Transformer, generate, init_cache
from jpe.registry import ENCODINGS, register

__all__ = [
    "ENCODINGS",
    "Transformer",
    "TransformerConfig",
    "attention",
    "generate",
    "init_cache",
    "register",
    *encodings.__all__,
]
