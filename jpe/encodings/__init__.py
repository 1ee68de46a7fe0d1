"""Pure functions: encoding tables, rotations, attention biases and positions.

No Flax and no state: every function works under `jax.jit` and `jax.vmap`.
"""

from jpe.encodings import absolute, contextual, floater, positions, relative, rotary, two_d
from jpe.encodings.absolute import *  # noqa: F403
from jpe.encodings.contextual import *  # noqa: F403
from jpe.encodings.floater import *  # noqa: F403
from jpe.encodings.positions import *  # noqa: F403
from jpe.encodings.relative import *  # noqa: F403
from jpe.encodings.rotary import *  # noqa: F403
from jpe.encodings.two_d import *  # noqa: F403

__all__ = [
    *absolute.__all__,
    *contextual.__all__,
    *floater.__all__,
    *positions.__all__,
    *relative.__all__,
    *rotary.__all__,
    *two_d.__all__,
]
