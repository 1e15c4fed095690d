"""Item content embeddings: the embedding-file loader round-trips and reports bad files clearly;
content vectors are written into task batches."""

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
    emb = hashed_title_embeddings(
        [1, 2, 3], ["Star Trek III (1984)", "Star Trek IV (1986)", "Toy Story (1995)"], dim=32
    )
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    sim = emb.vectors @ emb.vectors.T
    assert sim[0, 1] > sim[0, 2]
    again = hashed_title_embeddings(
        [1, 2, 3], ["Star Trek III (1984)", "Star Trek IV (1986)", "Toy Story (1995)"], dim=32
    )
    np.testing.assert_array_equal(emb.vectors, again.vectors)

    def ex(n):
        return Examples(
            x={"item": np.zeros((2, n, 2), np.int32)},
            y=np.zeros((2, n), np.float32),
            mask=np.ones((2, n), np.float32),
        )

    task = Task(support=ex(3), query=ex(2), user=np.arange(2))
    out = add_content(task, np.array([[1, 2, 0], [3, 3, 3]]), np.array([[3, 1], [7, 2]]), emb)
    assert out.support.x["content"].shape == (2, 3, 32)
    np.testing.assert_allclose(out.query.x["content"][0, 0], emb.vectors[2])
    assert np.all(out.query.x["content"][1, 0] == 0) and np.all(out.support.x["content"][0, 2] == 0)
    with pytest.raises(ValueError, match="do not match"):
        add_content(task, np.zeros((2, 4)), np.zeros((2, 2)), emb)
