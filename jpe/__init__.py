"""jpe: Transformer positional encodings for JAX, and a lab for length extrapolation.

The pure functions live in `jpe.encodings` and are re-exported here, with `jpe.attention`.
"""

from jpe import encodings
from jpe.attention import attention
from jpe.encodings import *  # noqa: F403

__all__ = ["attention", *encodings.__all__]
