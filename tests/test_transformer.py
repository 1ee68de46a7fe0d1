"""The contract every registered encoding meets inside the Transformer.

Parameterised over `jpe.ENCODINGS`, so registering an encoding enrols it here. The models are
tiny and mostly run eagerly (no compilation); one jitted call per encoding checks that jit and
eager agree.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpe
from jpe.nn.transformer import Transformer, generate, init_cache

TINY = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, max_len=64, cope_npos=16)
B, L = 2, 10


def make(pe, seed=0, **overrides):
    config = jpe.TransformerConfig(pe=pe, **{**TINY, **overrides})
    return Transformer(config, rngs=nnx.Rngs(seed))


def tokens(seed=1, shape=(B, L)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, TINY["vocab_size"])


@pytest.fixture(scope="module", params=jpe.ENCODINGS)
def pe(request):
    return request.param


def test_registry_names_match_the_design():
    assert set(jpe.ENCODINGS) >= {
        "none", "sinusoidal", "scaled-sinusoidal", "learned", "binary", "rope", "xpos",
        "alibi", "t5", "kerple", "sandwich", "fire", "shaw", "transformer-xl", "dpb", "cope",
    }  # fmt: skip
    with pytest.raises(ValueError, match="valid names: none, sinusoidal"):
        make("rotary")


@pytest.mark.parametrize("causal", [True, False])
def test_shapes_finite_logits_and_gradients(pe, causal):
    model = make(pe, causal=causal)
    x = tokens()
    logits = model(x)
    chex.assert_shape(logits, (B, L, TINY["vocab_size"]))
    chex.assert_tree_all_finite(logits)

    def loss(model):
        return jnp.mean(model(x) ** 2)

    grads = nnx.grad(loss)(model)
    chex.assert_tree_all_finite(grads)
    # every parameter gets a gradient signal (an unused parameter would be a wiring bug)
    norms = jax.tree.leaves(jax.tree.map(lambda g: jnp.abs(g).sum(), grads))
    assert all(float(n) > 0 for n in norms), pe


def test_jit_equals_eager_and_bf16_runs(pe):
    model = make(pe)
    x = tokens()
    eager = model(x)
    jitted = nnx.jit(lambda m, t: m(t))(model, x)
    chex.assert_trees_all_close(eager, jitted, atol=1e-4, rtol=1e-4)
    bf16 = make(pe, dtype="bfloat16")
    out = bf16(x)
    assert out.dtype == jnp.float32  # logits are returned in float32
    chex.assert_tree_all_finite(out)
    # bf16 compute tracks float32 loosely (same parameters: same seed)
    assert float(jnp.abs(out - eager).mean()) < 0.1 * float(jnp.abs(eager).mean()) + 0.05


def test_relative_encodings_are_shift_invariant(pe):
    model = make(pe)
    if not model.encoding.shift_invariant:
        pytest.skip(f"{pe} depends on absolute positions")
    x = tokens()
    base = model(x, positions=jnp.arange(L))
    shifted = model(x, positions=jnp.arange(L) + 1000)
    chex.assert_trees_all_close(base, shifted, atol=2e-4, rtol=2e-4)


def test_absolute_encodings_are_not_shift_invariant():
    """The check above can fail: an absolute encoding changes under the same shift."""
    model = make("sinusoidal")
    x = tokens()
    assert not np.allclose(
        model(x, positions=jnp.arange(L)), model(x, positions=jnp.arange(L) + 1000), atol=1e-2
    )


def test_decode_equals_forward(pe):
    """Prefill 6 tokens, then 4 one-token steps: the logits of the full forward pass."""
    model = make(pe)
    x = tokens()
    full = model(x)
    cache = init_cache(model.config, B, L)
    logits, cache = model.decode(x[:, :6], cache)
    steps = [logits]
    for t in range(6, L):
        logits, cache = model.decode(x[:, t : t + 1], cache)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=2e-4, rtol=2e-4)


def test_left_padding_equals_unpadded_rows(pe):
    model = make(pe)
    x = tokens(shape=(1, L))
    want = model(x)
    pad = 3
    padded = jnp.concatenate([jnp.zeros((1, pad), x.dtype), x], axis=1)
    mask = jnp.arange(L + pad)[None] >= pad
    got = model(padded, positions=jpe.positions_from_mask(mask), segment_ids=mask.astype(jnp.int32))
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got[:, pad:], want, atol=2e-4, rtol=2e-4)


def test_packed_rows_equal_separate_sequences(pe):
    model = make(pe)
    a, b = tokens(3, (1, 6)), tokens(4, (1, 4))
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 4])
    got = model(packed, positions=jpe.positions_from_segments(segments), segment_ids=segments)
    chex.assert_trees_all_close(got[:, :6], model(a), atol=2e-4, rtol=2e-4)
    chex.assert_trees_all_close(got[:, 6:], model(b), atol=2e-4, rtol=2e-4)


def test_generate_greedy_matches_argmax_of_forward():
    model = make("rope")
    prompt = tokens(shape=(2, 4))
    out = generate(model, prompt, 5)
    chex.assert_shape(out, (2, 5))
    # Greedy: each generated token is the argmax of the full forward pass over what precedes it.
    logits = model(jnp.concatenate([prompt, out.astype(prompt.dtype)], axis=1))
    np.testing.assert_array_equal(out, jnp.argmax(logits[:, 3:-1], axis=-1))
    sampled = generate(model, prompt, 5, rng=jax.random.PRNGKey(0), temperature=1.0)
    chex.assert_shape(sampled, (2, 5))
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)


def test_learned_positions_beyond_max_len_raise():
    model = make("learned", max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(shape=(1, 9)))
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(shape=(1, 4)), positions=jnp.arange(4) + 5)
    # Under jit the values are unknown: out-of-range rows are NaN, never a clamped row.
    run = nnx.jit(lambda m, t, p: m(t, positions=p))
    assert np.isnan(np.asarray(run(model, tokens(shape=(1, 4)), jnp.arange(4) + 5))).any()
    chex.assert_tree_all_finite(run(model, tokens(shape=(1, 4)), jnp.arange(4) + 4))


def test_token_classification_head_and_gqa():
    model = make("alibi", causal=False, num_classes=3, num_heads=4, num_kv_heads=2)
    chex.assert_shape(model(tokens()), (B, L, 3))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=15), "d_model"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_kv_heads=3, num_heads=2), "num_kv_heads"),
        (dict(dtype="float16"), "dtype"),
        (dict(rope_layout="neox"), "rope_layout"),
        (dict(rotary_fraction=0.0), "rotary_fraction"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        jpe.TransformerConfig(**{**TINY, **overrides})


def test_config_is_hashable_with_rope_scaling():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
               "original_max_position_embeddings": 8, "factor": 4.0}  # fmt: skip
    c1 = jpe.TransformerConfig(pe="rope", rope_scaling=scaling, **TINY)
    c2 = jpe.TransformerConfig(pe="rope", rope_scaling=dict(scaling), **TINY)
    assert hash(c1) == hash(c2) and c1 == c2
    assert c1.scaling == scaling
    model = Transformer(c1, rngs=nnx.Rngs(0))
    chex.assert_tree_all_finite(model(tokens(shape=(1, 12))))  # 12 > 8: the long factors
