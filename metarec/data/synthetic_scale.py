"""Synthetic ratings at scale (power-law users and items) and their encoding into task shards, both
in bounded memory.

:func:`generate_ratings` writes MovieLens-like ratings chunk by chunk (``chunk_users`` users at a
time, each chunk drawn from its own seeded generator, so the output is deterministic and memory
is one chunk, whatever the size):

* user activity: ``min_ratings + floor(scale * Lomax(user_alpha))`` ratings (a power-law tail:
  ``P(n > x) ~ x^-user_alpha``), ``scale`` set so the mean is about ``mean_ratings``, capped at
  ``max_user_ratings``;
* item popularity: Zipf, ``p(rank r) ~ r^-item_exponent``, ranks assigned to item ids by a seeded
  permutation; a user's items are drawn from it without repeats (items drawn twice are redrawn:
  a few rounds from the Zipf law, then a few uniform ones, which fill the heaviest users' last
  items);
* rating ``clip(rint(3.6 + user bias + item bias + 0.5 * u.v + 0.7 * noise), 1, 5)`` with 4-dim
  latents: enough structure for a meta-step to learn something, cheap to draw.

Layout: ``ratings.json`` (the arguments and counts) and ``chunk-NNNNN/{user,item,rating,time}.npy``
(users ascending, each user's ratings in one chunk), ``items.npz`` (release-year category and
genres per item). User and item ids count from 1 (0 is padding, as in MovieLens).

:func:`encode_to_shards` turns any such user-grouped chunk source into task shards
(:mod:`metarec.data.shards`), one chunk at a time: each user's task is drawn as
:func:`metarec.data.sample_user_sets` draws one (a random subset of at most ``max_ratings``, the
last ``min(n_query, m - min_support)`` of it the query set), vectorised over the chunk.
:class:`ScaleFeatures` is the row-wise encoder of those tasks into MovieLens-format model inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

from metarec.data.encode import FeatureSpec
from metarec.data.scenarios import UserSets, padded_arrays
from metarec.data.shards import ShardWriter, check_process
from metarec.data.tasks import Examples, Task

LATENT_DIM = 4
N_YEARS = 20
N_GENRES = 18
USER_VOCAB = (8, 3, 22, 101)  # age bucket, gender, occupation, zip prefix (+ OOV 0)
TOP_UP_ROUNDS = 3  # Zipf rounds, then as many uniform ones


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """Sizes and shape of a synthetic ratings set (all that :func:`generate_ratings` reads)."""

    n_users: int
    n_items: int
    mean_ratings: float = 100.0
    user_alpha: float = 1.5
    item_exponent: float = 1.0
    min_ratings: int = 5
    max_user_ratings: int = 10000
    chunk_users: int = 20000
    seed: int = 0

    def validate(self) -> None:
        if self.n_users < 1 or self.n_items < 2 or self.chunk_users < 1:
            raise ValueError(f"need n_users >= 1, n_items >= 2, chunk_users >= 1: {self}")
        cap = min(self.max_user_ratings, self.n_items // 2)
        if not 1 <= self.min_ratings < self.mean_ratings <= cap:
            raise ValueError(
                f"need 1 <= min_ratings < mean_ratings <= min(max_user_ratings, n_items // 2) "
                f"= {cap}: {self}"
            )
        if self.user_alpha <= 1 or self.item_exponent <= 0:
            raise ValueError(f"need user_alpha > 1 (finite mean) and item_exponent > 0: {self}")


def user_activity(spec: ScaleSpec) -> np.ndarray:
    """``int64 [n_users]``: how many distinct items each user is meant to rate."""
    rng = np.random.default_rng([spec.seed, 0])
    scale = (spec.mean_ratings - spec.min_ratings) * (spec.user_alpha - 1)
    n = spec.min_ratings + np.floor(scale * rng.pareto(spec.user_alpha, spec.n_users))
    return np.minimum(n, min(spec.max_user_ratings, spec.n_items // 2)).astype(np.int64)


def _item_side(spec: ScaleSpec):
    """Popularity CDF over ranks, the rank -> item id map, per-item bias, latent, year, genres."""
    rng = np.random.default_rng([spec.seed, 1])
    p = np.arange(1, spec.n_items + 1, dtype=np.float64) ** -spec.item_exponent
    cdf = np.cumsum(p / p.sum())
    ids = rng.permutation(spec.n_items).astype(np.int64) + 1  # rank r -> item id
    bias = 0.3 * rng.normal(size=spec.n_items + 1)
    latent = rng.normal(size=(spec.n_items + 1, LATENT_DIM))
    year = rng.integers(1, N_YEARS + 1, spec.n_items + 1).astype(np.int32)
    genres = (latent @ rng.normal(size=(LATENT_DIM, N_GENRES)) > 0.8).astype(np.uint8)
    year[0], genres[0] = 0, 0  # padding item
    return cdf, ids, bias, latent, year, genres


def _draw_items(rng, cdf, ids, n: int) -> np.ndarray:
    return ids[np.minimum(np.searchsorted(cdf, rng.random(n)), len(ids) - 1)]


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` by sorting (numpy 2's hash-based unique is ~10x slower on int64 keys)."""
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if len(a) else a


