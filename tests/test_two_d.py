"""2-D positions (`jpe.encodings.two_d`) against float64 NumPy references written from the
papers, and the 2-D encodings' own checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpe

# ------------------------------------------------------------------ references (float64 NumPy)


def mae_reference(height, width, dim, base=10000.0):
    """MAE `util/pos_embed.py`, `get_2d_sincos_pos_embed` (He et al. 2021), as written there."""
    grid_h, grid_w = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, height, width])

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / base**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def rotate_pairs(x, angle):
    """Interleaved pairs (x_2i, x_2i+1) as complex numbers times e^{i angle} (RoPE-ViT)."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * angle)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def rope_mixed_reference(x, positions, freqs):
    """RoPE-Mixed, Heo et al. 2024 eq. 11-12: angle = theta^y * row + theta^x * column per
    head and pair; x `[L, H, D]`, positions `[L, 2]`, freqs `[H, n, 2]`."""
    angle = positions[:, None, None, 0] * freqs[None, ..., 0]
    angle = angle + positions[:, None, None, 1] * freqs[None, ..., 1]  # [L, H, n]
    return rotate_pairs(np.asarray(x, np.float64), angle)


def axial_reference(x, positions, base=100.0):
    """RoPE-ViT `compute_axial_cis`: theta_k = 1/base^(4k/D), k < D/4; column pairs first."""
    d = x.shape[-1]
    theta = 1.0 / base ** (np.arange(0, d, 4)[: d // 4] / d)
    angle = np.concatenate(
        [positions[:, 1, None] * theta, positions[:, 0, None] * theta], axis=-1
    )  # [L, D/2]
    return rotate_pairs(np.asarray(x, np.float64), angle[:, None, :])


def logits(q, k):
    return np.einsum("qhd,khd->hqk", np.asarray(q, np.float64), np.asarray(k, np.float64))


@pytest.fixture
def qk():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    return [jax.random.normal(key, (12, 2, 8)) for key in keys]


GRID = np.asarray(jpe.grid_positions(3, 4))  # [12, 2]


# ------------------------------------------------------------------------------------- tests


def test_packing_round_trips_and_reads_1d_positions_as_row_zero():
    grid = np.array([[0, 0], [2, 5], [-3, 32767], [65535, 1]])
    packed = jpe.pack_grid_positions(grid)
    np.testing.assert_array_equal(packed[:2], [0, 2 * 2**15 + 5])
    np.testing.assert_array_equal(jpe.unpack_grid_positions(packed), grid)
    one_d = jpe.unpack_grid_positions(jnp.arange(7))
    np.testing.assert_array_equal(one_d, np.stack([np.zeros(7), np.arange(7)], -1))
    np.testing.assert_array_equal(jpe.grid_positions(2, 3)[4], [1, 1])  # row-major
    with pytest.raises(ValueError, match=r"positions: columns must be in \[0, 2\*\*15\)"):
        jpe.pack_grid_positions(np.array([[0, 2**15]]))
    with pytest.raises(ValueError, match="positions: columns"):
        jpe.pack_grid_positions(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="positions: rows"):
        jpe.pack_grid_positions(np.array([[2**16, 0]]))
    with pytest.raises(ValueError, match=r"\[\.\.\., L, 2\]"):
        jpe.pack_grid_positions(np.zeros((4, 3), np.int32))


@pytest.mark.parametrize("height, width, dim", [(3, 4, 16), (5, 5, 32), (1, 7, 8)])
def test_sincos_matches_mae(height, width, dim):
    want = mae_reference(height, width, dim)
    got = jpe.sincos_2d_at(jpe.grid_positions(height, width), dim)
    chex.assert_trees_all_close(np.asarray(got), want, atol=2e-6)
    chex.assert_trees_all_close(jpe.sincos_2d(height, width, dim), got, atol=1e-7)
    with pytest.raises(ValueError, match="dim must be a positive multiple of 4"):
        jpe.sincos_2d_at(GRID, 6)


def test_resize_is_the_identity_at_the_same_grid_and_interpolates_otherwise():
    table = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
    for method in ("bilinear", "bicubic"):
        np.testing.assert_array_equal(jpe.resize_table(table, (4, 5), method=method), table)
    # a linear ramp stays a ramp under bilinear upsampling (half-pixel centres): the new cell
    # i samples the old grid at (i + 0.5) * 4 / 8 - 0.5, clamped at the border
    ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None, None], (4, 2, 1))
    got = np.asarray(jpe.resize_table(ramp, (8, 2), method="bilinear"))[:, 0, 0]
    want = np.clip((np.arange(8) + 0.5) * 4 / 8 - 0.5, 0, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        jpe.resize_table(table, (2, 2), method="nearest")
    with pytest.raises(ValueError, match="table must be a float"):
        jpe.resize_table(jnp.zeros((4, 5)), (2, 2))


def test_axial_rope_matches_rope_vit_and_is_1d_rope_along_each_axis(qk):
    q, _ = qk
    got = jpe.axial_rope_2d(q, GRID)
    chex.assert_trees_all_close(np.asarray(got), axial_reference(q, GRID), atol=1e-5)
    # holding the row at 0, the column pairs turn as 1-D RoPE and the row pairs not at all
    inv_freq, _ = jpe.rope_frequencies(4, base=100.0)  # D/2 features per axis
    row0 = np.stack([np.zeros(12, int), np.arange(12)], -1)
    one_d = jpe.apply_rope(q[..., :4], jnp.arange(12), inv_freq, layout="interleaved")
    got = jpe.axial_rope_2d(q, row0)
    chex.assert_trees_all_close(got[..., :4], one_d, atol=1e-6)
    chex.assert_trees_all_close(got[..., 4:], q[..., 4:], atol=1e-6)
    col0 = np.stack([np.arange(12), np.zeros(12, int)], -1)
    one_d = jpe.apply_rope(q[..., 4:], jnp.arange(12), inv_freq, layout="interleaved")
    chex.assert_trees_all_close(jpe.axial_rope_2d(q, col0)[..., 4:], one_d, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        jpe.axial_rope_2d(jnp.zeros((12, 2, 6)), GRID)


def test_rope_mixed_init_follows_rope_vit():
    freqs = np.asarray(jpe.rope_mixed_init(jax.random.PRNGKey(3), 3, 16))
    assert freqs.shape == (3, 8, 2)
    magnitude = 1.0 / 10.0 ** (4 * np.arange(4) / 16)
    norms = np.hypot(freqs[..., 0], freqs[..., 1])  # |(theta^y, theta^x)|
    np.testing.assert_allclose(norms, np.tile(magnitude, (3, 2)), rtol=1e-5)
    phi = np.arctan2(freqs[..., 0], freqs[..., 1])  # direction of (theta^x, theta^y)
    for h in range(3):
        np.testing.assert_allclose(np.cos(phi[h, :4] - phi[h, 0]), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.cos(phi[h, 4:] - phi[h, 0]), 0.0, atol=1e-5)  # + pi/2
    assert np.ptp(phi[:, 0]) > 1e-3  # a random direction per head
    with pytest.raises(ValueError, match="rotary_dim must be a positive multiple of 4"):
        jpe.rope_mixed_init(jax.random.PRNGKey(0), 2, 6)


def test_rope_mixed_matches_the_reference(qk):
    q, _ = qk
    freqs = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 2))
    got = jpe.apply_rope_mixed(q, GRID, freqs)
    want = rope_mixed_reference(q, GRID, np.asarray(freqs, np.float64))
    chex.assert_trees_all_close(np.asarray(got), want, atol=1e-5)
    # axial RoPE is the special case theta^x = (theta, 0), theta^y = (0, theta)
    theta = 1.0 / 100.0 ** (np.arange(0, 8, 4)[:2] / 8)
    axial = np.zeros((2, 4, 2))
    axial[:, :2, 1], axial[:, 2:, 0] = theta, theta
    chex.assert_trees_all_close(
        jpe.apply_rope_mixed(q, GRID, axial), jpe.axial_rope_2d(q, GRID), atol=1e-5
    )
    with pytest.raises(ValueError, match=r"freqs must have shape \[H=2, n, 2\]"):
        jpe.apply_rope_mixed(q, GRID, jnp.zeros((3, 4, 2)))


