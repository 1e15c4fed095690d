"""Fixtures shared by the cold-start and tuning-path tests."""

import pytest

from metarec.data import readers
from metarec.data.movielens import clean
from tests.conftest import write_ml100k


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """A small ml-100k-shaped dataset (150 users, 120 items) and its folder."""
    d = write_ml100k(
        tmp_path_factory.mktemp("cs") / "ml-100k",
        n_users=150,
        n_items=120,
        min_per_user=14,
        max_per_user=60,
        seed=11,
    )
    return clean(readers.read_any(d), "ml-100k"), d
