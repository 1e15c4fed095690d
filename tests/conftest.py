"""Shared test fixtures: small MovieLens-shaped files written by the tests themselves (never the
real data, whose licence forbids redistribution)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

# Most of the suite's time is XLA compiling many small programs that then run for milliseconds, so
# the suite (and every script a test starts, through the environment) compiles the cheap way:
# without XLA's optimisation passes, and with XLA:CPU's older fusion emitters, whose fixed cost per
# program is lower than that of the MLIR ones (BUILD_NOTES.md, "The test suite's codegen").
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite as users compile; tests that pin the bits of the
# users' programs (or a seeded margin measured on them) request `xla_optimized`, which runs them in
# a child process that compiles that way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
FALSE = ("0", "n", "no", "f", "false", "off")  # how jax reads a false boolean variable
CHEAP_CODEGEN = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in FALSE
# an unknown flag in XLA_FLAGS is fatal, so it is added only for the jaxlib it was measured on
CHEAP_FLAG = "--xla_cpu_use_fusion_emitters=false"
if CHEAP_CODEGEN and importlib.metadata.version("jaxlib").startswith("0.10."):
    if CHEAP_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):  # unless set by the user
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CHEAP_FLAG).strip()

import numpy as np  # noqa: E402  (after the environment above, which jax reads on import)
import pytest  # noqa: E402

from experiments.common import enable_compilation_cache  # noqa: E402

# One persistent compilation cache for the whole suite: every xdist worker, and every script a test
# starts, uses the entry points' folder (~/.cache/metarec/jax); $METAREC_COMPILATION_CACHE=0 turns
# it off, a path moves it.
enable_compilation_cache()

GENRES_100K = 19


@pytest.fixture
def xla_optimized():
    """Run this test on the programs users run: where the suite compiles the cheap way,
    :func:`pytest_pyfunc_call` runs it in a child pytest process that compiles as users do."""


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not CHEAP_CODEGEN or "xla_optimized" not in pyfuncitem.fixturenames:
        return None
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != CHEAP_FLAG)
    # `-m ""` lifts the default `-m 'not slow'`, so a slow test runs when it is asked for
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", ""]
    out = subprocess.run(
        [*cmd, pyfuncitem.nodeid], cwd=REPO, env=env, capture_output=True, text=True
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0:
        pytest.fail(
            f"in a child process compiled as users do:\n{out.stdout[-6000:]}{out.stderr[-2000:]}",
            pytrace=False,
        )
    if "passed" not in summary:
        pytest.skip(f"in a child process compiled as users do: {out.stdout[-500:]}")
    return True


def write_ml100k(
    directory, n_users=60, n_items=80, seed=0, extra_ratings=(), min_per_user=5, max_per_user=40
):
    """Write u.data / u.user / u.item in GroupLens' ml-100k layout with random but valid content.

    Items 1..n_items have years 1990..1999 (item 3 has year 'V'-style garbage and item 4 none);
    users rate a random number of items in [min_per_user, max_per_user]. Returns the directory.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    occupations = ["student", "engineer", "artist", "none"]
    with open(os.path.join(directory, "u.user"), "w") as f:
        for u in range(1, n_users + 1):
            f.write(
                f"{u}|{rng.integers(10, 70)}|{'MF'[u % 2]}|{occupations[u % 4]}|"
                f"{rng.integers(10000, 99999)}\n"
            )
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as f:
        for i in range(1, n_items + 1):
            year = 1990 + (i % 10)
            date = f"01-Jan-{year}" if i not in (3, 4) else ("V" if i == 3 else "")
            flags = ["0"] * GENRES_100K
            flags[1 + i % 18] = "1"
            f.write(f"{i}|Movie Ã© {i} ({year})|{date}||http://x|" + "|".join(flags) + "\n")
    lines = []
    for u in range(1, n_users + 1):
        k = int(rng.integers(min_per_user, max_per_user + 1))
        for i in rng.choice(np.arange(1, n_items + 1), size=min(k, n_items), replace=False):
            lines.append(
                f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + int(rng.integers(0, 10**6))}"
            )
    lines.extend(extra_ratings)
    with open(os.path.join(directory, "u.data"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(directory)


@pytest.fixture
def ml100k_dir(tmp_path):
    return write_ml100k(tmp_path / "ml-100k")


def load_ml100k(directory):
    """Read and clean a folder written by :func:`write_ml100k` (no dataset lookup, no cache)."""
    from metarec.data import readers
    from metarec.data.movielens import clean

    return clean(readers.read_any(str(directory)), "ml-100k")


def rewrite_lines(path, edit):
    """Replace the lines of a latin-1 text file (e.g. ``u.data``) with ``edit(lines)``."""
    with open(path, encoding="latin-1") as f:
        lines = f.read().splitlines()
    with open(path, "w", encoding="latin-1") as f:
        f.write("\n".join(edit(lines)) + "\n")


# a last line of u.data whose rating is not a number: a fatal error naming file, line and field
MALFORMED_RATING = "1\t2\tfour\t881250949"


@pytest.fixture
def malformed_ml100k_dir(tmp_path):
    """An ml-100k folder whose ``u.data`` ends with :data:`MALFORMED_RATING`."""
    return write_ml100k(tmp_path / "malformed" / "ml-100k", extra_ratings=[MALFORMED_RATING])


@pytest.fixture
def scenario_data(tmp_path):
    """Cleaned ml-100k-shaped data in which every cold-start scenario has users."""
    directory = write_ml100k(
        tmp_path / "scenarios", n_users=120, n_items=150, min_per_user=5, max_per_user=110, seed=7
    )
    return load_ml100k(directory)


def random_sequences(n_users=40, num_items=16, max_len=8, seed=0, min_len=3):
    """:class:`metarec.data.sequences.Sequences` of random item ids ``1 .. num_items - 1``, each
    user with ``min_len .. max_len`` real positions (right-padded) and ratings 1..5."""
    from metarec.data.sequences import Sequences

    rng = np.random.default_rng(seed)
    items = rng.integers(1, num_items, (n_users, max_len)).astype(np.int32)
    n = rng.integers(min_len, max_len + 1, n_users)
    mask = (np.arange(max_len)[None] < n[:, None]).astype(np.float32)
    items = items * mask.astype(np.int32)
    ratings = (mask * rng.integers(1, 6, (n_users, max_len))).astype(np.float32)
    return Sequences(items=items, ratings=ratings, mask=mask, user=np.arange(n_users))


# the repository root (scripts run as `python -m experiments...` from here)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_host_devices(script: str, n_devices: int, timeout: int = 300):
    """Run ``script`` (``python -c``) from the repository root in a fresh process whose CPU backend
    has ``n_devices`` devices (the flag must be set before JAX starts, so not in this process).
    Returns the ``CompletedProcess`` (stdout and stderr captured as text)."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bandit_env(p_click, horizon: int):
    """RL environments whose click probabilities are exactly ``p_click`` (``[I]``: one user,
    ``[U, I]``: a batch): affinity ``logit(p)``, threshold 0, temperature 1, no boredom, no
    leaving, one history slot, no genres."""
    from metarec.rl import env as E

    p = np.asarray(p_click, np.float64)
    cfg = E.EnvConfig(
        horizon=horizon,
        history_len=1,
        threshold=0.0,
        temperature=1.0,
        boredom_weight=0.0,
        leave_growth=0.0,
    )
    return E.make_env_params(np.log(p / (1 - p)), np.zeros((p.shape[-1], 1)), cfg)
