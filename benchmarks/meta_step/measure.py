"""Library side of the vmapped-task benchmark (``experiments/benchmark.py``).

What is measured, per configuration (meta-learner, data, meta-batch, support size, inner steps,
model width, remat, chunking, compute dtype, devices) and per *execution mode* of the same meta-step:

* ``vmap`` — the library step, :func:`metarec.meta.step.make_meta_step` (``vmap(task_grad)`` over the task
  axis, one ``jax.jit``);
* ``map``  — the same meta-step with ``jax.lax.map`` over tasks instead of ``vmap`` (one jitted
  program, tasks processed one after another inside XLA);
* ``loop`` — what typical research code does: a Python loop over the tasks, each task's adapt +
  query loss + meta-gradient jitted separately, the gradients pulled to the host and averaged there,
  then one jitted optimizer update.

All three compute the same meta-gradient and apply the same update (clip, finite guard, optax), which
the tests check with :func:`grad_capture` (an "optimizer" whose state *is* the meta-gradient).

Measures (see :data:`RECORD_KEYS`): steady-state meta-steps/s and tasks/s, compile time, XLA's
compiled memory analysis (temp / argument / output bytes), peak process RSS (Linux ``VmHWM``, reset
per measurement through ``/proc/self/clear_refs``) or device peak bytes where the backend reports
them, FLOPs per step (:func:`count_flops`: an exact count from the jaxpr, with ``lax.scan`` bodies
multiplied by their length — XLA's ``cost_analysis()`` counts a while-loop body once, which we also
record as ``xla_flops``), achieved FLOP/s and its fraction of the machine's dense matmul peak
(:func:`matmul_peak`, measured in the same dtype), and the time the step loop waits for its input
pipeline (a background thread samples, slices and transfers the next meta-batches; see
:class:`Prefetcher`).

:func:`profile_ops` turns a ``jax.profiler`` trace of a compiled step into per-HLO-op times grouped
into categories (matmul / elementwise+fusion / data movement / loop control), which is what the
benchmark report uses to say what limits the step.

Everything here is host-side orchestration around the pure library functions; nothing reads flags.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import platform
import queue
import re
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarec import hostmem
from metarec import meta as mmeta
from metarec.meta import step as train as mtrain
from metarec.data.tasks import Task, index_tasks
from metarec.models import melu

PyTree = Any

LEARNER_NAMES = ("maml", "fomaml", "reptile", "metasgd", "imaml")
MODES = ("vmap", "map", "loop")
DATA_SOURCES = ("synthetic", "ml-100k")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: keys of every per-(configuration, mode) record in ``benchmark.json["records"]``
RECORD_KEYS = (
    "section", "config", "mode", "n_tasks", "support", "query", "n_steps", "seconds", "steps_per_s",
    "tasks_per_s", "step_ms", "lower_s", "compile_s", "flops_per_step", "matmul_flops_per_step",
    "xla_flops", "xla_bytes_accessed", "achieved_flops_per_s", "peak_fraction", "temp_bytes",
    "argument_bytes", "output_bytes", "peak_rss_bytes", "device_peak_bytes", "input_wait_s_per_step",
    "input_wait_fraction", "minor_faults_per_step", "user_cpu_ms_per_step", "sys_cpu_ms_per_step", "final_loss",
    "finite",
)  # fmt: skip
#: top-level keys of ``benchmark.json``
TOP_KEYS = (
    "command", "preset", "machine", "settings", "load_average", "matmul_peak", "memory_bandwidth",
    "records", "comparisons", "memory_vs_inner_steps", "profiles", "devices", "targets", "wall_s",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (a MeLU model on a meta-batch of tasks).

    ``support``/``query`` are the padded set sizes for synthetic data; for ``data="ml-100k"`` they are
    fixed by the protocol (support padded to 90, query 10) and the record reports the actual sizes.
    ``width`` is the size of both hidden MLP layers; ``chunk`` the ``chunk_size`` of the meta step
    (None = all tasks in one vmap); ``devices`` > 1 shards the task axis over a device mesh;
    ``dropout`` is MeLU's feature dropout during meta-training (0.1 as in the cold-start experiment;
    0 runs the step without a PRNG key, which also compiles about twice as fast).
    """

    learner: str = "maml"
    data: str = "synthetic"
    meta_batch: int = 32
    support: int = 64
    query: int = 16
    inner_steps: int = 5
    width: int = 64
    embed_dim: int = 32
    remat: bool = False
    chunk: int | None = None
    dtype: str = "float32"
    modes: tuple[str, ...] = ("vmap",)
    devices: int = 1
    dropout: float = 0.1
    section: str = "custom"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""
        if self.learner not in LEARNER_NAMES:
            raise ValueError(f"learner={self.learner!r}; allowed: {', '.join(LEARNER_NAMES)}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data={self.data!r}; allowed: {', '.join(DATA_SOURCES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes={self.modes!r}; allowed: non-empty subset of {', '.join(MODES)}")
        for name, lo in (("meta_batch", 1), ("support", 1), ("query", 1), ("inner_steps", 0),
                         ("width", 1), ("embed_dim", 1), ("devices", 1)):  # fmt: skip
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.chunk is not None and (self.chunk < 1 or self.meta_batch % self.chunk):
            raise ValueError(f"chunk={self.chunk} must be >= 1 and divide meta_batch={self.meta_batch}")
        if self.meta_batch % self.devices:
            raise ValueError(f"meta_batch={self.meta_batch} must be divisible by devices={self.devices}")
        if self.devices > 1 and self.modes != ("vmap",):
            raise ValueError("devices > 1 is only benchmarked for mode 'vmap' (the sharded library step)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.remat and self.learner == "imaml":
            raise ValueError("remat does not apply to imaml (it never back-propagates through the inner loop)")

    def short(self) -> str:
        """Compact label for tables."""
        s = f"{self.learner} {self.data[:5]} T={self.meta_batch} S={self.support} K={self.inner_steps} W={self.width}"
        if self.remat:
            s += " remat"
        if self.chunk:
            s += f" chunk={self.chunk}"
        if self.dtype != "float32":
            s += f" {self.dtype}"
        if self.devices > 1:
            s += f" dev={self.devices}"
        return s


# ----------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------
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


def machine_info() -> dict:
    """CPU model, cores, memory, jax/jaxlib versions, backend and devices."""
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
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc": hostmem.malloc_status(),
    }


