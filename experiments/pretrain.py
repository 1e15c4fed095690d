"""Masked-item pretraining of the history Transformer on the TRAINING users of one cold-start split.

Only ``Split.train_ratings`` is used: warm-train users x existing items (no warm_test / new user, no
new item: nothing of any test scenario).  A ``--val_fraction`` of those users has its last (most
recent) item held out; the script reports held-out next-item accuracy / HR@10 / nDCG@10 over the
full catalogue and writes an orbax checkpoint loadable with ``metarec.pretrain.load_pretrained`` (and
``make_transformer_rater(..., init_from=<workdir>)``).

  python -m experiments.pretrain --dataset=ml-100k --seed=0 --workdir=runs/pretrain/seed0
  python -m experiments.pretrain --dataset=ml-100k --seed=0 --workdir=runs/pretrain/seed0 --resume

Besides the final checkpoint (``params/``, ``encoder_config.json``, ``item_ids.npy``: the format
``load_pretrained`` reads, unchanged) the workdir gets ``train_state/`` (params, optimizer state and
PRNG key after every epoch, written atomically, the last 2 kept), ``run.json`` (command, config,
package versions, data SHA-256, seed, devices, git commit), ``metrics.jsonl`` / ``metrics.csv`` (one
row per epoch; TensorBoard under ``tb/`` when tensorboardX is installed) and ``history.json``.
``--resume`` continues an interrupted run from the newest ``train_state`` checkpoint and ends with
the same params as an uninterrupted run.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

from metarec import data as mdata
from metarec import pretrain as mpre
from metarec.training.checkpoint import Checkpointer
from metarec.models.transformer import EncoderConfig
from metarec.training.runlog import MetricsWriter, Progress, read_json, remove_run_files, run_metadata, write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "MovieLens variant.")
flags.DEFINE_string("data_dir", None, "Folder with GroupLens or RecBole files (default: cache / recbole wheel).")
flags.DEFINE_bool("download", False, "Download from GroupLens if the dataset is not cached.")
flags.DEFINE_enum("protocol", "melu", ["melu", "time"], "Cold-start protocol whose training users are used.")
flags.DEFINE_integer("seed", 0, "Split seed (must match the meta-learning run that loads the checkpoint).")
flags.DEFINE_integer("width", 64, "Model width.", lower_bound=2)
flags.DEFINE_integer("depth", 2, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer("heads", 2, "Attention heads.", lower_bound=1)
flags.DEFINE_integer("max_len", 100, "Longest history (most recent ratings kept).", lower_bound=2)
flags.DEFINE_float("dropout", 0.1, "Dropout rate.", lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_bool("causal", False, "Causal attention.")
flags.DEFINE_float("mask_prob", 0.2, "Fraction of positions masked.", lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_float("last_prob", 0.1, "Probability of masking only the last item of a sequence.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("num_negatives", 0, "0 = full softmax over the catalogue; else sampled softmax negatives.", lower_bound=0)
flags.DEFINE_integer("epochs", 30, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Sequences per batch.", lower_bound=1)
flags.DEFINE_float("lr", 2e-3, "Peak AdamW learning rate.", lower_bound=0.0)
flags.DEFINE_float("val_fraction", 0.1, "Fraction of training users whose last item is held out.", lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_string("workdir", "runs/pretrain", "Checkpoint directory (must not hold a checkpoint unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Delete this script's files in --workdir (checkpoint, train_state, metrics, run.json) first.")
flags.DEFINE_bool("resume", False, "Continue the interrupted run in --workdir from its newest train_state checkpoint.")
flags.register_multi_flags_validator(
    ["resume", "overwrite"], lambda f: not (f["resume"] and f["overwrite"]),
    "--resume and --overwrite contradict each other: --resume continues the run in --workdir, --overwrite deletes it",
)

STATE_DIR = "train_state"
UNIT = "pretrain"
# files this script owns in --workdir (the only ones --overwrite deletes)
RUN_FILES = (mpre.PARAMS_DIR, mpre.CONFIG_FILE, mpre.ITEMS_FILE, "history.json", STATE_DIR, "run.json",
             "metrics.jsonl", "metrics.csv", "tb")  # fmt: skip


def run_pretrain(
    data, seed: int, protocol: str, enc_kwargs: dict, pcfg: mpre.PretrainConfig, val_fraction: float, workdir: str,
    *, resume: bool = False, overwrite: bool = False, argv: list[str] | None = None, print_fn=print,
    progress_stream=None,
) -> dict:  # fmt: skip
    """The whole script on a loaded dataset (also used in-process by tests). ``enc_kwargs`` are the
    :class:`EncoderConfig` fields but ``num_items`` (taken from the split's item vocabulary).
    Returns ``{"path", "history", "val", "resumed_from"}``."""
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other")
    if overwrite:
        remove_run_files(workdir, RUN_FILES)
    if os.path.exists(os.path.join(workdir, mpre.PARAMS_DIR)):
        raise FileExistsError(
            f"--workdir={workdir} already holds a finished pretraining checkpoint; pass --overwrite to replace "
            "it or choose another --workdir"
        )
    split = mdata.make_split(data, seed, protocol)
    encoder = mdata.FeatureEncoder.fit(data, split.train_ratings)
    enc_cfg = EncoderConfig(num_items=encoder.spec.item_vocab[1], **enc_kwargs)
    data_sha = mdata.data_checksum(data)
    config = {"dataset": data.name, "protocol": protocol, "seed": seed, "encoder": enc_cfg.to_dict(),
              "pretrain": dataclasses.asdict(pcfg), "val_fraction": val_fraction}  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    run_path = os.path.join(workdir, "run.json")
    with Checkpointer(os.path.join(workdir, STATE_DIR), keep_last=2, keep_best=0) as ck:
        latest = ck.latest_step()
        if latest is not None and not resume:
            raise ValueError(
                f"{ck.directory} already holds training state (epoch {latest}); pass --resume to continue it, "
                "--overwrite to start again, or choose another --workdir"
            )
        invocations = []
        if resume and os.path.exists(run_path):
            saved = read_json(run_path)
            if saved.get("data_sha256") not in (None, data_sha):
                raise ValueError(
                    f"--resume: the data changed since the run in {workdir} started (ratings sha256 "
                    f"{saved['data_sha256'][:12]}... -> {data_sha[:12]}...); use a fresh --workdir"
                )
            invocations = saved.get("invocations", [])
        meta = run_metadata(config, argv)
        write_json_atomic(run_path, meta | {"seed": seed, "data_sha256": data_sha,
                                            "invocations": invocations + [meta["command"]]})  # fmt: skip
        start = (latest or 0) if resume else 0
        if resume:
            print_fn(f"resuming from the checkpoint of epoch {start}" if latest is not None
                     else f"--resume: nothing to resume in {workdir}; starting a fresh run")  # fmt: skip
        writer = MetricsWriter(workdir)
        if resume:
            writer.truncate(UNIT, start)  # epochs logged after the newest checkpoint are trained again
        bar = Progress(pcfg.epochs, desc=UNIT, done=start, stream=progress_stream)

        def log(rec):
            writer.write({"unit": UNIT, "kind": "epoch", "step": rec["epoch"], "train_loss": rec["loss"], **rec})
            print_fn(json.dumps(rec))
            bar.update(rec["epoch"], loss=rec["loss"])

        try:
            params, history, val = mpre.pretrain_on_split(
                split.train_ratings, encoder, enc_cfg, pcfg, val_fraction, log, checkpointer=ck, resume=resume
            )
        finally:
            bar.close()
            writer.close()
    info = {"dataset": data.name, "protocol": protocol, "seed": seed, "pretrain": pcfg.__dict__, "val": val,
            "n_train_users": int(split.train_ratings["user_id"].nunique()), "data_sha256": data_sha}  # fmt: skip
    path = mpre.save_pretrained(workdir, params, enc_cfg, mpre.item_ids_of_vocab(encoder), info)
    write_json_atomic(os.path.join(path, "history.json"), history)
    return {"path": path, "history": history, "val": val, "resumed_from": latest if resume else None}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.width % FLAGS.heads:
        raise app.UsageError(f"--width={FLAGS.width} must be divisible by --heads={FLAGS.heads}")
    data = mdata.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir, download=FLAGS.download)
    enc_kwargs = dict(max_len=FLAGS.max_len, width=FLAGS.width, depth=FLAGS.depth, heads=FLAGS.heads,
                      dropout_rate=FLAGS.dropout, causal=FLAGS.causal)  # fmt: skip
    pcfg = mpre.PretrainConfig(
        mask_prob=FLAGS.mask_prob, last_prob=FLAGS.last_prob, num_negatives=FLAGS.num_negatives,
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, lr=FLAGS.lr, seed=FLAGS.seed,
    )  # fmt: skip
    try:
        out = run_pretrain(
            data, FLAGS.seed, FLAGS.protocol, enc_kwargs, pcfg, FLAGS.val_fraction, FLAGS.workdir,
            resume=FLAGS.resume, overwrite=FLAGS.overwrite, argv=["-m", "experiments.pretrain", *sys.argv[1:]],
            print_fn=lambda m: print(m, flush=True),
        )  # fmt: skip
    except (ValueError, FileExistsError, FloatingPointError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        sys.exit(1)
    val = out["val"]
    print(f"held-out next item (last item of {val.get('n', 0)} training users): {val}")
    print(f"checkpoint: {out['path']}")


if __name__ == "__main__":
    app.run(main)
