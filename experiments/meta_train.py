"""Cold-start meta-learning on MovieLens: meta-train on warm users, evaluate every method on every
scenario over several seeds, print one table and write ``results.json`` (PROTOCOL.md) to --workdir.

  python -m experiments.meta_train --dataset=ml-100k --workdir=runs/demo
  python -m experiments.meta_train --algo=maml,metasgd --seeds=0 --epochs=5 --workdir=/tmp/quick
  python -m experiments.meta_train --workdir=runs/demo --resume     # continue an interrupted run

The workdir also gets per-(seed, algorithm) checkpoints and results (``checkpoints/``, ``units/``),
``metrics.jsonl``/``metrics.csv`` (TensorBoard event files under ``tb/`` when tensorboardX is
installed), ``config.json``, ``run.json`` (command, package versions, devices, git commit),
``train_log.txt`` and the Markdown report ``report/report.md`` with its figures.
"""

import os
import sys

import jax
from absl import app, flags, logging

from experiments import report
from metarec import coldstart
from metarec.data import DataFormatError
from metarec.training.runlog import remove_run_files, write_json_atomic

FLAGS = flags.FLAGS
_D = coldstart.default_config()
flags.DEFINE_enum("dataset", _D.dataset, ["ml-100k", "ml-1m"], "MovieLens variant.")
flags.DEFINE_string("data_dir", None, "Folder with GroupLens or RecBole files (default: cache / recbole wheel).")
flags.DEFINE_bool("download", False, "Download from GroupLens if the dataset is not cached.")
flags.DEFINE_enum("protocol", _D.protocol, ["melu", "time"], "Cold-start protocol (PROTOCOL.md).")
flags.DEFINE_list("algo", _D.algos, f"Meta-learners, comma list of {', '.join(coldstart.META_ALGOS)}.")
flags.DEFINE_list("baselines", _D.baselines, f"Baselines, comma list of {', '.join(coldstart.BASELINES)}.")
flags.DEFINE_list("seeds", [str(s) for s in _D.seeds], "Seeds (comma list of integers).")
flags.DEFINE_integer("inner_steps", _D.inner_steps, "Inner gradient steps.", lower_bound=0)
flags.DEFINE_float("inner_lr", _D.inner_lr, "Inner learning rate.", lower_bound=0.0)
flags.DEFINE_float("meta_lr", _D.meta_lr, "Outer (meta) learning rate (AdamW).", lower_bound=0.0)
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay.", lower_bound=0.0)
flags.DEFINE_float("clip_norm", _D.clip_norm, "Clip meta-gradients to this global norm (0 = off).", lower_bound=0.0)
flags.DEFINE_integer("meta_batch", _D.meta_batch, "Tasks (users) per meta-batch.", lower_bound=1)
flags.DEFINE_integer("epochs", _D.epochs, "Maximum meta-training epochs (early stopping on validation users).", lower_bound=1)
flags.DEFINE_integer("patience", _D.patience, "Early-stopping patience in epochs.", lower_bound=1)
flags.DEFINE_string("adapt", _D.adapt, "Parameters adapted in the inner loop: for --model=melu one of "
                    f"{', '.join(coldstart.ADAPT_CHOICES)}; for --model=transformer one of "
                    f"{', '.join(coldstart.TF_ADAPT_CHOICES)}.")
flags.DEFINE_enum("model", _D.model, list(coldstart.MODELS), "Rating model: MeLU-style MLP or Transformer history encoder.")
flags.DEFINE_string("init_from", _D.init_from, "--model=transformer: pretraining checkpoint of experiments.pretrain "
                    "('{seed}' is replaced by each seed, e.g. runs/pretrain/seed{seed}).")
