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
