"""metarec.hostmem: the re-exec applies the glibc settings once, and they stop XLA's per-call
temporaries from being unmapped and faulted in again on every call (same results). Whether that is
faster is a benchmark question (BUILD_NOTES.md), not tested here."""

import os
import subprocess
import sys
import textwrap

import pytest

from metarec import hostmem

pytestmark = pytest.mark.skipif(not hostmem.is_glibc(), reason="glibc malloc settings only")

_PROBE = textwrap.dedent(
    """
    import os, resource, sys
    from metarec import hostmem
    if sys.argv[1] == "tuned":
        hostmem.reexec_with_tuned_malloc()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
        return jnp.sum(jnp.square(jnp.sort(jnp.tile(x, 16))))  # a 64 MiB temporary

    x = jnp.arange(1 << 20, dtype=jnp.float32)
    c = f.lower(x).compile()
    jax.block_until_ready(c(x))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        jax.block_until_ready(c(x))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4
    value = float(c(x))
    print(faults, hostmem.malloc_status()["tuned"], os.environ.get("METAREC_MALLOC_REEXEC"), value.hex())
    """
)


def _run(mode: str):
    env = {k: v for k, v in os.environ.items() if k not in hostmem.TUNED_ENV and k != "METAREC_MALLOC_REEXEC"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    faults, tuned, mark, value = out.stdout.split()
    return float(faults), tuned == "True", mark, value


def test_reexec_sets_the_environment_once_and_removes_page_faults_per_call():
    f_default, tuned_default, mark_default, v_default = _run("default")
    f_tuned, tuned, mark, v_tuned = _run("tuned")
    assert v_tuned == v_default  # the same bits either way
    assert not tuned_default and mark_default == "None"
    assert tuned and mark == "1"  # restarted exactly once, with every variable set
    # 64 MiB = 16384 pages: the default allocator maps them afresh on every call
    assert f_default > 16384
    assert f_tuned < 0.25 * f_default, (f_tuned, f_default)


def test_no_reexec_when_already_tuned(monkeypatch):
    for k, v in hostmem.TUNED_ENV.items():
        monkeypatch.setenv(k, v)
    assert hostmem.malloc_status()["tuned"]
    hostmem.reexec_with_tuned_malloc()  # would replace this process (and the test run) otherwise
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("METAREC_MALLOC_REEXEC", "1")
    hostmem.reexec_with_tuned_malloc()  # the re-executed process never restarts again


def test_no_reexec_for_stdin_or_interactive(monkeypatch):
    for k in hostmem.TUNED_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("METAREC_MALLOC_REEXEC", raising=False)
    hostmem.reexec_with_tuned_malloc([sys.executable, "-"])  # returns instead of replacing the process
    hostmem.reexec_with_tuned_malloc([sys.executable])