flags.DEFINE_integer("tf_width", _D.tf_width, "Transformer width (without --init_from).", lower_bound=2)
flags.DEFINE_integer("tf_depth", _D.tf_depth, "Transformer blocks (without --init_from).", lower_bound=1)
flags.DEFINE_integer("tf_heads", _D.tf_heads, "Attention heads (without --init_from).", lower_bound=1)
flags.DEFINE_integer("chunk_size", _D.chunk_size, "Tasks vmapped at once inside a meta-step (0 = the whole "
                     "meta-batch); must divide --meta_batch.", lower_bound=0)
flags.DEFINE_integer("lora_rank", _D.lora_rank, "LoRA rank of the transformer head (--adapt=lora).", lower_bound=0)
flags.DEFINE_float("feature_dropout", _D.feature_dropout, "Probability of replacing a feature by its OOV index during meta-training.", lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_float("val_fraction", _D.val_fraction, "Fraction of warm training users held out for early stopping/tuning.")
flags.DEFINE_integer("embed_dim", _D.embed_dim, "Embedding size.", lower_bound=1)
flags.DEFINE_list("hidden", [str(h) for h in _D.hidden], "MLP hidden sizes.")
flags.DEFINE_bool("residual", _D.residual, "Predict residuals on the user's shrunk support mean.")
flags.DEFINE_bool("use_item_id", _D.use_item_id, "Item-id embedding (OOV row for unseen items).")
flags.DEFINE_integer("context_dim", _D.context_dim, "Size of the CAVIA-style user-context vector (0 = none; "
                     "--adapt=context or decision+context adapt it).", lower_bound=0)
flags.DEFINE_bool("all_devices", False, "Shard each meta-batch over all visible devices (data parallel; "
                  "multi-host: call jax.distributed.initialize() first, see BUILD_NOTES.md).")
flags.DEFINE_string("workdir", "runs/meta_train", "Where results.json, checkpoints, metrics and the report go.")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir: finished (seed, algorithm) units are read back, "
                  "the unfinished one continues from its newest checkpoint.")
flags.DEFINE_bool("overwrite", False, "Delete the run files in --workdir (checkpoints, units, metrics, results) and "
                  "start again.")
flags.DEFINE_integer("ckpt_every", _D.ckpt_every, "Meta-steps between checkpoints within an epoch (0: epoch ends only).",
                     lower_bound=0)
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Newest checkpoints kept per unit (the best by "
                     "validation MAE is kept as well).", lower_bound=1)
flags.DEFINE_integer("log_every", _D.log_every, "Meta-steps between metric records (0: per epoch only).", lower_bound=0)
flags.DEFINE_bool("progress", True, "Progress line with rate and ETA on stderr.")
flags.DEFINE_bool("adaptation_curves", _D.adaptation_curves, "Evaluate the first algorithm with several inner-step "
                  "counts and support sizes (report figures).")
flags.DEFINE_list("curve_steps", [str(v) for v in _D.curve_steps], "Inner steps for the MAE-vs-steps curve.")
flags.DEFINE_list("curve_support", [str(v) for v in _D.curve_support], "Support sizes for the MAE-vs-support curve.")
flags.DEFINE_bool("report", True, "Write report/report.md with tables and figures at the end.")
flags.DEFINE_bool("traceback", False, "Show the Python traceback of an error instead of the one-line message.")

# files this script owns in --workdir (the only ones --overwrite deletes)
RUN_FILES = ("checkpoints", "units", "config.json", "run.json", "metrics.jsonl", "metrics.csv", "tb", "results.json",
             "results.md", "report", "train_log.txt")


def _int_list_validator(name, lo):
    def check(values):
        try:
            ints = [int(v) for v in values]
        except (TypeError, ValueError):
            raise flags.ValidationError(f"--{name} takes a comma list of integers, got {','.join(values)!r}")
        if any(v < lo for v in ints):
            raise flags.ValidationError(f"--{name} values must be >= {lo}, got {ints}")
        return True

    flags.register_validator(name, check)


def _names_validator(name, valid):
    def check(values):
        bad = [v for v in values if v not in valid]
        if bad:
            raise flags.ValidationError(f"unknown --{name} {bad}; valid: {', '.join(valid)}")
        if len(set(values)) != len(values):
            raise flags.ValidationError(f"--{name} lists a name more than once: {list(values)}")
        return True

    flags.register_validator(name, check)


