"""Large-model comparison on the cold-start protocol (same splits and seeds for every method):

* ``melu_maml``       — the MeLU-style MLP meta-learned with MAML (reference);
* ``tf_scratch_maml`` — the Transformer rater from random initialisation, meta-learned with MAML;
* ``tf_pre_finetune`` — encoder pretrained (masked items, training users only), rater trained
  conventionally (no inner loop), then fine-tuned per user on the support set (step size picked on
  validation users);
* ``tf_pre_maml``     — pretrained encoder + MAML.

Rating metrics (MAE / RMSE / nDCG@3) per scenario, plus full-catalogue next-item ranking (HR@k,
recall@k, nDCG@k) of the pretrained encoder vs popularity on warm_test / user_cold.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from experiments.coldstart import build as coldstart
from experiments.coldstart.configs import default as coldstart_default
from experiments.common import (
    check_choice,
    enable_compilation_cache,
    format_mean_std,
    prepare_workdir,
    split_names,
)
from experiments.pretrain import pipeline as pretraining
from metarec import data as mdata
from metarec import metrics as mmetrics
from metarec.data.scenarios import PROTOCOLS
from metarec.meta import make_learner
from metarec.meta.step import make_eval_fn, make_meta_step
from metarec.models.transformer import (
    ADAPT_MODES,
    EncoderConfig,
    RaterConfig,
    adapt_filter,
    add_history,
    make_transformer_rater,
)
from metarec.training.encoder_checkpoint import load_pretrained, same_item_vocab
from metarec.training.meta_train import make_optimizer, meta_train, predict_tasks, score
from metarec.training.next_item import popularity_ranking, support_ranking
from metarec.training.pretrain import pretrain_on_split
from metarec.training.runlog import write_json_atomic

NAME = "large_model"
METHODS = ("melu_maml", "tf_scratch_maml", "tf_pre_finetune", "tf_pre_maml")
RANKED_SCENARIOS = ("warm_test", "user_cold")  # scenarios whose query items are known items
TABLE_METRICS = ("mae", "rmse", "ndcg@3")
LOWER = {"item_dim": 1, "rank_k": 1}


def coldstart_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the cold-start pieces (seed data, MeLU, meta-training): their defaults with
    this comparison's shared fields, model ``melu``, and no pretrained encoder of their own."""
    cs = coldstart_default.base_config()
    for name in cs.keys():
        # "methods" names this comparison's methods, not the cold-start experiment's
        if name in cfg and name not in ("init_from", "methods", "algos"):
            cs[name] = cfg[name]
    cs.model = "melu"
    cs.algos = ("maml",)
    return cs


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the config field and what is allowed."""
    cfg.methods = split_names(cfg.methods)
    for m in cfg.methods:
        check_choice("--config.methods", m, METHODS)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--config.methods lists a method more than once: {cfg.methods}")
    coldstart.validate_config(coldstart_config(cfg))
    check_choice("--config.protocol", cfg.protocol, PROTOCOLS)
    check_choice("--config.tf_adapt", cfg.tf_adapt, ADAPT_MODES)
    if cfg.tf_adapt == "lora" and cfg.lora_rank < 1:
        raise ValueError("--config.tf_adapt=lora needs --config.lora_rank >= 1")
    pretraining.check_bounds(cfg, pretraining.BOUNDS)
    pretraining.check_encoder(cfg.encoder)
    for name, lo in LOWER.items():
        if cfg[name] < lo:
            raise ValueError(f"--config.{name} must be >= {lo}, got {cfg[name]}")
    if cfg.init_from and "{seed}" not in cfg.init_from and len(cfg.seeds) > 1:
        raise ValueError(
            "--config.init_from holds one seed's pretraining: run a single --config.seeds value "
            "or name one run per seed with '{seed}' (e.g. runs/pretrain/seed{seed})"
        )


def _rater_config(cfg, spec, enc_cfg: EncoderConfig) -> RaterConfig:
    return RaterConfig(
        encoder=enc_cfg,
        n_years=spec.item_vocab[0],
        n_genres=spec.n_genres,
        item_dim=cfg.item_dim,
        head_hidden=tuple(cfg.head_hidden),
        lora_rank=cfg.lora_rank,
    )


def encoder_for_seed(cfg, seed: int, sd: coldstart.SeedData, enc_cfg: EncoderConfig, info: dict):
    """``(EncoderConfig, params, held-out metrics)`` of the seed's encoder: loaded from
    ``cfg.init_from``, else pretrained on the seed's training users only (warm_train x existing
    items; the meta-learning validation users are part of warm_train, test users never are)."""
    if cfg.init_from:
        path = cfg.init_from.format(seed=seed)
        enc_cfg, params, meta = load_pretrained(path, with_metadata=True)
        if not same_item_vocab(meta["item_ids"], sd.encoder):
            raise ValueError(
                f"--config.init_from={path}: its item vocabulary differs from seed {seed}'s "
                "feature encoder; pretrain with the same dataset and seed "
                f"(python -m experiments.pretrain.main --config.seed={seed})"
            )
        return enc_cfg, params, meta["metadata"].get("val", {})
    pcfg, val_fraction = pretraining.pretrain_config(cfg.pretrain, seed)
    train_ratings = sd.fit_ratings
    params, hist, val = pretrain_on_split(train_ratings, sd.encoder, enc_cfg, pcfg, val_fraction)
    info["histories"]["pretrain"] = hist
    return enc_cfg, params, val


def run_seed(data, seed: int, cfg, log_fn: Callable = print) -> dict:
    """One seed of the comparison: ``{scenario: {method: metrics}}`` plus ``_ranking`` and
    ``_info``."""
    t_start = time.time()
    cs = coldstart_config(cfg)
    sd = coldstart.prepare_seed(data, seed, cs)
    spec, scale = sd.encoder.spec, data.rating_scale
    width = sd.train.support.y.shape[1]
    enc_fields = cfg.encoder.to_dict() | {"max_len": max(cfg.encoder.max_len, width)}
    enc_cfg = EncoderConfig(num_items=spec.item_vocab[1], **enc_fields)
    info: dict = {"seconds": {}, "histories": {}}
    t0 = time.time()
    enc_cfg, enc_params, pre_val = encoder_for_seed(cfg, seed, sd, enc_cfg, info)
    info["seconds"]["pretrain"] = time.time() - t0
    info["pretrain_val"] = pre_val
    secs = info["seconds"]["pretrain"]
    log_fn(f"seed {seed} pretrain: held-out next item {pre_val} ({secs:.1f}s)")

    train, val = add_history(sd.train), add_history(sd.val)
    test = {s: add_history(t) for s, t in sd.test.items()}
    results = {s: {} for s in coldstart.TEST_SCENARIOS}
    key = jax.random.PRNGKey(seed)
    opt = make_optimizer(cs)
    clip = cs.clip_norm or None

    def fit(name, learner, apply_fn, init_params, k_train, train_learner=None):
        tl = train_learner or learner
        step = make_meta_step(tl, opt, clip_norm=clip)
        eval_fn = make_eval_fn(tl, apply_fn)
        tr = meta_train(tl, step, eval_fn, init_params, train, val, cs, k_train, scale)
        info["histories"][name] = tr.history
        return tr

    def maml(apply_fn, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, mask=None):
        return make_learner(
            "maml", apply_fn, inner_steps=inner_steps, inner_lr=inner_lr, adapt_mask=mask
        )

    rc = _rater_config(cfg, spec, enc_cfg)
    mask = adapt_filter(cfg.tf_adapt, depth=enc_cfg.depth)
    for name in cfg.methods:
        t0 = time.time()
        key, k_init, k_train = jax.random.split(key, 3)
        if name == "melu_maml":
            fns = coldstart.Compiled(cs)
            init_fn, apply_fn = fns.model(spec)
            learner, step = fns.learner(spec, "maml"), fns.step(spec, "maml")
            eval_fn, tasks = fns.eval(spec, "maml"), sd.test
            init_params = init_fn(k_init)
            args = (init_params, sd.train, sd.val, cs, k_train, scale)
            tr = meta_train(learner, step, eval_fn, *args)
        else:
            pretrained = None if name == "tf_scratch_maml" else {"params": enc_params["params"]}
            init_fn, apply_fn = make_transformer_rater(rc, pretrained=pretrained)
            learner = maml(apply_fn, mask=mask)
            if name == "tf_pre_finetune":
                plain = maml(apply_fn, inner_steps=0)
                tr = fit(name, learner, apply_fn, init_fn(k_init), k_train, train_learner=plain)
                best = (np.inf, None, None)
                for lr in cfg.finetune_lrs:  # per-user step size chosen on validation users
                    lrn = maml(apply_fn, inner_lr=lr, mask=mask)
                    out = predict_tasks(make_eval_fn(lrn, apply_fn), tr.params, val, cs.eval_chunk)
                    m = score(out["pred"], val, scale, cs.k)["mae"]
                    if m < best[0]:
                        best = (m, lrn, lr)
                learner = best[1]
                info["finetune_lr"] = best[2]
            else:
                tr = fit(name, learner, apply_fn, init_fn(k_init), k_train)
            eval_fn, tasks = make_eval_fn(learner, apply_fn), test
        for s, t in tasks.items():
            out = predict_tasks(eval_fn, tr.params, t, cs.eval_chunk)
            results[s][name] = score(out["pred"], t, scale, cs.k)
        info["seconds"][name] = time.time() - t0
        log_fn(
            f"seed {seed} {name}: best epoch {tr.best_epoch}, val MAE {tr.best_val_mae:.4f}, "
            f"{info['seconds'][name]:.1f}s"
        )

    # next-item ranking over the full catalogue (scenarios with known query items)
    ranking = {}
    for s in RANKED_SCENARIOS:
        ranking[s] = {
            "pretrained_encoder": support_ranking(enc_params, enc_cfg, test[s], k=cfg.rank_k),
            "popularity": popularity_ranking(sd.fit_ratings, sd.encoder, test[s], k=cfg.rank_k),
        }
    results["_ranking"] = ranking
    info["seconds"]["total"] = time.time() - t_start
    info["n_users"] = {s: int(t.num_tasks) for s, t in sd.test.items()}
    results["_info"] = info
    return results


def run(cfg: ml_collections.ConfigDict, data=None, log_fn: Callable = print) -> dict:
    """All seeds; mean and sample std over seeds (PROTOCOL.md result layout, plus ``ranking``)."""
    if data is None:
        data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    seeds = list(cfg.seeds)
    per_seed = {seed: run_seed(data, seed, cfg, log_fn) for seed in seeds}
    first = per_seed[seeds[0]]

    def agg(get):
        return {
            m: mmetrics.mean_std_over_seeds([get(per_seed[s])[m] for s in seeds])
            for m in get(first)
        }

    def over_methods(get_methods):
        return {meth: agg(lambda r, meth=meth: get_methods(r)[meth]) for meth in get_methods(first)}

    results = {s: over_methods(lambda r, s=s: r[s]) for s in coldstart.TEST_SCENARIOS}
    ranking = {s: over_methods(lambda r, s=s: r["_ranking"][s]) for s in first["_ranking"]}
    return {
        "dataset": data.name,
        "protocol": cfg.protocol,
        "seeds": seeds,
        "config": cfg.to_dict(),
        "scenarios": {
            s: {"n_users": first["_info"]["n_users"][s]} for s in coldstart.TEST_SCENARIOS
        },
        "results": results,
        "ranking": ranking,
        "training": {str(s): r["_info"] for s, r in per_seed.items()},
    }


def format_table(res: dict) -> str:
    """Rating metrics per scenario and method, then the next-item ranking."""
    n_seeds = len(res["seeds"])
    spread = "mean ± sample std over seeds" if n_seeds > 1 else "one seed, no spread measured"
    lines = [f"{res['dataset']} seeds={res['seeds']}  ({spread})"]
    for s, methods in res["results"].items():
        lines.append(f"[{s}] n_users={res['scenarios'][s]['n_users']}")
        for m, mets in methods.items():
            cells = [f"{k} {format_mean_std(mets[k], n_seeds).strip()}" for k in TABLE_METRICS]
            lines.append(f"  {m:18s} " + "  ".join(cells))
    lines.append(
        "next-item ranking (full catalogue, support items excluded, relevant = query items)"
    )
    for s, methods in res["ranking"].items():
        for m, mets in methods.items():
            cells = [f"{k} {v['mean']:.4f}" for k, v in mets.items()]
            lines.append(f"  [{s}] {m:18s} " + "  ".join(cells))
    return "\n".join(lines)


def main(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """The script body: run every seed, write ``results.json``, print the table."""
    validate_config(cfg)
    enable_compilation_cache()
    prepare_workdir(workdir, NAME)
    res = run(cfg, log_fn=lambda m: print(m, flush=True))
    path = write_json_atomic(os.path.join(workdir, "results.json"), res)
    print(format_table(res))
    print(f"wrote {path}")
    return res
