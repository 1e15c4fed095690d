"""Precomputed item content embeddings (``item_id -> vector``) as an item-side input for new items.

File formats accepted by :func:`load_item_embeddings` (chosen by extension):

* ``.tsv`` / ``.txt``: one item per line, ``item_id<TAB>v1 v2 ... vD`` (the values may be separated
  by spaces or tabs).  Blank lines and lines starting with ``#`` are skipped.  Every line must have
  the same number of values; item ids must be integers and unique.
* ``.npz``: two arrays, ``item_id`` (``[N]`` integers) and ``vectors`` (``[N, D]`` floats).

Errors name the file and, for text files, the line.  Vectors are looked up by **raw** item id (not
by the feature encoder's item index, which maps every new item to the same OOV index 0), so content
reaches new items: :func:`add_content` writes ``x["content"] [.., N, D]`` into a task batch from the
raw ids of the :class:`metarec.data.scenarios.UserSets` it was encoded from.

Two ways to make such a file: :func:`hashed_title_embeddings` (dependency-free signed hashing of
title words and the release year, deterministic) and :func:`sentence_title_embeddings` (a
``sentence-transformers`` model, only if the user has it installed with the weights available
locally).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib

import numpy as np

from metarec.data.tasks import Task


class ContentFormatError(ValueError):
    """A malformed embedding file; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class ItemEmbeddings:
    """``item_ids [N] int64`` and their ``vectors [N, D] float32``."""

    item_ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self):
        ids, vec = np.asarray(self.item_ids), np.asarray(self.vectors)
        if ids.ndim != 1 or vec.ndim != 2 or len(ids) != len(vec):
            raise ValueError(
                "ItemEmbeddings: need item_ids [N] and vectors [N, D], got "
                f"{ids.shape} and {vec.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ItemEmbeddings: duplicate item ids")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def lookup(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of raw item ids (any shape) and a ``found`` mask; missing ids get zeros."""
        ids = np.asarray(ids)
        order = np.argsort(self.item_ids)
        sorted_ids = self.item_ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(ids.shape, bool)
        out = np.where(found[..., None], self.vectors[order[pos]], 0.0).astype(np.float32)
        return out, found


def load_item_embeddings(path: str) -> ItemEmbeddings:
    """Read an embedding file (format in the module docstring)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"item embedding file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path) as z:
            for k in ("item_id", "vectors"):
                if k not in z:
                    raise ContentFormatError(
                        f"{path}: missing array '{k}' (need 'item_id' [N] and 'vectors' [N, D])"
                    )
            ids, vec = z["item_id"], z["vectors"]
        if not np.issubdtype(ids.dtype, np.integer):
            raise ContentFormatError(f"{path}: 'item_id' must be integers, got {ids.dtype}")
        if vec.ndim != 2 or ids.ndim != 1 or len(ids) != len(vec):
            raise ContentFormatError(
                f"{path}: need item_id [N] and vectors [N, D], got {ids.shape} and {vec.shape}"
            )
        _check_unique(path, ids, None)
        return ItemEmbeddings(ids.astype(np.int64), vec.astype(np.float32))
    if ext not in (".tsv", ".txt"):
        raise ContentFormatError(
            f"{path}: unknown embedding file type {ext!r}; use .tsv, .txt or .npz"
        )
    ids, rows, lines, dim = [], [], [], None
    with open(path, encoding="utf-8") as f:
        for ln, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" not in line:
                raise ContentFormatError(
                    f"{path}:{ln}: expected 'item_id<TAB>v1 v2 ...', found no tab"
                )
            head, rest = line.split("\t", 1)
            try:
                item = int(head)
            except ValueError:
                msg = f"{path}:{ln}: item_id {head!r} is not an integer"
                raise ContentFormatError(msg) from None
            try:
                vals = [float(v) for v in rest.split()]
            except ValueError as e:
                msg = f"{path}:{ln}: vector value is not a number ({e})"
                raise ContentFormatError(msg) from None
            if not vals:
                raise ContentFormatError(f"{path}:{ln}: empty vector for item {item}")
            if dim is None:
                dim = len(vals)
            elif len(vals) != dim:
                raise ContentFormatError(
                    f"{path}:{ln}: vector has {len(vals)} values, earlier lines have {dim}"
                )
            if not np.all(np.isfinite(vals)):
                raise ContentFormatError(f"{path}:{ln}: vector contains NaN or inf")
            ids.append(item)
            rows.append(vals)
            lines.append(ln)
    if not ids:
        raise ContentFormatError(f"{path}: no embeddings found")
    ids_arr = np.asarray(ids, np.int64)
    _check_unique(path, ids_arr, lines)
    return ItemEmbeddings(ids_arr, np.asarray(rows, np.float32))


def _check_unique(path, ids, lines):
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1][0]
        where = np.flatnonzero(ids == dup)
        loc = f" (lines {[lines[i] for i in where]})" if lines is not None else ""
        raise ContentFormatError(f"{path}: item_id {dup} appears {len(where)} times{loc}")


