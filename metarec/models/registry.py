"""The MODELS registry: each rating model the cold-start pipeline meta-learns, and its adapt modes.

A model entry turns ``(feature spec, config, pretrained encoder)`` into a pure
``(init_fn, apply_fn)`` pair, names the parameter subsets its inner loop may adapt, and says how
tasks are prepared for it (the Transformer rater reads the support set as the user's history).
Adding a model is one module with its ``make_*`` function plus one entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from metarec.baselines.neighbours import N_FEATURES as N_NBR_FEATURES
from metarec.data.tasks import Task
from metarec.models import hybrid, melu
from metarec.models import transformer as tfm


def _identity(tasks: Task) -> Task:
    return tasks


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """``build(spec, cfg, pretrained, max_len) -> (init_fn, apply_fn)``; ``adapt_filter(mode, cfg)``
    the inner-loop parameter filter of an adapt mode (one of ``adapt_modes``); ``prepare_tasks``
    maps encoded tasks to the model's inputs; ``pretrainable``: accepts a pretrained encoder;
    ``with_item_tables``: fills the item side from a fitted MF (``cfg.cf_dim`` factors);
    ``lookup_tables(spec, cfg)``: the embedding tables the model reads only by index, as
    :class:`metarec.meta.tables.LookupTable` (for a meta-step with row-gathered tables,
    :func:`metarec.training.meta_train.make_step`); None: the model declares none."""

    build: Callable[..., tuple[Callable, Callable]]
    adapt_modes: tuple[str, ...]
    adapt_filter: Callable[[str, Any], Callable]
    prepare_tasks: Callable[[Task], Task] = _identity
    pretrainable: bool = False
    # with_item_tables(params, rows, item_bias, item_factors, mu) -> params: the model starts from
    # the item side of an MF fitted on the training ratings (the pipeline fits it and hands it in)
    with_item_tables: Callable[..., Any] | None = None
    lookup_tables: Callable[[Any, Any], tuple] | None = None


def _build_melu(spec, cfg, pretrained=None, max_len=None):
    del pretrained, max_len
    return melu.make_melu(
        spec,
        embed_dim=cfg.embed_dim,
        hidden=tuple(cfg.hidden),
        residual=cfg.residual,
        use_item_id=cfg.use_item_id,
        feature_dropout=cfg.feature_dropout,
        context_dim=cfg.context_dim,
        residual_bound=cfg.residual_bound,
    )


def _build_transformer(spec, cfg, pretrained=None, max_len=None):
    """``pretrained``: ``(EncoderConfig, encoder params)`` of a pretraining checkpoint, or None for
    a randomly initialised encoder of the configured size."""
    if pretrained is not None:
        enc_cfg, enc_params = pretrained
    else:
        enc_cfg = tfm.EncoderConfig(
            num_items=spec.item_vocab[1],
            max_len=max_len,
            width=cfg.tf_width,
            depth=cfg.tf_depth,
            heads=cfg.tf_heads,
        )
        enc_params = None
    rc = tfm.RaterConfig(
        encoder=enc_cfg,
        n_years=spec.item_vocab[0],
        n_genres=spec.n_genres,
        lora_rank=cfg.lora_rank,
    )
    return tfm.make_transformer_rater(rc, pretrained=enc_params)


def _build_hybrid(spec, cfg, pretrained=None, max_len=None):
    del pretrained, max_len
    # the kNN predictions, plus the mf baseline's fold-in as a third feature with cf_knn_mf
    n_nbr = N_NBR_FEATURES + int(cfg.get("cf_knn_mf", False)) if cfg.get("cf_knn", False) else 0
    return hybrid.make_hybrid(
        spec,
        dim=cfg.cf_dim,
        embed_dim=cfg.embed_dim,
        hidden=tuple(cfg.cf_hidden),
        id_dropout=cfg.id_dropout,
        freeze_tables=cfg.cf_freeze_tables,
        n_nbr=n_nbr,
        nbr_init=1 / (n_nbr + 1),  # the model and each blended prediction start with equal weight
        user_fields=cfg.get("cf_user_fields", -1),
        nbr_new_items=cfg.get("cf_knn_new_items", False),
        nbr_new_own=cfg.get("cf_knn_new_own", False),
        table_init=cfg.get("cf_table_init", 0.0),
        new_item_mean=cfg.get("cf_new_item_mean", 0.0),
        melu=None
        if not cfg.cf_melu
        else {
            "embed_dim": cfg.embed_dim,
            "hidden": tuple(cfg.hidden),
            "residual": cfg.residual,
            "use_item_id": cfg.use_item_id,
            "feature_dropout": cfg.feature_dropout,
            "residual_bound": cfg.residual_bound,
        },
    )


MODELS: dict[str, ModelEntry] = {
    "melu": ModelEntry(
        build=_build_melu,
        adapt_modes=("decision", "all", "head", "context", "decision+context"),
        adapt_filter=lambda mode, cfg: melu.adapt_filter(mode),
        lookup_tables=lambda spec, cfg: melu.lookup_tables(spec, use_item_id=cfg.use_item_id),
    ),
    "hybrid": ModelEntry(
        build=_build_hybrid,
        adapt_modes=hybrid.ADAPT_MODES,
        adapt_filter=lambda mode, cfg: hybrid.adapt_filter(mode),
        with_item_tables=hybrid.with_item_tables,
    ),
    "transformer": ModelEntry(
        build=_build_transformer,
        adapt_modes=("head", "lora", "head+last_block", "all"),
        adapt_filter=lambda mode, cfg: tfm.adapt_filter(mode, depth=cfg.tf_depth),
        prepare_tasks=tfm.add_history,
        pretrainable=True,
    ),
}


def get_model(name: str) -> ModelEntry:
    """The registered model ``name``; ``ValueError`` listing the allowed names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return MODELS[name]