def load_average() -> list[float] | None:
    """``os.getloadavg()`` (1, 5, 15 min) or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _timeit(fn: Callable[[], Any], min_time: float, min_reps: int = 3) -> float:
    """Best wall time of ``fn()`` (which must block) over at least ``min_reps`` runs / ``min_time`` s."""
    fn()  # warm-up
    best, total, reps = np.inf, 0.0, 0
    while reps < min_reps or total < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def matmul_peak(dtype: str = "float32", sizes: Sequence[int] = (512, 1024, 2048), min_time: float = 0.5) -> dict:
    """Measured dense matmul peak: the best FLOP/s of a jitted ``[n, n] @ [n, n]`` (2 n^3 FLOPs) over
    ``sizes`` in ``dtype`` (accumulation as XLA does for that dtype). Returns
    ``{"dtype", "flops_per_s", "best_n", "by_n": {n: flops_per_s}}``."""
    dt = DTYPES[dtype]
    by_n = {}
    f = jax.jit(lambda a, b: a @ b)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n), jnp.float32).astype(dt)
        b = jax.random.normal(jax.random.PRNGKey(n + 1), (n, n), jnp.float32).astype(dt)
        t = _timeit(lambda: f(a, b).block_until_ready(), min_time)
        by_n[int(n)] = 2.0 * n**3 / t
    best_n = max(by_n, key=by_n.get)
    return {"dtype": dtype, "flops_per_s": by_n[best_n], "best_n": best_n, "by_n": by_n}


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
    """Reset the process' peak RSS (Linux: write 5 to ``/proc/self/clear_refs``). False if unsupported."""
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
    """``peak_bytes_in_use`` of device 0 where the backend reports memory stats (GPU/TPU), else None."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pragma: no cover
        stats = None
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> dict:
    """XLA's compiled memory analysis: temp / argument / output / alias bytes (None if unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # pragma: no cover
        m = None
    if m is None:
        return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None, "alias_bytes": None}
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def xla_cost(compiled) -> dict:
    """XLA's ``cost_analysis()`` of a compiled program: ``flops``, ``bytes_accessed``,
    ``transcendentals``. Note: XLA counts the body of a while loop (``lax.scan``) ONCE, whatever its
    trip count, so for the meta-step these undercount; see :func:`count_flops`."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pragma: no cover
        ca = None
    if isinstance(ca, (list, tuple)):  # older jax returned one dict per device program
        ca = ca[0] if ca else None
    ca = ca or {}
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
        "transcendentals": float(ca.get("transcendentals", 0.0)),
    }


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "exp", "exp2", "log", "log1p",
    "expm1", "tanh", "logistic", "sin", "cos", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square",
    "select_n", "erf", "erf_inv", "atan2", "floor", "ceil", "round", "clamp", "nextafter", "add_any",
    "reciprocal", "is_finite", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor",
}  # fmt: skip
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and",
               "reduce_or", "cumsum", "cummax", "cumlogsumexp"}  # fmt: skip


def _size(aval) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def _jaxpr_flops(jaxpr) -> tuple[float, float]:
    """(matmul FLOPs, other FLOPs) of a ``core.Jaxpr`` with loop trip counts applied."""
    mm = other = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        outs = eqn.outvars
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = int(np.prod([lhs[d] for d in lc], dtype=np.int64))
            mm += 2.0 * _size(outs[0].aval) * k
            continue
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_feature_dim = dn.rhs_spec[0]
            k = int(np.prod(rhs, dtype=np.int64)) // max(int(rhs[out_feature_dim]), 1)
            mm += 2.0 * _size(outs[0].aval) * k
            continue
        subs = []
        for v in eqn.params.values():
            for j in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    subs.append(j.jaxpr)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    subs.append(j)
        if subs:
            counts = [_jaxpr_flops(s) for s in subs]
            if name == "cond":  # one branch runs: count the most expensive
                m, o = max(counts, key=lambda c: c[0] + c[1])
            else:  # scan body x length; while body/cond once per (unknown) trip; calls once
                m, o = sum(c[0] for c in counts), sum(c[1] for c in counts)
            mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
            mm, other = mm + mult * m, other + mult * o
            continue
        if name in _ELEMENTWISE:
            other += float(sum(_size(o.aval) for o in outs))
        elif name in _REDUCTIONS:
            other += float(sum(_size(i.aval) for i in eqn.invars if hasattr(i, "aval")))
    return mm, other


def count_flops(fn: Callable, *args, **kwargs) -> dict:
    """FLOPs of one call ``fn(*args, **kwargs)`` counted on its jaxpr (traced, not run).

    ``dot_general``/convolutions count exactly (2 x output size x contracted size), element-wise ops
    one FLOP per output element, reductions one per input element (XLA's conventions); ``lax.scan``
    bodies are multiplied by the scan length, ``cond`` counts its most expensive branch, a
    ``while_loop`` body once per call (its trip count is not static). Returns
    ``{"flops", "matmul_flops", "other_flops"}``. Unlike ``compiled.cost_analysis()`` this is the
    work of the algorithm before XLA's simplifications and with loop trip counts applied.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    mm, other = _jaxpr_flops(closed.jaxpr)
    return {"flops": mm + other, "matmul_flops": mm, "other_flops": other}


# ----------------------------------------------------------------------------------------------
# step variants
# ----------------------------------------------------------------------------------------------
def grad_capture() -> optax.GradientTransformation:
    """An "optimizer" whose state after ``update`` is the (averaged, clipped) meta-gradient it was
    given and whose updates are zero: run any meta-step with it and read the meta-gradient from the
    returned optimizer state. Used to check that the step variants compute the same gradient."""

    def init(params):
        return jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree_util.tree_map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


def make_map_step(learner, optimizer, *, clip_norm=None, compute_dtype=None, jit: bool = True) -> Callable:
    """The meta-step with ``jax.lax.map`` over tasks (sequential inside one XLA program) instead of
    ``vmap``; same signature and result as :func:`metarec.meta.step.make_meta_step`."""
    one = mtrain.weighted_task_grad(learner, compute_dtype)

    def step(meta_params, opt_state, tasks, task_weights, key=None):
        n = jax.tree_util.tree_leaves(tasks)[0].shape[0]
        weights = jnp.asarray(task_weights, jnp.float32)
        keys = None if key is None else jax.random.split(key, n)

        def body(xs):
            t, w, k = xs
            return one(meta_params, t, w, k)

        losses, grads = jax.lax.map(body, (tasks, weights, keys))
        grad_sum = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)
        return mtrain.finish_meta_step(meta_params, opt_state, jnp.sum(losses), grad_sum, jnp.sum(weights),
                                optimizer, clip_norm)  # fmt: skip

    return jax.jit(step) if jit else step


