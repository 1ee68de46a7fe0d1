"""A Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929) with any registered encoding.

Data flow, for images `[B, H, W, C]` whose sides divide by the patch size p:

    patches `[B, h*w, p*p*C]` (row-major, h = H/p, w = W/p) -> Dense -> encoding.embed
    -> the Transformer's encoder blocks (`jpe.nn.transformer.Block`, `causal=False`) with the
       encoding's hooks -> norm -> mean over the patches -> Dense head: logits `[B, classes]`

The patch embedding is a reshape and one Dense layer, which equals ViT's p x p convolution of
stride p. Mean pooling over the patches replaces ViT's class token (as in Beyer et al. 2022,
"Better plain ViT baselines", arXiv 2205.01580): with no extra token, every token is a patch with
a grid position, and the pooled feature does not depend on where the class token would sit.

Positions are the patch grid packed into one int per patch, `row * 2**15 + column`
(`jpe.encodings.two_d.pack_grid_positions`), the form the 2-D encodings of
`jpe.nn.encodings_2d` read; the blocks, attention and hooks are the Transformer's own, unchanged.
Images of any size whose sides divide by p work: relative and rotary encodings read the larger
grid's positions, `sinusoidal-2d` evaluates its formula there, and `learned-2d` interpolates
its table to the grid (its `embed_grid`; an encoding that defines `embed_grid(x, positions,
grid)` gets the grid's shape, any other gets `embed(x, positions)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jpe.encodings import _checks, two_d
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import PositionContext
from jpe.nn.transformer import Block, _dtype

__all__ = ["VisionTransformer", "patchify"]


def patchify(images: jax.Array, patch_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """Images `[B, H, W, C]` -> patches `[B, h*w, p*p*C]`, row-major, and the grid `(h, w)`.

    Raises:
      ValueError: `images` not `[B, H, W, C]`, or a side that does not divide by `patch_size`.
    """
    p = _checks.positive_int("patch_size", patch_size)
    if jnp.ndim(images) != 4:
        raise ValueError(f"images must have shape [B, H, W, C], got {jnp.shape(images)}")
    b, height, width, channels = jnp.shape(images)
    if height % p or width % p:
        raise ValueError(
            f"images of {height}x{width} pixels do not divide into {p}x{p} patches; both sides "
            f"must be multiples of patch_size={p}"
        )
    h, w = height // p, width // p
    x = images.reshape(b, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
    return x.reshape(b, h * w, p * p * channels), (h, w)


class VisionTransformer(nnx.Module):
    """A ViT classifier on `jpe.Transformer`'s blocks, with `config.pe` as its encoding.

    `config` must be an encoder (`causal=False`) with `num_classes` set; `vocab_size` is not
    used.

    Example:
      >>> config = TransformerConfig(pe="rope-2d", causal=False, num_classes=10, d_model=32,
      ...                            num_heads=2, num_layers=2, max_len=8)
      >>> model = VisionTransformer(config, patch_size=2, channels=1, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((3, 12, 16, 1))).shape
      (3, 10)
    """

    def __init__(
        self, config: TransformerConfig, *, patch_size: int, channels: int, rngs: nnx.Rngs
    ):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a jpe.TransformerConfig, got {type(config).__name__}")
        if config.causal:
            raise ValueError("config must be an encoder: TransformerConfig(causal=False)")
        if config.num_classes is None:
            raise ValueError("config.num_classes must be set (the number of image classes)")
        c = self.config = config
        self.patch_size = _checks.positive_int("patch_size", patch_size)
        self.channels = _checks.positive_int("channels", channels)
        self.encoding = c.encoding(c, rngs=rngs)
        width = c.encoding.token_width(c)
        self.patch_embed = nnx.Linear(
            self.patch_size**2 * self.channels, width, dtype=_dtype(c), rngs=rngs
        )
        self.blocks = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.norm = nnx.RMSNorm(c.d_model, dtype=_dtype(c), rngs=rngs)
        self.head = nnx.Linear(c.d_model, c.num_classes, dtype=_dtype(c), rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """The encoder's normalised patch features `[B, h*w, d_model]`."""
        images = jnp.asarray(images)
        if jnp.ndim(images) == 4 and jnp.shape(images)[-1] != self.channels:
            raise ValueError(
                f"images have {jnp.shape(images)[-1]} channels, the model takes {self.channels}"
            )
        patches, grid = patchify(images.astype(_dtype(self.config)), self.patch_size)
        positions = two_d.pack_grid_positions(two_d.grid_positions(*grid))[None]  # [1, h*w]
        x = self.patch_embed(patches)
        embed_grid = getattr(self.encoding, "embed_grid", None)
        x = embed_grid(x, positions, grid) if embed_grid else self.encoding.embed(x, positions)
        segment_ids = jnp.ones((1, positions.shape[1]), jnp.int32)
        context = PositionContext(
            seq_len=positions.max(axis=1) + 1,
            anchor=positions.min(axis=1),
            prepared=self.encoding.prepare(positions),
        )
        for block in self.blocks:
            x, _ = block(x, self.encoding, positions, segment_ids, context)
        return self.norm(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Class logits `[B, num_classes]`, float32, of images `[B, H, W, C]` (H and W
        multiples of `patch_size`; any size)."""
        pooled = jnp.mean(self.features(images), axis=1)  # mean over the patches
        return self.head(pooled).astype(jnp.float32)
