"""The machine a benchmark runs on: CPU, devices, allocator settings, measured matmul peak and
memory bandwidth, process memory and page-fault counters, XLA's compiled memory analysis."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: glibc malloc settings that keep XLA's per-step temporaries mapped (read by glibc at process
#: start only). The harness only records whether they are set; to try them, run
#: ``MALLOC_...=... python -m benchmarks...``.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_ARENA_MAX": "1",
}


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: the vector extensions that set a CPU's f32 matmul peak (AVX-512 doubles AVX2's width)
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "amx_tile",
    "asimd",
    "sve",
)


def cpu_vector_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of :data:`VECTOR_FLAGS` the CPU reports (the ``flags`` / ``Features`` line of
    ``/proc/cpuinfo``, or the text given); empty where that is unavailable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [v for v in VECTOR_FLAGS if v in have]
    return []


def malloc_status() -> dict:
    """The allocator settings in effect: ``{"glibc": bool, "tuned": bool, "env": {var: value}}``
    (``tuned``: every variable of :data:`TUNED_MALLOC_ENV` has its tuned value)."""
    env = {k: os.environ.get(k) for k in TUNED_MALLOC_ENV}
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    tuned = all(env[k] == v for k, v in TUNED_MALLOC_ENV.items())
    return {"glibc": glibc, "tuned": tuned, "env": env}


def machine_info() -> dict:
    """CPU model and vector extensions, cores, memory, jax/jaxlib versions, backend, devices and
    allocator settings."""
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover
        jaxlib_version = "unknown"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "cpu_vector_flags": cpu_vector_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # None = the backend's default (on NVIDIA GPUs XLA runs f32 dots on TF32 tensor cores)
        "matmul_precision": jax.config.jax_default_matmul_precision,
        "malloc": malloc_status(),
    }


def load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 min) or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _timeit(fn: Callable[[], Any], min_time: float, min_reps: int = 3) -> float:
    """Best wall time of ``fn()`` (which must block) over at least ``min_reps`` runs and
    ``min_time`` seconds."""
    fn()  # warm-up
    best, total, reps = np.inf, 0.0, 0
    while reps < min_reps or total < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def matmul_peak(
    dtype: str = "float32", sizes: Sequence[int] = (512, 1024, 2048), min_time: float = 0.5
) -> dict:
    """Measured dense matmul peak: the best FLOP/s of a jitted ``[n, n] @ [n, n]`` (2 n^3 FLOPs)
    over ``sizes`` in ``dtype`` (accumulation as XLA does for that dtype). Returns
    ``{"dtype", "flops_per_s", "best_n", "by_n": {n: flops_per_s}}``."""
    dt = DTYPES[dtype]
    by_n = {}
    cpu_by_n = {}
    f = jax.jit(lambda a, b: a @ b)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n), jnp.float32).astype(dt)
        b = jax.random.normal(jax.random.PRNGKey(n + 1), (n, n), jnp.float32).astype(dt)
        t = _timeit(lambda a=a, b=b: f(a, b).block_until_ready(), min_time)
        by_n[int(n)] = 2.0 * n**3 / t
        cpu_by_n[int(n)] = 2.0 * n**3 / cpu_seconds_per_call(lambda a=a, b=b: f(a, b), min_time)
    best_n = max(by_n, key=by_n.get)
    return {
        "dtype": dtype,
        "flops_per_s": by_n[best_n],
        "best_n": best_n,
        "by_n": by_n,
        # FLOPs per second of process CPU time (all threads): what one core-second of matmul
        # gives, measurable under load from other jobs
        "flops_per_cpu_s": max(cpu_by_n.values()),
        "cpu_by_n": cpu_by_n,
    }


def cpu_seconds_per_call(fn: Callable[[], Any], min_time: float, min_reps: int = 3) -> float:
    """Process CPU seconds (user + system, all threads) per call of ``fn`` (dispatched back to
    back, blocked at the end), over at least ``min_reps`` calls and ``min_time`` seconds."""
    jax.block_until_ready(fn())
    reps, c0, t0 = 0, os.times(), time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_time:
        jax.block_until_ready(fn())
        reps += 1
    c1 = os.times()
    return max((c1.user + c1.system - c0.user - c0.system) / reps, 1e-9)


def memory_bandwidth(n_bytes: int = 1 << 27, min_time: float = 0.3) -> dict:
    """Measured host streaming bandwidth: ``numpy.copyto`` between two pre-allocated (already
    touched) float32 buffers of ``n_bytes`` (reads + writes ``2 * n_bytes``), best of several runs.
    On the CPU backend this is the memory XLA works in; used for the roofline in the report."""
    a = np.ones(n_bytes // 4, np.float32)
    b = np.zeros_like(a)
    t = _timeit(lambda: np.copyto(b, a), min_time)
    return {"bytes_per_s": 2.0 * n_bytes / t, "n_bytes": n_bytes}


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process' peak RSS (Linux: write 5 to ``/proc/self/clear_refs``); False if
    unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process since the last :func:`reset_peak_rss` (``VmHWM``)."""
    v = _proc_status("VmHWM")
    if v is None:  # non-Linux fallback: lifetime peak
        try:
            import resource

            v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:  # pragma: no cover
            v = None
    return v


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of device 0 where the backend reports memory stats (GPU/TPU), else
    None."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pragma: no cover
        stats = None
    return None if not stats else stats.get("peak_bytes_in_use")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory error (status ``RESOURCE_EXHAUSTED``)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh temp buffers touched for the first time)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except Exception:  # pragma: no cover
        return 0


def compiled_memory(compiled) -> dict:
    """XLA's compiled memory analysis: temp / argument / output / alias bytes (None if
    unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # pragma: no cover
        m = None
    if m is None:
        keys = ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes")
        return dict.fromkeys(keys)
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
