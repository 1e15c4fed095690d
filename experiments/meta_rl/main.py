"""Meta-RL recommendation on a MovieLens user simulator: held-out users, CTR / return / regret after
0, 1, 2, 5, 10 adaptation episodes, meta-learners vs bandits and PPO (``rl_results.json``).

  python -m experiments.meta_rl.main --workdir=runs/rl
  python -m experiments.meta_rl.main --workdir=runs/rl --resume   # continue an interrupted run
  python -m experiments.meta_rl.main --config=experiments/meta_rl/configs/quick.py \
      --config.dataset=synthetic --config.seeds=0 --workdir=/tmp/rl

Any config field can be overridden, e.g. ``--config.methods=ppo,maml --config.meta.inner_lr=1.0
--config.env.horizon=10 --config.meta.inner_params=all``. The workdir also gets per-(seed, method)
checkpoints and results (``checkpoints/``, ``units/``), ``metrics.jsonl``/``metrics.csv``,
``config.json``, ``run.json`` and the libraries' log (see ``pipeline.py``).
"""

from absl import flags

from experiments import common
from experiments.meta_rl import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/rl")


if __name__ == "__main__":
    common.run_resumable("meta_rl", "experiments.meta_rl.main", pipeline.main, _CONFIG)
