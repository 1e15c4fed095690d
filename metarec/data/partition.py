"""Users -> federated clients: IID (seeded random, near-equal sizes) and non-IID by user features.

A partition is a list of sorted ``int64`` arrays of user ids, one per client; every user is in
exactly one client.

* :func:`iid_partition`: the users in a seeded random order, cut into ``n_clients`` contiguous
  pieces whose sizes differ by at most one (``numpy.array_split``).
* :func:`feature_partition`: users are first grouped by a user feature (:func:`user_groups`:
  occupation, age bucket, gender, or a combination); each group, in a seeded random order, is cut
  into ``ceil(n_group / max_size)`` near-equal clients. Every client is homogeneous in the feature
  (all its users share one occupation, say), so client populations differ from each other and from
  the population, while client sizes stay at most ``max_size`` (small groups give small clients).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# the protocol's age buckets (PROTOCOL.md): <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
AGE_EDGES = (18, 25, 35, 45, 50, 56)
GROUP_FEATURES = ("occupation", "age", "gender")


def _check_users(user_ids) -> np.ndarray:
    users = np.asarray(user_ids, np.int64).reshape(-1)
    if users.size == 0:
        raise ValueError("partition: no users to partition")
    if np.unique(users).size != users.size:
        raise ValueError("partition: user ids must be distinct")
    return np.sort(users)


def iid_partition(user_ids, n_clients: int, seed: int) -> list[np.ndarray]:
    """``n_clients`` clients of near-equal size (differing by at most one) from a seeded shuffle."""
    users = _check_users(user_ids)
    if not isinstance(n_clients, (int, np.integer)) or not 1 <= n_clients <= users.size:
        raise ValueError(f"n_clients must be an int in [1, {users.size}], got {n_clients!r}")
    order = np.random.default_rng(seed).permutation(users)
    return [np.sort(part) for part in np.array_split(order, int(n_clients))]


def user_groups(users_frame: pd.DataFrame, user_ids, by=("occupation",)) -> np.ndarray:
    """One group label (str) per user of ``user_ids``: the values of the features ``by`` (any of
    :data:`GROUP_FEATURES`; ``age`` is the protocol's age bucket, -1 for unknown) joined by ``|``.
    ``users_frame``: :attr:`metarec.data.RatingsData.users`."""
    bad = [f for f in by if f not in GROUP_FEATURES]
    if not by or bad:
        raise ValueError(f"group features {list(by)!r}; allowed: {', '.join(GROUP_FEATURES)}")
    frame = users_frame.set_index("user_id")
    ids = np.asarray(user_ids, np.int64)
    missing = np.setdiff1d(ids, frame.index.to_numpy())
    if missing.size:
        raise ValueError(f"user_groups: {missing.size} user(s) without features, e.g. {missing[0]}")
    rows = frame.loc[ids]
    cols = []
    for f in by:
        if f == "age":
            age = rows["age"].to_numpy()
            cols.append(np.where(age < 0, -1, np.digitize(age, AGE_EDGES)).astype(str))
        else:
            cols.append(rows[f].astype(str).to_numpy())
    out = cols[0].astype(object)
    for c in cols[1:]:
        out = out + "|" + c.astype(object)
    return out.astype(str)


def feature_partition(user_ids, groups, max_size: int, seed: int) -> list[np.ndarray]:
    """Non-IID clients: users grouped by ``groups`` (one label per user of ``user_ids``), each
    group cut into ``ceil(n_group / max_size)`` near-equal clients after a seeded shuffle. Clients
    are listed by group label (sorted), then piece."""
    ids = np.asarray(user_ids, np.int64).reshape(-1)
    users = _check_users(ids)
    labels = np.asarray(groups).reshape(-1)
    if labels.shape != ids.shape:
        raise ValueError(f"groups must have one label per user ({ids.size}), got {labels.size}")
    if not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive int, got {max_size!r}")
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    rng = np.random.default_rng(seed)
    clients = []
    for g in sorted(set(label_of.values())):
        members = rng.permutation(np.array([u for u in users if label_of[u] == g], np.int64))
        n = math.ceil(members.size / max_size)
        clients.extend(np.sort(p) for p in np.array_split(members, n))
    return clients


def client_index(partition: list[np.ndarray]) -> dict[int, int]:
    """``{user id: client index}``."""
    return {int(u): c for c, part in enumerate(partition) for u in part}


def sizes(partition: list[np.ndarray]) -> dict[str, float]:
    """Client count and size statistics (min, max, mean, median)."""
    n = np.array([p.size for p in partition])
    return {
        "clients": int(n.size),
        "users": int(n.sum()),
        "min": int(n.min()),
        "max": int(n.max()),
        "mean": float(n.mean()),
        "median": float(np.median(n)),
    }


def heterogeneity(partition: list[np.ndarray], labels_of: dict[int, str]) -> float:
    """Mean over clients of the total-variation distance between the client's distribution of a
    user label and the population's (0: every client looks like the population)."""
    all_labels = np.array(list(labels_of.values()))
    cats, counts = np.unique(all_labels, return_counts=True)
    pop = counts / counts.sum()
    tv = []
    for part in partition:
        lab = np.array([labels_of[int(u)] for u in part])
        local = np.array([(lab == c).mean() for c in cats])
        tv.append(0.5 * np.abs(local - pop).sum())
    return float(np.mean(tv))