class LoopStep:
    """The per-task Python-loop baseline ("typical research code").

    ``prepare(host_batch)`` splits a batched host ``Task`` into per-task device pytrees (done by the
    input pipeline, off the timed path, so the baseline is not charged for it). Calling the object
    with ``(meta_params, opt_state, per_task_list, weights, key)`` runs, for every task, the jitted
    ``adapt + query loss + meta-gradient`` of that one task, pulls its gradient to the host and sums
    there (numpy, float32), then applies :func:`finish_meta_step` (jitted). Per-task keys are
    ``jax.random.split(key, T)[t]`` exactly like the library step, so results match it.
    """

    def __init__(self, learner, optimizer, *, clip_norm=None, compute_dtype=None):
        self.task_fn = jax.jit(mtrain.weighted_task_grad(learner, compute_dtype))
        self.finish = jax.jit(
            lambda mp, st, l, g, w: mtrain.finish_meta_step(mp, st, l, g, w, optimizer, clip_norm)
        )
        self.split = jax.jit(jax.random.split, static_argnums=1)
        self.task_call = self.task_fn  # may be replaced by a pre-compiled executable (see measure)

    @staticmethod
    def prepare(host_batch: Task) -> list[Task]:
        n = host_batch.num_tasks
        return [jax.device_put(index_tasks(host_batch, t)) for t in range(n)]

    def __call__(self, meta_params, opt_state, per_task: list, weights, key=None):
        weights = np.asarray(weights, np.float32)
        keys = [None] * len(per_task) if key is None else list(self.split(key, len(per_task)))
        loss_sum, grad_sum = 0.0, None
        for t, task in enumerate(per_task):
            loss, g = jax.device_get(self.task_call(meta_params, task, weights[t], keys[t]))
            loss_sum += float(loss)
            grad_sum = g if grad_sum is None else jax.tree_util.tree_map(np.add, grad_sum, g)
        return self.finish(meta_params, opt_state, np.float32(loss_sum), grad_sum, np.float32(weights.sum()))


def make_step(learner, optimizer, mode: str, *, chunk_size=None, clip_norm=None, compute_dtype=None, mesh=None):
    """The meta-step in execution ``mode`` (``vmap`` = :func:`metarec.meta.step.make_meta_step`, ``map``
    = :func:`make_map_step`, ``loop`` = :class:`LoopStep`). ``chunk_size``/``mesh`` apply to vmap."""
    if mode == "vmap":
        return mtrain.make_meta_step(learner, optimizer, chunk_size=chunk_size, clip_norm=clip_norm,
                                     compute_dtype=compute_dtype, mesh=mesh)  # fmt: skip
    if mode == "map":
        return make_map_step(learner, optimizer, clip_norm=clip_norm, compute_dtype=compute_dtype)
    if mode == "loop":
        return LoopStep(learner, optimizer, clip_norm=clip_norm, compute_dtype=compute_dtype)
    raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")


# ----------------------------------------------------------------------------------------------
# problems: data, model, learner
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Problem:
    """Everything a configuration needs: the learner, initial meta-parameters, optimizer (and its
    state) and a host-side pool of tasks to sample meta-batches from."""

    cfg: BenchConfig
    learner: Any
    apply_fn: Callable
    meta_params: PyTree
    optimizer: optax.GradientTransformation
    opt_state: PyTree
    pool: Task
    spec: Any


INNER_LR = 0.05  # the cold-start experiment's default inner step size
META_LR = 3e-3
CLIP_NORM = 10.0


def load_ml100k_pool(data_dir: str | None = None, seed: int = 0):
    """Real ml-100k warm-training tasks (protocol "melu", ``seed``) as a host ``Task`` and the
    feature spec, built exactly as the cold-start experiment builds them."""
    from metarec import coldstart
    from metarec import data as mdata

    cfg = coldstart.default_config()
    data = mdata.load_dataset("ml-100k", data_dir=data_dir)
    sd = coldstart.prepare_seed(data, seed, cfg)
    return sd.train, sd.encoder.spec


def synthetic_pool(n_tasks: int, support: int, query: int, seed: int = 0):
    """Synthetic MovieLens-format tasks (:func:`metarec.data.make_synthetic_tasks`) and their spec."""
    from metarec.data import make_synthetic_tasks

    n_items = max(400, 2 * (support + query))
    tasks, spec, _ = make_synthetic_tasks(seed, n_users=n_tasks, n_items=n_items, n_support=support, n_query=query)
    return tasks, spec


def build_learner(cfg: BenchConfig, apply_fn: Callable):
    """The learner of ``cfg`` with the cold-start experiment's conventions (adapt the decision layers;
    Reptile adapts everything since its pseudo-gradient is zero on frozen leaves)."""
    kwargs = dict(inner_steps=cfg.inner_steps, inner_lr=INNER_LR,
                  adapt_mask=melu.adapt_filter("all" if cfg.learner == "reptile" else "decision"))  # fmt: skip
    if cfg.learner == "imaml":
        kwargs.update(lam=1.0, cg_steps=5)
    else:
        kwargs.update(remat=cfg.remat)
    return mmeta.make_learner(cfg.learner, apply_fn, **kwargs)


def build_problem(cfg: BenchConfig, pools: dict | None = None, seed: int = 0, optimizer=None) -> Problem:
    """Model, learner, optimizer and a task pool for ``cfg``. ``pools`` caches task pools between
    configurations (key: data source and set sizes)."""
    cfg.validate()
    pools = {} if pools is None else pools
    if cfg.data == "ml-100k":
        key = ("ml-100k",)
        if key not in pools:
            pools[key] = load_ml100k_pool(seed=seed)
    else:
        n = max(2 * cfg.meta_batch, 64)
        key = ("synthetic", cfg.support, cfg.query)
        if key not in pools or pools[key][0].num_tasks < n:
            pools[key] = synthetic_pool(n, cfg.support, cfg.query, seed)
    pool, spec = pools[key]
    init_fn, apply_fn = melu.make_melu(spec, embed_dim=cfg.embed_dim, hidden=(cfg.width, cfg.width),
                                       feature_dropout=cfg.dropout)  # fmt: skip
    learner = build_learner(cfg, apply_fn)
    meta_params = learner.init(init_fn(jax.random.PRNGKey(seed)))
    optimizer = optimizer or optax.adamw(META_LR, weight_decay=1e-4)
    return Problem(cfg, learner, apply_fn, meta_params, optimizer, optimizer.init(meta_params), pool, spec)


def sample_batches(pool: Task, meta_batch: int, seed: int = 0) -> Iterator[Task]:
    """Endless seeded meta-batches from a host task pool (epochs of permutations; sampling with
    replacement when the pool is smaller than the meta-batch)."""
    rng = np.random.default_rng(seed)
    n = pool.num_tasks
    while True:
        if meta_batch > n:
            yield index_tasks(pool, rng.integers(0, n, meta_batch))
            continue
        order = rng.permutation(n)
        for start in range(0, n - meta_batch + 1, meta_batch):
            yield index_tasks(pool, order[start : start + meta_batch])


