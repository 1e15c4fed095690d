"""The suite compiles the cheap way (tests/conftest.py), and a test that requests `xla_optimized`
runs on the programs users run."""

import importlib.metadata
import os

import jax
import pytest

from tests.conftest import CHEAP_CODEGEN, CHEAP_FLAG


def _xla_flags() -> list[str]:
    return os.environ.get("XLA_FLAGS", "").split()


def test_the_suite_compiles_without_optimisation_passes_and_with_the_older_emitters():
    if not CHEAP_CODEGEN:
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS=0: the suite compiles as users do")
    assert jax.config.read("jax_disable_most_optimizations")
    if importlib.metadata.version("jaxlib").startswith("0.10."):
        assert CHEAP_FLAG in _xla_flags()


def test_an_xla_optimized_test_runs_as_users_compile(xla_optimized):
    # in a child process where the suite compiles the cheap way; in this one otherwise
    assert not jax.config.read("jax_disable_most_optimizations")
    assert CHEAP_FLAG not in _xla_flags()
