"""``--config.sparse_tables`` in the cold-start pipeline (``build.Compiled.step``): MeLU gets the
row-gathered step of :func:`metarec.training.meta_train.make_step` (whose parameters equal the
dense step's: ``test_meta_train_sparse.py``), the option off gives the dense step, and a model
without lookup tables (the hybrid) gets the dense step instead of an error."""

from __future__ import annotations

from experiments.coldstart import build
from metarec import data as mdata
from tests.unit.training.test_meta_train_sparse import _cfg


def _is_row_gathered(step) -> bool:
    return step.__qualname__.startswith("make_step.<locals>")


def test_compiled_step_follows_the_sparse_tables_option():
    _, spec, _ = mdata.make_synthetic_tasks(seed=3, n_users=8, n_items=40, n_support=6, n_query=4)
    assert _is_row_gathered(build.Compiled(_cfg(True)).step(spec, "maml"))
    assert not _is_row_gathered(build.Compiled(_cfg(False)).step(spec, "maml"))
    cfg = _cfg(True)
    cfg.model, cfg.adapt = "hybrid", "user"
    assert build.get_model("hybrid").lookup_tables is None
    assert not _is_row_gathered(build.Compiled(cfg).step(spec, "maml"))
