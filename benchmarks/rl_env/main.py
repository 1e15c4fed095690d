"""Simulator throughput: env steps per second of the vmapped, jitted JAX simulator at 1, 64, 1024
and 8192 users at once against a plain per-user Python/numpy loop of the same simulator
(:mod:`benchmarks.rl_env.numpy_env`), in one run; also the meta-learned bandit's rollouts (policy
+ simulator). Prints the table, the command and the machine; writes ``rl_env.json`` to --workdir.

  python -m benchmarks.rl_env.main --workdir=runs/bench_rl
  python -m benchmarks.rl_env.main --users=1,64 --numpy_users=16 --workdir=/tmp/b   # quick
"""

import sys

from absl import flags

from benchmarks.rl_env import bench
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_list("users", ["1", "64", "1024", "8192"], "Numbers of users simulated at once.")
flags.DEFINE_integer(
    "numpy_users", 256, "Users (one episode each) of the numpy loop.", lower_bound=1
)
flags.DEFINE_integer("items", 100, "Catalogue size.", lower_bound=2)
flags.DEFINE_integer("horizon", 20, "Steps per episode.", lower_bound=1)
flags.DEFINE_float("min_time", 1.0, "Seconds of timing per measurement.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Seed of the synthetic users and of the draws.")
common.define_run_flags("runs/bench_rl", resumable=False)


def main():
    common.prepare_workdir(FLAGS.workdir, "bench_rl")
    bench.run(
        FLAGS.workdir,
        " ".join(["python -m benchmarks.rl_env.main"] + sys.argv[1:]),
        users=[int(u) for u in FLAGS.users],
        numpy_users=FLAGS.numpy_users,
        items=FLAGS.items,
        horizon=FLAGS.horizon,
        min_time=FLAGS.min_time,
        seed=FLAGS.seed,
    )


if __name__ == "__main__":
    common.run_main("bench_rl", main)
