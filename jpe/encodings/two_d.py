"""2-D positions for image patches: packing, sine-cosine tables, learned-table resizing, axial
and mixed RoPE, and a 2-D ALiBi bias.

Positions of a grid are `[..., L, 2]` integer (row, column) pairs, row-major over the patches
(`grid_positions`). The 1-D API elsewhere in `jpe.encodings` is unchanged.

Packing. `jpe.Transformer` and `jpe.attention` carry one int per token (positions `[B, L]`),
which is what lets segment ids, left padding, decoding and packing work for every encoding. The
2-D encodings of `jpe.nn` therefore receive a grid position packed into one int32,

    packed = row * 2**15 + column,    0 <= column < 2**15,   -2**15 <= row < 2**16,

and unpack it in their hooks (`pack_grid_positions`, `unpack_grid_positions`). Ordinary 1-D
positions 0 <= p < 2**15 then read as row 0, column p: a 1 x L grid, on which each 2-D
encoding reduces to its 1-D counterpart along the column axis (longer 1-D positions wrap into
further rows). Differences of packed positions are not meaningful; every hook unpacks first.

Conventions, each from the paper or code cited at the function:

- `sincos_2d_at`: MAE's 2-D sine-cosine table (He et al. 2021), at any (row, column).
- `resize_table`: a learned `[rows, cols, dim]` table resized by bilinear or bicubic
  interpolation, as DeiT (Touvron et al. 2021) and MAE do when fine-tuning at another
  resolution.
- `axial_rope_2d`: RoPE-ViT's axial RoPE (Heo et al. 2024, arXiv 2403.13298): frequencies
  1 / 100^(4k / d) for k < d/4, the first d/4 pairs turned by the column (x), the next d/4 by
  the row (y).
- `rope_mixed_init`, `apply_rope_mixed`: RoPE-Mixed (same paper, eq. 11-12): the pair i of
  head h turns by theta^y_hi * row + theta^x_hi * column, with learned frequencies.
- `alibi_2d_bias`: ALiBi's -m_h * distance (Press et al. 2022) with the Euclidean or Manhattan
  distance between patches in the grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpe.encodings import _checks
from jpe.encodings._angles import angles as _angles
from jpe.encodings.rope import LAYOUTS, _rotate, apply_axial_rope
from jpe.encodings.rope_scaling import rope_frequencies

__all__ = [
    "COLUMN_BITS",
    "DISTANCES",
    "RESIZE_METHODS",
    "alibi_2d_bias",
    "apply_rope_mixed",
    "axial_rope_2d",
    "grid_positions",
    "pack_grid_positions",
    "resize_table",
    "rope_mixed_init",
    "sincos_2d_at",
    "unpack_grid_positions",
]

#: bits of a packed position that hold the column
COLUMN_BITS = 15
_COLUMNS = 1 << COLUMN_BITS
_ROW_RANGE = (-(1 << 15), 1 << 16)  # rows that keep row * 2**15 + column inside int32
DISTANCES = ("euclidean", "manhattan")
RESIZE_METHODS = ("bilinear", "bicubic")


# ---------------------------------------------------------------------------------------------
# Grid positions and their packing into one int
# ---------------------------------------------------------------------------------------------


def _grid(name: str, positions) -> jax.Array:
    positions = _checks.integer_array(name, positions)
    if positions.ndim < 2 or positions.shape[-1] != 2:
        raise ValueError(
            f"{name} must have shape [..., L, 2] of (row, column) pairs, got shape "
            f"{positions.shape}"
        )
    return positions


def grid_positions(height: int, width: int) -> jax.Array:
    """The (row, column) of each patch of a `height` x `width` grid, row-major.

    Args:
      height: patch rows, >= 1.
      width: patch columns, >= 1.

    Returns:
      int32 `[height * width, 2]`; entry `r * width + c` is `(r, c)`.

    Raises:
      ValueError: `height` or `width` not an integer >= 1.
    """
    height = _checks.positive_int("height", height)
    width = _checks.positive_int("width", width)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return jnp.asarray(np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1), jnp.int32)


def pack_grid_positions(positions) -> jax.Array:
    """(row, column) pairs packed into one int each: `row * 2**15 + column`.

    The inverse of `unpack_grid_positions`. This is how the Transformer's one-int positions
    carry a patch's place in the grid (see the module docstring).

    Args:
      positions: integer `[..., L, 2]` (row, column) pairs.

    Returns:
      int32 `[..., L]`.

    Raises:
      ValueError: `positions` not integer `[..., L, 2]`, or (concrete values) a column outside
        [0, 2**15) or a row outside [-2**15, 2**16).
    """
    positions = _grid("positions", positions)
    values = _checks.concrete(positions)
    if values is not None and values.size:
        cols, rows = values[..., 1], values[..., 0]
        if cols.min() < 0 or cols.max() >= _COLUMNS:
            raise ValueError(
                f"positions: columns must be in [0, 2**{COLUMN_BITS}) = [0, {_COLUMNS}) to be "
                f"packed, got values in [{int(cols.min())}, {int(cols.max())}]"
            )
        if rows.min() < _ROW_RANGE[0] or rows.max() >= _ROW_RANGE[1]:
            raise ValueError(
                f"positions: rows must be in [{_ROW_RANGE[0]}, {_ROW_RANGE[1]}) to be packed, "
                f"got values in [{int(rows.min())}, {int(rows.max())}]"
            )
    positions = positions.astype(jnp.int32)
    return positions[..., 0] * _COLUMNS + positions[..., 1]


def unpack_grid_positions(packed) -> jax.Array:
    """Packed positions back as (row, column) pairs: row = floor(p / 2**15), column = p mod
    2**15 (so a 1-D position 0 <= p < 2**15 is row 0, column p).

    Args:
      packed: integer `[..., L]`.

    Returns:
      int32 `[..., L, 2]`.

    Raises:
      ValueError: `packed` not an integer array of rank >= 1.
    """
    packed = _checks.integer_array("packed", packed)
    _checks.min_rank("packed", packed, 1, "[..., L]")
    packed = packed.astype(jnp.int32)
    return jnp.stack([packed >> COLUMN_BITS, packed & (_COLUMNS - 1)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Absolute tables
# ---------------------------------------------------------------------------------------------


def sincos_2d_at(positions, dim: int, *, base: float = 10000.0) -> jax.Array:
    """MAE's 2-D sine-cosine encoding of (row, column) positions.

    He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv 2111.06377),
    `util/pos_embed.py` `get_2d_sincos_pos_embed`: with omega_k = 1 / base^(k / (dim/4)),
    k < dim/4, the patch at row y, column x gets

      [sin(x omega) | cos(x omega) | sin(y omega) | cos(y omega)],

    the column first, as MAE's meshgrid puts it. On `grid_positions(h, w)` this is
    `jpe.sincos_2d(h, w, dim)`; here any positions (a shifted crop, a larger canvas) work.

    Args:
      positions: integer `[..., L, 2]` (row, column) pairs.
      dim: features, a positive multiple of 4.
      base: the wavelength base, > 0.

    Returns:
      float32 `[..., L, dim]`.

    Raises:
      ValueError: bad `positions` shape or dtype, `dim` not a positive multiple of 4, or
        `base` not a finite number > 0.
    """
    positions = _grid("positions", positions)
    dim = _checks.positive_int("dim", dim)
    if dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    base = _checks.positive_float("base", base)
    quarter = dim // 4
    omega = base ** (-np.arange(quarter, dtype=np.float64) / quarter)
    parts = []
    for axis in (1, 0):  # column (x), then row (y)
        angle = _angles(positions[..., axis], omega)  # [..., L, dim/4], exact mod 2 pi
        parts += [jnp.sin(angle), jnp.cos(angle)]
    return jnp.concatenate(parts, axis=-1)


def resize_table(table, size: tuple[int, int], *, method: str = "bicubic") -> jax.Array:
    """A learned 2-D position table resized to another grid by interpolation.

    DeiT (Touvron et al. 2021, arXiv 2012.12877, sec. 3) and MAE fine-tune at a new resolution
    by interpolating the table (`F.interpolate(..., mode="bicubic", align_corners=False)`).
    This uses `jax.image.resize` with half-pixel centres (= `align_corners=False`) and no
    antialiasing (as PyTorch's `interpolate`), so the same grid size returns the table
    unchanged. JAX's cubic kernel is Keys' with a = -0.5; PyTorch's bicubic uses a = -0.75, so
    the two differ slightly between grid points.

    Args:
      table: float `[rows, cols, dim]`.
      size: the new `(rows, cols)`, each >= 1.
      method: "bilinear" or "bicubic".

    Returns:
      `[size[0], size[1], dim]` in `table.dtype`.

    Raises:
      ValueError: `table` not a float `[rows, cols, dim]` array, a bad `size` or `method`.
    """
    _checks.one_of("method", method, RESIZE_METHODS)
    table = jnp.asarray(table)
    if table.ndim != 3 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(
            f"table must be a float [rows, cols, dim] array, got {table.dtype} with shape "
            f"{table.shape}"
        )
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise ValueError(f"size must be a pair (rows, cols), got {size!r}")
    rows, cols = (_checks.positive_int("size", s) for s in size)
    if (rows, cols) == table.shape[:2]:
        return table
    kind = {"bilinear": "linear", "bicubic": "cubic"}[method]
    return jax.image.resize(table, (rows, cols, table.shape[2]), kind, antialias=False)


# ---------------------------------------------------------------------------------------------
# Rotations
# ---------------------------------------------------------------------------------------------


def axial_rope_2d(x, positions, *, base: float = 100.0, layout: str = "interleaved") -> jax.Array:
    """RoPE-ViT's axial 2-D RoPE (Heo et al. 2024, arXiv 2403.13298, eq. 10; naver-ai/rope-vit
    `compute_axial_cis`).

    With theta_k = 1 / base^(4k / D), k < D/4, the first D/4 pairs of each head turn by
    column * theta_k and the next D/4 by row * theta_k: 1-D RoPE along each axis
    (`jpe.apply_axial_rope` with the column first). RoPE-ViT turns adjacent pairs (complex
    numbers), hence the default `layout="interleaved"`.

    Args:
      x: `[..., L, H, D]` queries or keys, D a multiple of 4.
      positions: integer `[..., L, 2]` (row, column) pairs.
      base: the frequency base (100 in RoPE-ViT).
      layout: "interleaved" or "half", as in `jpe.apply_rope`.

    Returns:
      `x` rotated, in `x.dtype`.

    Raises:
      ValueError: bad shapes, `D` not a multiple of 4, bad `base` or `layout`.
    """
    positions = _grid("positions", positions)
    head_dim = jnp.shape(x)[-1]
    if head_dim % 4:
        raise ValueError(f"x: the head dim must be a multiple of 4, got {head_dim}")
    inv_freq, _ = rope_frequencies(head_dim // 2, base=_checks.positive_float("base", base))
    columns_first = positions[..., ::-1]
    return apply_axial_rope(x, columns_first, (inv_freq, inv_freq), layout=layout)


def rope_mixed_init(
    key: jax.Array, num_heads: int, rotary_dim: int, *, base: float = 10.0
) -> jax.Array:
    """RoPE-Mixed's initial frequencies (Heo et al. 2024, sec. 3.3; naver-ai/rope-vit
    `init_random_2d_freqs`).

    Magnitudes m_k = 1 / base^(4k / r), k < r/4. Head h draws one angle phi_h uniformly in
    [0, 2 pi); its first r/4 pairs point along phi_h, the next r/4 along phi_h + pi/2:

      theta^x = [m cos(phi), m cos(phi + pi/2)],  theta^y = [m sin(phi), m sin(phi + pi/2)].

    Args:
      key: a PRNG key.
      num_heads: H >= 1.
      rotary_dim: r, rotated features per head, a positive multiple of 4.
      base: the magnitude base (10 in RoPE-ViT).

    Returns:
      float32 `[H, r/2, 2]`: `[..., 0]` = theta^y (per row), `[..., 1]` = theta^x (per column),
      the order of (row, column) positions.

    Raises:
      ValueError: bad `num_heads`, `rotary_dim` or `base`.
    """
    num_heads = _checks.positive_int("num_heads", num_heads)
    rotary_dim = _checks.positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 4:
        raise ValueError(f"rotary_dim must be a positive multiple of 4, got {rotary_dim}")
    base = _checks.positive_float("base", base)
    quarter = rotary_dim // 4
    magnitude = jnp.asarray(base ** (-4.0 * np.arange(quarter) / rotary_dim), jnp.float32)
    phi = jax.random.uniform(key, (num_heads, 1), jnp.float32, 0.0, 2 * np.pi)
    phi = jnp.repeat(phi, quarter, axis=-1)  # [H, r/4]
    direction = jnp.concatenate([phi, phi + np.pi / 2], axis=-1)  # [H, r/2]
    magnitude = jnp.concatenate([magnitude, magnitude])[None, :]  # [1, r/2]
    return jnp.stack([magnitude * jnp.sin(direction), magnitude * jnp.cos(direction)], axis=-1)


def apply_rope_mixed(x, positions, freqs, *, layout: str = "interleaved") -> jax.Array:
    """RoPE-Mixed (Heo et al. 2024, arXiv 2403.13298, eq. 11-12): pair i of head h turns by

      angle_hi = theta^y_hi * row + theta^x_hi * column,

    with `freqs[h, i] = (theta^y_hi, theta^x_hi)` learned (per layer in RoPE-ViT). The phase
    is linear in the position, so q . k depends on the difference of positions only. Angles
    are float32 products (the frequencies are traced parameters), accurate for grids of a few
    thousand patches a side.

    Args:
      x: `[..., L, H, D]` queries or keys.
      positions: integer `[..., L, 2]` (row, column) pairs.
      freqs: float `[H, n, 2]`, n <= D/2 (`rope_mixed_init`); the first 2n features rotate.
      layout: "interleaved" (RoPE-ViT's complex pairs) or "half".

    Returns:
      `x` rotated, in `x.dtype`.

    Raises:
      ValueError: mismatched shapes, `x` not floating, or a bad `layout`.
    """
    _checks.one_of("layout", layout, LAYOUTS)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array, got {x.dtype}")
    _checks.min_rank("x", x, 3, "[..., L, H, D]")
    positions = _grid("positions", positions)
    freqs = jnp.asarray(freqs, jnp.float32)
    heads, dim = x.shape[-2], x.shape[-1]
    if freqs.ndim != 3 or freqs.shape[0] != heads or freqs.shape[2] != 2:
        raise ValueError(f"freqs must have shape [H={heads}, n, 2], got shape {freqs.shape}")
    if 2 * freqs.shape[1] > dim:
        raise ValueError(f"freqs: 2 * n = {2 * freqs.shape[1]} must be <= the head dim {dim}")
    if positions.shape[-2] != x.shape[-3]:
        raise ValueError(
            f"positions has length {positions.shape[-2]} but x has length {x.shape[-3]}"
        )
    # [..., L, 1, 1, 2] * [H, n, 2] summed over the axis -> [..., L, H, n]
    p = positions.astype(jnp.float32)[..., :, None, None, :]
    freqs = freqs.reshape((1,) * (p.ndim - 3) + freqs.shape)
    angle = jnp.sum(p * freqs, axis=-1)
    rank = max(x.ndim, angle.ndim)
    fit = lambda a: a.reshape((1,) * (rank - a.ndim) + a.shape)  # noqa: E731
    return _rotate(fit(x), fit(jnp.cos(angle)), fit(jnp.sin(angle)), layout)


# ---------------------------------------------------------------------------------------------
# Relative bias
# ---------------------------------------------------------------------------------------------


def alibi_2d_bias(q_positions, k_positions, slopes, *, distance: str = "euclidean") -> jax.Array:
    """ALiBi in two dimensions: -m_h * d(q, k) between patches of a grid.

    Press et al. 2022 (arXiv 2108.12409) bias the logits by -m_h |i - j|; here the 1-D
    distance becomes the Euclidean sqrt(drow^2 + dcol^2) or the Manhattan |drow| + |dcol|
    distance between the patches. Both equal |i - j| on a single row, so on 1-D positions
    (row 0) this is ALiBi. It depends on position differences only.

    Args:
      q_positions: integer `[..., Lq, 2]` (row, column) pairs.
      k_positions: integer `[..., Lk, 2]`; batch axes broadcast with the queries'.
      slopes: `[H]` per-head slopes, e.g. `jpe.alibi_slopes(H)`.
      distance: "euclidean" or "manhattan".

    Returns:
      float32 `[..., H, Lq, Lk]`.

    Raises:
      ValueError: bad shapes or dtypes, `slopes` not `[H]`, or an unknown `distance`.
    """
    _checks.one_of("distance", distance, DISTANCES)
    q = _grid("q_positions", q_positions)
    k = _grid("k_positions", k_positions)
    batch = _checks.broadcastable(("q_positions", "k_positions"), (q.shape[:-2], k.shape[:-2]))
    slopes = jnp.asarray(slopes, jnp.float32)
    if slopes.ndim != 1:
        raise ValueError(f"slopes must have shape [H], got shape {slopes.shape}")
    delta = (k[..., None, :, :] - q[..., :, None, :]).astype(jnp.float32)  # [..., Lq, Lk, 2]
    if distance == "euclidean":
        d = jnp.sqrt(jnp.sum(delta**2, axis=-1))
    else:
        d = jnp.sum(jnp.abs(delta), axis=-1)
    d = jnp.broadcast_to(d, batch + d.shape[-2:])
    return -slopes.reshape((1,) * len(batch) + (-1, 1, 1)) * d[..., None, :, :]
