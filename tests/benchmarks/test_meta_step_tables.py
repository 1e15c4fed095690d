"""The ``tables`` section of the meta-step benchmark: dense vs row-gathered embedding tables
(mode ``sparse``), configured without running anything heavy."""

from __future__ import annotations

import optax
import pytest

from benchmarks.meta_step import config, harness
from benchmarks.meta_step.steps import make_step
from metarec import meta
from metarec.data import make_synthetic_tasks
from metarec.models import melu


def test_tables_section_compares_sparse_with_dense():
    grid, _ = config.make_grid("default", sections=["tables"])
    assert {c.modes for c in grid} == {("vmap", "sparse")}
    assert {c.n_items for c in grid} == {None, config.LARGE_CATALOGUE}
    assert {c.data for c in grid} == {"synthetic", "ml-100k"}
    assert "items=100000" in grid[-1].short()
    with pytest.raises(ValueError, match="n_items"):
        config.BenchConfig(data="ml-100k", n_items=10).validate()
    by_mode = {"vmap": {"steps_per_s": 2.0}, "sparse": {"steps_per_s": 5.0}}
    assert harness._comparison(grid[0], by_mode)["sparse_over_vmap"] == 2.5


def test_sparse_mode_needs_tables():
    _, spec, _ = make_synthetic_tasks(0, n_users=2, n_items=20, n_support=3, n_query=2)
    _, apply_fn = melu.make_melu(spec, embed_dim=4, hidden=(4,))
    learner = meta.maml(apply_fn, inner_steps=1, adapt_mask=melu.adapt_filter("decision"))
    with pytest.raises(ValueError, match="sparse_tables"):
        make_step(learner, optax.sgd(0.1), "sparse")
    assert callable(
        make_step(learner, optax.sgd(0.1), "sparse", sparse_tables=melu.lookup_tables(spec))
    )