def _chunk(spec: ScaleSpec, c: int, target: np.ndarray, item_side) -> dict[str, np.ndarray]:
    """The ratings of users ``c * chunk_users + 1 ...`` (sorted by user, item)."""
    cdf, ids, ibias, ilatent, _, _ = item_side
    rng = np.random.default_rng([spec.seed, 2, c])
    first = c * spec.chunk_users + 1
    n_u = len(target)
    base = spec.n_items + 1
    keys = np.zeros(0, np.int64)
    need = target.copy()
    for r in range(2 * TOP_UP_ROUNDS):
        users = np.repeat(np.arange(n_u, dtype=np.int64), need)
        n = int(need.sum())
        # Zipf draws first; then uniform ones, which fill a heavy user's last unrated items fast
        items = _draw_items(rng, cdf, ids, n) if r < TOP_UP_ROUNDS else rng.integers(1, base, n)
        keys = _sorted_unique(np.concatenate([keys, users * base + items]))
        need = target - np.bincount(keys // base, minlength=n_u)
        if not need.any():
            break
    row, item = keys // base, keys % base
    ubias = 0.4 * rng.normal(size=n_u)
    ulatent = rng.normal(size=(n_u, LATENT_DIM))
    dot = np.einsum("nd,nd->n", ulatent[row], ilatent[item]) / np.sqrt(LATENT_DIM)
    mu = 3.6 + ubias[row] + ibias[item] + 0.5 * dot + 0.7 * rng.normal(size=len(keys))
    return {
        "user": (row + first).astype(np.int32),
        "item": item.astype(np.int32),
        "rating": np.clip(np.rint(mu), 1, 5).astype(np.uint8),
        "time": (880_000_000 + rng.integers(0, 10**8, len(keys))).astype(np.int32),
    }


def generate_ratings(spec: ScaleSpec, directory: str) -> dict:
    """Write the ratings of ``spec`` to ``directory`` chunk by chunk; returns the ``ratings.json``
    content (spec, number of users, items and ratings, per-chunk counts)."""
    spec.validate()
    if os.path.exists(os.path.join(directory, "ratings.json")):
        raise FileExistsError(f"{directory}/ratings.json exists: generate into a new folder")
    os.makedirs(directory, exist_ok=True)
    target = user_activity(spec)
    side = _item_side(spec)
    np.savez(os.path.join(directory, "items.npz"), year=side[4], genres=side[5])
    chunks = []
    for c, lo in enumerate(range(0, spec.n_users, spec.chunk_users)):
        arrays = _chunk(spec, c, target[lo : lo + spec.chunk_users], side)
        name = f"chunk-{c:05d}"
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        for k, a in arrays.items():
            np.save(os.path.join(directory, name, f"{k}.npy"), a)
        chunks.append({"name": name, "n_ratings": int(len(arrays["user"]))})
    meta = {
        "spec": dataclasses.asdict(spec),
        "n_users": spec.n_users,
        "n_items": spec.n_items,
        "n_ratings": int(sum(c["n_ratings"] for c in chunks)),
        "chunks": chunks,
    }
    with open(os.path.join(directory, "ratings.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, "ratings.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no ratings index (run generate_ratings first)")
    with open(path) as f:
        return json.load(f)


def iter_chunks(directory: str) -> Iterator[dict[str, np.ndarray]]:
    """The chunks of a :func:`generate_ratings` folder, one at a time (``user, item, rating,
    time`` arrays)."""
    for c in read_meta(directory)["chunks"]:
        yield {
            k: np.load(os.path.join(directory, c["name"], f"{k}.npy"))
            for k in ("user", "item", "rating", "time")
        }


def draw_user_sets(
    chunk: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    max_ratings: int = 100,
    n_query: int = 10,
    min_support: int = 3,
) -> UserSets:
    """One task per user of ``chunk`` with at least ``min_support + 1`` ratings, drawn by the rule
    of :func:`metarec.data.sample_user_sets` but vectorised (random keys sorted within each user
    instead of one permutation per user): same distribution, other random numbers."""
    user = np.asarray(chunk["user"], np.int64)
    order = np.lexsort((rng.random(len(user)), user))
    users, start, count = np.unique(user[order], return_index=True, return_counts=True)
    rank = np.arange(len(user)) - np.repeat(start, count)
    m = np.minimum(count, max_ratings)
    n_q = np.minimum(n_query, m - min_support)
    row = np.repeat(np.arange(len(users)), count)
    m_r, cut = np.repeat(m, count), np.repeat(m - n_q, count)
    out = padded_arrays(users, max_ratings - n_query, n_query)
    for prefix, sel, pos in (
        ("support", rank < cut, rank),
        ("query", (rank >= cut) & (rank < m_r), rank - cut),
    ):
        r, p, src = row[sel], pos[sel], order[sel]
        out[f"{prefix}_item"][r, p] = chunk["item"][src]
        out[f"{prefix}_rating"][r, p] = chunk["rating"][src]
        out[f"{prefix}_mask"][r, p] = 1.0
        out[f"{prefix}_time"][r, p] = chunk["time"][src]
    return UserSets(**out).select(count >= min_support + 1)


def encode_to_shards(
    chunks,
    directory: str,
    *,
    seed: int,
    max_ratings: int = 100,
    n_query: int = 10,
    min_support: int = 3,
    shard_size: int = 65536,
    with_time: bool = False,
    extra: dict | None = None,
    epoch: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """Task shards from ``chunks`` (an iterable of ``user, item, rating, time`` arrays in which
    every user's ratings lie in one chunk, users ascending across chunks, e.g.
    :func:`iter_chunks`): chunk ``c``'s tasks are drawn with ``default_rng([seed, c])``, or
    ``default_rng([seed, epoch, c])`` for one epoch's fresh draw. A process encodes only its
    chunks, ``c % process_count == process_index``; as every chunk has its own generator, its
    tasks are exactly those of a one-process encoding, so each process can redraw its users every
    epoch without the others (every process still reads every chunk: the users-ascend check
    reads each one's user ids). Memory: one chunk plus at most one shard of tasks. Returns the
    shard index."""
    if max_ratings < n_query + min_support:
        raise ValueError(f"need max_ratings >= n_query + min_support, got {max_ratings}")
    check_process(process_index, process_count)
    if epoch is not None and epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    info = {
        "seed": seed,
        "max_ratings": max_ratings,
        "n_query": n_query,
        "min_support": min_support,
        "epoch": epoch,
        "process_index": process_index,
        "process_count": process_count,
    }
    writer = ShardWriter(
        directory,
        support_width=max_ratings - n_query,
        query_width=n_query,
        shard_size=shard_size,
        with_time=with_time,
        extra=info | (extra or {}),
    )
    last = -1
    for c, chunk in enumerate(chunks):
        u = chunk["user"]
        if len(u) == 0:
            continue
        if u.min() <= last:
            raise ValueError(
                f"chunk {c}: user ids must ascend across chunks (user {int(u.min())} after "
                f"{last}); every user's ratings must be in one chunk"
            )
        last = int(u.max())
        if c % process_count != process_index:
            continue
        writer.add(
            draw_user_sets(
                chunk,
                np.random.default_rng([seed, c] if epoch is None else [seed, epoch, c]),
                max_ratings=max_ratings,
                n_query=n_query,
                min_support=min_support,
            )
        )
    return writer.close()


def user_features(user_id: np.ndarray) -> np.ndarray:
    """``int32 [T, 4]`` demographic-like ids from the user id (deterministic, nothing stored)."""
    u = np.asarray(user_id, np.int64)
    cols = [1 + (u * 7919) % 7, 1 + u % 2, 1 + (u * 31) % 21, 1 + (u * 131) % 100]
    return np.stack(cols, axis=-1).astype(np.int32)


class ScaleFeatures:
    """Row-wise encoder of synthetic-scale tasks into MovieLens-format inputs (``x["user"]``,
    ``["item"]`` = (year, item id), ``["genres"]``, ``["offset"]``; see
    :mod:`metarec.data.encode`), with the shrunk support-mean offset of
    :class:`~metarec.data.FeatureEncoder`."""

    def __init__(self, directory: str, offset_prior: float = 2.0, global_mean: float = 3.6):
        meta = read_meta(directory)
        with np.load(os.path.join(directory, "items.npz")) as z:
            self.year, self.genres = z["year"], z["genres"].astype(np.float32)
        self.n_items = int(meta["n_items"])
        self.offset_prior, self.global_mean = offset_prior, global_mean

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(USER_VOCAB, (N_YEARS + 1, self.n_items + 1), N_GENRES)

    def _examples(self, uf, item, rating, mask, offset) -> Examples:
        n = item.shape[1]
        x = {
            "user": np.repeat(uf[:, None, :], n, axis=1),
            "item": np.stack([self.year[item], item.astype(np.int32)], axis=-1),
            "genres": self.genres[item],
            "offset": np.repeat(offset[:, None], n, axis=1),
        }
        return Examples(x=x, y=rating.astype(np.float32), mask=mask.astype(np.float32))

    def encode(self, sets: UserSets) -> Task:
        k = self.offset_prior
        s_r, s_m = sets.support_rating, sets.support_mask
        offset = (((s_r * s_m).sum(-1) + k * self.global_mean) / (s_m.sum(-1) + k)).astype(
            np.float32
        )
        uf = user_features(sets.user_id)
        return Task(
            support=self._examples(uf, sets.support_item, s_r, s_m, offset),
            query=self._examples(uf, sets.query_item, sets.query_rating, sets.query_mask, offset),
            user=sets.user_id.astype(np.int32),
        )
