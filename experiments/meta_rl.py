r"""Meta-RL recommendation benchmark: held-out users, CTR / return / regret vs adaptation episodes.

    python -m experiments.meta_rl --workdir runs/meta_rl            # ml-100k, seeds 0,1,2
    python -m experiments.meta_rl --dataset synthetic --quick --workdir /tmp/rl

Writes ``<workdir>/rl_results.json``::

    {"results": {method: {"ctr"|"return"|"regret": {n_episodes: {"mean", "std"}}}},
     "oracle_ctr": {"mean", "std"}, "config": {...}, "command": "...", ...}

and prints the tables. The catalogue is restricted to the ``--n_items`` most-rated training items;
train users are the first ``--n_train_users`` warm-train users, test users the first
``--n_test_users`` user-cold users of each seed (see metarec/rl/benchmark.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from absl import app, flags

from metarec.rl import benchmark
from metarec.rl import env as envlib

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m", "synthetic"], "Simulator source.")
flags.DEFINE_string("data_dir", None, "MovieLens directory (GroupLens or RecBole layout); default: cache.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (split, simulator fit, training, evaluation).")
flags.DEFINE_string("workdir", None, "Output directory for rl_results.json.", required=True)
flags.DEFINE_list("methods", list(benchmark.ALL_METHODS), "Methods to run.")
flags.DEFINE_integer("n_train_users", 400, "Training users (environments) per seed.")
flags.DEFINE_integer("n_test_users", 64, "Held-out users per seed.")
flags.DEFINE_integer("n_items", 100, "Catalogue size: the most-rated training items.")
flags.DEFINE_enum("reward", "click", ["click", "rating"], "Reward per click: 1, or predicted rating / 5.")
flags.DEFINE_integer("horizon", 20, "Steps per episode (truncation).")
flags.DEFINE_integer("history_len", 10, "Observed history length.")
flags.DEFINE_float("threshold", 3.5, "Affinity (rating) at which a fresh user clicks half the time.")
flags.DEFINE_float("temperature", 0.5, "Logistic link temperature (rating units).")
flags.DEFINE_float("boredom_weight", 1.0, "Satiation strength for repeated genres.")
flags.DEFINE_float("leave_growth", 0.1, "Leave probability added per consecutive unrewarded step.")
flags.DEFINE_list("adapt_episodes", ["0", "1", "2", "5", "10"], "Numbers of adaptation episodes reported.")
flags.DEFINE_integer("eval_episodes", 4, "Evaluation episodes per user and n.")
flags.DEFINE_integer("ppo_updates", 150, "PPO updates (non-meta PPO, also the meta-learners' warm start).")
flags.DEFINE_integer("dqn_iterations", 100, "DQN iterations.")
flags.DEFINE_integer("meta_iterations", 150, "Meta-training iterations.")
flags.DEFINE_integer("meta_batch", 16, "Users per meta-batch.")
flags.DEFINE_integer("inner_steps", 2, "Inner steps (one support episode each) during meta-training.")
flags.DEFINE_float("inner_lr", 1.0, "Inner learning rate (Meta-SGD: its initial value).")
flags.DEFINE_integer("online_rounds", 5, "Online loop: rounds per streamed test user (0 = skip).")
flags.DEFINE_bool("quick", False, "Tiny sizes for a smoke run (overrides the size flags).")


def _ints(values, flag):
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} must be a comma-separated list of integers, got {','.join(values)}")


def make_config() -> benchmark.BenchmarkConfig:
    """Flags -> :class:`BenchmarkConfig` (all validation happens in the library)."""
    f = FLAGS
    env = envlib.EnvConfig(horizon=f.horizon, history_len=f.history_len, threshold=f.threshold,
                           temperature=f.temperature, boredom_weight=f.boredom_weight, leave_growth=f.leave_growth)
    base = benchmark.BenchmarkConfig()
    c = dataclasses.replace(
        base, dataset=f.dataset, data_dir=f.data_dir, seeds=_ints(f.seeds, "seeds"), methods=tuple(f.methods),
        n_train_users=f.n_train_users, n_test_users=f.n_test_users, n_items=f.n_items, reward=f.reward, env=env,
        adapt_episodes=_ints(f.adapt_episodes, "adapt_episodes"), eval_episodes=f.eval_episodes,
        ppo=dataclasses.replace(base.ppo, num_updates=f.ppo_updates),
        dqn=dataclasses.replace(base.dqn, num_iterations=f.dqn_iterations),
        meta=dataclasses.replace(base.meta, num_iterations=f.meta_iterations, meta_batch=f.meta_batch,
                                 inner_steps=f.inner_steps, inner_lr=f.inner_lr),
        online_rounds=f.online_rounds,
    )
    if f.quick:
        c = dataclasses.replace(
            c, n_train_users=min(c.n_train_users, 64), n_test_users=min(c.n_test_users, 16), n_items=min(c.n_items, 30),
            env=dataclasses.replace(env, horizon=min(env.horizon, 8), history_len=min(env.history_len, 4)),
            adapt_episodes=tuple(n for n in c.adapt_episodes if n <= 2) or (0,), eval_episodes=2,
            ppo=dataclasses.replace(c.ppo, num_updates=20, num_envs=8),
            dqn=dataclasses.replace(c.dqn, num_iterations=10, num_envs=4, buffer_size=1024, batch_size=32),
            meta=dataclasses.replace(c.meta, num_iterations=10, meta_batch=4), online_rounds=min(c.online_rounds, 2),
        )
    try:
        c.validate()
    except ValueError as e:
        raise app.UsageError(str(e))
    return c


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv):
    del argv
    logging.getLogger("metarec.rl").setLevel(logging.INFO)
    config = make_config()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    t = time.time()
    payload = benchmark.run_benchmark(config)
    payload["config"] = _jsonable(config)
    payload["command"] = " ".join([os.path.basename(sys.executable), "-m", "experiments.meta_rl"] + sys.argv[1:])
    payload["wall_s"] = round(time.time() - t, 1)
    path = os.path.join(FLAGS.workdir, "rl_results.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    for metric in ("ctr", "return", "regret"):
        print(benchmark.format_table(payload, metric), end="\n\n")
    for s in payload["per_seed"]:
        if "online" in s:
            print(f"seed {s['seed']} online ({s['online']['policy']}): CTR per round "
                  f"{[round(v, 3) for v in s['online']['round_ctr']]}, running CTR {s['online']['final_running_ctr']:.3f}")
    print(f"wrote {path} in {payload['wall_s']}s")


if __name__ == "__main__":
    app.run(main)
