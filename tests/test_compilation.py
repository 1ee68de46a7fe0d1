"""Compiling less: JAX's persistent compilation cache (`jpe.lab.cli.enable_compilation_cache`)
and evaluation functions compiled once per model configuration and shape."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jpe.lab import cli

ROOT = Path(__file__).resolve().parents[1]
_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def restore_jax_config():
    saved = {name: getattr(jax.config, name) for name in _OPTIONS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_cache_directory_from_argument_environment_or_home(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    assert cli.compilation_cache_dir() == Path.home() / ".cache" / "jpe" / "xla"
    monkeypatch.setenv(cli.CACHE_ENV, str(tmp_path / "env"))
    assert cli.compilation_cache_dir() == tmp_path / "env"
    assert cli.compilation_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    for off in ("off", "OFF", ""):
        monkeypatch.setenv(cli.CACHE_ENV, off)
        assert cli.compilation_cache_dir() is None
        assert cli.compilation_cache_dir(off) is None


def test_enable_sets_the_jax_config_and_off_clears_it(restore_jax_config, tmp_path):
    directory = cli.enable_compilation_cache(tmp_path / "xla")
    assert directory == tmp_path / "xla" and directory.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == pytest.approx(0.1)
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    assert cli.enable_compilation_cache("off") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_flags(monkeypatch):
    import argparse

    p = argparse.ArgumentParser()
    cli.add_compilation_cache(p)
    assert p.parse_args([]).compilation_cache is None
    assert p.parse_args(["--compilation-cache", "/x"]).compilation_cache == "/x"
    assert p.parse_args(["--no-compilation-cache"]).compilation_cache == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["--no-compilation-cache", "--compilation-cache", "/x"])


_COMPILE_ONCE = """
import sys
import jax, jax.numpy as jnp
from jpe.lab import cli
cli.enable_compilation_cache(sys.argv[1], min_compile_seconds=0)
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3)
f.lower(jnp.ones((8, 8))).compile()
print("hit" if hits else "miss")
"""


def test_a_second_process_loads_the_cached_executable(tmp_path):
    """One compile writes the cache directory; the same program in a fresh process loads it
    from there (JAX's `cache_hits` event)."""
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _COMPILE_ONCE, str(cache)],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert run().stdout.split() == ["miss"]
    assert [p for p in cache.rglob("*") if p.is_file()], "the first compile wrote nothing"
    assert run().stdout.split() == ["hit"]


# ---------------------------------------------------------------------------------------------
# Evaluation compiled once per model configuration and shape
# ---------------------------------------------------------------------------------------------


def _lm(seed: int, pe: str = "rope"):
    from flax import nnx

    from jpe.nn.config import TransformerConfig
    from jpe.nn.transformer import Transformer

    config = TransformerConfig(pe=pe, d_model=16, num_layers=1, num_heads=2, max_len=128)
    return Transformer(config, rngs=nnx.Rngs(seed))


def _val(n: int = 1500):
    from jpe.lab import data as data_lib

    return data_lib.load_corpus(None).val[:n]


def test_two_models_of_one_config_trace_the_evaluation_once(monkeypatch):
    """Another seed of the same configuration, at the same length, in both modes: one trace,
    one compile; the second model compiles nothing."""
    from jpe.lab import train

    traces, original = [], train._token_nll

    def counted(model, inputs, targets, key, random_positions):
        traces.append(inputs.shape)  # a Python side effect runs once per trace
        return original(model, inputs, targets, key, random_positions)

    monkeypatch.setattr(train, "_token_nll", counted)
    val = _val()
    first = train.evaluate(_lm(0), val, [32], stride=8, tokens_per_length=512)
    second = train.evaluate(_lm(1), val, [32], stride=8, tokens_per_length=512)
    assert traces == [(16, 32)]
    assert first["timings"]["compiles"] == 1 and second["timings"]["compiles"] == 0
    assert second["timings"]["calls"] == 2 and second["timings"]["compile_seconds"] == 0
    assert first["ppl"] != second["ppl"]  # two models, not one result reused


def test_padded_last_batch_gives_the_unpadded_perplexity(monkeypatch):
    """12 windows in batches of 5: the last batch (2 windows) is padded to 5 rows, and the
    sums equal those of one unpadded pass over all the windows."""
    import numpy as np

    from jpe.lab import data as data_lib
    from jpe.lab import train

    monkeypatch.setattr(train, "_EVAL_TOKENS", 5 * 32)
    model = _lm(0)
    windows = data_lib.eval_windows(_val(), 32, max_windows=12)
    assert len(windows["inputs"]) == 12 and train._batch_rows(12, 32) == 5
    total, count, by_position = train._nll_sums(model, windows)
    nll = np.asarray(
        train._token_nll(model, windows["inputs"], windows["targets"], None, None), np.float64
    )
    w = windows["weights"].astype(np.float64)
    assert count == w.sum()
    np.testing.assert_allclose(total, (nll * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(by_position, (nll * w).sum(0) / w.sum(0), rtol=1e-5)


def test_batch_rows_are_a_few_buckets():
    from jpe.lab import train

    full = train._EVAL_TOKENS // 64
    assert [train._batch_rows(n, 64) for n in (1, 2, 3, 5, 17)] == [1, 2, 4, 8, 32]
    assert train._batch_rows(full + 1, 64) == train._batch_rows(10 * full, 64) == full


def test_a_row_s_random_positions_do_not_depend_on_the_rows_after_it():
    """What padding the last batch relies on for randomized positions."""
    import numpy as np

    from jpe.encodings.positions import randomized_positions

    key = jax.random.PRNGKey(3)
    few, more = randomized_positions(key, (2, 16), 64), randomized_positions(key, (5, 16), 64)
    np.testing.assert_array_equal(few, more[:2])


def test_compile_clock_counts_jit_compiles_but_not_run_compiled():
    """`CompileClock` sums JAX's compile events for a fresh jit in its thread; the compiles of
    `run_compiled` are timed by `Timings` instead and left out, and nothing counts after
    the clock stops."""
    import jax
    import jax.numpy as jnp

    from jpe.lab import core

    x = jnp.ones((8, 8))
    with core.CompileClock() as clock:
        jax.jit(lambda a: jnp.tanh(a) @ a.T + 1.0)(x).block_until_ready()
    compiled = clock.seconds
    assert compiled > 0
    timings = core.Timings()
    with core.CompileClock() as clock:
        core.run_compiled(jax.jit(lambda a: jnp.cos(a) @ a + 2.0), x, timings=timings)
    assert clock.seconds == 0 and timings.compiles == 1 and timings.compile_seconds > 0
    jax.jit(lambda a: jnp.sin(a) * 3.0)(x).block_until_ready()  # after the clock stopped
    assert clock.seconds == 0
