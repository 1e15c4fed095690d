"""A dataset's cleaning counts and cold-start scenario table (``main.py`` is the command line)."""

from __future__ import annotations

import ml_collections

from experiments import common
from metarec import data as mdata
from metarec.data.scenarios import PROTOCOLS


def validate_config(config: ml_collections.ConfigDict) -> None:
    """``ValueError`` naming the first bad config value and what is allowed."""
    mdata.check_dataset(config.dataset)
    common.check_choice("--config.protocol", config.protocol, PROTOCOLS)
    if config.seed < 0:
        raise ValueError(f"--config.seed must be >= 0, got {config.seed}")


def describe(config: ml_collections.ConfigDict) -> str:
    """The description printed by the script: source, sizes, cleaning counts, scenario table."""
    validate_config(config)
    data = mdata.load_dataset(
        config.dataset, data_dir=config.data_dir or None, download=config.download
    )
    lines = [
        f"dataset {data.name} ({data.format}) from {data.source}",
        f"users {len(data.users)}, items {len(data.items)}, ratings {len(data.ratings)}, "
        f"genres {len(data.genres)}",
        "cleaning counts:",
    ]
    lines += [f"  {k:28s} {v}" for k, v in data.report.items()]
    split = mdata.make_split(data, config.seed, config.protocol)
    lines += [
        "",
        f"protocol {config.protocol}, seed {config.seed}: {len(split.new_users)} new users, "
        f"{len(split.new_items)} new items, {len(split.train_ratings)} training ratings",
        split.table().to_string(index=False, float_format=lambda v: f"{v:.1f}"),
    ]
    return "\n".join(lines)


def main(config: ml_collections.ConfigDict) -> None:
    print(describe(config))