@pytest.mark.parametrize("shift", [(0, 5), (7, 0), (11, 13)])
def test_relative_2d_encodings_give_the_same_logits_when_every_patch_shifts(qk, shift):
    q, k = qk
    moved = GRID + np.array(shift)
    freqs = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 2))
    for turn in (
        lambda x, p: jpe.axial_rope_2d(x, p),
        lambda x, p: jpe.apply_rope_mixed(x, p, freqs),
    ):
        chex.assert_trees_all_close(
            logits(turn(q, moved), turn(k, moved)), logits(turn(q, GRID), turn(k, GRID)), atol=1e-4
        )
    slopes = jpe.alibi_slopes(2)
    for distance in ("euclidean", "manhattan"):
        chex.assert_trees_all_close(
            jpe.alibi_2d_bias(moved, moved, slopes, distance=distance),
            jpe.alibi_2d_bias(GRID, GRID, slopes, distance=distance),
            atol=1e-6,
        )
    # an absolute table does change
    assert not np.allclose(jpe.sincos_2d_at(moved, 8), jpe.sincos_2d_at(GRID, 8), atol=1e-2)


def test_alibi_2d_matches_the_distance_reference_and_is_alibi_on_a_row():
    slopes = np.asarray(jpe.alibi_slopes(4))
    delta = GRID[None, :, :] - GRID[:, None, :]
    for distance, d in [
        ("euclidean", np.sqrt((delta**2).sum(-1))),
        ("manhattan", np.abs(delta).sum(-1)),
    ]:
        want = -slopes[:, None, None] * d[None]
        got = jpe.alibi_2d_bias(GRID, GRID, slopes, distance=distance)
        chex.assert_trees_all_close(np.asarray(got), want, atol=1e-5)
    row = jpe.unpack_grid_positions(jnp.arange(6)[None])
    chex.assert_trees_all_close(
        jpe.alibi_2d_bias(row, row, slopes),
        jpe.alibi_bias(jnp.arange(6)[None], jnp.arange(6)[None], slopes),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="distance must be one of"):
        jpe.alibi_2d_bias(GRID, GRID, slopes, distance="chebyshev")


def test_2d_encoding_options_and_sizes_are_checked():
    tiny = dict(d_model=16, num_heads=2, num_layers=1, causal=False)
    with pytest.raises(ValueError, match="head_dim .* multiple of 4"):
        jpe.TransformerConfig(pe="rope-2d", **{**tiny, "d_model": 12, "num_heads": 2})
    with pytest.raises(ValueError, match="num_kv_heads must equal num_heads"):
        jpe.TransformerConfig(pe="rope-mixed", num_kv_heads=1, **tiny)
    with pytest.raises(ValueError, match="distance must be one of"):
        jpe.TransformerConfig(pe="alibi-2d", pe_options={"distance": "max"}, **tiny)
    with pytest.raises(ValueError, match="method must be one of"):
        jpe.TransformerConfig(pe="learned-2d", pe_options={"method": "area"}, **tiny)
    assert jpe.TransformerConfig(pe="rope-mixed", **tiny).pe_options.base == 10.0
    assert jpe.TransformerConfig(pe="rope-2d", **tiny).pe_options.base == 100.0
