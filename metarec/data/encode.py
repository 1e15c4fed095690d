"""Feature vocabularies and the encoding of :class:`UserSets` into :class:`metarec.data.tasks.Task`.

Per-example model inputs ``x`` (leaves share the example axis N):

* ``"user"``   int32 [N, 4]: age bucket, gender, occupation, zip prefix (first 3 characters);
* ``"item"``   int32 [N, 2]: release year, item id;
* ``"genres"`` float32 [N, G]: multi-hot genres;
* ``"offset"`` float32 [N]: the user's support-mean rating shrunk toward the training mean with
  ``offset_prior`` pseudo-ratings — the same value for all of a task's support and query examples
  (computed from the support set only), so a model can predict residuals.

Vocabularies are fitted on training data only (the items and users of ``train_ratings``); index 0
of every vocabulary is the out-of-vocabulary entry, used for categories never seen in training
(unseen zip prefixes, items not rated in training). A release year never seen in training maps to
the nearest year that was (``unseen_years="nearest"``, the default; ties go to the earlier year):
the scenarios' new items are the newest releases, so an OOV year would be one embedding row that
no training example reaches, left at its random initial value. ``unseen_years="oov"`` keeps the OOV
index (MeLU's reference encoding). ``to_dict``/``from_dict`` store
the vocabularies as JSON next to results so a trained model can be applied to new data.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd

from metarec.data.movielens import RatingsData
from metarec.data.scenarios import UserSets
from metarec.data.tasks import Examples, Task

AGE_BUCKETS = ((0, 18), (18, 25), (25, 35), (35, 45), (45, 50), (50, 56), (56, 10**6))
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
USER_FIELDS = ("age", "gender", "occupation", "zip3")
ITEM_FIELDS = ("year", "item_id")
OOV = 0
UNSEEN_YEARS = ("nearest", "oov")


def new_item_mask(x: dict) -> np.ndarray:
    """True where an encoded example's item is out of vocabulary (``x["item"][..., 1]`` is
    :data:`OOV`): a new item, which a model predicts from its content."""
    return np.asarray(x["item"])[..., ITEM_FIELDS.index("item_id")] == OOV


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Map ages to 1..7 (PROTOCOL buckets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); unknown
    (<0) -> 0. ml-1m's age codes (1, 18, 25, 35, 45, 50, 56) land in the matching buckets."""
    age = np.asarray(age)
    out = np.zeros(age.shape, np.int32)
    for b, (lo, hi) in enumerate(AGE_BUCKETS, start=1):
        out[(age >= lo) & (age < hi)] = b
    return out


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Vocabulary sizes (including the OOV index 0) — all a model needs to size its embeddings."""

    user_vocab: tuple[int, ...]
    item_vocab: tuple[int, ...]
    n_genres: int


class Vocab:
    """A token -> index map with index 0 reserved for out-of-vocabulary tokens.

    ``capacity`` (optional) reserves that many indices in all (unused ones are never produced), so
    that embedding tables keep one shape across seeds whose training vocabularies differ.
    ``nearest``: an unseen numeric token takes the index of the numerically nearest numeric token
    (ties: the smaller one); unseen non-numeric tokens stay OOV."""

    def __init__(self, tokens, capacity: int = 0, nearest: bool = False):
        self.tokens = sorted({str(t) for t in tokens})
        self.index = {t: i + 1 for i, t in enumerate(self.tokens)}
        self.capacity = max(int(capacity), len(self.tokens) + 1)
        self.nearest = bool(nearest)
        numeric = sorted((float(t), self.index[t]) for t in self.tokens if _is_number(t))
        self._values = np.array([v for v, _ in numeric], np.float64)
        self._rows = np.array([i for _, i in numeric], np.int32)

    def __len__(self) -> int:
        return self.capacity

    def encode(self, values) -> np.ndarray:
        tokens = [str(v) for v in values]
        out = np.array([self.index.get(t, OOV) for t in tokens], dtype=np.int32)
        if self.nearest and len(self._values):
            for j in np.flatnonzero(out == OOV):
                if _is_number(tokens[j]):
                    # argmin returns the first minimum: the smaller value on ties
                    out[j] = self._rows[int(np.argmin(np.abs(self._values - float(tokens[j]))))]
        return out


def _is_number(token: str) -> bool:
    try:
        return np.isfinite(float(token))
    except ValueError:
        return False


class FeatureEncoder:
    """Fitted vocabularies; :meth:`encode` turns :class:`UserSets` into a :class:`Task` batch."""

    def __init__(
        self,
        vocabs: dict[str, list[str]],
        genres: list[str],
        global_mean: float,
        offset_prior: float,
        capacity: dict[str, int] | None = None,
        unseen_years: str = "nearest",
    ):
        if unseen_years not in UNSEEN_YEARS:
            raise ValueError(f"unseen_years={unseen_years!r}; allowed: {', '.join(UNSEEN_YEARS)}")
        capacity = capacity or {}
        self.unseen_years = unseen_years
        self.vocabs = {
            k: Vocab(v, capacity.get(k, 0), nearest=k == "year" and unseen_years == "nearest")
            for k, v in vocabs.items()
        }
        self.genres = list(genres)
        self.global_mean = float(global_mean)
        self.offset_prior = float(offset_prior)
        self._tables: tuple | None = None

    @classmethod
    def fit(
        cls,
        data: RatingsData,
        train_ratings: pd.DataFrame,
        offset_prior: float = 2.0,
        stable_shapes: bool = True,
        unseen_years: str = "nearest",
    ) -> FeatureEncoder:
        """Vocabularies from the users and items of ``train_ratings`` only.

        With ``stable_shapes`` every vocabulary's size (not its content) is the number of distinct
        values in the whole dataset + 1, so models of different seeds have identical parameter
        shapes and share compiled steps; indices of categories unseen in training are still the
        OOV 0. ``unseen_years``: see the module docstring.
        """
        users = data.users[data.users["user_id"].isin(train_ratings["user_id"].unique())]
        items = data.items[data.items["item_id"].isin(train_ratings["item_id"].unique())]
        vocabs = {
            "gender": list(users["gender"]),
            "occupation": list(users["occupation"]),
            "zip3": list(users["zip_code"].str[:3]),
            "year": list(items["year"]),
            "item_id": [str(i) for i in items["item_id"]],
        }
        capacity = {}
        if stable_shapes:
            capacity = {
                "gender": data.users["gender"].nunique() + 1,
                "occupation": data.users["occupation"].nunique() + 1,
                "zip3": data.users["zip_code"].str[:3].nunique() + 1,
                "year": data.items["year"].nunique() + 1,
                "item_id": len(data.items) + 1,
            }
        enc = cls(
            vocabs,
            list(data.genres),
            float(train_ratings["rating"].mean()),
            offset_prior,
            capacity,
            unseen_years,
        )
        enc.bind(data)
        return enc

    def bind(self, data: RatingsData) -> FeatureEncoder:
        """Build the id -> feature-row lookup tables for ``data`` (any dataset, same fields)."""
        u = data.users
        user_feats = np.stack(
            [
                age_bucket(u["age"].to_numpy()),
                self.vocabs["gender"].encode(u["gender"]),
                self.vocabs["occupation"].encode(u["occupation"]),
                self.vocabs["zip3"].encode(u["zip_code"].str[:3]),
            ],
            axis=1,
        )
        it = data.items
        item_feats = np.stack(
            [
                self.vocabs["year"].encode(it["year"]),
                self.vocabs["item_id"].encode(it["item_id"].astype(str)),
            ],
            axis=1,
        )
        gidx = {g: j for j, g in enumerate(self.genres)}
        genres = np.zeros((len(it), len(self.genres)), np.float32)
        for r, gs in enumerate(it["genres"]):
            for g in gs:
                if g in gidx:
                    genres[r, gidx[g]] = 1.0
        self._tables = (
            pd.Index(u["user_id"].to_numpy()),
            user_feats,
            pd.Index(it["item_id"].to_numpy()),
            item_feats,
            genres,
        )
        return self

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            user_vocab=(
                len(AGE_BUCKETS) + 1,
                len(self.vocabs["gender"]),
                len(self.vocabs["occupation"]),
                len(self.vocabs["zip3"]),
            ),
            item_vocab=(len(self.vocabs["year"]), len(self.vocabs["item_id"])),
            n_genres=len(self.genres),
        )

    def user_offset(self, rating: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Shrunk support mean per user: (sum r + k * mu) / (n + k)."""
        k = self.offset_prior
        return ((rating * mask).sum(-1) + k * self.global_mean) / (mask.sum(-1) + k)

    def _examples(self, user_rows, items, rating, mask, offset) -> Examples:
        if self._tables is None:
            raise RuntimeError("FeatureEncoder.bind(data) must be called before encode()")
        user_index, user_feats, item_index, item_feats, genres = self._tables
        t, n = items.shape
        flat = items.reshape(-1)
        rows = item_index.get_indexer(flat)
        real = mask.reshape(-1) > 0
        if np.any(rows[real] < 0):
            bad = np.unique(flat[real][rows[real] < 0])[:5]
            raise KeyError(f"item ids not in the item table: {bad.tolist()}")
        rows = np.where(rows < 0, 0, rows)
        x = {
            "user": np.repeat(user_feats[user_rows][:, None, :], n, axis=1).astype(np.int32),
            "item": item_feats[rows].reshape(t, n, -1).astype(np.int32),
            "genres": genres[rows].reshape(t, n, -1),
            "offset": np.repeat(offset[:, None], n, axis=1).astype(np.float32),
        }
        return Examples(x=x, y=rating.astype(np.float32), mask=mask.astype(np.float32))

    def encode(self, sets: UserSets) -> Task:
        """Encode users' support and query sets into a batched :class:`Task` (host numpy leaves)."""
        user_index = self._tables[0]
        user_rows = user_index.get_indexer(sets.user_id)
        if np.any(user_rows < 0):
            raise KeyError(
                f"user ids not in the user table: {sets.user_id[user_rows < 0][:5].tolist()}"
            )
        offset = self.user_offset(sets.support_rating, sets.support_mask).astype(np.float32)
        support = self._examples(
            user_rows, sets.support_item, sets.support_rating, sets.support_mask, offset
        )
        query = self._examples(
            user_rows, sets.query_item, sets.query_rating, sets.query_mask, offset
        )
        return Task(support=support, query=query, user=sets.user_id.astype(np.int32))

    def to_dict(self) -> dict:
        return {
            "vocabs": {k: v.tokens for k, v in self.vocabs.items()},
            "capacity": {k: v.capacity for k, v in self.vocabs.items()},
            "genres": self.genres,
            "global_mean": self.global_mean,
            "offset_prior": self.offset_prior,
            "unseen_years": self.unseen_years,
            "age_buckets": list(AGE_LABELS),
            "user_fields": list(USER_FIELDS),
            "item_fields": list(ITEM_FIELDS),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureEncoder:
        # files written before unseen_years existed encoded unseen years as OOV
        return cls(
            d["vocabs"],
            d["genres"],
            d["global_mean"],
            d["offset_prior"],
            d.get("capacity"),
            d.get("unseen_years", "oov"),
        )

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> FeatureEncoder:
        with open(path) as f:
            return cls.from_dict(json.load(f))
