"""The contract every registered encoding meets inside the Transformer.

Parameterised over `jpe.ENCODINGS`, so registering an encoding enrols it here. The models are
tiny and mostly run eagerly (no compilation); one jitted call per encoding checks that jit and
eager agree.
"""

import dataclasses
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpe
from jpe.nn.transformer import Transformer, generate, init_cache


@jpe.register("test-gaussian")
class GaussianBias(jpe.nn.Encoding):
    """A bias -s_h (q - k)^2 / (2 width^2), learned s_h per head: an encoding registered through
    the public API with an option of its own, so the contract tests below cover it."""

    @dataclasses.dataclass(frozen=True)
    class Options(jpe.nn.Options):
        width: float = 4.0

        def __post_init__(self):
            if not self.width > 0:
                raise ValueError(f"width must be > 0, got {self.width}")

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((config.num_heads,)))

    def bias(self, q_positions, k_positions):
        # [B, bq] and [B, bk] -> [B, 1, bq, bk], times a scale per head -> [B, H, bq, bk]
        d = (q_positions[:, None, :, None] - k_positions[:, None, None, :]).astype(jnp.float32)
        scale = self.scale[...][None, :, None, None]
        return -scale * d**2 / (2 * self.options.width**2)


TINY = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, max_len=64)
# Options that keep the tiny models tiny, per encoding.
OPTIONS = {"cope": {"npos": 16}, "floater": {"hidden": 4, "delta": 0.5, "steps_per_delta": 1}}
B, L = 2, 10


def make(pe, seed=0, pe_options=None, **overrides):
    options = {**OPTIONS.get(pe, {}), **(pe_options or {})}
    config = jpe.TransformerConfig(pe=pe, pe_options=options, **{**TINY, **overrides})
    return Transformer(config, rngs=nnx.Rngs(seed))


def tokens(seed=1, shape=(B, L)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, TINY["vocab_size"])


@pytest.fixture(scope="module", params=jpe.ENCODINGS)
def pe(request):
    return request.param


def test_a_registered_encoding_has_its_own_options_and_joins_the_contract():
    assert "test-gaussian" in jpe.ENCODINGS  # so every test over `pe` runs it
    config = jpe.TransformerConfig(pe="test-gaussian", pe_options={"width": 2.0}, **TINY)
    assert config.pe_options.width == 2.0
    with pytest.raises(ValueError, match="width must be > 0"):
        jpe.TransformerConfig(pe="test-gaussian", pe_options={"width": 0.0}, **TINY)
    with pytest.raises(ValueError, match="unknown option.*'slope'.*its options are: width"):
        jpe.TransformerConfig(pe="test-gaussian", pe_options={"slope": 1.0}, **TINY)
    # the option reaches the bias: a wider Gaussian decays less
    p = jnp.arange(6)[None]
    narrow = make("test-gaussian", pe_options={"width": 1.0}).encoding.bias(p, p)
    wide = make("test-gaussian", pe_options={"width": 8.0}).encoding.bias(p, p)
    assert float(narrow[0, 0, 0, 5]) < float(wide[0, 0, 0, 5]) < 0
    with pytest.raises(ValueError, match="already registered"):
        jpe.register("test-gaussian", GaussianBias)
    with pytest.raises(ValueError, match="subclass of jpe.nn.Encoding"):
        jpe.register("not-an-encoding", dict)

    class Loose(jpe.nn.Encoding):
        Options = dict  # not an Options dataclass

    with pytest.raises(ValueError, match="Options must be a frozen dataclass"):
        jpe.register("loose", Loose)


def test_capabilities_are_read_off_the_overridden_hooks():
    cap = lambda pe: jpe.nn.encoding_class(pe).capabilities()  # noqa: E731
    assert cap("alibi").bias and not cap("alibi").query_bias and not cap("alibi").embed
    assert cap("rope").transform_qkv and not cap("rope").bias
    assert cap("shaw").query_bias and cap("shaw").value and not cap("shaw").bias
    assert cap("transformer-xl").transform_qkv and cap("transformer-xl").query_bias
    assert cap("cope").contextual_bias
    assert cap("learned").absolute and cap("binary").absolute
    assert not any(cap("none"))
    assert cap("test-gaussian").bias
    # facts are asked of the class, never of the name
    c = jpe.TransformerConfig(pe="learned", **TINY)
    assert c.encoding.position_limit(c) == 64
    assert jpe.nn.encoding_class("alibi").position_limit(c) is None
    concat = jpe.TransformerConfig(pe="sinusoidal", pe_options={"combine": "concat"}, **TINY)
    assert concat.encoding.token_width(concat) == 8
    for flag in ("has_bias", "bias_takes_query", "has_value", "dense", "absolute"):
        assert not hasattr(jpe.nn.Encoding, flag)


