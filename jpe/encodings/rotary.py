"""Rotary position encodings: RoPE, its context-extension scalings, xPos and axial RoPE.

The public surface of the rotary family, one module per idea behind it:

- `rope_scaling.py`: `rope_frequencies` and the Hugging Face `rope_scaling` forms (linear,
  ntk, dynamic, yarn, longrope, llama3), checked once by `parse_rope_scaling`;
- `rope.py`: angles, cos and sin, `apply_rope` in the `half` and `interleaved` layouts, the
  length-dependent `apply_rope_at_length` and the axial `apply_axial_rope`;
- `xpos.py`: xPos's decaying scales on top of the rotation;
- `rope_layout.py`: converting q/k weights between the two layouts.

Import from here (`jpe.encodings.rotary.apply_rope`) or from `jpe` itself.
"""

from jpe.encodings.rope import (
    LAYOUTS,
    apply_axial_rope,
    apply_rope,
    apply_rope_at_length,
    rope_angles,
    rope_cos_sin,
    rope_cos_sin_at_length,
)
from jpe.encodings.rope import LENGTH_DEPENDENT as LENGTH_DEPENDENT
from jpe.encodings.rope_layout import permute_rope_weights, rope_permutation
from jpe.encodings.rope_scaling import ROPE_TYPES, rope_frequencies
from jpe.encodings.rope_scaling import ParsedScaling as ParsedScaling
from jpe.encodings.rope_scaling import parse_rope_scaling as parse_rope_scaling
from jpe.encodings.xpos import XPOS_MAX_EXPONENT as XPOS_MAX_EXPONENT
from jpe.encodings.xpos import apply_xpos, xpos_max_position, xpos_scale

# The names `jpe.encodings` and `jpe` re-export. The aliased imports above are importable
# from here too (`from jpe.encodings.rotary import parse_rope_scaling`) without joining them.
__all__ = [
    "LAYOUTS",
    "ROPE_TYPES",
    "apply_axial_rope",
    "apply_rope",
    "apply_rope_at_length",
    "apply_xpos",
    "permute_rope_weights",
    "rope_angles",
    "rope_cos_sin",
    "rope_cos_sin_at_length",
    "rope_frequencies",
    "rope_permutation",
    "xpos_max_position",
    "xpos_scale",
]
