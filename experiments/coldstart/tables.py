"""A model's frozen MF item tables: fitted for meta-training (per cross-fitting fold) and
refitted on every training rating for the deployed model."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from experiments.coldstart.draws import CROSSFITS
from metarec.baselines import make_baseline
from metarec.models.registry import get_model


def item_tables(sd, cfg, seed: int, ratings=None):
    """``(rows, item_bias, item_factors, mu)``: a biased MF (``cfg.cf_dim`` factors, L2
    ``cfg.cf_reg``) fitted on the seed's training ratings (without the meta-training query sets
    when those are held out: ``train_tasks="resample_support"``, fold 0's under "crossfit"; or
    ``ratings``), by the encoder's item rows."""
    r = sd.table_ratings[cfg.train_tasks] if ratings is None else ratings
    state = make_baseline("mf", dim=cfg.cf_dim, reg=cfg.cf_reg, seed=seed).fit(
        r["user_id"].to_numpy(), r["item_id"].to_numpy(), r["rating"].to_numpy()
    )
    rows = sd.encoder.vocabs["item_id"].encode(np.asarray(state.item_vocab).astype(str))
    return rows, state.item_bias, state.item_factors, state.mu


def initial_params(init_fn, key, sd, cfg, seed: int):
    """The model's initial parameters; a model that starts from MF item tables gets them here."""
    params = init_fn(key)
    fill = get_model(cfg.model).with_item_tables
    if fill is not None and cfg.get("cf_mf_tables", True):
        params = fill(params, *item_tables(sd, cfg, seed))
    return params


def deployed(sd, cfg, seed: int) -> Callable:
    """``meta_params -> meta_params`` as the method is evaluated (validation and test): a model
    whose frozen item tables were fitted without the training tasks' query sets
    (``train_tasks="resample_support"`` or "crossfit", which keep those query ratings unseen
    during meta-training) gets tables refitted on every training rating; everything meta-learned,
    including ``global_bias``, is kept. Otherwise the identity."""
    fill = get_model(cfg.model).with_item_tables
    if (
        fill is None
        or not cfg.get("cf_mf_tables", True)
        or not cfg.cf_freeze_tables
        or sd.table_ratings[cfg.train_tasks] is sd.fit_ratings
    ):
        return lambda meta: meta
    tables = item_tables(sd, cfg, seed, sd.fit_ratings)
    return lambda meta: _with_tables(meta, fill, tables)


def fold_tables(sd, cfg, seed: int) -> Callable | None:
    """``(epoch, meta_params) -> meta_params`` for meta-training with ``train_tasks="crossfit"``
    (``meta_train``'s ``epoch_params``): the frozen MF item tables swapped for those fitted on
    the epoch's fold (without its query sets), as its features are; everything meta-learned,
    including ``global_bias``, is kept. None where the model has no tables to swap."""
    fill = get_model(cfg.model).with_item_tables
    mode = cfg.train_tasks
    if mode not in CROSSFITS or fill is None or not cfg.get("cf_mf_tables", True):
        return None

    @functools.cache
    def tables(fold: int):
        return item_tables(sd, cfg, seed, sd.training_ratings(mode, fold))

    return lambda epoch, meta: _with_tables(meta, fill, tables(sd.fold_of(mode, epoch)))


def _with_tables(meta, fill: Callable, tables):
    def swap(params):
        return fill(params, *tables) | {"global_bias": params["global_bias"]}

    if hasattr(meta, "_replace") and hasattr(meta, "params"):  # e.g. Meta-SGD's (params, lr)
        return meta._replace(params=swap(meta.params))
    return swap(meta)
