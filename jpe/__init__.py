"""jpe: Transformer positional encodings for JAX, and a lab for length extrapolation.

Layers, each importing only the ones above it (`docs/architecture.md` says where each concept
lives):

    jpe.encodings   pure functions: tables, rotations, biases, positions (JAX and NumPy only)
    jpe.attention   blocked attention that asks an encoding for its bias one block at a time
    jpe.nn          Flax NNX: the `Encoding` interface and registry, one module per encoding,
                    `TransformerConfig` and the `Transformer`
    jpe.lab         one training core, data, evaluation and reporting for every task
    train/          thin command lines over jpe.lab; configs/ holds the presets

The pure functions are re-exported here with `jpe.attention`. The NNX names (`Transformer`,
`TransformerConfig`, `ENCODINGS`, `register`, `generate`, `init_cache`) load Flax on first use,
so `import jpe.encodings` stays free of Flax.
"""

import importlib
from typing import TYPE_CHECKING

from jpe import encodings
from jpe.attention import attention
from jpe.encodings import *  # noqa: F403

if TYPE_CHECKING:  # for type checkers and linters; at run time they load lazily below
    from jpe.nn.config import TransformerConfig
    from jpe.nn.registry import ENCODINGS, register
    from jpe.nn.transformer import Transformer, generate, init_cache

_NN_NAMES = {
    "ENCODINGS": "jpe.nn.registry",
    "register": "jpe.nn.registry",
    "TransformerConfig": "jpe.nn.config",
    "Transformer": "jpe.nn.transformer",
    "generate": "jpe.nn.transformer",
    "init_cache": "jpe.nn.transformer",
}

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


def __getattr__(name: str):
    if name in ("nn", "lab"):
        return importlib.import_module(f"jpe.{name}")
    if name in _NN_NAMES:
        importlib.import_module("jpe.nn")  # registers the built-in encodings
        value = getattr(importlib.import_module(_NN_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jpe' has no attribute {name!r}")
