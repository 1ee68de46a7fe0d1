"""The fused Pallas kernel (interpret mode on CPU) against the blocked XLA path: outputs and the
gradients of q, k, v and the bias's parameters, with causal skipping and dispatch's errors.

The kernel has two layouts: programs that loop over key blocks (GPU's, and the CPU
interpreter's by default) and a grid whose last axis walks the key blocks (TPU's); the `layout`
fixture runs a test under each, both interpreted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from grad_check import assert_grad_outside_jit_equals_inside

import jpe
from jpe import pallas_attention
from jpe.attention import attention, choose_implementation, target_backend
from jpe.nn.config import TransformerConfig
from jpe.nn.registry import encoding_class
from jpe.pallas_attention import _live_blocks, default_block_size, flash_attention

# L is not a multiple of the block; H = 2 query heads share one key/value head (grouped-query).
B, L, H, HKV, D, BLOCK = 1, 20, 2, 1, 8, 8


def _qkv(seed, heads=H, kv_heads=HKV):
    kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(kq, (B, L, heads, D)),
        jax.random.normal(kk, (B, L, kv_heads, D)),
        jax.random.normal(kv, (B, L, kv_heads, D)),
        jax.random.normal(kw, (B, L, heads, D)),  # weights of the loss
    )


def _run(implementation, pe, causal, q, k, v, w, heads=H, kv_heads=HKV, **kwargs):
    """(loss, out), grads of (q, k, v, the encoding's parameters), jitted."""
    config = TransformerConfig(
        pe=pe, d_model=heads * D, num_heads=heads, num_kv_heads=kv_heads, causal=causal
    )
    graphdef, state = nnx.split(encoding_class(pe)(config, rngs=nnx.Rngs(0)))

    def loss(q, k, v, state):
        encoding = nnx.merge(graphdef, state)
        if pe == "rope":
            inv_freq, _ = jpe.rope_frequencies(D)
            positions = jnp.arange(L)
            q, k = jpe.apply_rope(q, positions, inv_freq), jpe.apply_rope(k, positions, inv_freq)
        bias_fn = encoding.bias if type(encoding).capabilities().bias else None
        out = attention(
            q,
            k,
            v,
            bias_fn=bias_fn,
            causal=causal,
            # The reference runs as one block (the same sums, and a faster compile).
            block_size=BLOCK if implementation == "pallas" else L,
            implementation=implementation,
            **kwargs,
        )
        return jnp.sum(out * w), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(grad)(q, k, v, state)


@pytest.fixture(params=["loop", "grid"])
def layout(request, monkeypatch):
    """ "grid": `jpe.attention(implementation="pallas")` runs the TPU layout of the kernel
    (interpreted, as on CPU it always is)."""
    calls = []
    if request.param == "grid":
        original = pallas_attention.flash_attention

        @functools.wraps(original)
        def on_tpu_grid(*args, **kwargs):
            calls.append(kwargs["platform"])
            return original(*args, **{**kwargs, "platform": "tpu", "interpret": True})

        monkeypatch.setattr(pallas_attention, "flash_attention", on_tpu_grid)
    yield request.param
    if request.param == "grid":
        assert calls, "the test never reached the kernel"


def _assert_same(got, want, atol=2e-5):
    (_, out), grads = got
    (_, out_ref), grads_ref = want
    np.testing.assert_allclose(out, out_ref, atol=atol, rtol=1e-4)
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(leaves) == len(leaves_ref)
    for g, g_ref in zip(leaves, leaves_ref, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g_ref, atol=atol * 10, rtol=1e-4)


CASES = [(pe, True) for pe in ("none", "rope", "alibi", "t5", "kerple", "sandwich", "fire", "dpb")]
CASES += [("t5", False)]


@pytest.mark.parametrize(("pe", "causal"), CASES)
def test_matches_xla_forward_and_gradients(pe, causal, layout):
    q, k, v, w = _qkv(0)
    got = _run("pallas", pe, causal, q, k, v, w)
    _assert_same(got, _run("xla", pe, causal, q, k, v, w))
    if pe in ("t5", "kerple", "fire", "dpb"):  # the bias's parameters get a gradient
        assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(got[1][3]))


