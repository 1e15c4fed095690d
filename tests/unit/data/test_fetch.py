"""Getting MovieLens onto the machine: checksums, extraction, the cache, clear errors."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from metarec.data import fetch, readers
from tests.conftest import load_ml100k, write_ml100k


def _zip_fixture(tmp_path):
    src = write_ml100k(tmp_path / "src" / "ml-100k")
    zpath = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in os.listdir(src):
            z.write(os.path.join(src, f), f"ml-100k/{f}")
    return zpath


def test_download_grouplens_checks_md5(tmp_path):
    zpath = _zip_fixture(tmp_path)
    md5 = hashlib.md5(zpath.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    out = fetch.download_grouplens("ml-100k", str(cache), url=zpath.as_uri(), md5=md5)
    assert sorted(os.listdir(out)) == ["u.data", "u.item", "u.user"]
    assert len(load_ml100k(out).users) == 60
    with pytest.raises(readers.DataFormatError, match="md5 checksum mismatch"):
        fetch.download_grouplens("ml-100k", str(tmp_path / "c2"), url=zpath.as_uri(), md5="0" * 32)
    # the cache is then found without any download
    assert fetch.ensure_dataset("ml-100k", cache_dir=str(cache)) == out


def test_download_failure_is_a_file_not_found_error(tmp_path):
    url = (tmp_path / "no-such.zip").as_uri()
    with pytest.raises(FileNotFoundError, match=r"could not download ml-1m from file://.*no-such"):
        fetch.download_grouplens("ml-1m", str(tmp_path / "cache"), url=url, md5="0" * 32)


def test_extract_from_recbole_wheel(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in fetch.RECBOLE_ML100K_SHA256:
            z.writestr(f"recbole/dataset_example/ml-100k/{name}", "x")
    out = fetch.extract_from_recbole_wheel(str(wheel), str(tmp_path / "dest"), check=False)
    assert sorted(os.listdir(out)) == sorted(fetch.RECBOLE_ML100K_SHA256)
    with pytest.raises(readers.DataFormatError, match="sha256 checksum mismatch"):
        fetch.extract_from_recbole_wheel(str(wheel), str(tmp_path / "dest2"), check=True)


def test_ensure_dataset_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown MovieLens dataset 'ml-25m'; allowed: ml-100k, ml-1m"
    ):
        fetch.ensure_dataset("ml-25m")
    missing = tmp_path / "missing"
    with pytest.raises(
        readers.DataFormatError,
        match=rf"^{missing}: data_dir does not exist or is not a folder$",
    ):
        fetch.ensure_dataset("ml-100k", data_dir=str(missing))
    with pytest.raises(FileNotFoundError, match=r"ml-1m is not in the cache .*--config\.data_dir"):
        fetch.ensure_dataset("ml-1m", cache_dir=str(tmp_path))


def test_data_dir_and_download_exclude_each_other(ml100k_dir):
    message = (
        r"download fetches GroupLens' zip into the cache; it cannot be combined with data_dir "
        r"\(files you already have: "
    )
    with pytest.raises(ValueError, match=message):
        fetch.ensure_dataset("ml-100k", data_dir=ml100k_dir, download=True)
