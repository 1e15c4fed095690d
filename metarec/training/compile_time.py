"""Seconds this process has spent compiling, read from JAX's own monitoring events.

JAX reports the duration of each stage of turning a function into an executable
(``jax.monitoring`` events, emitted by ``jax._src.dispatch`` / ``pxla`` / ``pjit``): tracing to a
jaxpr, lowering the jaxpr to an MLIR module, and the backend compile (which includes a persistent
cache lookup; a hit makes it short). Their sum is the compile time; everything else is compute.
A cached call (the jit fast path) emits none of them.

The listener is process-wide because JAX's monitoring is: :func:`compile_seconds` installs it once
and returns the running total, and callers take differences (``after - before``). This is the one
piece of module state in the training layer, kept to a float under a lock.
"""

from __future__ import annotations

import threading

#: the monitoring events whose durations add up to compile time (names as in jax._src.dispatch)
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

_lock = threading.Lock()
_total = {"seconds": 0.0, "installed": False}


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        with _lock:
            _total["seconds"] += float(duration_secs)


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling in this process since the first call (which
    installs the listener and returns 0.0, unless something compiled concurrently)."""
    with _lock:
        if not _total["installed"]:
            import jax  # here, so that importing the run log does not start JAX

            jax.monitoring.register_event_duration_secs_listener(_listener)
            _total["installed"] = True
        return _total["seconds"]


def split_seconds(wall_seconds: float, compile_before: float) -> dict[str, float]:
    """``{"wall_seconds", "compile_seconds", "compute_seconds"}`` of a stretch of ``wall_seconds``
    that began when :func:`compile_seconds` read ``compile_before``; compute is the rest (data,
    training, evaluation, I/O)."""
    compiled = compile_seconds() - compile_before
    return {
        "wall_seconds": round(wall_seconds, 3),
        "compile_seconds": round(compiled, 3),
        "compute_seconds": round(max(wall_seconds - compiled, 0.0), 3),
    }