def test_imports_have_no_cycle_and_pure_functions_need_no_flax():
    """Nor does `import jpe` load diffrax (FLOATER's solver, 0.6 s): it is imported by the
    first solve, which may be inside `jit`, and a later solve outside agrees with it."""
    code = (
        "import sys, jpe.encodings; assert 'flax' not in sys.modules, 'flax loaded'; "
        "assert 'diffrax' not in sys.modules, 'diffrax loaded'; "
        "import jax, jax.numpy as jnp; from jpe.encodings import floater as f; "
        "p, x = f.floater_init(jax.random.key(0), 4, hidden=4), jnp.arange(6); "
        "kw = dict(delta=0.5, steps_per_delta=1, position_range=(0, 8)); "
        "a = jax.jit(lambda x: f.floater_encoding(x, p, jnp.zeros(4), **kw))(x); "
        "assert 'diffrax' in sys.modules; "
        "assert abs(a - f.floater_encoding(x, p, jnp.zeros(4), **kw)).max() < 1e-6; "
        "import jpe.nn.transformer, jpe.nn.encodings, jpe.nn.config; "
        "assert 'cope' in jpe.ENCODINGS\n"
        # Then jpe alone is imported afresh twice, each time from another module first: a
        # cycle through them would fail there (jax, flax and diffrax stay loaded; one process
        # rather than three saves two interpreters' imports of jax).
        "import importlib\n"
        "for first in ('jpe.nn.encodings', 'jpe.nn.config'):\n"
        "    for name in [m for m in sys.modules if m == 'jpe' or m.startswith('jpe.')]:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module(first); import jpe; assert 'cope' in jpe.ENCODINGS\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


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
    # Under jit the values are unknown: an out-of-range row is NaN, never a clamped row, and
    # the NaN reaches exactly the tokens that attend to it: only the last one (position 8).
    run = nnx.jit(lambda m, t, p: m(t, positions=p))
    out = np.asarray(run(model, tokens(shape=(1, 4)), jnp.arange(4) + 5))
    np.testing.assert_array_equal(np.isfinite(out).all(axis=-1), [[True, True, True, False]])
    assert np.isnan(out[0, 3]).all()
    # and the rows before it equal a run without the bad token
    np.testing.assert_allclose(
        out[:, :3], model(tokens(shape=(1, 4))[:, :3], positions=jnp.arange(3) + 5), atol=1e-5
    )
    chex.assert_tree_all_finite(run(model, tokens(shape=(1, 4)), jnp.arange(4) + 4))
    # Constants a jitted function closes over are concrete: checked, not a tracer error.
    bad = jnp.arange(4) + 5
    with pytest.raises(ValueError, match="max_len"):
        nnx.jit(lambda m, t: m(t, positions=bad))(model, tokens(shape=(1, 4)))


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
        (dict(pe="rope", pe_options=dict(layout="neox")), "layout"),
        (dict(pe="rope", pe_options=dict(rotary_fraction=0.0)), "rotary_fraction"),
        (dict(pe="rope", pe_options=dict(rotary_fraction=0.1)), "fewer than 2 rotated"),
        (dict(pe="rope", pe_options=dict(scaling={"rope_type": "bogus"})), "scaling.*rope_type"),
        (dict(pe="rope", pe_options=dict(scaling={"rope_type": "linear"})), "scaling.*factor"),
        (dict(pe="rope", pe_options=dict(base=0.5)), "base=0.5.*base must be > 1"),
        (dict(pe="t5", causal=False, pe_options=dict(num_buckets=33)), "num_buckets.*even"),
        (dict(pe="t5", pe_options=dict(max_distance=4, num_buckets=32)), "max_distance"),
        (
            dict(pe="xpos", pe_options=dict(scaling={"rope_type": "linear", "factor": 2.0})),
            "unknown option.*'scaling'.*pe='xpos'.*base, layout, rotary_fraction, scale_base",
        ),
        (dict(pe="sandwich", d_model=12, num_heads=4), "even head_dim"),
        (dict(pe="xpos", pe_options=dict(scale_base=0.0)), "scale_base"),
        (dict(pe="alibi", pe_options=dict(num_buckets=8)), "options are: none"),
        (dict(pe="sinusoidal", pe_options=dict(combine="stack")), "combine"),
        (dict(pe="binary", pe_options=dict(bits=0)), "bits"),
        (dict(pe="kerple", pe_options=dict(kind="exp")), "kind"),
        (dict(pe="fire", pe_options=dict(hidden=0)), "hidden"),
        (dict(pe="shaw", pe_options=dict(max_distance=0)), "max_distance"),
        (dict(pe="cope", pe_options=dict(npos=0)), "npos"),
        (dict(pe="rope", pe_options=[("base", 2.0)]), "pe_options must be a mapping"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        jpe.TransformerConfig(**{**TINY, **overrides})


def test_options_are_declared_by_the_class_and_carried_in_one_field():
    c = jpe.TransformerConfig(pe="t5", pe_options={"num_buckets": 16}, **TINY)
    assert isinstance(c.pe_options, jpe.nn.encoding_class("t5").Options)
    assert (c.pe_options.num_buckets, c.pe_options.max_distance) == (16, 128)
    assert c.to_json()["pe_options"] == {"num_buckets": 16}
    # changing pe keeps the options that were set, which must exist for the new encoding
    assert c.replace(pe="t5", causal=False).pe_options.num_buckets == 16
    with pytest.raises(ValueError, match="unknown option.*num_buckets.*pe='alibi'"):
        c.replace(pe="alibi")
    assert c.replace(pe="alibi", pe_options=None).pe == "alibi"
    # defaults need no options
    assert jpe.TransformerConfig(pe="rope", **TINY).replace(pe="alibi").pe == "alibi"


def test_config_is_hashable_with_rope_scaling():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
               "original_max_position_embeddings": 8, "factor": 4.0}  # fmt: skip
    c1 = jpe.TransformerConfig(pe="rope", pe_options={"scaling": scaling}, **TINY)
    c2 = jpe.TransformerConfig(pe="rope", pe_options={"scaling": dict(scaling)}, **TINY)
    assert hash(c1) == hash(c2) and c1 == c2
    assert c1.pe_options.scaling_mapping == scaling
    model = Transformer(c1, rngs=nnx.Rngs(0))
    chex.assert_tree_all_finite(model(tokens(shape=(1, 12))))  # 12 > 8: the long factors


# ---------------------------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pe", ["learned", "binary", "floater"])
def test_generate_with_absolute_tables_checked_on_concrete_values(pe):
    """generate jitted closed-over prompts; the tables' checks then read traced values."""
    model = make(pe)
    prompt = tokens(shape=(2, 4))
    out = generate(model, prompt, 3)
    logits = model(jnp.concatenate([prompt, out.astype(prompt.dtype)], axis=1))
    np.testing.assert_array_equal(out, jnp.argmax(logits[:, 3:-1], axis=-1))


def test_generate_and_decode_input_errors():
    model = make("rope")
    with pytest.raises(ValueError, match=r"prompt must have shape \[B, P\]"):
        generate(model, jnp.array([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, tokens(shape=(1, 5)), 2, prompt_mask=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokens(shape=(1, 5)), 2, prompt_mask=jnp.arange(5)[None] < 3)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, jnp.array([[1, 40]]), 2)
    with pytest.raises(ValueError, match="past max_len 8 of pe='learned'"):
        generate(make("learned", max_len=8), tokens(shape=(1, 5)), 4)
    with pytest.raises(ValueError, match="rows"):
        model.decode(tokens(shape=(3, 2)), init_cache(model.config, 2, 8))


def test_token_ids_outside_the_vocabulary_raise():
    model = make("rope")
    for bad in ([[5, 32, 1]], [[-1, 2]]):
        with pytest.raises(ValueError, match=r"tokens must be in \[0, vocab_size\)"):
            model(jnp.array(bad))


def test_decoding_past_the_cache_capacity_raises():
    model = make("rope")
    x = tokens(shape=(1, 6))
    cache = init_cache(model.config, 1, 4)
    with pytest.raises(ValueError, match="capacity 4"):
        model.decode(x[:, :5], cache)  # static length > capacity
    _, cache = model.decode(x[:, :4], cache)
    with pytest.raises(ValueError, match="already holding 4"):
        model.decode(x[:, 4:5], cache)  # a concrete index + length > capacity


_D = TINY["d_model"] // TINY["num_heads"]
_LENGTH_SCALINGS = {
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0] * (_D // 2),
        "long_factor": [4.0] * (_D // 2),
        "original_max_position_embeddings": 8,
        "factor": 4.0,
    },
}


@pytest.mark.parametrize("kind", list(_LENGTH_SCALINGS))
def test_length_dependent_rope_scalings_agree_across_paths(kind):
    """dynamic and longrope read seq_len = max position + 1 in every path, so a forward pass, a
    left-padded one, a prefill into a larger cache and token-by-token decoding (while within
    the original length) agree; the cache capacity and the padding used to change it. Jitted,
    so seq_len is traced."""
    forward = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
    decode = nnx.jit(lambda m, t, c: m.decode(t, c))

    def run(model, x, mask=None):
        mask = jnp.ones(x.shape, bool) if mask is None else mask
        return forward(model, x, jpe.positions_from_mask(mask), mask.astype(jnp.int32))

    model = make("rope", pe_options={"scaling": _LENGTH_SCALINGS[kind]}, num_layers=1)
    x = tokens(shape=(1, L))  # L = 10 > original 8: the scaling is active
    full = run(model, x)
    logits, _ = decode(model, x, init_cache(model.config, 1, 32))
    chex.assert_trees_all_close(logits, full, atol=1e-5, rtol=1e-5)
    # within the original length, step-by-step decoding into a large cache equals forward
    short = x[:, :8]
    want_short = run(model, short)
    cache = init_cache(model.config, 1, 32)
    logits, cache = decode(model, short[:, :5], cache)
    steps = [logits]
    for t in range(5, 8):
        logits, cache = decode(model, short[:, t : t + 1], cache)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), want_short, atol=1e-5)
    # left padding to 12 columns (> original) changes nothing, with 10 or 8 real tokens
    for real, want in ((x, full), (short, want_short)):
        pad = 12 - real.shape[1]
        padded = jnp.concatenate([jnp.zeros((1, pad), x.dtype), real], axis=1)
        got = run(model, padded, jnp.arange(12)[None] >= pad)
        chex.assert_trees_all_close(got[:, pad:], want, atol=1e-5, rtol=1e-5)
    # and the length really matters: a twin without the long-context change agrees up to the
    # original length and differs at L = 10
    if kind == "dynamic":
        twin = make("rope", num_layers=1)
    else:
        same = {**_LENGTH_SCALINGS[kind], "long_factor": [1.0] * (_D // 2)}
        twin = make("rope", pe_options={"scaling": same}, num_layers=1)
    np.testing.assert_allclose(run(twin, short), want_short, atol=1e-5)
    assert not np.allclose(run(twin, x), full, atol=1e-3)


def test_xpos_is_finite_and_shift_invariant_far_from_zero():
    """xPos scales are measured from each row's anchor, so only distances matter: positions
    past 36k no longer overflow float32, in the forward pass and in decoding."""
    model = make("xpos", num_layers=1)
    x = tokens(shape=(1, 6))
    base = model(x)
    for offset in (40_000, 1_000_000):
        positions = jnp.arange(6) + offset
        out = model(x, positions=positions)
        chex.assert_tree_all_finite(out)
        chex.assert_trees_all_close(out, base, atol=2e-4, rtol=2e-4)
        jitted = nnx.jit(lambda m, t, p: m(t, positions=p))(model, x, positions[None])
        chex.assert_trees_all_close(jitted, base, atol=2e-4, rtol=2e-4)
    cache = init_cache(model.config, 1, 6)
    logits, cache = model.decode(x[:, :4], cache, positions=jnp.arange(4)[None] + 40_000)
    steps = [logits]
    for t in (4, 5):
        logits, cache = model.decode(x[:, t : t + 1], cache)
        steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), base, atol=2e-4, rtol=2e-4)
    # a span wider than the finite range raises on concrete positions
    with pytest.raises(ValueError, match="xPos"):
        model(x, positions=jnp.array([0, 1, 2, 3, 4, 40_000]))


def test_sandwich_sinusoids_are_one_head_wide():
    model = make("sandwich")
    p = jnp.arange(12)[None]
    got = model.encoding.bias(p, p)
    want = jpe.sandwich_bias(p, p, TINY["num_heads"], dim=_D)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    assert not np.allclose(got, jpe.sandwich_bias(p, p, TINY["num_heads"]), atol=1e-2)


@pytest.mark.parametrize("kind, r1_max, r2_max", [("log", 2.0, 1.0), ("power", 1.0, 2.0)])
def test_kerple_initialisation_follows_the_reference(kind, r1_max, r2_max):
    """chijames/KERPLE: log -p log(1 + a d), power -a d^p, with p ~ U(0, 2) and a ~ U(0, 1):
    the scale r1 and the exponent/shape r2 trade ranges between the kinds."""
    model = make("kerple", pe_options={"kind": kind}, num_heads=16, d_model=32)
    r1, r2 = np.asarray(model.encoding.r1[...]), np.asarray(model.encoding.r2[...])
    for r, top in ((r1, r1_max), (r2, r2_max)):
        assert np.all((r >= 0) & (r <= top))
        assert r.max() > 0.5 * top  # spans its range (16 draws)
