"""One size of the scale benchmark: generate synthetic ratings, encode them into task shards,
stream them, and time a real MAML meta-step on the streamed meta-batches; peak RSS per phase.

Peak RSS is the kernel's high-water mark (``VmHWM``), reset before every phase by writing ``5`` to
``/proc/self/clear_refs`` (Linux), so each phase reports its own peak (memory-mapped shard pages
the loader touched included); where the reset is refused the figure is the process's peak so far
(``ru_maxrss``) and ``rss_reset`` says so.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks.meta_step.machine import reset_peak_rss
from benchmarks.meta_step.problems import melu_learner
from metarec.data import shards as mshards
from metarec.data import stream as mstream
from metarec.data import synthetic_scale as ss
from metarec.meta.step import make_meta_step
from metarec.models import melu

MB = 1 << 20


def peak_rss_mb() -> float:
    """``VmHWM`` in MiB (falls back to ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(fn: Callable[[], object]) -> tuple[object, dict]:
    """Run ``fn``; its result and ``{"seconds", "peak_rss_mb", "rss_reset"}``."""
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    return out, {
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_reset": reset,
    }


def disk_mb(directory: str) -> float:
    n = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)
    return round(n / MB, 1)


def build_step(spec, s, rows_per_task: int):
    """MeLU with its decision layers adapted by ``s.learner`` (the cold-start experiment's rule),
    AdamW, the jitted vmapped meta-step; returns ``(step, params, opt_state, gathered)``. With
    ``s.sparse_tables`` the embedding tables with more rows than a task reads
    (``rows_per_task``) are row-gathered per task, as ``--config.sparse_tables`` does in
    ``meta_train``; ``gathered`` names them."""
    init_fn, _, learner = melu_learner(
        spec, s.learner, inner_steps=s.inner_steps, width=s.width, embed_dim=s.embed_dim
    )
    opt = optax.adamw(3e-3, weight_decay=1e-4)
    params = learner.init(init_fn(jax.random.PRNGKey(s.seed)))
    tables = melu.lookup_tables(spec, min_vocab=rows_per_task + 1) if s.sparse_tables else ()
    step = make_meta_step(learner, opt, clip_norm=10.0, sparse_tables=tables or None)
    return step, params, opt.init(params), [t.path for t in tables]


def stream_phase(sh, features, s) -> dict:
    """The loader alone: ``s.stream_batches`` meta-batches read and encoded (no step)."""
    n = 0
    start = mstream.LoaderState(s.seed)
    with mstream.MetaBatchStream(
        sh, features.encode, meta_batch=s.meta_batch, start=start, buffer=s.buffer
    ) as st:
        for _ in range(min(s.stream_batches, st.n_batches)):
            next(st)
            n += 1
        held = st.peak_held_tasks
    return {"batches": n, "peak_held_tasks": held}


def train_phase(sh, features, s, full_epoch: bool) -> dict:
    """Stream meta-batches through the meta-step: the first step (compilation) apart, then the
    rest of a whole epoch (``full_epoch``) or ``s.steps`` steps; time per step (input wait
    included) and per epoch, ``n_batches x`` the mean step (compile seconds are reported apart,
    ``first_step_s``)."""
    step, params, opt_state, gathered = build_step(
        features.spec, s, 1 + sh.support_width + sh.query_width
    )
    weights = jnp.ones(s.meta_batch)
    start = mstream.LoaderState(s.seed)
    with mstream.MetaBatchStream(
        sh, features.encode, meta_batch=s.meta_batch, start=start, buffer=s.buffer
    ) as st:
        n_batches = st.n_batches
        n_timed = n_batches - 1 if full_epoch else min(s.steps, n_batches - 1)
        key = jax.random.PRNGKey(s.seed)
        times, waits = [], 0.0
        for i in range(n_timed + 1):
            t0 = time.perf_counter()
            batch, _ = next(st)
            t1 = time.perf_counter()
            batch = jax.tree_util.tree_map(jnp.asarray, batch)
            key, sub = jax.random.split(key)
            params, opt_state, m = step(params, opt_state, batch, weights, sub)
            loss = float(m["loss"])  # waits for the step
            t2 = time.perf_counter()
            if i == 0:
                first = t2 - t0
                continue
            times.append(t2 - t0)
            waits += t1 - t0
        held = st.peak_held_tasks
    mean = statistics.fmean(times)
    # compilation left out at every size: the first step counts as a mean step
    epoch = mean * n_batches
    return {
        "n_batches": n_batches,
        "steps_timed": n_timed,
        "first_step_s": round(first, 3),
        "step_s_mean": round(mean, 5),
        "step_s_median": round(statistics.median(times), 5),
        "input_wait_s": round(waits, 3),
        "epoch_s": round(epoch, 2),
        "epoch_measured": full_epoch,
        "epoch_note": (
            f"measured: {n_timed} of {n_batches} steps timed, the first (compilation) counted as "
            "a mean step"
            if full_epoch
            else f"extrapolated: {n_batches} batches x the mean of {n_timed} streamed steps"
        ),
        "tasks_per_s": round(s.meta_batch / mean, 1),
        "gathered_tables": gathered,
        "last_loss": loss,
        "peak_held_tasks": held,
    }