def test_gradient_taken_outside_jit_equals_the_one_inside(layout):
    """`jax.grad(jax.jit(f))` through the kernel: its custom VJP reads the block tables, masks
    and the bias's integer arrays as arguments, not from the jit's finished trace."""
    q, k, v, w = _qkv(2)
    graphdef, state = nnx.split(
        encoding_class("t5")(
            TransformerConfig(pe="t5", d_model=H * D, num_heads=H, num_kv_heads=HKV),
            rngs=nnx.Rngs(0),
        )
    )
    segments = jnp.asarray([[0] * 12 + [1] * 8])

    def loss(q, k, v, state):
        out = attention(
            q, k, v, bias_fn=nnx.merge(graphdef, state).bias, causal=True,
            segment_ids=segments, implementation="pallas", block_size=BLOCK,
        )  # fmt: skip
        return jnp.sum(out * w)

    argnums = (0, 1, 2, 3)
    assert_grad_outside_jit_equals_inside(loss, (q, k, v, state), argnums)


def test_packed_rows_gqa_and_rows_without_keys(layout):
    """Three packed segments, positions restarting in each; the last segment's keys are all
    invalid, so its queries have no key: zeros, and finite gradients."""
    q, k, v, w = _qkv(1, heads=4, kv_heads=2)
    segments = jnp.asarray([[0] * 7 + [1] * 9 + [2] * 4])
    positions = jnp.concatenate([jnp.arange(7), jnp.arange(9), jnp.arange(4)])[None]
    kv_mask = segments != 2
    kwargs = dict(
        q_positions=positions,
        k_positions=positions,
        segment_ids=segments,
        kv_mask=kv_mask,
        heads=4,
        kv_heads=2,
    )
    got = _run("pallas", "t5", True, q, k, v, w, **kwargs)
    _assert_same(got, _run("xla", "t5", True, q, k, v, w, **kwargs))
    out = got[0][1]
    np.testing.assert_array_equal(out[:, 16:], 0.0)


def test_causal_skips_blocks_above_the_diagonal(layout):
    """Keys 16..19 (the last block) hold NaN: rows 0..15 stay finite, in the output and
    in dq, only if the kernel never computes the blocks above the diagonal (a computed block would
    meet NaN in P @ V even where the mask zeroes P)."""
    q, k, v, w = _qkv(2)
    k = k.at[:, 16:].set(jnp.nan)
    v = v.at[:, 16:].set(jnp.nan)
    (_, out), (dq, _, _, _) = _run("pallas", "alibi", True, q, k, v, w)
    (_, out_ref), _ = _run("xla", "alibi", True, q, k, v, w)
    assert np.all(np.isfinite(out[:, :16])) and np.all(np.isfinite(dq[:, :16]))
    np.testing.assert_allclose(out[:, :16], out_ref[:, :16], atol=2e-5, rtol=1e-4)


def test_loop_bounds_visit_the_diagonal_and_below_only():
    positions = jnp.arange(24)[None]
    zeros, valid = jnp.zeros((1, 24), jnp.int32), jnp.ones((1, 24), bool)
    live, k_lo, k_hi, q_lo, q_hi = _live_blocks(
        positions, zeros, positions, zeros, valid, 24, 24, 8, 8, True
    )
    np.testing.assert_array_equal(live[0], np.tril(np.ones((3, 3), int)))
    np.testing.assert_array_equal(k_lo[0], [0, 0, 0])
    np.testing.assert_array_equal(k_hi[0], [1, 2, 3])  # query block i visits key blocks 0..i
    np.testing.assert_array_equal(q_lo[0], [0, 1, 2])  # key block j is seen by blocks j..2
    np.testing.assert_array_equal(q_hi[0], [3, 3, 3])
    # Two packed segments of 12: the cross-segment block pairs are dead too.
    segments = jnp.asarray([[0] * 12 + [1] * 12])
    live, *_ = _live_blocks(positions, segments, positions, segments, valid, 24, 24, 8, 8, False)
    np.testing.assert_array_equal(live[0], [[1, 1, 0], [1, 1, 1], [0, 1, 1]])


