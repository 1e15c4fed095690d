"""Scale benchmark: synthetic power-law ratings at several sizes, generated and encoded into task
shards in bounded memory, streamed through a real MAML meta-step; writes ``scale.json`` to
--workdir (generation / encoding / streaming / epoch seconds and peak RSS per phase).

  python -m benchmarks.scale.main --workdir=runs/bench_scale                       # 10k,100k,1M
  python -m benchmarks.scale.main --users=2000,20000 --steps=20 --workdir=/tmp/s   # smoke run

Epoch time: a whole epoch is run up to --full_epoch_max_users users; above, --steps streamed steps
are timed and the epoch is ``n_batches x`` their mean (the JSON says which, per size).
"""

import json
import os
import sys
import types

from absl import flags

from benchmarks.meta_step import machine
from benchmarks.scale import bench
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list("users", ["10000", "100000", "1000000"], "Numbers of users, ascending.")
flags.DEFINE_float("items_per_user", 0.1, "Items = max(--min_items, this x users).")
flags.DEFINE_integer("min_items", 1000, "Fewest items at any size.", lower_bound=2)
flags.DEFINE_float("mean_ratings", 100.0, "Mean ratings per user (power-law tail).")
flags.DEFINE_integer("chunk_users", 20000, "Users per generated chunk (bounds memory).")
flags.DEFINE_integer("shard_size", 65536, "Tasks per shard.", lower_bound=1)
flags.DEFINE_integer("meta_batch", 32, "Tasks per meta-batch.", lower_bound=1)
flags.DEFINE_enum("learner", "maml", ["maml", "fomaml", "metasgd", "reptile"], "Meta-learner.")
flags.DEFINE_integer("inner_steps", 5, "Inner steps K.", lower_bound=1)
flags.DEFINE_integer("width", 64, "MeLU hidden width.", lower_bound=1)
flags.DEFINE_integer("embed_dim", 32, "MeLU embedding size.", lower_bound=1)
flags.DEFINE_integer("steps", 200, "Timed steps per size when the epoch is extrapolated.")
flags.DEFINE_integer("full_epoch_max_users", 10000, "Run whole epochs up to this many users.")
flags.DEFINE_integer("stream_batches", 500, "Meta-batches of the loader-only phase.")
flags.DEFINE_integer("buffer", 4, "Loader buffer in meta-batches.", lower_bound=1)
flags.DEFINE_string("data_dir", None, "Where the data goes (default: <workdir>/data).")
flags.DEFINE_bool("keep_data", False, "Keep each size's ratings and shards.")
flags.DEFINE_bool(
    "sparse_tables", True, "Row-gather the embedding tables larger than a task (meta_train's rule)."
)
flags.DEFINE_integer("seed", 0, "Seed of data, parameters and order.")
common.define_run_flags("runs/bench_scale", resumable=False)


def main() -> None:
    try:
        users = [int(u) for u in FLAGS.users]
    except ValueError:
        raise ValueError(f"--users takes a comma list of integers, got {FLAGS.users}") from None
    if not users or users != sorted(users) or users[0] < FLAGS.meta_batch:
        raise ValueError(f"--users must ascend and be >= --meta_batch, got {users}")
    workdir = common.prepare_workdir(FLAGS.workdir, "scale")
    root = FLAGS.data_dir or os.path.join(workdir, "data")
    names = (
        "mean_ratings chunk_users shard_size meta_batch learner inner_steps width embed_dim "
        "steps full_epoch_max_users stream_batches buffer keep_data seed items_per_user min_items "
        "sparse_tables"
    ).split()
    settings = types.SimpleNamespace(**{n: getattr(FLAGS, n) for n in names})
    command = " ".join(
        [os.path.basename(sys.executable), "-m", "benchmarks.scale.main", *sys.argv[1:]]
    )
    info = machine.machine_info()
    print(f"command: {command}")
    print(
        f"machine: {info['cpu_model']}, {info['cpu_count']} cores, jax {info['jax']} "
        f"{info['backend']}, load average {machine.load_average()}"
    )
    sizes = []
    for n in users:
        sizes.append(bench.run_size(n, settings, root, lambda m: print(m, flush=True)))
        res = {
            "command": command,
            "machine": info,
            "load_average_end": machine.load_average(),
            "settings": vars(settings),
            "sizes": sizes,
            "linearity": bench.linearity(sizes),
            "peak_rss_mb_max": max(
                r[p]["peak_rss_mb"]
                for r in sizes
                for p in ("generate", "encode", "stream", "train")
            ),
        }
        res["peak_rss_under_4gb"] = res["peak_rss_mb_max"] < 4096
        path = os.path.join(workdir, "scale.json")
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
    print()
    print("users      ratings       gen_s  enc_s  peak_MB  step_ms  epoch_s (measured?)")
    for r in sizes:
        peak = max(r[p]["peak_rss_mb"] for p in ("generate", "encode", "stream", "train"))
        t = r["train"]
        print(
            f"{r['n_users']:<10d} {r['n_ratings']:<13,d} {r['generate']['seconds']:6.1f} "
            f"{r['encode']['seconds']:6.1f} {peak:8.0f} {1e3 * t['step_s_mean']:8.1f} "
            f"{t['epoch_s']:9.1f} ({'yes' if t['epoch_measured'] else 'extrapolated'})"
        )
    print(f"linearity: {res['linearity']}; peak RSS under 4 GB: {res['peak_rss_under_4gb']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main("scale", main)
