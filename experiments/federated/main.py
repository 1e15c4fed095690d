"""Federated meta-learning simulation (issue 15, item 2): the private variant of the recommended
method trained centrally and federated (FedMeta / Per-FedAvg / Reptile-as-FedAvg), IID and non-IID
clients, full and 10% participation; MAE and nDCG@3 on the four test scenarios, validation MAE vs
rounds and bytes.

  python -m experiments.federated.main --workdir=runs/federated
  python -m experiments.federated.main --workdir=runs/federated --resume
  python -m experiments.federated.main --config=experiments/federated/configs/quick.py \
      --workdir=/tmp/fed

Writes results.json, results.md, report/federated_rounds.png, report/federated_bytes.png,
config.json, run.json, metrics.jsonl, checkpoints/ and units/ (see pipeline.py).
"""

from absl import flags

from experiments import common
from experiments.federated import pipeline

FLAGS = flags.FLAGS
_CONFIG = common.define_config(__file__)
common.define_run_flags(default_workdir="runs/federated")


if __name__ == "__main__":
    common.run_resumable("federated", "experiments.federated.main", pipeline.main, _CONFIG)
