"""Masked-item pretraining of the history Transformer on the TRAINING users of one cold-start split.

Only ``Split.train_ratings`` is used: warm-train users x existing items (no warm_test / new user, no
new item: nothing of any test scenario).  A ``--val_fraction`` of those users has its last (most
recent) item held out; the script reports held-out next-item accuracy / HR@10 / nDCG@10 over the
full catalogue and writes an orbax checkpoint loadable with ``metarec.pretrain.load_pretrained`` (and
``make_transformer_rater(..., init_from=<workdir>)``).

  python -m experiments.pretrain --dataset=ml-100k --seed=0 --workdir=runs/pretrain/seed0
"""

import json
import os

import jax
from absl import app, flags

from metarec import data as mdata
from metarec import pretrain as mpre
from metarec.models.transformer import EncoderConfig

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
flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint in --workdir.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.width % FLAGS.heads:
        raise app.UsageError(f"--width={FLAGS.width} must be divisible by --heads={FLAGS.heads}")
    data = mdata.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir, download=FLAGS.download)
    split = mdata.make_split(data, FLAGS.seed, FLAGS.protocol)
    encoder = mdata.FeatureEncoder.fit(data, split.train_ratings)
    enc_cfg = EncoderConfig(
        num_items=encoder.spec.item_vocab[1], max_len=FLAGS.max_len, width=FLAGS.width, depth=FLAGS.depth,
        heads=FLAGS.heads, dropout_rate=FLAGS.dropout, causal=FLAGS.causal,
    )  # fmt: skip
    pcfg = mpre.PretrainConfig(
        mask_prob=FLAGS.mask_prob, last_prob=FLAGS.last_prob, num_negatives=FLAGS.num_negatives,
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs, lr=FLAGS.lr, seed=FLAGS.seed,
    )  # fmt: skip
    log = lambda r: print(json.dumps(r), flush=True)  # noqa: E731
    params, history, val = mpre.pretrain_on_split(split.train_ratings, encoder, enc_cfg, pcfg, FLAGS.val_fraction, log)
    meta = {"dataset": data.name, "protocol": FLAGS.protocol, "seed": FLAGS.seed, "pretrain": pcfg.__dict__,
            "val": val, "n_train_users": int(split.train_ratings["user_id"].nunique())}  # fmt: skip
    path = mpre.save_pretrained(FLAGS.workdir, params, enc_cfg, mpre.item_ids_of_vocab(encoder), meta, FLAGS.overwrite)
    with open(os.path.join(path, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    print(f"held-out next item (last item of {val.get('n', 0)} training users): {val}")
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    app.run(main)
