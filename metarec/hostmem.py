"""Host (CPU) allocator settings for XLA's per-step temporary buffers.

XLA's CPU runtime allocates each executable's temporaries (one buffer per call, tens to hundreds of
MiB for a vmapped second-order meta-step) with ``malloc`` and frees them at the end of the call.
glibc serves requests above its mmap threshold (at most 32 MiB, adapted dynamically) with a fresh
``mmap`` and returns them with ``munmap``, and an allocation made on one of XLA's worker threads
lands in a per-thread arena whose 64 MiB heaps are unmapped when they empty. Either way every step
touches fresh zero pages: ``benchmark.json`` counted ~12,000 minor page faults per step (all 48 MiB
of the headline step's temporaries) and ~25 ms of kernel time per step on the 2-core VM.

:data:`TUNED_ENV` keeps those buffers in the process: a 1 GiB mmap threshold (served from the heap),
a 1 GiB trim threshold (freed heap memory is kept for the next step) and one arena (so worker
threads share the main heap instead of 64 MiB per-thread heaps). glibc reads these variables only
at start-up, hence :func:`reexec_with_tuned_malloc`, which restarts the current command with them
set. Nothing here changes results (bit-identical).

Measured on the 2-core VM (BUILD_NOTES.md, issue 6): the page faults per step drop ~30x, but the
wall time of the vmapped step does not improve and ``lax.map`` steps get 2-3x slower (one arena
serialises the many small allocations of XLA's worker threads). So it is an opt-in experiment
(``experiments/benchmark.py --tune_malloc``), not a default; bounding temporaries with
``chunk_size`` is what avoids the faults in practice.

This module imports nothing heavy, so a script can call it before importing JAX.
"""

from __future__ import annotations

import os
import platform
import sys

#: glibc malloc settings (environment variables read at process start)
TUNED_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_ARENA_MAX": "1",
}
_MARK = "METAREC_MALLOC_REEXEC"


def is_glibc() -> bool:
    """True on Linux with glibc (the only allocator these settings apply to)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def malloc_status() -> dict:
    """The allocator settings in effect: ``{"glibc": bool, "tuned": bool, "env": {var: value}}``
    (``tuned`` = every variable of :data:`TUNED_ENV` set to its tuned value)."""
    env = {k: os.environ.get(k) for k in TUNED_ENV}
    return {"glibc": is_glibc(), "tuned": all(env[k] == v for k, v in TUNED_ENV.items()), "env": env}


def reexec_with_tuned_malloc(argv: list[str] | None = None) -> None:
    """Restart this process with :data:`TUNED_ENV` in the environment (``os.execve``: same
    interpreter, same command line, including ``python -m module``), unless it is already set, the
    C library is not glibc, this process is itself the re-executed one, or it runs interactively or
    from a script on stdin (which cannot be read twice). Returns only when nothing had to be done.
    Variables the user already set are kept as they are.

    Call it first thing in a script's ``main`` — before any thread is started or much memory
    allocated — since everything done before it is done twice.
    """
    if not is_glibc() or os.environ.get(_MARK) or malloc_status()["tuned"]:
        return
    env = dict(os.environ)
    for k, v in TUNED_ENV.items():
        env.setdefault(k, v)
    env[_MARK] = "1"
    args = list(argv) if argv is not None else list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if len(args) < 2 or args[1] == "-":
        return  # interactive or a script read from stdin: nothing to run again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args[1:]], env)
