"""The DATASETS registry: the names scripts accept, loading by name, errors that list the names."""

from __future__ import annotations

import pytest

from metarec import data as mdata
from metarec.data import registry
from tests.conftest import load_ml100k


def test_registered_datasets():
    assert list(mdata.DATASETS) == ["ml-100k", "ml-1m"]
    for name, entry in mdata.DATASETS.items():
        assert entry.name == name and entry.description
        assert mdata.check_dataset(name) == name


def test_unknown_dataset_lists_the_registered_ones():
    for call in (mdata.check_dataset, mdata.load_dataset):
        message = r"^unknown dataset 'ml-25m'; allowed: ml-100k, ml-1m$"
        with pytest.raises(ValueError, match=message):
            call("ml-25m")


def test_load_dataset_by_name_reads_and_cleans(ml100k_dir):
    data = mdata.load_dataset("ml-100k", data_dir=ml100k_dir)
    expected = load_ml100k(ml100k_dir)
    assert data.name == "ml-100k" and data.source == expected.source
    assert data.report == expected.report
    assert data.ratings.equals(expected.ratings) and data.users.equals(expected.users)
    assert data.items.equals(expected.items)


def test_missing_data_dir_names_the_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(mdata.DataFormatError, match=rf"^{missing}: data_dir does not exist"):
        mdata.load_dataset("ml-100k", data_dir=str(missing))


def test_register_dataset(monkeypatch, ml100k_dir):
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))
    entry = mdata.DatasetEntry(
        "toy", lambda data_dir, cache_dir, download: load_ml100k(ml100k_dir), "a test fixture"
    )
    registry.register_dataset(entry)
    assert registry.check_dataset("toy") == "toy"
    assert len(registry.load_dataset("toy").users) == 60
    with pytest.raises(ValueError, match="dataset 'toy' is already registered"):
        registry.register_dataset(entry)
