"""The ``finetune`` baseline: the base network trained conventionally on the pooled training
tasks (no inner loop, every training rating in the loss, early stopping on the validation users'
query MAE without adaptation), then fine-tuned on each user's support set with the step size of
``cfg.finetune_lrs`` that the validation users choose.

One definition for both places that score it: the cold-start experiment (test scenarios) and the
tune stage (its validation users and stand-ins), so the tune stage's report compares the tuned
methods with the same baseline the results table does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments.coldstart.build import Compiled
from metarec.data.tasks import pooled_tasks
from metarec.training.meta_train import (
    TrainResult,
    evaluate,
    meta_train,
    predict_tasks,
    score,
)

PLAIN = {"inner_steps": 0, "adapt": "all"}  # conventional training: no inner loop


def trainer(fns, sd, cfg, k_init: jax.Array, k_train: jax.Array, scale) -> Callable:
    """``train(**meta_train_kwargs) -> TrainResult``: the base network (``fns.model``) trained on
    ``sd``'s pooled training tasks (``cfg.train_tasks``) for ``cfg.finetune_epochs`` epochs
    (patience ``cfg.finetune_patience``)."""
    spec = sd.encoder.spec
    init_fn, _ = fns.model(spec)
    ft_cfg = ml_collections.ConfigDict(cfg.to_dict())
    ft_cfg.epochs, ft_cfg.patience = cfg.finetune_epochs, cfg.finetune_patience

    def train(**kw) -> TrainResult:
        return meta_train(
            fns.learner(spec, "maml", **PLAIN),
            fns.step(spec, "maml", **PLAIN),
            fns.eval(spec, "maml", **PLAIN),
            init_fn(k_init),
            pooled_tasks(sd.train_tasks(cfg.train_tasks)),
            sd.val,
            ft_cfg,
            k_train,
            scale,
            mesh=fns.mesh,
            **kw,
        )

    return train


def choose_lr(fns, sd, params, cfg, scale) -> tuple[float, float, Callable]:
    """``(lr, val MAE, eval_fn)``: the step size of ``cfg.finetune_lrs`` with the lowest MAE on
    ``sd``'s validation users after fine-tuning every parameter on their support sets (the first
    of equals), and the evaluation function that fine-tunes at it."""
    spec = sd.encoder.spec
    best_lr, best_mae = None, np.inf
    for lr in cfg.finetune_lrs:
        out = predict_tasks(
            fns.eval(spec, "maml", inner_lr=lr, adapt="all"), params, sd.val, cfg.eval_chunk
        )
        m = score(out["pred"], sd.val, scale, cfg.k)["mae"]
        if m < best_mae:
            best_lr, best_mae = lr, m
    return best_lr, best_mae, fns.eval(spec, "maml", inner_lr=best_lr, adapt="all")


def fit_and_score(sd, cfg, seed: int, scale, tasks: dict) -> dict:
    """The tune stage's ``finetune``: trained on ``sd`` (keys from ``seed``), its step size chosen
    on ``sd.val``, then scored on each of ``tasks`` (name -> Task): name -> ``(scores, per-user
    record)`` of :func:`metarec.training.meta_train.evaluate`."""
    fns = Compiled(cfg).use_seed(seed)
    fns.load_pretrained(sd.encoder, seed)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    params = trainer(fns, sd, cfg, k_init, k_train, scale)().params
    _, _, eval_fn = choose_lr(fns, sd, params, cfg, scale)
    return score_tasks(eval_fn, params, tasks, cfg, scale)


def score_tasks(eval_fn, params, tasks: dict, cfg, scale) -> dict:
    """Each of ``tasks`` (name -> Task) fine-tuned by ``eval_fn`` from ``params`` and scored:
    name -> ``(scores, per-user record)`` of :func:`metarec.training.meta_train.evaluate`."""
    return {
        n: evaluate(predict_tasks(eval_fn, params, t, cfg.eval_chunk)["pred"], t, scale, cfg.k)
        for n, t in tasks.items()
    }
