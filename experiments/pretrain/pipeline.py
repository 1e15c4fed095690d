"""Masked-item pretraining of the history Transformer on the TRAINING users of one cold-start split.

Only the cold-start training ratings are used: ``Split.train_ratings`` (warm-train users x existing
items: nothing of any test scenario) minus the query ratings of the cold-start validation users.
A ``pretrain.val_fraction`` of those users has its last (most recent) item held out; the run
reports held-out next-item accuracy / HR@10 / nDCG@10 over the full catalogue.

The workdir gets the encoder checkpoint (``params/``, ``encoder_config.json``, ``item_ids.npy``:
:mod:`metarec.training.encoder_checkpoint`, read with ``load_pretrained``), ``train_state/``
(params, optimizer state and PRNG key after every epoch, written atomically, the last 2 kept),
``config.json``, ``run.json`` (command, config, package versions, data SHA-256, seed, devices, git
commit), ``metrics.jsonl`` / ``metrics.csv`` (one row per epoch; TensorBoard under ``tb/`` when
tensorboardX is installed) and ``history.json``. A resumed run continues from the newest
``train_state`` checkpoint and ends with the same params as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from experiments.coldstart.build import fit_ratings_of
from experiments.common import check_choice, enable_compilation_cache, prepare_workdir
from metarec import data as mdata
from metarec.data.scenarios import PROTOCOLS
from metarec.models.transformer import EncoderConfig
from metarec.training import encoder_checkpoint
from metarec.training.checkpoint import Checkpointer
from metarec.training.pretrain import PretrainConfig, pretrain_on_split
from metarec.training.runlog import MetricsWriter, Progress, run_metadata, write_json_atomic
from metarec.training.workdir import check_resume, record_invocation

NAME = "pretrain"
STATE_DIR = "train_state"
# files this script owns in --workdir (the only ones --overwrite deletes)
RUN_FILES = encoder_checkpoint.FILES + (
    "history.json",
    STATE_DIR,
    "config.json",
    "run.json",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
)

# (lowest, highest) allowed value of numeric fields; None = unbounded
BOUNDS = {
    "encoder.max_len": (2, None),
    "encoder.width": (2, None),
    "encoder.depth": (1, None),
    "encoder.heads": (1, None),
    "encoder.mlp_ratio": (1, None),
    "encoder.dropout_rate": (0.0, 0.9),
    "encoder.rating_levels": (1, None),
    "pretrain.mask_prob": (0.01, 1.0),
    "pretrain.last_prob": (0.0, 1.0),
    "pretrain.num_negatives": (0, None),
    "pretrain.epochs": (1, None),
    "pretrain.batch_size": (1, None),
    "pretrain.lr": (0.0, None),
    "pretrain.weight_decay": (0.0, None),
    "pretrain.warmup_frac": (0.0, 1.0),
    "pretrain.clip_norm": (0.0, None),
    "pretrain.val_fraction": (0.0, 0.9),
}


def check_bounds(cfg: ml_collections.ConfigDict, bounds: dict, prefix: str = "") -> None:
    """``ValueError`` naming the first ``--config.<field>`` outside its ``bounds``."""
    for field, (lo, hi) in bounds.items():
        value = cfg
        for part in field.split("."):
            value = value[part]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"--config.{prefix}{field}={value}: must be {allowed}")


def check_encoder(encoder: ml_collections.ConfigDict, prefix: str = "") -> None:
    """The encoder fields that depend on each other."""
    if encoder.width % encoder.heads:
        raise ValueError(
            f"--config.{prefix}encoder.width={encoder.width} must be divisible by "
            f"--config.{prefix}encoder.heads={encoder.heads}"
        )


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Names checked against the registries, numbers against :data:`BOUNDS`."""
    check_choice("--config.dataset", cfg.dataset, mdata.DATASETS)
    check_choice("--config.protocol", cfg.protocol, PROTOCOLS)
    check_bounds(cfg, BOUNDS | {"seed": (0, None)})
    check_encoder(cfg.encoder)


def encoder_config(encoder: ml_collections.ConfigDict, num_items: int) -> EncoderConfig:
    """The :class:`EncoderConfig` of a config's ``encoder`` section for ``num_items`` items."""
    return EncoderConfig(num_items=num_items, **encoder.to_dict())


