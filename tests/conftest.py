"""Test set-up shared by every test file.

Rank promotion raises so that an accidental broadcast between, say, `[L]` positions and `[H]`
slopes is an error rather than a silently wrong tensor.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("JPE_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("default")
