"""jpe: Transformer positional encodings for JAX, and a lab for length extrapolation.

The pure functions live in `jpe.encodings` and are re-exported here.
"""

from jpe.attention import attention
from jpe.encodings.rotary import (
    apply_axial_rope,
    apply_rope,
    apply_xpos,
    permute_rope_weights,
    rope_angles,
    rope_cos_sin,
    rope_frequencies,
    rope_permutation,
    xpos_scale,
)

__all__ = [
    "apply_axial_rope",
    "attention",
    "apply_rope",
    "apply_xpos",
    "permute_rope_weights",
    "rope_angles",
    "rope_cos_sin",
    "rope_frequencies",
    "rope_permutation",
    "xpos_scale",
]
