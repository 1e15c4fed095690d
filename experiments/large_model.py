"""Large-model comparison on the cold-start protocol (same splits and seeds for every method):

* ``melu_maml``       — the MeLU-style MLP meta-learned with MAML (reference);
* ``tf_scratch_maml`` — the Transformer rater from random initialisation, meta-learned with MAML;
* ``tf_pre_finetune`` — encoder pretrained (masked items, training users only), rater trained
  conventionally (no inner loop), then fine-tuned per user on the support set (step size picked on
  validation users);
* ``tf_pre_maml``     — pretrained encoder + MAML.

Rating metrics (MAE / RMSE / nDCG@3) per scenario, plus full-catalogue next-item ranking (HR@10,
recall@10, nDCG@10) of the pretrained encoder vs popularity on warm_test / user_cold.

  python -m experiments.large_model --workdir=runs/large_model
  python -m experiments.large_model --seeds=0,1,2 --init_from=runs/pretrain/seed0   # single-seed ckpt: --seeds=0
"""

import json
import os

import jax
from absl import app, flags

from metarec import pretrain as mpre

FLAGS = flags.FLAGS
_D = mpre.large_model_config()
flags.DEFINE_enum("dataset", _D.dataset, ["ml-100k", "ml-1m"], "MovieLens variant.")
flags.DEFINE_string("data_dir", None, "Folder with GroupLens or RecBole files (default: cache / recbole wheel).")
flags.DEFINE_bool("download", False, "Download from GroupLens if the dataset is not cached.")
flags.DEFINE_list("seeds", [str(s) for s in _D.seeds], "Seeds (comma list of integers).")
flags.DEFINE_list("methods", _D.methods, f"Methods, comma list of {', '.join(mpre.LARGE_METHODS)}.")
flags.DEFINE_integer("epochs", _D.epochs, "Max meta-training epochs (early stopping on validation users).", lower_bound=1)
flags.DEFINE_integer("patience", _D.patience, "Early-stopping patience.", lower_bound=1)
flags.DEFINE_integer("inner_steps", _D.inner_steps, "Inner gradient steps.", lower_bound=0)
flags.DEFINE_float("inner_lr", _D.inner_lr, "Inner learning rate.", lower_bound=0.0)
flags.DEFINE_float("meta_lr", _D.meta_lr, "Outer learning rate.", lower_bound=0.0)
flags.DEFINE_integer("meta_batch", _D.meta_batch, "Tasks per meta-batch.", lower_bound=1)
flags.DEFINE_integer("width", _D.width, "Transformer width.", lower_bound=2)
flags.DEFINE_integer("depth", _D.depth, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer("heads", _D.heads, "Attention heads.", lower_bound=1)
flags.DEFINE_bool("causal", _D.causal, "Causal attention.")
flags.DEFINE_integer("pretrain_epochs", _D.pretrain_epochs, "Masked-item pretraining epochs.", lower_bound=0)
flags.DEFINE_integer("num_negatives", _D.num_negatives, "0 = full softmax, else sampled softmax.", lower_bound=0)
flags.DEFINE_enum("rater_adapt", _D.rater_adapt, ["head", "lora", "head+last_block", "all"], "Parameters adapted per user.")
flags.DEFINE_integer("lora_rank", _D.lora_rank, "LoRA rank on the head (needed by --rater_adapt=lora).", lower_bound=0)
flags.DEFINE_string("init_from", "", "Pretrained checkpoint (experiments/pretrain.py) instead of pretraining per seed.")
flags.DEFINE_string("workdir", "runs/large_model", "Where results.json goes.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = mpre.large_model_config()
    try:
        cfg.seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise app.UsageError(f"--seeds takes a comma list of integers, got {','.join(FLAGS.seeds)!r}")
    cfg.dataset, cfg.data_dir, cfg.download = FLAGS.dataset, FLAGS.data_dir or "", FLAGS.download
    for name in ("methods", "epochs", "patience", "inner_steps", "inner_lr", "meta_lr", "meta_batch", "width", "depth",
                 "heads", "causal", "pretrain_epochs", "num_negatives", "rater_adapt", "lora_rank", "init_from"):
        cfg[name] = list(getattr(FLAGS, name)) if name == "methods" else getattr(FLAGS, name)
    bad = [m for m in cfg.methods if m not in mpre.LARGE_METHODS]
    if bad:
        raise app.UsageError(f"unknown --methods {bad}; valid: {', '.join(mpre.LARGE_METHODS)}")
    if cfg.width % cfg.heads:
        raise app.UsageError(f"--width={cfg.width} must be divisible by --heads={cfg.heads}")
    if cfg.rater_adapt == "lora" and cfg.lora_rank < 1:
        raise app.UsageError("--rater_adapt=lora needs --lora_rank >= 1")
    if cfg.init_from and len(cfg.seeds) > 1:
        raise app.UsageError("--init_from holds one seed's pretraining; run with a single --seeds value")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    res = mpre.run_large_model(cfg, log_fn=lambda m: print(m, flush=True))
    path = os.path.join(FLAGS.workdir, "results.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(format_table(res))
    print(f"wrote {path}")


def format_table(res) -> str:
    lines = [f"{res['dataset']} seeds={res['seeds']}  (mean ± std over seeds)"]
    for s, methods in res["results"].items():
        lines.append(f"[{s}] n_users={res['scenarios'][s]['n_users']}")
        for m, mets in methods.items():
            lines.append(f"  {m:18s} " + "  ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in mets.items() if k in ("mae", "rmse", "ndcg@3")))
    lines.append("next-item ranking (full catalogue, support items excluded, relevant = query items)")
    for s, methods in res["ranking"].items():
        for m, mets in methods.items():
            lines.append(f"  [{s}] {m:18s} " + "  ".join(f"{k} {v['mean']:.4f}" for k, v in mets.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "metarec", "jax"))
    app.run(main)