def test_dispatch_errors():
    q, k, v, _ = _qkv(3)
    query_bias = lambda qb, qp, kp: jnp.zeros((1, 1, qp.shape[-1], kp.shape[-1]))  # noqa: E731
    with pytest.raises(ValueError, match="implementation='pallas'.*query_bias_fn.*xla"):
        attention(q, k, v, query_bias_fn=query_bias, implementation="pallas")
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="implementation must be"):
        attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="cudnn.*bias_fn.*xla, pallas"):
        choose_implementation("cudnn", bias_fn=query_bias, backend="gpu")
    with pytest.raises(ValueError, match="attention='pallas' does not serve pe='shaw'"):
        TransformerConfig(pe="shaw", attention="pallas")
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerConfig(attention="flash")


def test_dispatch_defaults_and_supported_paths():
    bias = lambda qp, kp: 0.0  # noqa: E731
    assert choose_implementation(None, bias_fn=bias) == "xla"  # this machine is a CPU
    assert choose_implementation(None, bias_fn=bias, backend="tpu") == "pallas"
    assert choose_implementation(None, bias_fn=bias, backend="gpu") == "pallas"
    assert choose_implementation(None, dtype=jnp.bfloat16, backend="gpu") == "cudnn"
    assert choose_implementation(None, dtype=jnp.float32, backend="gpu") == "pallas"
    assert choose_implementation(None, value_fn=bias, backend="tpu") == "xla"
    assert encoding_class("alibi").supported_attention() == ("xla", "pallas")
    assert encoding_class("rope").supported_attention() == ("xla", "pallas", "cudnn")
    for pe in ("shaw", "transformer-xl", "cope"):
        assert encoding_class(pe).supported_attention() == ("xla",)


def test_transformer_passes_its_attention_choice():
    """`TransformerConfig.attention` reaches `jpe.attention`: cuDNN, asked for on a CPU,
    raises from inside the model's forward pass."""
    config = TransformerConfig(pe="rope", d_model=16, num_heads=2, num_layers=1, attention="cudnn")
    model = jpe.Transformer(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        model(jnp.zeros((1, 8), jnp.int32))


def _kernel_loss(pe, length, heads, head_dim, block, platform, **options):
    """(loss of q, k, v and the encoding's state, the state): the kernel's output summed (the
    kernel asks the encoding for the form of its bias that lowers, `bias(..., kernel=True)`)."""
    config = TransformerConfig(
        pe=pe, d_model=heads * head_dim, num_heads=heads, pe_options=options or None
    )
    graphdef, state = nnx.split(encoding_class(pe)(config, rngs=nnx.Rngs(0)))
    positions, zeros = jnp.arange(length)[None], jnp.zeros((1, length), jnp.int32)

    def loss(q, k, v, state):
        encoding = nnx.merge(graphdef, state)
        bias_fn = encoding.bias if pe != "none" else None
        out = flash_attention(
            q,
            k,
            v,
            bias_fn=bias_fn,
            causal=True,
            q_positions=positions,
            k_positions=positions,
            q_segment_ids=zeros,
            k_segment_ids=zeros,
            kv_valid=jnp.ones((1, length), bool),
            block_size=block,
            scale=head_dim**-0.5,
            platform=platform,
        )
        return out.astype(jnp.float32).sum()

    return loss, state


BIASES = ["alibi", "kerple", "t5", "sandwich", "fire", "dpb"]


@pytest.mark.parametrize("pe", ["none", *BIASES])
def test_lowers_to_triton_for_gpu(pe):
    """Forward and backward lower for CUDA (Triton IR) on a machine without a GPU."""
    length, heads, head_dim = 64, 2, 32
    loss, state = _kernel_loss(pe, length, heads, head_dim, 32, "gpu")
    x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    text = grad.trace(x, x, x, state).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize("pe", BIASES)
def test_compiles_for_tpu(pe):
    """Forward and backward compile for a TPU (Mosaic) ahead of time, with no TPU: bf16,
    length 256 in blocks of 128, head_dim 64."""
    from jax.experimental import topologies  # libtpu: in the test extra, so never skipped

    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    device = jax.sharding.SingleDeviceSharding(topology.devices[0])
    length, heads, head_dim = 256, 2, 64
    options = {"hidden": 8} if pe in ("fire", "dpb") else {}  # a smaller MLP compiles faster
    loss, state = _kernel_loss(pe, length, heads, head_dim, 128, "tpu", **options)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=device)

    x = spec((1, length, heads, head_dim), jnp.bfloat16)
    state = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    compiled = grad.trace(x, x, x, state).lower(lowering_platforms=("tpu",)).compile()
    assert "jpe_flash_dkv" in compiled.as_text()