def save_item_embeddings(path: str, emb: ItemEmbeddings) -> None:
    """Write ``emb`` as ``.npz`` or ``.tsv``/``.txt`` (by extension)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        np.savez(path, item_id=emb.item_ids, vectors=emb.vectors)
    elif ext in (".tsv", ".txt"):
        with open(path, "w", encoding="utf-8") as f:
            for i, v in zip(emb.item_ids, emb.vectors, strict=True):
                f.write(f"{int(i)}\t" + " ".join(f"{x:.7g}" for x in v) + "\n")
    else:
        raise ValueError(f"{path}: unknown embedding file type {ext!r}; use .tsv, .txt or .npz")


def add_content(
    task: Task, support_item: np.ndarray, query_item: np.ndarray, emb: ItemEmbeddings
) -> Task:
    """Add ``x["content"]`` to a task batch from the raw item ids it was encoded from.

    ``support_item``/``query_item`` are the ``[T, S]`` / ``[T, Q]`` raw ids of the
    :class:`~metarec.data.scenarios.UserSets` given to ``FeatureEncoder.encode``.  Items without a
    vector (and padding) get zeros.
    """

    def put(ex, ids):
        ids = np.asarray(ids)
        if ids.shape != tuple(np.shape(ex.y)):
            raise ValueError(
                f"add_content: item ids of shape {ids.shape} do not match the examples "
                f"{np.shape(ex.y)}"
            )
        vec, _ = emb.lookup(ids)
        return ex.replace(x=dict(ex.x, content=vec))

    return task.replace(support=put(task.support, support_item), query=put(task.query, query_item))


_WORD = re.compile(r"[a-z0-9]+")


def hashed_title_embeddings(
    item_ids, titles, years=None, dim: int = 64, seed: int = 0
) -> ItemEmbeddings:
    """Deterministic content vectors from titles: signed feature hashing of lower-cased title words
    and word bigrams (plus ``"year:<y>"`` tokens), L2-normalised.  No model weights needed; items
    whose titles share words (sequels, "Star Trek ...") get similar vectors."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    titles = list(titles)
    ids = np.asarray(item_ids, np.int64)
    if len(titles) != len(ids):
        raise ValueError(f"{len(ids)} item ids but {len(titles)} titles")
    out = np.zeros((len(ids), dim), np.float32)
    for r, t in enumerate(titles):
        words = _WORD.findall(re.sub(r"\(\d{4}\)", " ", str(t).lower()))
        toks = words + [a + "_" + b for a, b in zip(words, words[1:], strict=False)]
        if years is not None:
            toks.append(f"year:{years[r]}")
        for tok in toks:
            h = zlib.crc32(f"{seed}:{tok}".encode())
            out[r, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return ItemEmbeddings(ids, out / np.maximum(norm, 1e-12))


def sentence_title_embeddings(
    item_ids, titles, model_name: str = "all-MiniLM-L6-v2", batch_size: int = 64
) -> ItemEmbeddings:
    """Title embeddings from a locally available ``sentence-transformers`` model (optional extra).

    Raises ImportError with instructions when the package is not installed; nothing is downloaded
    by metarec itself (the model must be available to ``SentenceTransformer(model_name)``).
    """
    try:
        from sentence_transformers import SentenceTransformer  # type: ignore
    except ImportError as e:
        raise ImportError(
            "sentence_title_embeddings needs the optional 'sentence-transformers' package "
            "(pip install sentence-transformers) and a locally available model; "
            "hashed_title_embeddings works without either"
        ) from e
    model = SentenceTransformer(model_name)
    vec = model.encode(
        list(titles), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    return ItemEmbeddings(np.asarray(item_ids, np.int64), np.asarray(vec, np.float32))
