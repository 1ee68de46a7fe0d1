"""Test set-up shared by every test file.

Rank promotion raises so that an accidental broadcast between, say, `[L]` positions and `[H]`
slopes is an error rather than a silently wrong tensor.

One persistent compilation cache for the whole run, in a temporary folder removed at the
end: many tests compile the same program (one model configuration's forward pass, in this
process, in another pytest-xdist worker, or in a notebook's kernel or a command line run as a
subprocess, which inherit `JPE_CACHE_DIR`), and only the first compiles it. The tests'
processes keep programs that took at least a quarter of a second to compile: the thousands of
one-operation programs that a model run outside `jit` compiles are quicker to compile again
than to write and read back (kernels and command lines keep their own default, 0.1 s). Nothing
is written to the home folder, and every run starts empty, so no test ever depends on an
earlier run. Tests of the cache itself point it at folders of their own.

The suite runs in pytest-xdist workers (`addopts` in pyproject.toml: as many as the
machine's cores, at most 4, each test file in one worker so that module fixtures are built
once); `-n 0` runs it in one process. The files that take longest start first
(`LONGEST_FIRST`, with xdist's own reordering by test count turned off): the longest job
first is how a schedule of a few workers ends with none of them idle. Ordered by test count,
the notebooks (18 tests, four of them slow) started late and one worker ran alone at the end.

XLA compiles with most optimizations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`: LLVM at -O0 and
none of its expensive passes; the HLO passes, fusion included, still run). The suite is
thousands of small programs each run a few times, so compiling is most of its time: this
cut the suite's summed test time by about a third (a side-by-side run of two test files:
120 s to 91 s). XLA:CPU also uses its classic loop emitters and no XNNPACK rewrites here
(`FAST_COMPILE_FLAGS`, appended to `XLA_FLAGS` unless it names them): one after the other,
`python -m pytest -q -n 0 -p no:cacheprovider tests/test_transformer.py` took 278 s with
`XLA_FLAGS="--xla_cpu_use_fusion_emitters=true --xla_cpu_use_xnnpack=true"` and 203 s without
(at 0d711bf). The values each program computes are the same up to float rounding,
which every numerical test's tolerance already allows. Set the variable to 0 (and the flags
to true) to test the optimized programs; the notebooks run optimized and without the flags
(tests/test_notebooks.py), as users run them.

libtpu (in the test extra, for the TPU compile checks) is allowed to load in every worker at
once; it needs no TPU to compile.
"""

import gc
import os
import shutil
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA:CPU's newer fusion emitters and its XNNPACK rewrites cost most of a small program's
# compile; the tests compile with the classic emitters (`FAST_COMPILE_FLAGS`, see above).
# The notebooks' kernels get the flags the run started with (`JPE_TEST_USER_XLA_FLAGS`).
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_use_xnnpack=false")
_flags = os.environ.setdefault("JPE_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = " ".join(
    [_flags, *(f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _flags)]
).strip()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jpe.lab import cli  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _run_cache_dir() -> Path:
    """The run's cache folder: one per test run, shared by its xdist workers, which inherit
    the controller's `JPE_TEST_RUN_UID`."""
    uid = os.environ.setdefault("JPE_TEST_RUN_UID", uuid.uuid4().hex)
    return Path(tempfile.gettempdir()) / f"jpe-test-xla-{uid}"


_CACHE = _run_cache_dir()
os.environ["JPE_CACHE_DIR"] = str(_CACHE)
cli.enable_compilation_cache(_CACHE, min_compile_seconds=0.25)


# The test files that take longest, longest first; every other file follows in name order.
# Summed test seconds per file of `python -m pytest -q --durations=0 -p no:cacheprovider` on
# 2 cores at 587d934: 246, 186, 122, 89, 79, 53, 52 and 40; the rest 35 or less. Replayed
# through a model of xdist's scheduler, they end the run after 605 s ordered by test count
# and after 555 s in this order (1085 s of work in all); measured, the time beyond half the
# summed seconds went from 82 s to 33 s.
LONGEST_FIRST = (
    "test_transformer.py",
    "test_notebooks.py",
    "test_pallas_attention.py",
    "test_attention.py",
    "test_train.py",
    "test_floater.py",
    "test_extrapolate.py",
    "test_tagger.py",
)


def pytest_collection_modifyitems(config, items):
    """Runs the files of `LONGEST_FIRST` first, in its order; a stable sort, so the tests of a
    file keep their order. Every xdist worker sorts alike, as its scheduler requires."""

    def rank(item):
        name = item.path.name
        if name in LONGEST_FIRST:
            return (LONGEST_FIRST.index(name), "")
        return (len(LONGEST_FIRST), str(item.path))

    items.sort(key=rank)


def pytest_sessionfinish(session):
    """After the last test: one full garbage collection, then `gc.freeze()` on what survives.

    pytest's clean-up then runs five full collections (to report unraisable exceptions); with
    a worker's compiled programs and traces in memory, each took 1.4 to 2.5 s here, so the
    worker outlived execnet's 5 s allowance after it reported back, and execnet interrupted it
    (the `PytestUnraisableExceptionWarning` of a `KeyboardInterrupt` in hypothesis's gc
    callback that ended some runs). Frozen objects are left out of later collections, so those
    five see only what was made since. This runs before xdist tells the controller that the
    worker is done, and an exception ignored during it is still reported."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        shutil.rmtree(_CACHE, ignore_errors=True)


settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("JPE_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("default")