class Prefetcher:
    """Background input pipeline: a thread pulls host batches from ``source``, applies ``prepare``
    (device transfer / sharding / per-task split) and keeps up to ``depth`` ready batches in a queue.
    ``next()`` returns the next prepared batch and accumulates the time the caller waited in
    ``wait_s`` — the input-pipeline stall the benchmark reports."""

    def __init__(self, source: Iterator, prepare: Callable, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._prepare = prepare
        self._source = source
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for item in self._source:
                item = self._prepare(item)
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # surface errors in the consumer
            self.q.put(e)

    def next(self):
        t0 = time.perf_counter()
        item = self.q.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def _minor_faults() -> int:
    """Minor page faults of this process so far (fresh temp buffers touched for the first time)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except Exception:  # pragma: no cover
        return 0


def _block(tree):
    return jax.block_until_ready(tree)


# ----------------------------------------------------------------------------------------------
# one measurement
# ----------------------------------------------------------------------------------------------
def measure(
    problem: Problem,
    mode: str,
    *,
    min_time: float = 1.0,
    min_steps: int = 3,
    max_steps: int = 10_000,
    peak: dict | None = None,
    seed: int = 0,
    section: str | None = None,
    keep: dict | None = None,
) -> dict:
    """Compile and time one configuration in one mode; returns a record with :data:`RECORD_KEYS`.

    Steady state: after compilation and one warm-up step, steps run back to back (asynchronous
    dispatch, parameters threaded from step to step) until ``min_time`` seconds and ``min_steps``
    steps have passed; the clock stops after ``block_until_ready`` on the final state. Input batches
    come from a :class:`Prefetcher`; the time spent waiting for it is reported separately.
    ``peak`` (from :func:`matmul_peak` in the compute dtype) gives the ``peak_fraction``. If
    ``keep`` is a dict, the compiled vmap executable and its arguments are stored in it (for
    :func:`profile_ops`).
    """
    cfg = problem.cfg
    compute_dtype = None if cfg.dtype == "float32" else DTYPES[cfg.dtype]
    mesh = mtrain.make_mesh(cfg.devices) if cfg.devices > 1 else None
    step = make_step(problem.learner, problem.optimizer, mode, chunk_size=cfg.chunk, clip_norm=CLIP_NORM,
                     compute_dtype=compute_dtype, mesh=mesh)  # fmt: skip
    T = cfg.meta_batch
    weights = jnp.ones((T,), jnp.float32)
    mp, st = problem.meta_params, problem.opt_state
    if mesh is not None:
        weights = mtrain.shard_tasks(weights, mesh)
        mp, st = mtrain.replicate(mp, mesh), mtrain.replicate(st, mesh)
        prepare = lambda b: mtrain.shard_tasks(b, mesh)  # noqa: E731
    elif mode == "loop":
        prepare = LoopStep.prepare
    else:
        prepare = jax.device_put
    source = sample_batches(problem.pool, T, seed)
    first = next(source)
    support, query = int(first.support.size), int(first.query.size)
    key = jax.random.PRNGKey(seed + 1) if cfg.dropout > 0 else None

    reset_peak_rss()
    # ---- compile (and FLOPs / memory of the compiled program)
    if mode == "loop":
        one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), first)
        t0 = time.perf_counter()
        lowered = step.task_fn.lower(mp, one, np.float32(1.0), key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        step.task_call = compiled
        batch0 = prepare(first)
        _block(step(mp, st, batch0, weights, key))  # compiles finish() and split too
        t3 = time.perf_counter()
        lower_s, compile_s = t1 - t0, (t2 - t1) + (t3 - t2)
        mem = compiled_memory(compiled)  # per-task program (the loop runs it T times)
        run = step
    else:
        batch0 = prepare(first)
        t0 = time.perf_counter()
        lowered = step.lower(mp, st, batch0, weights, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        lower_s, compile_s = t1 - t0, t2 - t1
        mem = compiled_memory(compiled)
        run = compiled
    cost = xla_cost(compiled)
    plain = make_step(problem.learner, problem.optimizer, "vmap", chunk_size=cfg.chunk, clip_norm=CLIP_NORM,
                      compute_dtype=compute_dtype)  # fmt: skip
    host0 = jax.tree_util.tree_map(jnp.asarray, first)
    fl = count_flops(plain, problem.meta_params, problem.opt_state, host0, jnp.ones((T,), jnp.float32), key)

    # ---- steady state
    state = _block(run(mp, st, batch0, weights, key))  # warm-up
    mp_, st_ = state[0], state[1]
    if keep is not None and mode == "vmap":
        keep["compiled"], keep["args"] = compiled, (mp, st, batch0, weights, key)
    pre = Prefetcher(source, prepare)
    try:
        pre.next()  # let the pipeline fill before the clock starts
        pre.wait_s = 0.0
        faults0, cpu0 = _minor_faults(), os.times()
        n, t_start = 0, time.perf_counter()
        while True:
            batch = pre.next()
            sub = None
            if key is not None:
                key, sub = jax.random.split(key)
            mp_, st_, metrics = run(mp_, st_, batch, weights, sub)
            n += 1
            if n >= max_steps:
                break
            if n >= min_steps and time.perf_counter() - t_start >= min_time:
                break
        metrics = _block(metrics)
        _block(mp_)
        seconds = time.perf_counter() - t_start
        faults, cpu1 = _minor_faults() - faults0, os.times()
        wait = pre.wait_s
    finally:
        pre.close()
    steps_per_s = n / seconds
    flops = fl["flops"]
    achieved = flops * steps_per_s
    return {
        "section": section or cfg.section,
        "config": dataclasses.asdict(cfg) | {"modes": list(cfg.modes)},
        "label": cfg.short(),
        "mode": mode,
        "n_tasks": T,
        "support": support,
        "query": query,
        "n_steps": n,
        "seconds": seconds,
        "steps_per_s": steps_per_s,
        "tasks_per_s": steps_per_s * T,
        "step_ms": 1e3 / steps_per_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "flops_per_step": flops,
        "matmul_flops_per_step": fl["matmul_flops"],
        "xla_flops": cost["flops"],
        "xla_bytes_accessed": cost["bytes_accessed"],
        "achieved_flops_per_s": achieved,
        "peak_fraction": achieved / peak["flops_per_s"] if peak else None,
        "temp_bytes": mem["temp_bytes"],
        "argument_bytes": mem["argument_bytes"],
        "output_bytes": mem["output_bytes"],
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": device_peak_bytes(),
        "input_wait_s_per_step": wait / n,
        "input_wait_fraction": wait / seconds,
        "minor_faults_per_step": faults / n,
        # process CPU time (all threads, the prefetch thread included): user = compute, sys = kernel,
        # mostly zeroing fresh pages of temporaries (see metarec.hostmem)
        "user_cpu_ms_per_step": 1e3 * (cpu1.user - cpu0.user) / n,
        "sys_cpu_ms_per_step": 1e3 * (cpu1.system - cpu0.system) / n,
        "final_loss": float(metrics["loss"]),
        "finite": bool(metrics["finite"]),
    }


def compiled_temp_bytes(problem: Problem, chunk: int | None = None) -> dict:
    """Compiled memory analysis of the vmapped step of ``problem`` without running it (cheap and
    deterministic): used for memory-vs-inner-steps with and without remat."""
    cfg = problem.cfg
    step = make_step(problem.learner, problem.optimizer, "vmap", chunk_size=chunk or cfg.chunk, clip_norm=CLIP_NORM,
                     compute_dtype=None if cfg.dtype == "float32" else DTYPES[cfg.dtype])  # fmt: skip
    batch = jax.tree_util.tree_map(jnp.asarray, next(sample_batches(problem.pool, cfg.meta_batch)))
    t0 = time.perf_counter()
    compiled = step.lower(problem.meta_params, problem.opt_state, batch, jnp.ones((cfg.meta_batch,)),
                          jax.random.PRNGKey(0) if cfg.dropout > 0 else None).compile()  # fmt: skip
    return compiled_memory(compiled) | {"compile_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# profile: where the time goes
# ----------------------------------------------------------------------------------------------
_CONTAINERS = re.compile(r"^(while|conditional|call|ThunkExecutor|Thunk|PjitFunction|\$)")


def _hlo_categories(hlo_text: str) -> dict[str, str]:
    """Map instruction name -> category from optimized HLO text: ``matmul`` (dot / convolution, or a
    fusion whose computation contains one), ``data`` (copy, transpose, gather, scatter, slices,
    concatenate, pad, broadcast, reshape...), ``loop`` (while / conditional / call), ``elementwise``
    (every other fusion or op)."""
    comps: dict[str, set] = {}
    cur = None
    inst: dict[str, tuple[str, list[str]]] = {}
    head = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
    line_re = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("{")[0].split("(")[0]:
            m = head.match(line)
            if m:
                cur = m.group(1)
                comps.setdefault(cur, set())
            continue
        m = line_re.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
        if cur is not None:
            comps[cur].add(op)
        inst[name] = (op, calls)

    def has_dot(comp, seen=()):
        ops = comps.get(comp, set())
        return bool(ops & {"dot", "convolution"})

    out = {}
    data_ops = {"copy", "transpose", "gather", "scatter", "slice", "dynamic-slice", "dynamic-update-slice",
                "concatenate", "pad", "broadcast", "reshape", "bitcast", "iota", "copy-start", "copy-done"}  # fmt: skip
    for name, (op, calls) in inst.items():
        if op in ("dot", "convolution") or (op in ("fusion", "custom-call") and any(has_dot(c) for c in calls)):
            out[name] = "matmul"
        elif op in ("while", "conditional", "call"):
            out[name] = "loop"
        elif op in data_ops or (op == "fusion" and calls and all(comps.get(c, set()) <= data_ops | {"parameter", "tuple", "get-tuple-element", "constant"} for c in calls)):
            out[name] = "data"
        else:
            out[name] = "elementwise"
    return out


def profile_ops(compiled, args: tuple, n_runs: int = 3, top: int = 12) -> dict:
    """Trace ``n_runs`` executions of a compiled step with ``jax.profiler`` and aggregate the XLA
    thunk events by HLO instruction (summed over XLA threads).

    Returns ``{"wall_s", "op_s": total op time, "by_category": {matmul|elementwise|data|other: s},
    "fractions": {...}, "top_ops": [[name, category, seconds], ...], "n_events"}``. Container events
    (while loops, executor wrappers) are excluded so nested ops are not counted twice. Where the
    trace cannot be read (no ``jax.profiler.ProfileData``) returns ``{"error": ...}``.
    """
    try:
        from jax.profiler import ProfileData
    except ImportError as e:  # pragma: no cover
        return {"error": f"jax.profiler.ProfileData unavailable: {e}"}
    cats = _hlo_categories(compiled.as_text())
    _block(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(n_runs):
                out = compiled(*args)
            _block(out)
        wall = time.perf_counter() - t0
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"error": "the profiler wrote no trace"}
        pdata = ProfileData.from_file(files[0])
        per_op: collections.Counter = collections.Counter()
        n_events = 0
        for plane in pdata.planes:
            for line in plane.lines:
                if line.name == "python" or "python" in line.name.lower():
                    continue
                for ev in line.events:
                    name = ev.name
                    if _CONTAINERS.match(name) or " " in name:
                        continue
                    per_op[name] += ev.duration_ns * 1e-9
                    n_events += 1
    by_cat: collections.Counter = collections.Counter()
    for name, s in per_op.items():
        base = name.split(":")[0]
        by_cat[cats.get(base, "other")] += s
    total = sum(by_cat.values())
    return {
        "wall_s": wall / n_runs,
        "op_s": total / n_runs,
        "by_category": {k: v / n_runs for k, v in by_cat.items()},
        "fractions": {k: v / total for k, v in by_cat.items()} if total else {},
        "top_ops": [[k, cats.get(k.split(":")[0], "other"), v / n_runs] for k, v in per_op.most_common(top)],
        "n_events": n_events,
    }


def profile_problem(problem: Problem, n_runs: int = 3) -> dict:
    """:func:`profile_ops` of the vmapped step of ``problem`` on one meta-batch, plus its FLOPs."""
    cfg = problem.cfg
    compute_dtype = None if cfg.dtype == "float32" else DTYPES[cfg.dtype]
    step = make_step(problem.learner, problem.optimizer, "vmap", chunk_size=cfg.chunk, clip_norm=CLIP_NORM,
                     compute_dtype=compute_dtype)  # fmt: skip
    batch = jax.tree_util.tree_map(jnp.asarray, next(sample_batches(problem.pool, cfg.meta_batch)))
    key = jax.random.PRNGKey(0) if cfg.dropout > 0 else None
    args = (problem.meta_params, problem.opt_state, batch, jnp.ones((cfg.meta_batch,)), key)
    compiled = step.lower(*args).compile()
    out = profile_ops(compiled, args, n_runs=n_runs)
    out["label"] = cfg.short()
    out["flops_per_step"] = count_flops(step, *args)["flops"]
    return out


# ----------------------------------------------------------------------------------------------
# presets, the whole run, the report
# ----------------------------------------------------------------------------------------------
HEADLINE = dict(data="synthetic", meta_batch=32, support=64, query=16, inner_steps=5, width=64, embed_dim=32)
SECTIONS = ("headline", "data", "meta_batch", "inner_steps", "support", "width", "chunk", "dtype")


@dataclasses.dataclass
class Settings:
    """How long to time each measurement, which matmul sizes to try, what to profile."""

    min_time: float = 1.0
    min_steps: int = 3
    matmul_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    matmul_min_time: float = 0.5
    memory_steps: tuple[int, ...] = (1, 5, 10, 20)
    memory_config: dict = dataclasses.field(default_factory=lambda: dict(meta_batch=32, support=64, query=16, width=64))
    profile: bool = True
    seed: int = 0


def make_grid(preset: str = "default", learners: Sequence[str] = LEARNER_NAMES, sections: Sequence[str] = SECTIONS,
              devices: int = 1, custom: dict | None = None) -> tuple[list[BenchConfig], Settings]:
    """The configurations of a preset (``quick`` ~1-2 min or ``default`` ~10 min on 2 CPU cores) and
    its :class:`Settings`.

    Sections: ``headline`` (every learner in ``learners`` at the headline configuration — MeLU,
    meta-batch 32, support 64, query 16, 5 inner steps — in all three modes), ``data`` (real ml-100k
    task batches), ``meta_batch`` (1..1024), ``inner_steps`` (timed with/without remat at 20 steps),
    ``support``, ``width`` (including the large configuration used for the peak-fraction target),
    ``chunk`` (task chunking at meta-batch 256), ``dtype`` (bfloat16 compute). The quick preset keeps
    only the headline MAML comparison. ``devices`` > 1 adds a ``devices`` section (sharded vmap
    step). ``custom`` (a dict of lists: ``meta_batch``, ``support``, ``inner_steps``, ``width``, and
    scalars ``data``, ``modes``) adds the Cartesian product for every learner as section ``custom``.
    """
    if preset not in ("quick", "default"):
        raise ValueError(f"preset={preset!r}; allowed: quick, default")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown sections {bad}; allowed: {', '.join(SECTIONS)}")
    bad = [l for l in learners if l not in LEARNER_NAMES]
    if bad or not learners:
        raise ValueError(f"unknown learners {bad}; allowed: {', '.join(LEARNER_NAMES)}")
    B = lambda section, **kw: BenchConfig(**(HEADLINE | kw), section=section)  # noqa: E731
    three = ("vmap", "map", "loop")
    grid: list[BenchConfig] = []
    if preset == "quick":
        settings = Settings(min_time=0.4, min_steps=2, matmul_sizes=(256, 512, 1024), matmul_min_time=0.2,
                            memory_steps=(1, 4), memory_config=dict(meta_batch=8, support=32, query=8, width=64))  # fmt: skip
        if "headline" in sections:
            grid.append(B("headline", learner="maml", modes=three))
    else:
        settings = Settings()
        if "headline" in sections:
            grid += [B("headline", learner=l, modes=three) for l in learners]
        if "data" in sections:
            grid.append(B("data", learner="maml", data="ml-100k", modes=three))
        if "meta_batch" in sections:
            grid += [B("meta_batch", learner="maml", meta_batch=t, modes=("vmap", "map") if t <= 128 else ("vmap",))
                     for t in (1, 8, 128, 512, 1024)]  # fmt: skip
        if "inner_steps" in sections:
            grid += [B("inner_steps", learner="maml", inner_steps=20, remat=r) for r in (False, True)]
        if "support" in sections:
            grid += [B("support", learner="maml", support=s) for s in (16, 256)]
        if "width" in sections:
            grid += [B("width", learner="maml", width=256),
                     B("large", learner="maml", meta_batch=16, support=128, width=512, embed_dim=64)]
        if "chunk" in sections:
            grid += [B("chunk", learner="maml", meta_batch=256, chunk=c) for c in (None, 64, 16)]
            grid += [B("chunk", learner="maml", chunk=c) for c in (8, 4)]  # headline T=32 in cache-sized chunks
        if "dtype" in sections:
            grid += [B("dtype", learner="maml", dtype="bfloat16"),
                     B("dtype", learner="maml", meta_batch=16, support=128, width=512, embed_dim=64, dtype="bfloat16")]
    if devices > 1:
        grid += [B("devices", learner="maml", devices=d) for d in (1, devices)]
    if custom:
        lists = {k: list(custom.get(k) or [HEADLINE[k]]) for k in ("meta_batch", "support", "inner_steps", "width")}
        modes = tuple(custom.get("modes") or ("vmap",))
        data = custom.get("data") or "synthetic"
        for l in learners:
            for t in lists["meta_batch"]:
                for s in lists["support"]:
                    for k in lists["inner_steps"]:
                        for w in lists["width"]:
                            grid.append(B("custom", learner=l, data=data, meta_batch=t, support=s, inner_steps=k,
                                          width=w, modes=modes))  # fmt: skip
    for c in grid:
        c.validate()
    return grid, settings


def _ratio(a, b):
    return None if not a or not b else a / b


def memory_vs_inner_steps(settings: Settings, pools: dict, log_fn: Callable = print) -> list[dict]:
    """Compiled temp bytes of the vmapped second-order MAML step for each inner-step count in
    ``settings.memory_steps``, with and without remat (compile only; no dropout key)."""
    out = []
    for k in settings.memory_steps:
        for remat in (False, True):
            cfg = BenchConfig(**(HEADLINE | settings.memory_config | dict(inner_steps=k)), learner="maml",
                              remat=remat, dropout=0.0, section="memory")  # fmt: skip
            reset_peak_rss()
            m = compiled_temp_bytes(build_problem(cfg, pools, settings.seed))
            row = {"inner_steps": k, "remat": remat, "meta_batch": cfg.meta_batch, "support": cfg.support,
                   "width": cfg.width, "temp_bytes": m["temp_bytes"], "compile_s": m["compile_s"],
                   "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
            log_fn(f"  memory K={k:3d} remat={remat!s:5s}: temp {m['temp_bytes'] / 2**20:9.2f} MiB "
                   f"(compile {m['compile_s']:.1f}s)")  # fmt: skip
            out.append(row)
    return out


def run_benchmark(grid: Sequence[BenchConfig], settings: Settings, *, log_fn: Callable = print,
                  command: str = "", preset: str = "custom") -> dict:
    """Run every configuration of ``grid`` in each of its modes plus the matmul peak, memory vs
    inner steps, profiles and the device check; return the ``benchmark.json`` dict (:data:`TOP_KEYS`)."""
    t_start = time.perf_counter()
    load_before = load_average()
    log_fn(f"command: {command}")
    info = machine_info()
    log_fn(f"machine: {info['cpu_model']} x{info['cpu_count']} cores, jax {info['jax']}, backend "
           f"{info['backend']}, {len(info['devices'])} device(s), load average {load_before}; "
           f"allocator: {_malloc_line(info['malloc'])}")  # fmt: skip
    dtypes = sorted({c.dtype for c in grid} | {"float32"})
    peaks = {}
    for dt in dtypes:
        peaks[dt] = matmul_peak(dt, settings.matmul_sizes, settings.matmul_min_time)
        log_fn(f"matmul peak {dt}: {peaks[dt]['flops_per_s'] / 1e9:.1f} GFLOP/s (n={peaks[dt]['best_n']})")
    bw = memory_bandwidth(min_time=settings.matmul_min_time)
    log_fn(f"memory bandwidth: {bw['bytes_per_s'] / 1e9:.2f} GB/s")
    pools: dict = {}
    records, comparisons, profiles = [], [], {}
    for cfg in grid:
        problem = build_problem(cfg, pools, settings.seed)
        by_mode = {}
        for mode in cfg.modes:
            keep: dict = {}
            r = measure(problem, mode, min_time=settings.min_time, min_steps=settings.min_steps,
                        peak=peaks[cfg.dtype], seed=settings.seed, keep=keep)  # fmt: skip
            records.append(r)
            by_mode[mode] = r
            log_fn(f"  {cfg.section:11s} {cfg.short():46s} {mode:4s} {r['steps_per_s']:9.2f} steps/s "
                   f"{r['tasks_per_s']:10.1f} tasks/s  compile {r['compile_s']:6.1f}s  "
                   f"{r['achieved_flops_per_s'] / 1e9:7.2f} GFLOP/s ({100 * (r['peak_fraction'] or 0):5.1f}% peak)  "
                   f"wait {100 * r['input_wait_fraction']:4.1f}%  faults/step {r['minor_faults_per_step']:.0f}")  # fmt: skip
            if settings.profile and mode == "vmap" and keep and (
                (cfg.section == "headline" and cfg.learner == "maml") or cfg.section == "large"
            ):
                prof = profile_ops(keep["compiled"], keep["args"])
                prof["label"], prof["steps_per_s"] = cfg.short(), r["steps_per_s"]
                profiles[cfg.short()] = prof
        if len(by_mode) > 1:
            v = by_mode.get("vmap", {}).get("steps_per_s")
            comparisons.append({
                "section": cfg.section, "label": cfg.short(), "config": dataclasses.asdict(cfg) | {"modes": list(cfg.modes)},
                "steps_per_s": {m: r["steps_per_s"] for m, r in by_mode.items()},
                "vmap_over_loop": _ratio(v, by_mode.get("loop", {}).get("steps_per_s")),
                "vmap_over_map": _ratio(v, by_mode.get("map", {}).get("steps_per_s")),
                "map_over_loop": _ratio(by_mode.get("map", {}).get("steps_per_s"), by_mode.get("loop", {}).get("steps_per_s")),
            })  # fmt: skip
    log_fn("memory vs inner steps (vmapped second-order MAML, compiled temp bytes):")
    mem = memory_vs_inner_steps(settings, pools, log_fn) if settings.memory_steps else []
    devices = device_check(grid, pools, settings) if any(c.devices > 1 for c in grid) else None
    result = {
        "command": command,
        "preset": preset,
        "machine": info,
        "settings": dataclasses.asdict(settings),
        "load_average": {"before": load_before, "after": load_average()},
        "matmul_peak": peaks,
        "memory_bandwidth": bw,
        "records": records,
        "comparisons": comparisons,
        "memory_vs_inner_steps": mem,
        "profiles": profiles,
        "devices": devices,
        "targets": {},
        "wall_s": 0.0,
    }
    result["targets"] = check_targets(result)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def device_check(grid: Sequence[BenchConfig], pools: dict, settings: Settings) -> dict:
    """Correctness of the sharded step: the meta-gradient with the task axis sharded over N devices
    (:func:`grad_capture`) equals the single-device one; plus the measured steps/s of both."""
    n = max(c.devices for c in grid)
    cfg = BenchConfig(**HEADLINE, learner="maml", dropout=0.0, section="devices")
    problem = build_problem(cfg, pools, settings.seed, optimizer=grad_capture())
    batch = next(sample_batches(problem.pool, cfg.meta_batch, settings.seed))
    w = jnp.ones((cfg.meta_batch,), jnp.float32)
    single = make_step(problem.learner, problem.optimizer, "vmap", clip_norm=CLIP_NORM)
    g1 = single(problem.meta_params, problem.opt_state, jax.device_put(batch), w)[1]
    mesh = mtrain.make_mesh(n)
    sharded = make_step(problem.learner, problem.optimizer, "vmap", clip_norm=CLIP_NORM, mesh=mesh)
    gn = sharded(mtrain.replicate(problem.meta_params, mesh), mtrain.replicate(problem.opt_state, mesh),
                 mtrain.shard_tasks(batch, mesh), mtrain.shard_tasks(w, mesh))[1]  # fmt: skip
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(gn)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(g1))
    return {"n_devices": n, "device_count": jax.device_count(), "max_abs_grad_diff": diff, "max_abs_grad": scale,
            "grads_match": bool(diff <= 1e-5 * max(scale, 1.0))}  # fmt: skip


TARGETS = {
    "vmap_over_loop_maml_mb32": 10.0,  # vmapped 2nd-order MAML at the headline config vs the per-task loop
    "large_config_peak_fraction": 0.25,  # best fraction of the matmul peak at a large configuration
}


def check_targets(result: dict) -> dict:
    """Evaluate :data:`TARGETS` on a result dict: ``{name: {"value", "target", "met", "where", ...}}``
    (value None when the run did not include the needed configuration).

    ``vmap_over_loop_maml_mb32`` also gets ``bound``: the largest vmap/loop ratio this machine can
    give at all — the loop's measured step time over the time the step's FLOPs take at 100% of the
    measured matmul peak. When ``bound < target`` the target is out of reach for any implementation
    of the step on this machine (the per-task loop is compute-bound, not dispatch-bound); ``best``
    and ``best_mode`` report the fastest library execution (vmap, chunked vmap or ``lax.map``) of the
    same step over the loop."""
    out = {}
    name = "vmap_over_loop_maml_mb32"
    head = [c for c in result["comparisons"] if c["section"] == "headline" and c["config"]["learner"] == "maml"]
    v = head[0]["vmap_over_loop"] if head else None
    out[name] = {"value": v, "target": TARGETS[name], "met": None if v is None else bool(v >= TARGETS[name]),
                 "where": head[0]["label"] if head else None, "bound": None, "best": None, "best_mode": None}
    if head:
        label = head[0]["label"]
        recs = [r for r in result["records"] if r["label"] == label and r["section"] == "headline"]
        loop = next((r for r in recs if r["mode"] == "loop"), None)
        peak = (result.get("matmul_peak") or {}).get(head[0]["config"]["dtype"], {}).get("flops_per_s")
        if loop and peak and loop["flops_per_step"]:
            out[name]["bound"] = loop["step_ms"] / 1e3 * peak / loop["flops_per_step"]
            # the same step in the library's other executions: lax.map here, chunked vmap in "chunk"
            same = [r for r in result["records"] if r["mode"] != "loop" and r["config"]["learner"] == "maml"
                    and all(r["config"][k] == head[0]["config"][k] for k in
                            ("data", "meta_batch", "support", "query", "inner_steps", "width", "embed_dim",
                             "dtype", "remat", "dropout", "devices"))]  # fmt: skip
            if same:
                best = max(same, key=lambda r: r["steps_per_s"])
                out[name]["best"] = best["steps_per_s"] / loop["steps_per_s"]
                out[name]["best_mode"] = f"{best['label']} {best['mode']}"
    name = "large_config_peak_fraction"
    large = [r for r in result["records"] if r["section"] in ("large", "width", "dtype") and r["peak_fraction"] is not None]
    best = max(large, key=lambda r: r["peak_fraction"]) if large else None
    v = best["peak_fraction"] if best else None
    out[name] = {"value": v, "target": TARGETS[name], "met": None if v is None else bool(v >= TARGETS[name]),
                 "where": f"{best['label']} {best['mode']}" if best else None}  # fmt: skip
    return out


def _malloc_line(m: dict | None) -> str:
    if not m:
        return "unknown"
    if not m["glibc"]:
        return "not glibc (settings do not apply)"
    env = " ".join(f"{k}={v}" for k, v in m["env"].items() if v is not None) or "glibc defaults"
    return ("tuned: " if m["tuned"] else "") + env


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_report(result: dict) -> str:
    """The benchmark as plain-text tables (records, mode ratios, memory vs inner steps, profiles,
    targets)."""
    m = result["machine"]
    lines = [f"command: {result['command']}",
             f"machine: {m['cpu_model']} ({m['cpu_count']} cores), jax {m['jax']} / jaxlib {m['jaxlib']}, "
             f"backend {m['backend']}, devices {len(m['devices'])}; load average before {result['load_average']['before']}"
             f" after {result['load_average']['after']}",
             f"allocator: {_malloc_line(m.get('malloc'))}"]  # fmt: skip
    for dt, p in result["matmul_peak"].items():
        lines.append(f"measured matmul peak ({dt}): {p['flops_per_s'] / 1e9:.1f} GFLOP/s at n={p['best_n']}")
    lines.append(f"measured memory bandwidth: {result['memory_bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s")
    hdr = (f"{'section':11s} {'configuration':46s} {'mode':4s} {'steps/s':>9s} {'tasks/s':>10s} {'compile s':>9s} "
           f"{'GFLOP/step':>10s} {'GFLOP/s':>8s} {'%peak':>6s} {'temp MiB':>9s} {'RSS MiB':>8s} {'wait %':>6s} {'faults':>7s} {'sys ms':>6s}")  # fmt: skip
    lines += ["", hdr, "-" * len(hdr)]
    for r in result["records"]:
        lines.append(
            f"{r['section']:11s} {r['label']:46s} {r['mode']:4s} {r['steps_per_s']:9.2f} {r['tasks_per_s']:10.1f} "
            f"{r['compile_s']:9.1f} {r['flops_per_step'] / 1e9:10.3f} {r['achieved_flops_per_s'] / 1e9:8.2f} "
            f"{100 * (r['peak_fraction'] or 0):6.1f} {_mib(r['temp_bytes']):>9s} {_mib(r['peak_rss_bytes']):>8s} "
            f"{100 * r['input_wait_fraction']:6.2f} {r['minor_faults_per_step']:7.0f} "
            f"{r.get('sys_cpu_ms_per_step', float('nan')):6.1f}"
        )
    if result["comparisons"]:
        lines += ["", "same meta-step, three executions (ratios of steps/s, measured in this run):"]
        for c in result["comparisons"]:
            f = lambda x: "-" if x is None else f"{x:.1f}x"  # noqa: E731
            lines.append(f"  {c['label']:46s} vmap/loop {f(c['vmap_over_loop']):>8s}  vmap/map {f(c['vmap_over_map']):>8s}"
                         f"  map/loop {f(c['map_over_loop']):>8s}")  # fmt: skip
    if result["memory_vs_inner_steps"]:
        lines += ["", "memory vs inner steps (vmapped 2nd-order MAML, XLA compiled temp MiB):"]
        rows = collections.defaultdict(dict)
        for e in result["memory_vs_inner_steps"]:
            rows[e["inner_steps"]][e["remat"]] = e["temp_bytes"]
        lines.append(f"  {'K':>4s} {'no remat':>10s} {'remat':>10s}")
        for k, d in sorted(rows.items()):
            lines.append(f"  {k:4d} {_mib(d.get(False)):>10s} {_mib(d.get(True)):>10s}")
    for label, p in result["profiles"].items():
        if "error" in p:
            lines.append(f"profile {label}: {p['error']}")
            continue
        fr = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(p["fractions"].items(), key=lambda kv: -kv[1]) if v > 0)
        lines += ["", f"profile {label}: wall {1e3 * p['wall_s']:.1f} ms/step, XLA op time (summed over threads) "
                      f"{1e3 * p['op_s']:.1f} ms/step: {fr}"]  # fmt: skip
        for name, cat, s in p["top_ops"][:6]:
            lines.append(f"    {name:40s} {cat:12s} {1e3 * s:8.3f} ms")
    if result["devices"]:
        d = result["devices"]
        lines += ["", f"devices: {d['n_devices']} (of {d['device_count']}); sharded vs single-device meta-gradient "
                      f"max |diff| {d['max_abs_grad_diff']:.2e} (max |g| {d['max_abs_grad']:.2e}) -> "
                      f"{'match' if d['grads_match'] else 'MISMATCH'}"]  # fmt: skip
    lines += ["", "targets:"]
    for name, t in result["targets"].items():
        v = "not measured" if t["value"] is None else f"{t['value']:.3g}"
        met = {True: "MET", False: "NOT MET", None: "-"}[t["met"]]
        lines.append(f"  {name:28s} {v:>12s} (target >= {t['target']})  {met}  [{t['where']}]")
        if t.get("bound") is not None:
            lines.append(f"  {'':28s} attainable on this machine at 100% of the matmul peak: {t['bound']:.2g}x"
                         + ("  -> out of reach for any implementation here" if t["bound"] < t["target"] else ""))
        if t.get("best") is not None:
            lines.append(f"  {'':28s} fastest library execution of the step vs the loop: {t['best']:.2f}x"
                         f" [{t['best_mode']}]")
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)
