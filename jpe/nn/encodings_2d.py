"""NNX modules of the 2-D encodings for image patches, registered next to their classes.

Each hook receives the Transformer's ordinary int positions `[B, L]` and reads them as grid
positions packed into one int, `row * 2**15 + column` (`jpe.encodings.two_d`): the attention,
segment ids, decoding and packing need no change, and 1-D positions read as a 1 x L grid, on
which each class reduces to its 1-D counterpart along the columns (so the contract tests over
`jpe.ENCODINGS` cover these classes too). `jpe.nn.vision.VisionTransformer` packs the patch
grid this way; `train/vit.py --pe=sinusoidal|learned|rope|alibi|rope-mixed` selects them.

=================  ==========================================================================
name               encoding
=================  ==========================================================================
`sinusoidal-2d`    MAE's fixed 2-D sine-cosine table, added to the patch embeddings
`learned-2d`       a learned `[max_len, max_len, d]` table (rows x columns), resized by
                   interpolation to another grid (`embed_grid`, DeiT's fine-tuning recipe)
`rope-2d`          RoPE-ViT's axial RoPE (base 100, column pairs then row pairs)
`rope-mixed`       RoPE-ViT's RoPE-Mixed: frequencies learned per layer and head
`alibi-2d`         -m_h * Euclidean (or Manhattan) distance between patches
=================  ==========================================================================
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpe.encodings import _checks, absolute, relative, rotary, two_d
from jpe.nn.encodings import _Absolute
from jpe.nn.registry import Encoding, Options, register

__all__ = ["ALiBi2D", "AxialRoPE2D", "Learned2D", "RoPEMixed", "Sinusoidal2D"]


def _check_width(name: str, width: int, multiple: int, what: str) -> None:
    if width % multiple:
        raise ValueError(f"pe={name!r} needs {what} to be a multiple of {multiple}, got {width}")


@register("sinusoidal-2d")
class Sinusoidal2D(_Absolute):
    """MAE's 2-D sine-cosine table (He et al. 2021, `two_d.sincos_2d_at`) at each patch's
    (row, column); on 1-D positions, a 1 x L grid."""

    position_axes = 2

    @classmethod
    def check_config(cls, config):
        _check_width("sinusoidal-2d", cls.width(config), 4, "the table width (d_model)")

    def table(self, positions):
        grid = two_d.unpack_grid_positions(positions)
        return two_d.sincos_2d_at(grid, self.width(self.config))


@register("learned-2d")
class Learned2D(_Absolute):
    """A learned table of `max_len` x `max_len` grid cells (rows x columns), as a ViT's
    position embedding (Dosovitskiy et al. 2021) laid out on the grid.

    `embed` reads the cell of each (row, column); a row or column >= max_len raises on
    concrete positions and reads NaN under `jit` (never a clamped cell). `embed_grid` first
    resizes the table to the image's patch grid by interpolation (`two_d.resize_table`,
    option `method`), as DeiT and MAE fine-tune at a new resolution; at the table's own size it
    is the table. `jpe.nn.vision.VisionTransformer` calls `embed_grid` where an encoding
    defines it, so a ViT trained on a 6 x 6 grid with max_len 6 runs at 8 x 8 with the table
    interpolated.
    """

    position_axes = 2

    @dataclasses.dataclass(frozen=True)
    class Options(_Absolute.Options):
        """method: how the table is resized to another grid, "bicubic" (DeiT) or
        "bilinear"."""

        method: str = "bicubic"

        def __post_init__(self):
            super().__post_init__()
            _checks.one_of("method", self.method, two_d.RESIZE_METHODS)

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        side, width = config.max_len, self.width(config)
        table = absolute.learned_init(rngs.params(), side * side, width)
        self.table_ = nnx.Param(table.reshape(side, side, width))

    def _lookup(self, table, positions):
        """`table` `[rows, cols, w]` at packed `positions` `[B, L]` -> `[B, L, w]`."""
        rows, cols = table.shape[:2]
        grid = two_d.unpack_grid_positions(positions)
        values = _checks.concrete(grid)
        if values is not None and values.size:
            r, c = values[..., 0], values[..., 1]
            if r.min() < 0 or r.max() >= rows or c.max() >= cols:
                raise ValueError(
                    f"positions: pe='learned-2d' holds a {rows} x {cols} grid; got rows in "
                    f"[{int(r.min())}, {int(r.max())}] and columns in [{int(c.min())}, "
                    f"{int(c.max())}]. Raise TransformerConfig.max_len (the grid side)."
                )
        inside = (grid[..., 0] >= 0) & (grid[..., 0] < rows) & (grid[..., 1] < cols)
        index = jnp.where(inside, grid[..., 0] * cols + grid[..., 1], rows * cols)
        flat = table.reshape(rows * cols, -1)
        return jnp.take(flat, index, axis=0, mode="fill", fill_value=jnp.nan)

    def table(self, positions):
        return self._lookup(self.table_[...], positions)

    def embed_grid(self, x, positions, grid: tuple[int, int]):
        """`embed` with the table resized to `grid` = (rows, cols) of patches first."""
        table = two_d.resize_table(self.table_[...], tuple(grid), method=self.options.method)
        pe = self._lookup(table, positions)
        return absolute.combine(x, pe.astype(x.dtype), mode=self.options.combine)


class _Rotary2D(Encoding):
    position_axes = 2

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """base: the frequency base (RoPE-ViT: 100 axial, 10 mixed); layout: "interleaved"
        (RoPE-ViT's complex pairs) or "half"."""

        base: float = 100.0
        layout: str = "interleaved"

        def __post_init__(self):
            _checks.positive_float("base", self.base)
            _checks.one_of("layout", self.layout, rotary.LAYOUTS)

    @classmethod
    def check_config(cls, config):
        _check_width(config.pe, config.head_dim, 4, "head_dim (d_model / num_heads)")


@register("rope-2d")
class AxialRoPE2D(_Rotary2D):
    """Axial 2-D RoPE (Heo et al. 2024, arXiv 2403.13298; `two_d.axial_rope_2d`): half of each
    head's pairs turn with the column, half with the row. On 1-D positions it is RoPE on the
    column half, the row half left unturned."""

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        grid = two_d.unpack_grid_positions(positions)
        o = self.options
        turn = lambda x: two_d.axial_rope_2d(x, grid, base=o.base, layout=o.layout)  # noqa: E731
        return turn(q), turn(k), v


@register("rope-mixed")
class RoPEMixed(_Rotary2D):
    """RoPE-Mixed (Heo et al. 2024, arXiv 2403.13298, eq. 11-12; `two_d.apply_rope_mixed`):
    each layer and head learns the 2-D frequencies of its pairs, initialised with magnitudes
    1 / base^(4k / head_dim) along a random direction per head (`two_d.rope_mixed_init`).

    Its parameter `freqs` is `[num_layers, H, head_dim / 2, 2]` (row, column components). Keys
    share the queries' frequencies head by head, so grouped-query attention is not supported.
    """

    @dataclasses.dataclass(frozen=True)
    class Options(_Rotary2D.Options):
        base: float = 10.0

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.kv_heads != config.num_heads:
            raise ValueError(
                "pe='rope-mixed' learns frequencies per head, so keys need their own heads: "
                f"num_kv_heads must equal num_heads ({config.num_heads}), got {config.kv_heads}"
            )

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        keys = [rngs.params() for _ in range(config.num_layers)]
        self.freqs = nnx.Param(
            jnp.stack(
                [
                    two_d.rope_mixed_init(
                        key, config.num_heads, config.head_dim, base=self.options.base
                    )
                    for key in keys
                ]
            )
        )

    def transform_qkv(self, q, k, v, positions, *, layer, context):
        grid = two_d.unpack_grid_positions(positions)
        freqs = self.freqs[...][layer]
        turn = lambda x: two_d.apply_rope_mixed(x, grid, freqs, layout=self.options.layout)  # noqa: E731
        return turn(q), turn(k), v


@register("alibi-2d")
class ALiBi2D(Encoding):
    """ALiBi on the patch grid: -m_h * distance between patches (`two_d.alibi_2d_bias`), the
    slopes of Press et al. (`alibi_slopes`). On 1-D positions it is ALiBi."""

    position_axes = 2

    @dataclasses.dataclass(frozen=True)
    class Options(Options):
        """distance: "euclidean" (sqrt(drow^2 + dcol^2)) or "manhattan" (|drow| + |dcol|)."""

        distance: str = "euclidean"

        def __post_init__(self):
            _checks.one_of("distance", self.distance, two_d.DISTANCES)

    def bias(self, q_positions, k_positions, *, kernel=False):
        slopes = np.asarray(relative.alibi_slopes(self.config.num_heads), np.float32)
        return two_d.alibi_2d_bias(
            two_d.unpack_grid_positions(q_positions),
            two_d.unpack_grid_positions(k_positions),
            slopes,
            distance=self.options.distance,
        )
