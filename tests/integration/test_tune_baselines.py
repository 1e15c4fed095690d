"""The tune stage's report reads the tuned methods against the baselines the results table has,
fine-tuning included, each trained and scored on the tuning data only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments.coldstart import build, finetune
from experiments.tune import pipeline as tune
from metarec.training.meta_train import predict_tasks, score
from tests.integration.test_coldstart import tiny_config


@pytest.mark.slow  # over 6 s in the default suite (2026-12-07); CI runs `make test-slow` too
def test_the_tune_report_has_the_finetune_baseline_as_the_experiment_defines_it(fixture_data):
    """``finetune`` is scored on the validation users and both stand-ins (the new-item one by a
    network trained without the held-out items); its step size is the validation users' choice
    of ``cfg.finetune_lrs``, as in the cold-start experiment; ``no_adapt`` (a method's own
    start) is left out."""
    data, _ = fixture_data
    cfg = tiny_config()
    cfg.epochs = 1
    cfg.val_new_model = "separate"
    cfg.val_cold_users = 0.2
    cfg.finetune_lrs = (0.0, 0.05)  # no fine-tuning at all, or some
    with tune.prepared_seeds(cfg, (0,), data, lambda m: None) as (d, prepared):
        rows = tune.baselines_on_validation(cfg, d, prepared)
    sd = prepared[0]
    assert set(rows) == {"global_mean", "user_mean", "item_mean", "finetune"}
    ft = rows["finetune"]
    sets = ("val", "val_new", "val_cold")
    assert set(ft) == {f"{s}_{m}" for s in sets for m in ("mae", "ndcg@3")}
    assert all(np.isfinite(v) for v in ft.values())
    # the validation users choose the step size: their MAE is the lower of the two
    fns = build.Compiled(cfg).use_seed(0)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(0))
    params = finetune.trainer(fns, sd, cfg, k_init, k_train, d.rating_scale)().params
    maes = []
    for lr in cfg.finetune_lrs:
        fn = fns.eval(sd.encoder.spec, "maml", inner_lr=lr, adapt="all")
        pred = predict_tasks(fn, params, sd.val, cfg.eval_chunk)["pred"]
        maes.append(score(pred, sd.val, d.rating_scale, cfg.k)["mae"])
    assert maes[0] != pytest.approx(maes[1], abs=1e-4)  # the choice matters here
    assert ft["val_mae"] == pytest.approx(min(maes), abs=1e-6)
    # the new-item stand-in is scored by a network trained on its own data, the held-out items
    # left out of training
    new = sd.val_new_data
    got = finetune.fit_and_score(new, cfg, 0, d.rating_scale, {"val_new": new.val_new})
    assert ft["val_new_mae"] == pytest.approx(got["val_new"][0]["mae"], abs=1e-6)
