"""Retriever (search, leakage filter, LRU cache) and continual-stage reference pairing."""

import numpy as np
import pytest

from m3jax.memory.embed import FunctionEmbedder
from m3jax.memory.index import VectorIndex
from m3jax.memory.retrieve import Retriever, SequenceFilter, chunk_queries, rag_prompt
from m3jax.model.memory import MemoryKV
from m3jax.train.pairs import load_or_pair, pair_references, reference_lookup

DIM = 1024


def _bow(texts):
    """Bag-of-token-ids embedding: texts here are space-separated ints."""
    out = np.zeros((len(texts), DIM), np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, int(w) % DIM] = 1.0
    out[:, 0] += 1e-3
    return out


class IntTokenizer:
    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def encode(self, text):
        return [int(w) for w in text.split()]


class FakeBank:
    """Codes of memory i are filled with the value i; decoding doubles them."""

    def __init__(self, n):
        self.n = n
        self.gathered = []

    def gather_codes(self, ids):
        ids = np.asarray(ids)
        self.gathered.append(ids.tolist())
        codes = np.broadcast_to(ids[:, None, None, None, None, None].astype(np.float32), (len(ids), 1, 2, 1, 2, 2))
        return np.array(codes), np.ones((len(ids), 2), bool)

    def decode(self, codes, mask):
        return MemoryKV(2 * np.asarray(codes), np.asarray(mask))


@pytest.fixture()
def setup():
    rng = np.random.default_rng(0)
    refs = [list(rng.integers(0, 1000, 20)) for _ in range(50)]
    emb = FunctionEmbedder(_bow, DIM)
    index = VectorIndex.build(emb([" ".join(map(str, r)) for r in refs]))
    bank = FakeBank(len(refs))
    ret = Retriever(index, emb, reference_tokens=refs, bank=bank, tokenizer=IntTokenizer(), k=2, candidates=6)
    return refs, ret, bank


def test_retrieves_the_matching_reference_unless_it_leaks(setup):
    refs, ret, _ = setup
    q = refs[7][:12]  # 12 of 20 tokens: overlap 0.6 < 2/3, kept
    ids = ret.search([q])
    assert ids[0, 0] == 7
    q = refs[7][:16]  # 16/20 = 0.8 > 2/3: it leaks and is dropped
    ids = ret.search([q])
    assert 7 not in ids[0] and ret.stats.filtered >= 1
    ids = ret.search([q], threshold=0.9)  # the training threshold keeps it
    assert ids[0, 0] == 7
    # a longer filter text: the whole document the query comes from
    ids = ret.search([refs[7][:5]], filter_tokens=[refs[7] + [1, 2, 3]])
    assert 7 not in ids[0]


def test_memories_and_lru_cache(setup):
    refs, ret, bank = setup
    ids, mem = ret.retrieve([refs[3][:10], refs[3][:10]])
    assert mem.kv_ILZKEH.shape[0] == 4
    np.testing.assert_array_equal(np.asarray(mem.kv_ILZKEH)[:, 0, 0, 0, 0, 0], 2 * ids.reshape(-1).astype(np.float32))
    assert len(bank.gathered) == 1 and len(bank.gathered[0]) == len(set(ids.reshape(-1)))
    ret.retrieve([refs[3][:10]])
    assert len(bank.gathered) == 1  # all hits
    assert ret.stats.cache_hits >= 2
    masked = ret.memories(np.array([[-1, ids[0, 0]]]))
    assert not np.asarray(masked.mask_IE)[0].any() and np.asarray(masked.mask_IE)[1].all()


def test_prepared_queries_give_the_same_result(setup):
    refs, ret, _ = setup
    qs = [refs[3][:10], refs[11][:12], refs[40][:8]]
    calls = []
    ret.embedder = FunctionEmbedder(lambda t: calls.append(list(t)) or _bow(t), DIM)
    handle = ret.prepare(qs)  # FunctionEmbedder has no dispatch: embeds when the handle is called
    assert calls == []
    ids, mem = ret.retrieve(qs, prepared=handle)
    assert len(calls) == 1
    ids2, mem2 = ret.retrieve(qs)
    np.testing.assert_array_equal(ids, ids2)
    assert list(ids[:, 0]) == [3, 11, 40]
    np.testing.assert_array_equal(np.asarray(mem.kv_ILZKEH), np.asarray(mem2.kv_ILZKEH))
    with pytest.raises(ValueError, match="prepared query vectors"):
        ret.search(qs[:2], prepared=handle)


