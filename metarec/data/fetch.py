"""Getting MovieLens onto the machine — never into the repository (its licence forbids
redistribution).

Three ways, tried in this order by :func:`ensure_dataset`:

1. ``data_dir``: a directory the user already has, in GroupLens or RecBole layout; used as is.
2. The cache (``$METAREC_DATA`` or ``~/.cache/metarec``), filled earlier by 3 or 4.
3. Offline default for ml-100k: the copy of ml-100k inside the ``recbole==1.2.1`` wheel, fetched
   with ``pip download --no-deps recbole==1.2.1`` (PyPI is reachable where GroupLens may not be) and
   extracted (only ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``) into the cache.
   The wheel's SHA-256 is checked.
4. ``download=True``: GroupLens' published zip (checked against its published MD5) extracted into
   the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

from metarec.data.readers import DataFormatError

log = logging.getLogger("metarec.data")

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

GROUPLENS = {
    # name: (url, md5 of the zip as published by GroupLens next to it, folder inside the zip)
    "ml-100k": (
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        "ml-100k",
    ),
    "ml-1m": (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
        "ml-1m",
    ),
}


def _check_name(name: str) -> None:
    if name not in GROUPLENS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; allowed: {', '.join(GROUPLENS)}")


def cache_root(cache_dir: str | None = None) -> str:
    """The data cache: ``cache_dir``, else ``$METAREC_DATA``, else ``~/.cache/metarec``."""
    return os.path.abspath(
        cache_dir
        or os.environ.get("METAREC_DATA")
        or os.path.join(os.path.expanduser("~"), ".cache", "metarec")
    )


def file_digest(path: str, algo: str = "sha256") -> str:
    """Hex digest of a file."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(path: str, expected: str, algo: str) -> None:
    got = file_digest(path, algo)
    if got != expected:
        raise DataFormatError(
            path,
            f"{algo} checksum mismatch: expected {expected}, got {got} "
            "(corrupt or different download)",
        )


def extract_from_recbole_wheel(wheel: str, dest: str, check: bool = True) -> str:
    """Extract ml-100k's RecBole atomic files from a recbole wheel into ``dest`` (returned)."""
    if check:
        _check_digest(wheel, RECBOLE_WHEEL_SHA256, "sha256")
    os.makedirs(dest, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest)
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in RECBOLE_ML100K_SHA256:
                member = f"recbole/dataset_example/ml-100k/{name}"
                with z.open(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if check:
            for name, digest in RECBOLE_ML100K_SHA256.items():
                _check_digest(os.path.join(tmp, name), digest, "sha256")
        for name in RECBOLE_ML100K_SHA256:  # atomic per file: a crash never leaves half a file
            os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_recbole_wheel(cache: str) -> str:
    """``pip download --no-deps recbole==1.2.1`` into ``cache`` (once); returns the wheel's path."""
    wheel = os.path.join(cache, RECBOLE_WHEEL)
    if os.path.isfile(wheel):
        return wheel
    os.makedirs(cache, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        f"recbole=={RECBOLE_VERSION}",
        "-d",
        cache,
    ]
    log.info("fetching ml-100k via the recbole wheel: %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not os.path.isfile(wheel):
        why = (res.stderr.strip().splitlines() or ["no message"])[-1]
        raise FileNotFoundError(
            f"ml-100k is not in the cache {cache} and pip could not download {RECBOLE_WHEEL} "
            f"(exit {res.returncode}: {why}); set data_dir to a MovieLens copy you have "
            "(--config.data_dir=...) or allow downloading from GroupLens (--config.download=true)"
        )
    return wheel


def download_grouplens(
    name: str, cache: str, url: str | None = None, md5: str | None = None
) -> str:
    """Download GroupLens' zip of ``name`` (or ``url``), check its MD5, extract it; returns the
    folder."""
    _check_name(name)
    default_url, default_md5, folder = GROUPLENS[name]
    url, md5 = url or default_url, md5 or default_md5
    os.makedirs(cache, exist_ok=True)
    zpath = os.path.join(cache, f"{name}.zip")
    part = zpath + ".part"
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)
    except urllib.error.URLError as e:
        raise FileNotFoundError(f"could not download {name} from {url}: {e.reason}") from None
    _check_digest(part, md5, "md5")
    os.replace(part, zpath)
    return extract_grouplens_zip(zpath, os.path.join(cache, "grouplens"), folder)


def extract_grouplens_zip(zpath: str, dest_parent: str, folder: str) -> str:
    """Extract a GroupLens zip (whose files live under ``folder/``) into ``dest_parent/folder``."""
    with zipfile.ZipFile(zpath) as z:
        members = [m for m in z.namelist() if m.startswith(folder + "/") and not m.endswith("/")]
        if not members:
            raise DataFormatError(zpath, f"zip has no '{folder}/' folder")
        tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(zpath)))
        try:
            for m in members:
                if ".." in m.split("/"):
                    raise DataFormatError(zpath, f"unsafe path in zip: {m}")
                z.extract(m, tmp)
            os.makedirs(dest_parent, exist_ok=True)
            target = os.path.join(dest_parent, folder)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, folder), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_dataset(
    name: str = "ml-100k",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
) -> str:
    """Return a directory holding ``name`` in a layout :func:`metarec.data.readers.read_any` reads.
    ``data_dir`` and ``download`` exclude each other."""
    _check_name(name)
    if data_dir and download:
        raise ValueError(
            "download fetches GroupLens' zip into the cache; it cannot be combined with data_dir "
            f"(files you already have: {data_dir})"
        )
    if data_dir:
        if not os.path.isdir(data_dir):
            raise DataFormatError(data_dir, "data_dir does not exist or is not a folder")
        return data_dir
    cache = cache_root(cache_dir)
    grouplens_dir = os.path.join(cache, "grouplens", GROUPLENS[name][2])
    if os.path.isdir(grouplens_dir):
        return grouplens_dir
    if name == "ml-100k":
        recbole_dir = os.path.join(cache, "recbole", "ml-100k")
        if all(os.path.isfile(os.path.join(recbole_dir, f)) for f in RECBOLE_ML100K_SHA256):
            return recbole_dir
        if not download:
            return extract_from_recbole_wheel(fetch_recbole_wheel(cache), recbole_dir)
    if download:
        return download_grouplens(name, cache)
    raise FileNotFoundError(
        f"{name} is not in the cache {cache}: set data_dir to a folder holding its files "
        "(--config.data_dir=...) or allow downloading from GroupLens (--config.download=true)"
    )
