"""What one configuration measures: a MeLU model, its meta-learner (built by the registry's
:func:`metarec.meta.make_learner`), an optimizer and a host-side task pool, plus the background
input pipeline that feeds the timed steps."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax

from benchmarks.meta_step.config import BenchConfig
from metarec import meta
from metarec.data.tasks import Task, index_tasks
from metarec.models import melu

PyTree = Any

INNER_LR = 0.05  # the cold-start experiment's default inner step size
META_LR = 3e-3
CLIP_NORM = 10.0


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
    #: MeLU's lookup tables larger than the rows a task reads (for the ``sparse`` mode)
    tables: tuple = ()


def load_ml100k_pool(data_dir: str | None = None, seed: int = 0):
    """Real ml-100k warm-training tasks (protocol "melu", ``seed``) as a host ``Task`` and the
    feature spec, built exactly as the cold-start experiment builds them."""
    from experiments.coldstart import build
    from experiments.coldstart.configs import default
    from metarec import data as mdata

    data = mdata.load_dataset("ml-100k", data_dir=data_dir)
    sd = build.prepare_seed(data, seed, default.get_config())
    return sd.train, sd.encoder.spec


def synthetic_pool(
    n_tasks: int, support: int, query: int, seed: int = 0, n_items: int | None = None
):
    """Synthetic MovieLens-format tasks (:func:`metarec.data.make_synthetic_tasks`) and their
    spec; ``n_items`` (default ``max(400, 2 (S + Q))``) sets the catalogue (item-id table) size."""
    from metarec.data import make_synthetic_tasks

    n_items = n_items or max(400, 2 * (support + query))
    tasks, spec, _ = make_synthetic_tasks(
        seed, n_users=n_tasks, n_items=n_items, n_support=support, n_query=query
    )
    return tasks, spec


def melu_learner(
    spec,
    learner: str,
    *,
    inner_steps: int,
    width: int,
    embed_dim: int,
    feature_dropout: float = 0.0,
    remat: bool = False,
) -> tuple[Callable, Callable, meta.MetaLearner]:
    """``(init_fn, apply_fn, learner)``: MeLU over ``spec`` with two hidden layers of ``width``,
    its decision layers adapted by the registered ``learner`` as the cold-start experiment does
    (inner lr :data:`INNER_LR`; every other rule, which parameters, options, remat, the
    registry's)."""
    init_fn, apply_fn = melu.make_melu(
        spec, embed_dim=embed_dim, hidden=(width, width), feature_dropout=feature_dropout
    )
    lrn = meta.make_learner(
        learner,
        apply_fn,
        inner_steps=inner_steps,
        inner_lr=INNER_LR,
        adapt_mask=melu.adapt_filter("decision"),
        remat=remat,
    )
    return init_fn, apply_fn, lrn


def build_problem(
    cfg: BenchConfig, pools: dict | None = None, seed: int = 0, optimizer=None
) -> Problem:
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
        key = ("synthetic", cfg.support, cfg.query, cfg.n_items)
        if key not in pools or pools[key][0].num_tasks < n:
            pools[key] = synthetic_pool(n, cfg.support, cfg.query, seed, cfg.n_items)
    pool, spec = pools[key]
    init_fn, apply_fn, learner = melu_learner(
        spec,
        cfg.learner,
        inner_steps=cfg.inner_steps,
        width=cfg.width,
        embed_dim=cfg.embed_dim,
        feature_dropout=cfg.dropout,
        remat=cfg.remat,
    )
    meta_params = learner.init(init_fn(jax.random.PRNGKey(seed)))
    optimizer = optimizer or optax.adamw(META_LR, weight_decay=1e-4)
    opt_state = optimizer.init(meta_params)
    rows = 1 + int(pool.support.size) + int(pool.query.size)  # rows a task gathers per table
    tables = melu.lookup_tables(spec, min_vocab=rows + 1)
    return Problem(cfg, learner, apply_fn, meta_params, optimizer, opt_state, pool, spec, tables)


def sample_indices(n: int, meta_batch: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless seeded task indices of meta-batches from a pool of ``n`` tasks (epochs of
    permutations; sampling with replacement when the pool is smaller than the meta-batch)."""
    rng = np.random.default_rng(seed)
    while True:
        if meta_batch > n:
            yield rng.integers(0, n, meta_batch)
            continue
        order = rng.permutation(n)
        for start in range(0, n - meta_batch + 1, meta_batch):
            yield order[start : start + meta_batch]


def sample_batches(pool: Task, meta_batch: int, seed: int = 0) -> Iterator[Task]:
    """Endless seeded meta-batches (:func:`sample_indices`) gathered from a host task pool."""
    for idx in sample_indices(pool.num_tasks, meta_batch, seed):
        yield index_tasks(pool, idx)


def device_batches(pool: Task, meta_batch: int, seed: int = 0) -> Iterator[Task]:
    """The meta-batches of :func:`sample_batches`, in the same order, gathered on the device from
    a copy of the pool placed there once: the host sends only the indices."""
    on_device = jax.device_put(pool)
    gather = jax.jit(index_tasks)
    for idx in sample_indices(pool.num_tasks, meta_batch, seed):
        yield gather(on_device, idx)


class Prefetcher:
    """Background input pipeline: a thread pulls host batches from ``source``, applies ``prepare``
    (device transfer / sharding / per-task split) and keeps up to ``depth`` ready batches in a
    queue. ``next()`` returns the next prepared batch and accumulates the time the caller waited in
    ``wait_s``: the input-pipeline stall the benchmark reports."""

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
