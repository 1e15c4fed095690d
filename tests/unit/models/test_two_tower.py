"""Two-tower retrieval recovers planted neighbours; content embeddings reach new items."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.models.two_tower import Tables, TwoTowerConfig, bpr_loss, embed_all, retrieve
from metarec.training.two_tower import train_two_tower

C, PER_C, N_USERS = 6, 6, 72  # clusters, items per cluster, users


def _planted(seed=0):
    """Users and items in C clusters; every user interacts with 4 of its cluster's 6 items (the
    other 2 are held out); item content = noisy cluster one-hot."""
    rng = np.random.default_rng(seed)
    n_items = C * PER_C
    item_cluster = np.arange(n_items) % C
    user_cluster = np.arange(N_USERS) % C
    pairs, held = [], []
    for u in range(N_USERS):
        mine = rng.permutation(np.flatnonzero(item_cluster == user_cluster[u]))
        pairs += [(u, i) for i in mine[:4]]
        held.append(mine[4:])
    content = np.eye(C, dtype=np.float32)[item_cluster] + 0.1 * rng.normal(
        size=(n_items, C)
    ).astype(np.float32)
    return np.array(pairs), np.array(held), item_cluster, user_cluster, content


@pytest.fixture(scope="module")
def trained():
    pairs, held, ic, uc, content = _planted()
    tables = Tables(
        user_cat=np.arange(N_USERS)[:, None].astype(np.int32),
        item_cat=(np.arange(C * PER_C)[:, None] + 1).astype(np.int32),  # 0 = OOV item id
        item_dense=content,
    )
    cfg = TwoTowerConfig(
        embed_dim=16, hidden=(32,), out_dim=16, epochs=40, batch_size=96, lr=1e-2, seed=0
    )
    model, params, hist = train_two_tower(pairs, tables, cfg)
    return model, params, hist, tables, pairs, held, ic, uc


def test_bpr_loss_value():
    np.testing.assert_allclose(
        bpr_loss(jnp.array([0.0]), jnp.array([[0.0, 0.0]])), np.log(2.0), rtol=1e-6
    )


def test_retrieval_recovers_planted_neighbours(trained):
    model, params, hist, tables, pairs, held, ic, uc = trained
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    u, i = embed_all(model, params, tables)
    seen = np.zeros((N_USERS, C * PER_C), bool)
    seen[pairs[:, 0], pairs[:, 1]] = True
    idx, _ = retrieve(u, i, k=2, exclude=jnp.asarray(seen))
    idx = np.asarray(idx)
    # held-out items of the user's own cluster are retrieved (collaborative signal)
    recall = np.mean([len(set(idx[r]) & set(held[r])) / 2 for r in range(N_USERS)])
    assert recall > 0.8, recall
    # item-tower neighbours: nearest items (cosine) are in the same cluster
    iv = np.asarray(i) / np.linalg.norm(np.asarray(i), axis=1, keepdims=True)
    sim = iv @ iv.T
    np.fill_diagonal(sim, -np.inf)
    nn_ = np.argsort(-sim, axis=1)[:, :3]
    assert np.mean(ic[nn_] == ic[:, None]) > 0.9


def test_content_reaches_new_items(trained):
    """New items (OOV id 0) with only a content vector are scored highest by their cluster's
    users."""
    model, params, _, tables, _, _, ic, uc = trained
    rng = np.random.default_rng(7)
    new_content = np.eye(C, dtype=np.float32) + 0.1 * rng.normal(size=(C, C)).astype(np.float32)
    new = Tables(
        user_cat=tables.user_cat, item_cat=np.zeros((C, 1), np.int32), item_dense=new_content
    )
    u, i = embed_all(model, params, new)
    best = np.asarray(jnp.argmax(u @ i.T, -1))
    assert np.mean(best == uc) > 0.9


def test_random_model_does_not_recover(trained):
    """Control: an untrained model is near chance on the same retrieval task."""
    model, _, _, tables, pairs, held, *_ = trained
    from metarec.models.two_tower import init_two_tower

    params = init_two_tower(
        jax.random.PRNGKey(1), model, jax.tree_util.tree_map(jnp.asarray, tables)
    )
    u, i = embed_all(model, params, tables)
    seen = np.zeros((N_USERS, C * PER_C), bool)
    seen[pairs[:, 0], pairs[:, 1]] = True
    idx = np.asarray(retrieve(u, i, 2, jnp.asarray(seen))[0])
    recall = np.mean([len(set(idx[r]) & set(held[r])) / 2 for r in range(N_USERS)])
    assert recall < 0.3


def test_two_tower_config_errors():
    with pytest.raises(ValueError, match="loss"):
        TwoTowerConfig(loss="hinge")
    with pytest.raises(ValueError, match="pairs"):
        train_two_tower(
            np.zeros((0, 2)),
            Tables(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)),
            TwoTowerConfig(),
        )