def run_size(n_users: int, s, root: str, log: Callable[[str], None]) -> dict:
    """Every phase at ``n_users`` users (``max(s.min_items, s.items_per_user * n_users)`` items)."""
    n_items = max(s.min_items, int(s.items_per_user * n_users))
    spec = ss.ScaleSpec(
        n_users=n_users,
        n_items=n_items,
        mean_ratings=s.mean_ratings,
        chunk_users=s.chunk_users,
        seed=s.seed,
    )
    rdir, sdir = (
        os.path.join(root, f"u{n_users}", "ratings"),
        os.path.join(root, f"u{n_users}", "shards"),
    )
    for d in (rdir, sdir):
        shutil.rmtree(d, ignore_errors=True)
    out: dict = {"n_users": n_users, "n_items": n_items}
    meta_info, out["generate"] = phase(lambda: ss.generate_ratings(spec, rdir))
    out["n_ratings"] = meta_info["n_ratings"]
    log(f"  {n_users} users: generated {out['n_ratings']:,} ratings {out['generate']}")
    index, out["encode"] = phase(
        lambda: ss.encode_to_shards(
            ss.iter_chunks(rdir), sdir, seed=s.seed, shard_size=s.shard_size
        )
    )
    out |= {"n_tasks": index["n_tasks"], "n_shards": len(index["shards"])}
    out["disk_mb"] = {"ratings": disk_mb(rdir), "shards": disk_mb(sdir)}
    log(f"  {n_users} users: encoded {out['n_tasks']:,} tasks {out['encode']}")
    features = ss.ScaleFeatures(rdir)
    sh = mshards.open_shards(sdir)
    res, out["stream"] = phase(lambda: stream_phase(sh, features, s))
    out["stream"] |= res
    out["stream"]["tasks_per_s"] = round(
        res["batches"] * s.meta_batch / max(out["stream"]["seconds"], 1e-9), 1
    )
    log(f"  {n_users} users: streamed {out['stream']}")
    full = n_users <= s.full_epoch_max_users
    res, out["train"] = phase(lambda: train_phase(sh, features, s, full))
    out["train"] |= res
    log(f"  {n_users} users: meta-training {out['train']}")
    if not s.keep_data:
        shutil.rmtree(os.path.join(root, f"u{n_users}"), ignore_errors=True)
    return out


def linearity(sizes: list[dict]) -> dict:
    """Epoch seconds per user relative to the smallest size; linear within +-25% or not."""
    base = sizes[0]["train"]["epoch_s"] / sizes[0]["n_tasks"]
    ratio = {
        str(r["n_users"]): round(r["train"]["epoch_s"] / r["n_tasks"] / base, 3) for r in sizes
    }
    return {
        "per_task_ratio_to_smallest": ratio,
        "within_25pct": all(0.75 <= v <= 1.25 for v in ratio.values()),
    }