_int_list_validator("seeds", 0)
_int_list_validator("hidden", 1)
_int_list_validator("curve_steps", 0)
_int_list_validator("curve_support", 1)
_names_validator("algo", coldstart.META_ALGOS)
_names_validator("baselines", coldstart.BASELINES)
flags.register_validator("val_fraction", lambda v: 0 < v < 1, "--val_fraction must be in (0, 1)")
flags.register_multi_flags_validator(
    ["resume", "overwrite"], lambda f: not (f["resume"] and f["overwrite"]),
    "--resume and --overwrite contradict each other: --resume continues the run in --workdir, --overwrite deletes it",
)  # fmt: skip
flags.register_multi_flags_validator(
    ["data_dir", "download"], lambda f: not (f["data_dir"] and f["download"]),
    "--download fetches GroupLens' zip into the cache; it cannot be combined with --data_dir (files you already have)",
)  # fmt: skip


def _ints(name, values):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--{name} takes a comma list of integers, got {','.join(values)!r}")


def config_from_flags():
    cfg = coldstart.default_config()
    cfg.dataset, cfg.data_dir, cfg.download, cfg.protocol = FLAGS.dataset, FLAGS.data_dir or "", FLAGS.download, FLAGS.protocol
    cfg.algos, cfg.baselines = list(FLAGS.algo), list(FLAGS.baselines)
    cfg.seeds = _ints("seeds", FLAGS.seeds)
    cfg.hidden = _ints("hidden", FLAGS.hidden)
    for name in ("inner_steps", "inner_lr", "meta_lr", "weight_decay", "clip_norm", "meta_batch", "epochs",
                 "patience", "adapt", "feature_dropout", "val_fraction", "embed_dim", "residual", "use_item_id", "context_dim",
                 "model", "init_from", "tf_width", "tf_depth", "tf_heads", "lora_rank", "chunk_size",
                 "all_devices", "ckpt_every", "keep_checkpoints", "log_every", "adaptation_curves"):
        cfg[name] = getattr(FLAGS, name)
    cfg.curve_steps = _ints("curve_steps", FLAGS.curve_steps)
    cfg.curve_support = _ints("curve_support", FLAGS.curve_support)
    try:
        coldstart.validate_config(cfg)
    except ValueError as e:
        raise app.UsageError(str(e))
    return cfg


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = config_from_flags()
    # XLA's persistent compilation cache: a second run with the same shapes skips compilation.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "metarec", "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    workdir = FLAGS.workdir
    if FLAGS.overwrite:
        remove_run_files(workdir, RUN_FILES)
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("meta_train", workdir)
    log_path = os.path.join(workdir, "train_log.txt")
    argv_rec = ["-m", "experiments.meta_train", *sys.argv[1:]]
    try:
        with open(log_path, "a" if FLAGS.resume else "w") as log_file:
            def log_fn(msg):
                log_file.write(msg + "\n")
                log_file.flush()
                if not msg.startswith("  "):
                    print(msg, flush=True)

            res = coldstart.run(cfg, log_fn=log_fn, workdir=workdir, resume=FLAGS.resume, progress=FLAGS.progress,
                                argv=argv_rec)  # fmt: skip
    except (DataFormatError, ValueError, FileNotFoundError, coldstart.NonFiniteLossError) as e:
        if FLAGS.traceback:
            raise
        print(f"meta_train: error: {e}", file=sys.stderr)
        sys.exit(1)
    path = write_json_atomic(os.path.join(workdir, "results.json"), res)
    table = coldstart.format_table(res)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("```\n" + table + "\n```\n")
    print()
    print(table)
    print(f"wrote {path}")
    if FLAGS.report:
        print(f"report: {report.make_report(workdir)}")


if __name__ == "__main__":
    app.run(main)