def pretrain_config(section: ml_collections.ConfigDict, seed: int) -> tuple[PretrainConfig, float]:
    """``(PretrainConfig, val_fraction)`` of a config's ``pretrain`` section."""
    fields = section.to_dict()
    val_fraction = fields.pop("val_fraction")
    return PretrainConfig(seed=seed, **fields), val_fraction


def run_pretrain(
    data: mdata.RatingsData,
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    argv: list[str] | None = None,
    print_fn=print,
    progress_stream=None,
) -> dict:
    """The run on a loaded dataset (also used in-process by tests). Returns ``{"path", "history",
    "val", "resumed_from"}``."""
    if os.path.exists(os.path.join(workdir, encoder_checkpoint.PARAMS_DIR)):
        raise FileExistsError(
            f"--workdir={workdir} already holds a finished pretraining checkpoint; pass "
            "--overwrite to replace it or choose another --workdir"
        )
    seed, protocol = cfg.seed, cfg.protocol
    split = mdata.make_split(data, seed, protocol)
    # the cold-start experiment's training ratings (its validation users' query ratings held out),
    # so its early stopping and tuning never score ratings the encoder was pretrained on
    train_ratings = fit_ratings_of(split, cfg.coldstart_val_fraction, seed)
    encoder = mdata.FeatureEncoder.fit(data, train_ratings)
    enc_cfg = encoder_config(cfg.encoder, encoder.spec.item_vocab[1])
    pcfg, val_fraction = pretrain_config(cfg.pretrain, seed)
    data_sha = mdata.data_checksum(data)
    config = {
        "dataset": data.name,
        "protocol": protocol,
        "seed": seed,
        "encoder": enc_cfg.to_dict(),
        "pretrain": dataclasses.asdict(pcfg),
        "val_fraction": val_fraction,
        "coldstart_val_fraction": cfg.coldstart_val_fraction,
    }
    check_resume(workdir, config, resume=resume, data_sha256=data_sha, log_fn=print_fn)
    meta = run_metadata(config, argv)
    record_invocation(workdir, meta | {"seed": seed, "data_sha256": data_sha}, resume=resume)
    with Checkpointer(os.path.join(workdir, STATE_DIR), keep_last=2, keep_best=0) as ck:
        latest = ck.latest_step() if resume else None
        start = latest or 0
        if latest is not None:
            print_fn(f"resuming from the checkpoint of epoch {start}")
        writer = MetricsWriter(workdir)
        if resume:
            writer.truncate(NAME, start)  # epochs logged after the newest checkpoint run again
        bar = Progress(pcfg.epochs, desc=NAME, done=start, stream=progress_stream)

        def log(rec):
            row = {"unit": NAME, "kind": "epoch", "step": rec["epoch"], "train_loss": rec["loss"]}
            writer.write(row | rec)
            print_fn(json.dumps(rec))
            bar.update(rec["epoch"], loss=rec["loss"])

        try:
            params, history, val = pretrain_on_split(
                train_ratings,
                encoder,
                enc_cfg,
                pcfg,
                val_fraction,
                log,
                checkpointer=ck,
                resume=resume,
            )
        finally:
            bar.close()
            writer.close()
    n_train = int(train_ratings["user_id"].nunique())
    info = {
        "dataset": data.name,
        "protocol": protocol,
        "seed": seed,
        "pretrain": pcfg.__dict__,
        "val": val,
        "n_train_users": n_train,
        "data_sha256": data_sha,
    }
    item_ids = encoder_checkpoint.item_ids_of_vocab(encoder)
    path = encoder_checkpoint.save_pretrained(workdir, params, enc_cfg, item_ids, info)
    write_json_atomic(os.path.join(path, "history.json"), history)
    return {"path": path, "history": history, "val": val, "resumed_from": latest}


def main(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict:
    """The script body: load the data, pretrain, print the held-out metrics."""
    validate_config(cfg)
    enable_compilation_cache()
    prepare_workdir(workdir, NAME, RUN_FILES, overwrite=overwrite)
    data = mdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, download=cfg.download)
    out = run_pretrain(
        data, cfg, workdir, resume=resume, argv=argv, print_fn=lambda m: print(m, flush=True)
    )
    val = out["val"]
    print(f"held-out next item (last item of {val.get('n', 0)} training users): {val}")
    print(f"checkpoint: {out['path']}")
    return out