@pytest.mark.parametrize("pe", ["fire", "dpb"])
def test_gpu_default_block_lowers_mlp_biases(pe):
    """On GPU, `jpe.attention` gives the kernel blocks of 128 unless told otherwise: FIRE's
    and DPB's `[hidden, bq, bk]` activations (32 x 256 x 256 at blocks of 256) would pass
    Triton's 2**20 elements a tensor."""
    length, heads, head_dim = 256, 2, 32
    config = TransformerConfig(pe=pe, d_model=heads * head_dim, num_heads=heads)
    graphdef, state = nnx.split(encoding_class(pe)(config, rngs=nnx.Rngs(0)))

    def loss(q, k, v, state, block_size):
        bias_fn = nnx.merge(graphdef, state).bias
        out = attention(q, k, v, bias_fn=bias_fn, causal=True, block_size=block_size)
        return out.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16)
    with target_backend("gpu"):
        for block_size, fits in ((None, True), (256, False)):
            grad = jax.jit(jax.grad(loss, argnums=(0, 3)), static_argnums=4)
            traced = grad.trace(x, x, x, state, block_size)
            if fits:
                assert "triton" in traced.lower(lowering_platforms=("cuda",)).as_text()
            else:
                with pytest.raises(Exception, match="Maximum allowed number of elements"):
                    traced.lower(lowering_platforms=("cuda",))


def test_default_block_size_shrinks_for_large_biases_and_on_gpu():
    def bias_of(pe, **options):
        config = TransformerConfig(pe=pe, d_model=64, num_heads=4, pe_options=options or None)
        return encoding_class(pe)(config, rngs=nnx.Rngs(0)).bias

    assert default_block_size(None, 8192, 8192, 4, "tpu") == 512
    assert default_block_size(bias_of("alibi"), 8192, 8192, 4, "tpu") == 512
    assert default_block_size(bias_of("t5"), 8192, 8192, 4, "tpu") == 512
    assert default_block_size(bias_of("sandwich"), 8192, 8192, 4, "tpu") == 512
    # FIRE's and DPB's [32, bq, bk] activations: 2**23 elements at 512, 2**19 at 128
    assert default_block_size(bias_of("fire"), 8192, 8192, 4, "tpu") == 128
    assert default_block_size(bias_of("dpb"), 8192, 8192, 4, "tpu") == 128
    assert default_block_size(bias_of("dpb", hidden=4), 8192, 8192, 4, "tpu") == 512
    assert default_block_size(bias_of("fire"), 100, 100, 4, "tpu") == 512  # 32 x 100 x 100
    assert default_block_size(bias_of("fire"), 8192, 8192, 4, "gpu") == 128
    assert default_block_size(bias_of("alibi"), 8192, 8192, 4, "gpu") == 128