class ShortRows:
    """An index whose rows come back with -1 at the end (as ScaNN pads a short leaf)."""

    def __init__(self, index):
        self.index, self.dim = index, index.dim

    def __len__(self):
        return len(self.index)

    def search(self, vecs, k):
        ids, d = self.index.search(vecs, k)
        ids, d = ids.copy(), d.copy()
        ids[:, k // 2:] = -1
        return ids, d


def test_short_index_rows_and_empty_queries(setup):
    refs, ret, _ = setup
    ret.index = ShortRows(ret.index)
    calls = []
    ret.embedder = FunctionEmbedder(lambda t: calls.append(list(t)) or _bow(t), DIM)
    q = refs[7][:16]  # leaks reference 7 (16/20 > 2/3)
    ids = ret.search([q, [], refs[3][:10]])
    assert 7 not in ids[0] and ids[2, 0] == 3 and (ids[1] == -1).all()
    assert len(calls) == 1 and len(calls[0]) == 2  # the empty query was not embedded
    assert ret.search([[], []]).tolist() == [[-1, -1], [-1, -1]] and len(calls) == 1
    ids, mem = ret.retrieve([[], refs[3][:10]], prepared=ret.prepare([[], refs[3][:10]]))
    assert ids[0].tolist() == [-1, -1] and not np.asarray(mem.mask_IE)[:2].any()


def test_errors(setup):
    refs, ret, _ = setup
    with pytest.raises(ValueError, match="dim"):
        Retriever(ret.index, FunctionEmbedder(lambda t: _bow(t)[:, :16], 16), reference_tokens=refs)
    with pytest.raises(ValueError, match="no memory bank"):
        Retriever(ret.index, ret.embedder, reference_tokens=refs, tokenizer=IntTokenizer()).memories(np.array([[1]]))


def test_pairing_one_reference_per_chunk_respecting_the_filter(setup, tmp_path):
    refs, ret, _ = setup
    # row 0: chunk 0 quotes ref 5 fully (overlap 1 with the row: must be dropped), chunk 1 quotes
    # 8 tokens of ref 9 (overlap 0.4: kept)
    row0 = refs[5] + [1] * 12 + refs[9][:8] + [2] * 24
    row1 = refs[11][:8] + [3] * 24 + [0] * 32
    tokens = np.array([row0, row1], np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, 32:] = False
    ids = pair_references(tokens, mask, ret, chunk_size=32, show_progress=False)
    assert ids.shape == (2, 2)
    assert ids[0, 0] != 5 and ids[0, 1] == 9 and ids[1, 0] == 11 and ids[1, 1] == -1
    path = str(tmp_path / "pairs.npy")
    a = load_or_pair(path, tokens, mask, ret, chunk_size=32, show_progress=False)
    np.testing.assert_array_equal(a, ids)
    ret.index = None  # cached: no retrieval needed the second time
    np.testing.assert_array_equal(load_or_pair(path, tokens, mask, ret, chunk_size=32), ids)
    add = reference_lookup(refs, 24)
    b = add({"ref_ids": ids})
    assert b["ref_tokens"].shape == (2, 2, 24)
    assert b["ref_mask"][0, 1].sum() == 20 and not b["ref_mask"][1, 1].any()
    np.testing.assert_array_equal(b["ref_tokens"][0, 1, :20], refs[9])


# ------------------------------------------------------------------------------ the memory-source protocol
def test_chunk_queries_and_rag_prompt():
    assert chunk_queries([1, 2, 3, 4, 5], 2, 4) == [[1, 2], [3, 4], [5], []]
    refs = [[10, 11], [12, 13, 14]]
    assert rag_prompt([1, 7, 8], refs) == [1, 10, 11, 12, 13, 14, 7, 8]
    assert rag_prompt([1, 7, 8], refs, room=2) == [1, 13, 14, 7, 8]  # cut from the left
    assert rag_prompt([1, 7], refs, room=0) == rag_prompt([1, 7], refs, room=-3) == [1, 7]


class Recorder:
    """A memory source that records the filter text and threshold of every search."""

    k = 2

    def __init__(self):
        self.calls = []

    def search(self, queries, filter_tokens=None, threshold=None, **kwargs):
        self.calls.append((filter_tokens, threshold))
        return np.arange(2 * len(queries)).reshape(len(queries), 2)

    def memories(self, ids):
        return ("memories", ids.shape)

    def reference_tokens(self, ids):
        return [[[5, 6, 7], [8, 9]] for _ in np.asarray(ids)]


def test_sequence_filter_filters_each_query_against_its_own_sequence(setup):
    rec = Recorder()
    src = SequenceFilter(rec, threshold=0.5)
    src.search([[1], [2]])
    assert rec.calls[-1] == (None, None)  # outside `sequences`: the plain retriever
    with src.sequences([[1, 1], [2, 2]], reference_room=[3, 0]):
        ids, mem = src.retrieve([[1], [1], [1], [2], [2], [2]])  # a prefill: 2 sequences x 3 chunks
        assert rec.calls[-1] == ([[1, 1]] * 3 + [[2, 2]] * 3, 0.5) and mem == ("memories", (6, 2))
        src.search([[1], [2]])  # a swap: one query per sequence
        assert rec.calls[-1] == ([[1, 1], [2, 2]], 0.5)
        assert src.reference_tokens(ids[:2]) == [[[7, 8, 9]], []]  # cut to each sequence's room
        with src.sequences([[3]], threshold=2.0):
            src.search([[3]])
            assert rec.calls[-1] == ([[3]], 2.0)
        src.search([[1], [2]])
        assert rec.calls[-1] == ([[1, 1], [2, 2]], 0.5)  # the outer block is back
    src.search([[1]])
    assert rec.calls[-1] == (None, None)
    # a real Retriever: its own threshold by default, and the filter does drop a leaking reference
    refs, ret, _ = setup
    source = ret.per_sequence()
    assert source.threshold == ret.threshold and source.prepare == ret.prepare
    q = refs[7][:5]  # 5 of 20 tokens: no leak on its own
    assert 7 in source.search([q])[0]
    with source.sequences([refs[7]]):  # its sequence holds reference 7 whole
        assert 7 not in source.search([q])[0]
