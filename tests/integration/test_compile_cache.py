"""The compilation cache every entry point and the test suite turn on ($METAREC_COMPILATION_CACHE
moves or turns it off) and the compile / compute seconds a run adds to its run.json."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from experiments import common


@pytest.fixture
def jax_cache_config():
    """Put JAX's cache settings back after a test changed them."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)


def test_environment_variable_turns_the_cache_off_or_moves_it(tmp_path, jax_cache_config):
    home = os.path.join(os.path.expanduser("~"), ".cache", "metarec", "jax")
    assert common.compilation_cache_dir({}) == home
    assert common.compilation_cache_dir({common.CACHE_ENV: "1"}) == home
    jax.config.update("jax_compilation_cache_dir", None)
    for off in ("0", "off", "False"):
        assert common.enable_compilation_cache({common.CACHE_ENV: off}) is None
        assert jax.config.jax_compilation_cache_dir is None  # left off
    moved = str(tmp_path / "cache")
    assert common.enable_compilation_cache({common.CACHE_ENV: moved}) == moved
    assert jax.config.jax_compilation_cache_dir == moved
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"METAREC_COMPILATION_CACHE=.*not a folder"):
        common.compilation_cache_dir({common.CACHE_ENV: str(tmp_path / "file")})


def test_the_test_suite_runs_with_the_cache_on():
    expected = common.compilation_cache_dir()
    assert jax.config.jax_compilation_cache_dir == expected  # tests/conftest.py turned it on


def test_run_timing_adds_compile_and_compute_seconds_to_the_run_json_the_block_wrote(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    with common.run_timing(str(wd)):
        (wd / "run.json").write_text(json.dumps({"command": "x"}))
        # a program no other test or earlier run compiles (every program is cached, and a cache
        # hit has no backend_compile event): a constant of its own in the HLO
        unique = float(time.time_ns() % 1_000_003)
        f = jax.jit(lambda v: jnp.cos(v) * 7.0 - unique)
        f(jnp.arange(3.0)).block_until_ready()
        time.sleep(0.05)  # compute that is not compilation
    timing = json.loads((wd / "run.json").read_text())["timing"]
    assert timing["compile_seconds"] > 0 and timing["compute_seconds"] >= 0.04
    stages = timing["compile_stages"]
    assert set(stages) == {"trace", "lower", "backend_compile"} and stages["trace"] > 0
    assert sum(stages.values()) == pytest.approx(timing["compile_seconds"], abs=2e-3)
    total = timing["compile_seconds"] + timing["compute_seconds"]
    assert total == pytest.approx(timing["wall_seconds"], abs=2e-3)

    other = tmp_path / "other"  # a run.json written before the block (another script's)
    other.mkdir()
    (other / "run.json").write_text("{}")
    old = time.time() - 60
    os.utime(other / "run.json", (old, old))
    with common.run_timing(str(other)):
        pass
    assert json.loads((other / "run.json").read_text()) == {}
