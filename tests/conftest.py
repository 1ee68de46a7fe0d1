"""Test set-up shared by every test file.

Rank promotion raises so that an accidental broadcast between, say, `[L]` positions and `[H]`
slopes is an error rather than a silently wrong tensor.

`JPE_CACHE_DIR=off`: the command lines and notebooks that tests run (in this process or in
subprocesses, which inherit it) never write JAX's persistent compilation cache into the home
folder; tests of the cache point it at a temporary folder.
"""

import os

import jax
from hypothesis import HealthCheck, settings

os.environ["JPE_CACHE_DIR"] = "off"
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("JPE_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("default")
