"""``--config.sparse_tables`` on the training path (:func:`metarec.training.meta_train.make_step`
with the model registry's ``lookup_tables``): meta-training gives the same parameters as the dense
step (float tolerance), a learner that adapts the tables falls back to the dense step, and a model
without lookup tables is one error line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.coldstart import build
from experiments.coldstart.configs import default as default_config
from metarec import data as mdata
from metarec.models.registry import get_model
from metarec.training.meta_train import make_optimizer, make_step, meta_train


def _cfg(sparse: bool, adapt: str = "decision"):
    cfg = default_config.get_config()
    cfg.embed_dim, cfg.hidden, cfg.inner_steps, cfg.meta_batch = 4, (8,), 1, 8
    cfg.epochs, cfg.patience, cfg.eval_chunk, cfg.chunk_size = 1, 1, 8, 0
    # equality with dropout keys and in chunks is the step's own test (tests/unit/meta/
    # test_sparse_tables.py); without them this one compiles in a few seconds
    cfg.feature_dropout = 0.0
    cfg.adapt = adapt
    cfg.sparse_tables = sparse
    return cfg


@pytest.fixture(scope="module")
def data():
    # 40 items: the item-id table (41 rows) is larger than the 1 + 6 + 4 rows a task reads
    tasks, spec, _ = mdata.make_synthetic_tasks(
        seed=3, n_users=24, n_items=40, n_support=6, n_query=4
    )
    train, val = mdata.index_tasks(tasks, slice(0, 16)), mdata.index_tasks(tasks, slice(16, 24))
    init_fn, _ = build.Compiled(_cfg(False)).model(spec)
    return spec, train, val, jax.jit(init_fn)(jax.random.PRNGKey(0))


def _setup(data, sparse: bool, adapt: str = "decision", log=None):
    spec, _, _, params = data
    cfg = _cfg(sparse, adapt)
    fns = build.Compiled(cfg)
    learner = fns.learner(spec, "maml")
    tables = get_model(cfg.model).lookup_tables(spec, cfg)
    return cfg, fns, learner, make_step(learner, cfg, tables=tables, log_fn=log), params


def _train(data, sparse: bool, log=None):
    spec, train, val, _ = data
    cfg, fns, learner, step, params = _setup(data, sparse, log=log)
    args = (params, train, val, cfg, jax.random.PRNGKey(1), (1.0, 5.0))
    return meta_train(learner, step, fns.eval(spec, "maml"), *args)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_sparse_tables_train_the_same_parameters(data):
    log: list[str] = []
    dense, sparse = _train(data, False), _train(data, True, log=log.append)
    assert log == []  # MAML on the decision layers: the row-gathered step was used
    assert dense.steps == sparse.steps == 2
    for a, b in zip(_leaves(dense.params), _leaves(sparse.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sparse.best_val_mae == pytest.approx(dense.best_val_mae, rel=1e-5)


def test_adapted_tables_fall_back_to_the_dense_step(data):
    _, train, _, _ = data
    log: list[str] = []
    batch = jax.tree_util.tree_map(jnp.asarray, mdata.index_tasks(train, slice(0, 8)))
    out = []
    for sparse in (False, True):
        cfg, _, learner, step, params = _setup(data, sparse, "all", log=log.append)
        mp = learner.init(params)
        opt = make_optimizer(cfg).init(mp)
        out.append(step(mp, opt, batch, jnp.ones(8), jax.random.PRNGKey(2)))
    assert len(log) == 1 and "--config.sparse_tables: dense tables instead" in log[0]
    for a, b in zip(_leaves(out[0]), _leaves(out[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_without_tables_is_one_error_line(data):
    spec = data[0]
    cfg = _cfg(True)
    learner = build.Compiled(cfg).learner(spec, "maml")
    with pytest.raises(ValueError, match=r"--config.sparse_tables=True needs a model"):
        make_step(learner, cfg, tables=())
