"""Two-tower retrieval recovers planted neighbours; content embeddings reach new items; the
embedding-file loader reports bad files clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarec.data.tasks import Examples, Task
from metarec.models.content import (
    ContentFormatError,
    ItemEmbeddings,
    add_content,
    hashed_title_embeddings,
    load_item_embeddings,
    save_item_embeddings,
)
from metarec.models.two_tower import Tables, TwoTowerConfig, bpr_loss, embed_all, retrieve, train_two_tower

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
    content = np.eye(C, dtype=np.float32)[item_cluster] + 0.1 * rng.normal(size=(n_items, C)).astype(np.float32)
    return np.array(pairs), np.array(held), item_cluster, user_cluster, content


@pytest.fixture(scope="module")
def trained():
    pairs, held, ic, uc, content = _planted()
    tables = Tables(
        user_cat=np.arange(N_USERS)[:, None].astype(np.int32),
        item_cat=(np.arange(C * PER_C)[:, None] + 1).astype(np.int32),  # 0 = OOV item id
        item_dense=content,
    )
    cfg = TwoTowerConfig(embed_dim=16, hidden=(32,), out_dim=16, epochs=40, batch_size=96, lr=1e-2, seed=0)
    model, params, hist = train_two_tower(pairs, tables, cfg)
    return model, params, hist, tables, pairs, held, ic, uc


def test_bpr_loss_value():
    np.testing.assert_allclose(bpr_loss(jnp.array([0.0]), jnp.array([[0.0, 0.0]])), np.log(2.0), rtol=1e-6)


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
    """New items (OOV id 0) with only a content vector are scored highest by their cluster's users."""
    model, params, _, tables, _, _, ic, uc = trained
    rng = np.random.default_rng(7)
    new_content = np.eye(C, dtype=np.float32) + 0.1 * rng.normal(size=(C, C)).astype(np.float32)
    new = Tables(user_cat=tables.user_cat, item_cat=np.zeros((C, 1), np.int32), item_dense=new_content)
    u, i = embed_all(model, params, new)
    best = np.asarray(jnp.argmax(u @ i.T, -1))
    assert np.mean(best == uc) > 0.9


def test_random_model_does_not_recover(trained):
    """Control: an untrained model is near chance on the same retrieval task."""
    model, _, _, tables, pairs, held, *_ = trained
    from metarec.models.two_tower import init_two_tower

    params = init_two_tower(jax.random.PRNGKey(1), model, jax.tree_util.tree_map(jnp.asarray, tables))
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
        train_two_tower(np.zeros((0, 2)), Tables(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)), TwoTowerConfig())


# ---------------------------------------------------------------------------------------------
# Content embedding files
# ---------------------------------------------------------------------------------------------


def test_tsv_and_npz_round_trip(tmp_path):
    emb = ItemEmbeddings(np.array([5, 2, 9]), np.arange(12, dtype=np.float32).reshape(3, 4) / 7)
    for name in ("e.tsv", "e.npz"):
        save_item_embeddings(str(tmp_path / name), emb)
        got = load_item_embeddings(str(tmp_path / name))
        np.testing.assert_array_equal(got.item_ids, emb.item_ids)
        np.testing.assert_allclose(got.vectors, emb.vectors, rtol=1e-6)
    vec, found = emb.lookup(np.array([[2, 3], [9, 0]]))
    np.testing.assert_array_equal(found, [[True, False], [True, False]])
    np.testing.assert_allclose(vec[0, 0], emb.vectors[1])
    assert np.all(vec[0, 1] == 0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("1\t0.1 0.2\n2\t0.3\n", r"e\.tsv:2: vector has 1 values"),
        ("# header\n\nx\t0.1\n", r"e\.tsv:3: item_id 'x' is not an integer"),
        ("1 0.1 0.2\n", r"e\.tsv:1: .*no tab"),
        ("1\t0.1 abc\n", r"e\.tsv:1: vector value is not a number"),
        ("1\t0.1\n1\t0.2\n", r"item_id 1 appears 2 times \(lines \[1, 2\]\)"),
        ("1\tnan\n", r"e\.tsv:1: .*NaN"),
        ("# only a comment\n", r"no embeddings"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, text, match):
    p = tmp_path / "e.tsv"
    p.write_text(text)
    with pytest.raises(ContentFormatError, match=match):
        load_item_embeddings(str(p))


def test_npz_errors(tmp_path):
    p = tmp_path / "e.npz"
    np.savez(p, item_id=np.array([1, 2]))
    with pytest.raises(ContentFormatError, match="missing array 'vectors'"):
        load_item_embeddings(str(p))
    with pytest.raises(ContentFormatError, match="unknown embedding file type"):
        (tmp_path / "e.csv").write_text("1,2\n")
        load_item_embeddings(str(tmp_path / "e.csv"))
    with pytest.raises(FileNotFoundError):
        load_item_embeddings(str(tmp_path / "missing.tsv"))


def test_add_content_and_hashed_titles():
    emb = hashed_title_embeddings([1, 2, 3], ["Star Trek III (1984)", "Star Trek IV (1986)", "Toy Story (1995)"], dim=32)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    sim = emb.vectors @ emb.vectors.T
    assert sim[0, 1] > sim[0, 2]
    again = hashed_title_embeddings([1, 2, 3], ["Star Trek III (1984)", "Star Trek IV (1986)", "Toy Story (1995)"], dim=32)
    np.testing.assert_array_equal(emb.vectors, again.vectors)

    def ex(n):
        return Examples(x={"item": np.zeros((2, n, 2), np.int32)}, y=np.zeros((2, n), np.float32), mask=np.ones((2, n), np.float32))

    task = Task(support=ex(3), query=ex(2), user=np.arange(2))
    out = add_content(task, np.array([[1, 2, 0], [3, 3, 3]]), np.array([[3, 1], [7, 2]]), emb)
    assert out.support.x["content"].shape == (2, 3, 32)
    np.testing.assert_allclose(out.query.x["content"][0, 0], emb.vectors[2])
    assert np.all(out.query.x["content"][1, 0] == 0) and np.all(out.support.x["content"][0, 2] == 0)
    with pytest.raises(ValueError, match="do not match"):
        add_content(task, np.zeros((2, 4)), np.zeros((2, 2)), emb)
