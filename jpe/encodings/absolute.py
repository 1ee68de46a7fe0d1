"""Absolute position encodings: tables indexed by position, and how to combine them with `x`.

Every table is a pure function of integer `positions` `[..., L]` (any integer dtype, leading
batch axes allowed) and returns float32 `[..., L, dim]`. Learned tables are ordinary arrays
created by `learned_init` and read by `learned_lookup`; the Flax module that owns one only
stores it. `combine` adds, multiplies or concatenates a table onto the token embeddings.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jpe.encodings import _checks
from jpe.encodings._angles import angles as _angles

__all__ = [
    "binary",
    "combine",
    "learned_init",
    "learned_lookup",
    "scaled_sinusoidal",
    "scaled_sinusoidal_init",
    "sincos_2d",
    "sinusoidal",
]

COMBINE_MODES = ("add", "multiply", "concat")


def _inv_freq(num: int, denominator: int, base: float) -> np.ndarray:
    """Returns base ** (-2i / denominator) for i < num, in float64."""
    return base ** (-2.0 * np.arange(num, dtype=np.float64) / denominator)


def _positions(name: str, positions) -> jax.Array:
    positions = _checks.integer_array(name, positions)
    _checks.min_rank(name, positions, 1, "[..., L]")
    return positions


def sinusoidal(positions, dim: int, *, base: float = 10000.0) -> jax.Array:
    """The fixed sinusoidal table of Vaswani et al. 2017 (arXiv 1706.03762, sec. 3.5).

    PE[p, 2i] = sin(p / base^(2i/dim)),  PE[p, 2i+1] = cos(p / base^(2i/dim)).

    Sine and cosine of one frequency are interleaved (columns 2i, 2i+1), as in the paper. Some
    libraries (x-transformers, the randomized-PE code) concatenate [sin | cos] with the same
    frequencies instead, a fixed permutation of the features. The exponents divide by `dim`
    itself for every `dim`, as the formula reads; an odd `dim` has ceil(dim / 2) frequencies and
    ends with the sine column of the last one. (So an odd-dim table is not the first columns of
    the table for dim + 1, whose exponents divide by dim + 1.)

    Precision: the frequencies are computed in float64 on the host, and the angle is reduced
    modulo 2 pi in exact float32 pieces before the sine (`jpe/encodings/_angles.py`, shared
    with RoPE), so every angle is within 3e-6 rad of the exact value for every int32 position
    (a float32 `p * w` is off by up to 4e-3 rad at p = 1e5 and 4e-2 at p = 2**20). Negative
    positions are allowed.

    Example:
      >>> sinusoidal(jnp.arange(4), 8).shape
      (4, 8)

    Args:
      positions: integer array `[..., L]`.
      dim: number of features, >= 1.
      base: the wavelength base (10000 in the paper), > 0.

    Returns:
      float32 `[..., L, dim]`.

    Raises:
      ValueError: if `positions` is not an integer array of rank >= 1, `dim` is not an integer
        >= 1, or `base` is not a finite number > 0.
    """
    positions = _positions("positions", positions)
    dim = _checks.positive_int("dim", dim)
    base = _checks.positive_float("base", base)
    num = (dim + 1) // 2  # frequencies: column 2i needs i = 0 .. ceil(dim / 2) - 1
    angles = _angles(positions, _inv_freq(num, dim, base))  # [..., L, num]
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., L, num, 2]
    table = table.reshape(table.shape[:-2] + (2 * num,))  # interleave: sin0, cos0, sin1, ...
    return table[..., :dim]  # an odd dim drops the last cosine, ending with a sine column


def scaled_sinusoidal_init(dim: int) -> float:
    """The initial gain of `scaled_sinusoidal`: dim ** -0.5 (x-transformers' choice).

    Args:
      dim: number of features, >= 1.

    Returns:
      A Python float; the owning module stores it as its learned scalar parameter.

    Raises:
      ValueError: if `dim` is not an integer >= 1.
    """
    dim = _checks.positive_int("dim", dim)
    return dim**-0.5


def scaled_sinusoidal(positions, dim: int, scale, *, base: float = 10000.0) -> jax.Array:
    """The sinusoidal table times a learned scalar gain: PE[p] = scale * sinusoidal(p, dim).

    This is x-transformers' `ScaledSinusoidalEmbedding` (lucidrains/x-transformers), whose gain
    starts at dim ** -0.5 (`scaled_sinusoidal_init`), so each row starts with norm about
    1/sqrt(2) instead of sqrt(dim / 2), small next to the token embeddings. x-transformers
    concatenates [sin | cos]; this library interleaves sin and cos (see `sinusoidal`), a fixed
    permutation of the features that a model learns around but that matters when loading its
    weights.

    Args:
      positions: integer array `[..., L]`.
      dim: number of features, >= 1.
      scale: the gain, a real scalar or an array of shape `()` or `(1,)` (a learned parameter);
        gradients flow through it.
      base: the wavelength base, > 0.

    Returns:
      float32 `[..., L, dim]`.

    Raises:
      ValueError: as `sinusoidal`, or if `scale` is not a real scalar of shape `()` or `(1,)`.
    """
    table = sinusoidal(positions, dim, base=base)
    try:
        floating = jnp.issubdtype(jnp.result_type(scale), jnp.floating)
    except TypeError:
        floating = False
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or floating):
        raise ValueError(f"scale must be a real scalar, got {scale!r}")
    if jnp.shape(scale) not in ((), (1,)):
        raise ValueError(f"scale must have shape () or (1,), got shape {jnp.shape(scale)}")
    return table * jnp.reshape(jnp.asarray(scale, jnp.float32), ())


def binary(positions, dim: int) -> jax.Array:
    """The binary encoding: column b is +1 if bit b of the position is set, else -1.

    PE[p, b] = 2 * ((p >> b) & 1) - 1,  b = 0 (least significant) ... dim - 1.

    Only ceil(log2(n)) of the columns vary over positions 0..n-1; the others are constant -1.

    Positions must lie in [0, 2**dim). On concrete arrays (including constants a jitted
    function closes over) this is checked and raises; traced values cannot be checked and a
    position p is encoded as the low `dim` bits of its two's complement, i.e. as p mod 2**dim.

    Args:
      positions: integer array `[..., L]`.
      dim: number of bits, >= 1.

    Returns:
      float32 `[..., L, dim]` with entries in {-1, +1}.

    Raises:
      ValueError: if `positions` is not an integer array of rank >= 1, `dim` is not an integer
        >= 1, or (concrete `positions` only) a position is outside [0, 2**dim).
    """
    positions = _positions("positions", positions)
    dim = _checks.positive_int("dim", dim)
    values = _checks.concrete(positions)  # NumPy: a jnp reduction would be traced under jit
    if values is not None and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= 2**dim:
            raise ValueError(
                f"positions must be in [0, 2**dim) = [0, {2**dim}) for dim={dim}; "
                f"got values in [{low}, {high}]"
            )
    # Shifts only up to the dtype's width; higher bits are the sign bit (two's complement).
    width = min(dim, jnp.iinfo(positions.dtype).bits)
    shifts = jnp.arange(width, dtype=positions.dtype).reshape((1,) * positions.ndim + (width,))
    bits = jnp.bitwise_and(jnp.right_shift(positions[..., None], shifts), 1) == 1
    if width < dim:
        sign = jnp.broadcast_to(positions[..., None] < 0, positions.shape + (dim - width,))
        bits = jnp.concatenate([bits, sign], axis=-1)
    return jnp.where(bits, 1.0, -1.0).astype(jnp.float32)


def sincos_2d(height: int, width: int, dim: int, *, base: float = 10000.0) -> jax.Array:
    """The 2-D sine-cosine table for a grid of image patches, in MAE's convention.

    He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv 2111.06377),
    facebookresearch/mae `util/pos_embed.py`, `get_2d_sincos_pos_embed`. With
    omega_k = 1 / base^(k / (dim/4)), k < dim/4, the patch in row y, column x gets

      [sin(x omega) | cos(x omega) | sin(y omega) | cos(y omega)],

    each block dim/4 wide. MAE builds its grid with `np.meshgrid(grid_w, grid_h)`, so the
    column (x) coordinate fills the first half even though the code names it `emb_h`; this is
    reproduced here. Patches are flattened row-major: row index y * width + x. big_vision's
    `posemb_sincos_2d` (the MoCo v3 form) uses the same order but divides by dim/4 - 1 in the
    exponent (so its lowest frequency is exactly 1/base), which this function does not.

    Args:
      height: number of patch rows, >= 1.
      width: number of patch columns, >= 1.
      dim: number of features, a positive multiple of 4.
      base: the wavelength base, > 0.

    Returns:
      float32 `[height * width, dim]`.

    Raises:
      ValueError: if `height` or `width` is not an integer >= 1, `dim` is not a positive
        multiple of 4, or `base` is not a finite number > 0.
    """
    height = _checks.positive_int("height", height)
    width = _checks.positive_int("width", width)
    dim = _checks.positive_int("dim", dim)
    if dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    base = _checks.positive_float("base", base)
    quarter = dim // 4
    omega = base ** (-np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    grid = jnp.stack([cols.reshape(-1), rows.reshape(-1)])  # [2, H*W]: x first, as MAE
    angles = _angles(grid, omega)  # [2, H*W, dim/4]
    halves = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [2, H*W, dim/2]
    return jnp.concatenate([halves[0], halves[1]], axis=-1)


def learned_init(
    key: jax.Array, max_len: int, dim: int, *, stddev: float = 0.02, truncated: bool = True
) -> jax.Array:
    """Initial values for a learned position table (one row per position).

    BERT (google-research/bert `modeling.py`) draws from a normal with stddev 0.02 truncated at
    two standard deviations (TF's `truncated_normal_initializer`, where `stddev` is that of the
    normal before truncation, so the sample std is ~0.88 * stddev); that is the default here.
    GPT-2 (openai/gpt-2 `model.py`, `wpe`) uses an untruncated normal with stddev 0.01:
    `learned_init(key, 1024, 768, stddev=0.01, truncated=False)`.

    Args:
      key: a JAX PRNG key.
      max_len: number of positions, >= 1.
      dim: number of features, >= 1.
      stddev: standard deviation of the normal (before truncation), > 0.
      truncated: redraw values more than two standard deviations from 0 (BERT) or not (GPT-2).

    Returns:
      float32 `[max_len, dim]`.

    Raises:
      ValueError: if `max_len` or `dim` is not an integer >= 1, or `stddev` is not a finite
        number > 0.
    """
    max_len = _checks.positive_int("max_len", max_len)
    dim = _checks.positive_int("dim", dim)
    stddev = _checks.positive_float("stddev", stddev)
    shape = (max_len, dim)
    if truncated:
        values = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    else:
        values = jax.random.normal(key, shape, jnp.float32)
    return stddev * values


def learned_lookup(table, positions) -> jax.Array:
    """Gathers the rows of a learned position table: PE[..., l, :] = table[positions[..., l]].

    JAX's gather silently clamps out-of-range indices, which would give every position past
    the end the last row. Here, on concrete `positions` (including constants a jitted function
    closes over), a position outside [0, max_len) raises. Traced values cannot be checked: the
    caller must bound them (the Transformer checks `max_len` against the static sequence
    length), and a position out of range reads a row of NaN, never a clamped row. Only that
    position's row is NaN; in `jpe.Transformer` the NaN then reaches exactly the tokens that
    attend to it (later tokens of a decoder, every token of its segment in an encoder), since
    `jpe.attention` keeps a NaN key or value out of rows that do not attend to it.

    Args:
      table: `[max_len, dim]` floating array (`learned_init`).
      positions: integer array `[..., L]`.

    Returns:
      `[..., L, dim]` in `table.dtype`.

    Raises:
      ValueError: if `table` is not a floating array of rank 2, `positions` is not an integer
        array of rank >= 1, or (concrete `positions` only) a position is outside [0, max_len).
    """
    table = jnp.asarray(table)
    if table.ndim != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(
            f"table must be a floating array of shape [max_len, dim], "
            f"got {table.dtype} with shape {table.shape}"
        )
    positions = _positions("positions", positions)
    max_len = table.shape[0]
    values = _checks.concrete(positions)  # NumPy: a jnp reduction would be traced under jit
    if values is not None and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= max_len:
            raise ValueError(
                f"positions must be in [0, max_len) = [0, {max_len}); got values in [{low}, {high}]"
            )
    # `take` would wrap negative indices; send them past the end so they fill with NaN too.
    index = jnp.where(positions < 0, max_len, positions)
    return jnp.take(table, index, axis=0, mode="fill", fill_value=jnp.nan)


def combine(x, pe, *, mode: str = "add") -> jax.Array:
    """Combines token embeddings `x` with a position table `pe`.

    add: x + pe (Vaswani et al. 2017, BERT, GPT-2); multiply: x * pe, elementwise;
    concat: [x | pe] on the feature axis.

    `pe` is cast to `x.dtype` first, so a bfloat16 `x` stays bfloat16. `pe` must have the same
    rank as `x`, with leading axes that broadcast *to* x's (each equal to x's or 1: the result
    keeps x's leading shape), or be `[L, d]`, which is expanded over x's leading axes
    explicitly.

    Args:
      x: floating array `[..., L, D]`.
      pe: floating array `[..., L, d]` of x's rank, or `[L, d]`; d == D for add and multiply.
      mode: "add", "multiply" or "concat".

    Returns:
      `[..., L, D]` (add, multiply) or `[..., L, D + d]` (concat), in `x.dtype`.

    Raises:
      ValueError: if `mode` is unknown, `x` or `pe` is not floating, their ranks or shapes do
        not match as above (a `pe` leading axis that would enlarge x's included).
    """
    _checks.one_of("mode", mode, COMBINE_MODES)
    x, pe = jnp.asarray(x), jnp.asarray(pe)
    for name, a in (("x", x), ("pe", pe)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")
    _checks.min_rank("x", x, 2, "[..., L, D]")
    if pe.ndim == 2:
        pe = pe.reshape((1,) * (x.ndim - 2) + pe.shape)  # [L, d] -> [1, ..., L, d]
    elif pe.ndim != x.ndim:
        raise ValueError(
            f"pe must have shape [L, d] or the rank of x ({x.ndim}), got shape {pe.shape}"
        )
    pe = pe.astype(x.dtype)
    lead = x.shape[:-2]
    if any(p not in (1, n) for p, n in zip(pe.shape[:-2], lead, strict=True)):
        raise ValueError(
            f"pe's leading axes {pe.shape[:-2]} must each equal x's {lead} or be 1 (the "
            f"result keeps x's shape), got pe {pe.shape} for x {x.shape}"
        )
    if mode == "concat":
        if pe.shape[-2] != x.shape[-2]:
            raise ValueError(f"pe must have x's length L = {x.shape[-2]}, got shape {pe.shape}")
        pe = jnp.broadcast_to(pe, x.shape[:-1] + pe.shape[-1:])
        return jnp.concatenate([x, pe], axis=-1)
    if pe.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"pe must end in x's [L, D] = {list(x.shape[-2:])} for mode={mode!r}, "
            f"got shape {pe.shape}"
        )
    return x + pe if mode == "add" else x * pe
