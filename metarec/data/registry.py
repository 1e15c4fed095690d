"""The datasets metarec can load, by name: :data:`DATASETS`.

Scripts never list dataset names themselves: a config's ``dataset`` is checked with
:func:`check_dataset` and loaded with :func:`load_dataset`. A new dataset is one
:class:`DatasetEntry` whose ``load`` returns a cleaned :class:`~metarec.data.movielens.RatingsData`,
added with :func:`register_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from metarec.data import fetch, readers
from metarec.data.movielens import RatingsData, clean

# load(data_dir, cache_dir, download) -> RatingsData
Loader = Callable[[str | None, str | None, bool], RatingsData]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """How to get one dataset: ``load(data_dir, cache_dir, download)`` finds its files (a user's
    ``data_dir`` first, then the cache, then a download where allowed), reads and cleans them."""

    name: str
    load: Loader
    description: str


def load_movielens(
    name: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
) -> RatingsData:
    """Locate (:func:`metarec.data.fetch.ensure_dataset`), read and clean a MovieLens dataset."""
    directory = fetch.ensure_dataset(name, data_dir, cache_dir, download)
    return clean(readers.read_any(directory), name)


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    """Add ``entry`` to :data:`DATASETS` (a name may be registered once)."""
    if entry.name in DATASETS:
        raise ValueError(f"dataset {entry.name!r} is already registered")
    DATASETS[entry.name] = entry
    return entry


register_dataset(
    DatasetEntry(
        "ml-100k",
        functools.partial(load_movielens, "ml-100k"),
        "MovieLens 100K: 943 users, 1,682 movies, 100,000 ratings (GroupLens or RecBole layout)",
    )
)
register_dataset(
    DatasetEntry(
        "ml-1m",
        functools.partial(load_movielens, "ml-1m"),
        "MovieLens 1M: 6,040 users, 3,883 movies, 1,000,209 ratings (GroupLens or RecBole layout)",
    )
)


def check_dataset(name: str) -> str:
    """``name`` if it is a registered dataset, else ``ValueError`` listing the registered ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return name


def load_dataset(
    name: str = "ml-100k",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
) -> RatingsData:
    """Load the registered dataset ``name`` (see :class:`DatasetEntry` for where its files come
    from)."""
    return DATASETS[check_dataset(name)].load(data_dir, cache_dir, download)
