"""VectorIndex: exact search == NumPy argsort, ScaNN recall, add, save/load, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from m3jax.memory.index import EXACT_BELOW, ScannParams, VectorIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_unit(rng, n, d):
    return unit(rng.standard_normal((n, d)))


def numpy_topk(db, ids, q, k):
    s = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(s, order, axis=1)


def recall(got, want):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want)])


@pytest.fixture(scope="module")
def big():
    """20k random unit vectors (dim 384) with scattered int64 ids; noisy-copy and random queries."""
    rng = np.random.default_rng(0)
    n, d = 20_000, 384
    db = random_unit(rng, n, d)
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)
    noisy = unit(db[rng.integers(0, n, 200)] + 0.6 * rng.standard_normal((200, d)) / np.sqrt(d))
    queries = np.concatenate([noisy, random_unit(rng, 200, d)])
    return db, ids, queries


@pytest.fixture(scope="module")
def scann_index(big):
    db, ids, _ = big
    return VectorIndex.build(db, ids, method="scann")


# ----------------------------------------------------------------------------- exact
def test_exact_equals_numpy_argsort():
    rng = np.random.default_rng(1)
    db = random_unit(rng, 3000, 48)
    ids = rng.permutation(10_000)[:3000] * 7 - 5000  # arbitrary, some negative
    q = random_unit(rng, 300, 48)
    index = VectorIndex.build(db, ids)
    assert index.method == "exact" and len(index) == 3000 and index.dim == 48
    got_ids, got_s = index.search(q, 10)
    want_ids, want_s = numpy_topk(db, ids, q, 10)
    assert got_ids.dtype == np.int64 and got_s.dtype == np.float32 and got_ids.shape == (300, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    # k == len: a full ranking (float32 near-ties may swap neighbours: compare scores and sets)
    got_ids, got_s = index.search(q[:3], 3000)
    want_ids, want_s = numpy_topk(db, ids, q[:3], 3000)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    assert all(set(a) == set(b) for a, b in zip(got_ids, want_ids))


def test_auto_picks_by_size():
    rng = np.random.default_rng(2)
    assert VectorIndex.build(random_unit(rng, 100, 8)).method == "exact"
    assert EXACT_BELOW == 20_000
    p = ScannParams.for_size(1_000_000)
    assert p.tree and p.num_leaves == 1000 and p.num_leaves_to_search == 100
    assert not ScannParams.for_size(50_000).tree and ScannParams.for_size(100).brute_force


# ----------------------------------------------------------------------------- scann
def test_scann_recall(big, scann_index):
    db, ids, queries = big
    assert scann_index.method == "scann" and len(scann_index) == len(db)
    got_ids, got_s = scann_index.search(queries, 5)
    want_ids, want_s = numpy_topk(db, ids, queries, 5)
    r_noisy = recall(got_ids[:200], want_ids[:200])
    r_random = recall(got_ids[200:], want_ids[200:])
    assert r_noisy >= 0.95 and r_random >= 0.95, (r_noisy, r_random)
    # scores are exact (re-scored) dot products of the returned ids
    pos = {int(i): j for j, i in enumerate(ids)}
    rows = np.vectorize(pos.get)(got_ids)
    exact = np.einsum("qd,qkd->qk", queries, db[rows])
    np.testing.assert_allclose(got_s, exact, atol=1e-4)
    assert np.all(np.diff(got_s, axis=1) <= 1e-6)


def test_scann_tree_path():
    rng = np.random.default_rng(3)
    centers = random_unit(rng, 50, 32)
    db = unit(centers[rng.integers(0, 50, 5000)] + 0.5 * rng.standard_normal((5000, 32)) / np.sqrt(32))
    q = unit(db[:100] + 0.3 * rng.standard_normal((100, 32)) / np.sqrt(32))
    index = VectorIndex.build(db, method="scann", tree=True, num_leaves=70, num_leaves_to_search=10)
    assert index.params.tree
    got, _ = index.search(q, 5)
    assert recall(got, numpy_topk(db, np.arange(5000), q, 5)[0]) >= 0.9


def test_scann_tiny_uses_brute_force():
    rng = np.random.default_rng(4)
    db = random_unit(rng, 40, 16)
    index = VectorIndex.build(db, np.arange(40) + 100, method="scann")
    got, _ = index.search(db[:5], 3)
    np.testing.assert_array_equal(got, numpy_topk(db, np.arange(40) + 100, db[:5], 3)[0])


# ----------------------------------------------------------------------------- add, save, load
@pytest.mark.parametrize("method", ["exact", "scann"])
def test_add_makes_vectors_findable(method):
    rng = np.random.default_rng(5)
    db = random_unit(rng, 2000, 32)
    index = VectorIndex.build(db, np.arange(2000) * 2, method=method)
    new = random_unit(rng, 20, 32)
    index.add(new, np.arange(20) + 10**9)
    assert len(index) == 2020
    got, scores = index.search(new, 1)
    np.testing.assert_array_equal(got[:, 0], np.arange(20) + 10**9)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    index.add(random_unit(rng, 3, 32))  # default ids continue after the largest
    np.testing.assert_array_equal(index.ids[-3:], 10**9 + 20 + np.arange(3))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(new[:1], [0])
    with pytest.raises(ValueError, match="dimension"):
        index.add(random_unit(rng, 2, 31), [5, 7])


@pytest.mark.parametrize("method", ["exact", "scann"])
def test_save_load_round_trip(tmp_path, method):
    rng = np.random.default_rng(6)
    db = random_unit(rng, 1500, 32)
    ids = rng.choice(10**9, 1500, replace=False)
    index = VectorIndex.build(db, ids, method=method)
    index.add(random_unit(rng, 5, 32), [1, 2, 3, 4, 5])
    q = random_unit(rng, 50, 32)
    before = index.search(q, 5)
    index.save(str(tmp_path / "idx"))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["method"] == method and meta["dim"] == 32 and meta["count"] == 1505
    loaded = VectorIndex.load(str(tmp_path / "idx"))
    after = loaded.search(q, 5)
    assert loaded.method == method and len(loaded) == 1505
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VectorIndex.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        VectorIndex.load(str(tmp_path / "empty"))
    rng = np.random.default_rng(7)
    index = VectorIndex.build(random_unit(rng, 100, 8))
    d = tmp_path / "idx"
    index.save(str(d))
    (d / "vectors.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt vectors"):
        VectorIndex.load(str(d))
    os.remove(d / "vectors.npy")
    with pytest.raises(FileNotFoundError, match="vectors.npy"):
        VectorIndex.load(str(d))
    (d / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt index metadata"):
        VectorIndex.load(str(d))
    index.save(str(d))
    np.save(d / "ids.npy", np.arange(99))
    with pytest.raises(ValueError, match="expected 100"):
        VectorIndex.load(str(d))


def test_input_errors():
    rng = np.random.default_rng(8)
    db = random_unit(rng, 50, 8)
    index = VectorIndex.build(db)
    with pytest.raises(ValueError, match="dimension 9"):
        index.search(random_unit(rng, 2, 9), 3)
    with pytest.raises(ValueError, match="exceeds"):
        index.search(db[:2], 51)
    with pytest.raises(ValueError, match="positive"):
        index.search(db[:2], 0)
    with pytest.raises(ValueError, match="2-D"):
        index.search(db[0], 3)
    bad = db.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        VectorIndex.build(bad)
    with pytest.raises(ValueError, match="non-finite"):
        index.search(bad[:5], 2)
    with pytest.raises(ValueError, match="duplicates"):
        VectorIndex.build(db[:3], [1, 1, 2])
    with pytest.raises(ValueError, match="3 ids"):
        VectorIndex.build(db[:3], [1, 2])
    with pytest.raises(ValueError, match="unknown index method"):
        VectorIndex.build(db, method="faiss")
    with pytest.raises(TypeError, match="unknown ScaNN option"):
        VectorIndex.build(db, method="scann", leaves=3)
