"""experiments/describe_data: the cleaning counts and scenario table it prints, and its config
checks (the script's one-line errors: tests/integration/test_errors.py)."""

from __future__ import annotations

import pytest

from experiments.describe_data import pipeline
from experiments.describe_data.configs import default
from tests.conftest import write_ml100k


@pytest.fixture
def config(tmp_path):
    cfg = default.get_config()
    cfg.data_dir = write_ml100k(
        tmp_path / "ml-100k", n_users=120, n_items=150, min_per_user=5, max_per_user=110, seed=7
    )
    return cfg


def test_description_of_a_fixture(config):
    lines = pipeline.describe(config).splitlines()
    assert lines[0] == f"dataset ml-100k (grouplens-100k) from {config.data_dir}/u.data"
    assert lines[1] == "users 120, items 150, ratings 6828, genres 19"
    assert "  items_unknown_year           2" in lines
    assert "  ratings_kept                 6828" in lines
    assert "protocol melu, seed 0: 24 new users, 45 new items, 3337 training ratings" in lines
    assert lines[-6].split() == ["scenario", "users", "ratings", "support_mean", "query_size"]
    assert lines[-5].split() == ["warm_train", "71", "3206", "35.2", "10"]
    assert lines[-1].split() == ["user_item_cold", "18", "414", "13.0", "10"]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dataset", "ml-25m", r"unknown dataset 'ml-25m'; allowed: ml-100k, ml-1m"),
        ("protocol", "mamo", r"--config\.protocol='mamo'; allowed: melu, time"),
        ("seed", -1, r"--config\.seed must be >= 0, got -1"),
    ],
)
def test_bad_config_values(config, field, value, message):
    config[field] = value
    with pytest.raises(ValueError, match=message):
        pipeline.describe(config)
