"""Training data: TFDS array_record without TensorFlow, splits, token stream cache, packing,
shuffling, sharding and resumable iterators."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from m3jax.tokenizer import Tokenizer, train_bpe
from m3jax.train import data as D

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega memory reference chunk token model").split()


def _text(rng: np.random.Generator, n_words: int) -> str:
    words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=n_words)]
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus of 50 documents (doc_id, title, text, description, topic), some longer than
    a row, one untitled, one with non-ASCII text."""
    rng = np.random.default_rng(0)
    docs = []
    for i in range(50):
        n = int(rng.choice([3, 8, 20, 60]))
        docs.append({"doc_id": 100 + i, "title": f"Doc {i}", "text": _text(rng, n),
                     "description": f"description {i}", "topic": ["A", "B"][i % 2]})
    docs[7]["title"] = ""
    docs[8]["text"] = "Café 😀 naïve — unicode text."
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n", encoding="utf-8")
    return str(path), docs


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe([d["text"] for d in corpus[1]], vocab_size=300)


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return D.DataConfig(data_dir=str(data_dir), corpus=corpus[0], heldout_fraction=0.2, seq_len=16,
                        batch_size=4, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)


def _records(src):
    return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------------------------ builder
def test_prepare_array_record_and_read_back(cfg, corpus):
    name = D.prepare(cfg)
    assert name.startswith("m3jax_text/small_") and name.endswith(":1.0.0")
    ds_dir = os.path.join(cfg.data_dir, *name.replace(":", "/").split("/"))
    files = os.listdir(ds_dir)
    assert any(".array_record-" in f for f in files), files
    assert not any("tfrecord" in f for f in files), files
    by_id = {d["doc_id"]: d for d in corpus[1]}
    seen = []
    for split in D.SPLITS:
        src = tfds.data_source(name, split=split, data_dir=cfg.data_dir, download=False)
        recs = _records(src)
        ids = [int(r["doc_id"]) for r in recs]
        assert ids == sorted(ids)  # written in doc_id order, not shuffled
        for r in recs:
            d = by_id[int(r["doc_id"])]
            for k in ("title", "text", "description", "topic"):
                assert r[k].decode("utf-8") == d[k]
        seen += ids
    assert sorted(seen) == sorted(by_id)
    assert "tensorflow" not in sys.modules


def test_splits_disjoint_and_deterministic(cfg, corpus, tmp_path):
    train = [int(r["doc_id"]) for r in _records(D.data_source(cfg, "train"))]
    held = [int(r["doc_id"]) for r in _records(D.data_source(cfg, "heldout"))]
    assert not set(train) & set(held)
    assert 0 < len(held) < len(train)
    want = [d["doc_id"] for d in corpus[1]
            if D.is_heldout(D.heldout_key(d["title"], d["text"]), cfg.heldout_fraction)]
    assert held == want
    # Prepared again elsewhere: the same records in the same order.
    again = dataclasses.replace(cfg, data_dir=str(tmp_path))
    assert [int(r["doc_id"]) for r in _records(D.data_source(again, "heldout"))] == held
    assert [int(r["doc_id"]) for r in _records(D.data_source(again, "train"))] == train
    # A different fraction is a different dataset config.
    assert D.corpus_config(cfg.corpus, 0.3).name != D.corpus_config(cfg.corpus, 0.2).name
    # read_documents: the knowledge base holds both splits.
    kb = D.read_documents(cfg)
    assert sorted(i for i, _ in kb) == sorted(d["doc_id"] for d in corpus[1])
    assert dict(kb)[108] == corpus[1][8]["text"]


def test_corpus_without_heldout_documents(tmp_path):
    """A small corpus (or heldout_fraction 0) has no held-out document: TFDS cannot write an empty
    split, so only `train` is written and `read_documents` reads an empty held-out split."""
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"title": f"T{i}", "text": f"text number {i}"}) + "\n" for i in range(3)))
    cfg = D.DataConfig(data_dir=str(tmp_path / "tfds"), corpus=str(path), heldout_fraction=0.0, seq_len=8,
                       batch_size=2)
    assert [d for d, _ in D.read_documents(cfg)] == [0, 1, 2]
    assert len(D.data_source(cfg, "train")) == 3


def test_is_heldout_fraction():
    keys = [f"title {i}" for i in range(20000)]
    frac = np.mean([D.is_heldout(k, 0.05) for k in keys])
    assert 0.04 < frac < 0.06
    assert not any(D.is_heldout(k, 0.0) for k in keys[:100])
    assert [D.is_heldout(k, 0.05) for k in keys[:500]] == [D.is_heldout(k, 0.05) for k in keys[:500]]


class ForeignText(tfds.core.GeneratorBasedBuilder):
    """A foreign dataset prepared elsewhere: only a `body` feature, no doc_id."""

    VERSION = tfds.core.Version("2.0.0")
    code_path = None  # see M3jaxText.code_path

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            yield i, {"body": f"foreign document number {i} " * (i + 1)}


def test_reads_any_prepared_array_record_dataset(tmp_path, tok):
    ForeignText(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    cfg = D.DataConfig(data_dir=str(tmp_path), tfds_name="foreign_text:2.0.0", text_key="body",
                       seq_len=16, batch_size=2, shuffle=False, num_epochs=1, shard_index=0,
                       shard_count=1)
    docs = D.read_documents(cfg, splits=("train",))
    assert [i for i, _ in docs] == list(range(12))  # record index as doc id
    stream = D.token_stream(cfg, tok)
    assert stream.num_docs == 12
    batch = next(D.make_iterator(cfg, tok))
    assert batch["tokens"].shape == (2, 16)
    with pytest.raises(KeyError, match="text_key"):
        D.read_documents(dataclasses.replace(cfg, text_key="text"), splits=("train",))


# ------------------------------------------------------------------------------------ tokens
def test_token_stream_structure_and_cache(cfg, tok, monkeypatch):
    stream = D.token_stream(cfg, tok)
    docs = D.read_documents(cfg, splits=("train",))
    assert stream.num_docs == len(docs)
    assert stream.tokens.dtype == np.int32 and stream.doc_ids.dtype == np.int32
    for d, (doc_id, text) in enumerate(docs):
        piece = stream.tokens[stream.doc_starts[d]:stream.doc_starts[d + 1]]
        assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
        assert piece[1:-1].tolist() == tok.encode(text)
        assert (stream.doc_ids[stream.doc_starts[d]:stream.doc_starts[d + 1]] == doc_id).all()
    # Cached: a second call does not tokenize.
    cache = D._cache_dir(cfg, D.prepare(cfg), tok)
    assert (cache / "train.tokens.npy").exists()
    monkeypatch.setattr(D, "tokenize_documents", lambda *a, **k: pytest.fail("re-tokenized"))
    again = D.token_stream(cfg, tok)
    for k in ("tokens", "doc_ids", "doc_starts"):
        np.testing.assert_array_equal(getattr(again, k), getattr(stream, k))
    # Another tokenizer gets another cache entry.
    other = train_bpe([t for _, t in docs], vocab_size=280)
    assert D.tokenizer_fingerprint(other) != D.tokenizer_fingerprint(tok)


def test_prepare_tokenizer_trains_then_loads(tmp_path, corpus):
    texts = [d["text"] for d in corpus[1]]
    a = D.prepare_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    b = D.prepare_tokenizer(lambda: pytest.fail("trained again"), str(tmp_path / "tok"))
    assert isinstance(b, Tokenizer)
    assert D.tokenizer_fingerprint(a) == D.tokenizer_fingerprint(b)
    assert b.encode(texts[0]) == a.encode(texts[0])


# ------------------------------------------------------------------------------------ rows
def _all_batches(cfg, tok, **kw):
    return list(D.make_iterator(dataclasses.replace(cfg, **kw), tok))


def test_packed_batches_reproduce_stream(cfg, tok):
    stream = D.token_stream(cfg, tok)
    batches = _all_batches(cfg, tok)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for b in batches:
        assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
        assert b["loss_mask"].dtype == bool and b["doc_ids"].dtype == np.int32
    flat = rows["tokens"].reshape(-1)
    n = len(flat)
    # Full batches only (drop_remainder): at most one batch of rows is missing at the end.
    assert len(stream.tokens) - n < 4 * 16 + 16
    np.testing.assert_array_equal(flat, stream.tokens[:n])
    np.testing.assert_array_equal(rows["doc_ids"].reshape(-1), stream.doc_ids[:n])
    assert rows["loss_mask"].all()  # packed rows before the last are all real tokens
    # The last, padded row of the stream.
    r = D.pack_rows(stream, 16, tok.pad_id)
    tail = len(stream.tokens) % 16
    if tail:
        assert r["loss_mask"][-1].sum() == tail
        assert (r["doc_ids"][-1, tail:] == -1).all() and (r["tokens"][-1, tail:] == tok.pad_id).all()


def test_unpacked_rows(cfg, tok):
    stream = D.token_stream(cfg, tok)
    r = D.pack_rows(stream, 16, tok.pad_id, pack=False)
    assert (r["tokens"][~r["loss_mask"]] == tok.pad_id).all()
    assert (r["doc_ids"][~r["loss_mask"]] == -1).all()
    assert (r["doc_ids"][r["loss_mask"]] >= 0).all()
    # Every row holds one document; concatenating a document's rows gives it back.
    row = 0
    for d in range(stream.num_docs):
        want = stream.tokens[stream.doc_starts[d]:stream.doc_starts[d + 1]]
        got = []
        while len(got) < len(want):
            assert r["tokens"][row, 0] == (tok.bos_id if not got else want[len(got)])
            got += r["tokens"][row][r["loss_mask"][row]].tolist()
            assert len(set(r["doc_ids"][row][r["loss_mask"][row]].tolist())) == 1
            row += 1
        assert got == want.tolist()
    assert row == len(r["tokens"])
    batches = _all_batches(cfg, tok, pack=False)
    assert batches[0]["tokens"][0, 0] == tok.bos_id
    assert not all(b["loss_mask"].all() for b in batches)


def _epoch_ids(n, **kw):
    ds = D.rows_dataset({"idx": np.arange(n)}, **kw)
    return np.concatenate([b["idx"] for b in ds])


def test_shuffle_deterministic_per_seed():
    a = _epoch_ids(40, batch_size=4, seed=1, num_epochs=3)
    b = _epoch_ids(40, batch_size=4, seed=1, num_epochs=3)
    c = _epoch_ids(40, batch_size=4, seed=2, num_epochs=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    epochs = a.reshape(3, 40)
    for e in epochs:  # each epoch is a permutation of all rows
        assert sorted(e.tolist()) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(epochs[0], np.arange(40))
    np.testing.assert_array_equal(_epoch_ids(40, batch_size=4, shuffle=False, num_epochs=2),
                                  np.tile(np.arange(40), 2))


def test_end_to_end_shuffle(cfg, tok):
    a = _all_batches(cfg, tok, shuffle=True, seed=3)
    b = _all_batches(cfg, tok, shuffle=True, seed=3)
    c = _all_batches(cfg, tok, shuffle=True, seed=4)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("n", [40, 41, 43])
def test_two_shards_partition_each_epoch(n):
    kw = dict(batch_size=1, seed=5, num_epochs=2, shard_count=2)
    s0 = _epoch_ids(n, shard_index=0, **kw).reshape(2, -1)
    s1 = _epoch_ids(n, shard_index=1, **kw).reshape(2, -1)
    assert s0.shape == s1.shape == (2, n // 2)  # each epoch cut to a multiple of the shards
    for e in range(2):  # the shards split every epoch between them
        assert not set(s0[e]) & set(s1[e])
        assert len(set(s0[e]) | set(s1[e])) == 2 * (n // 2)
    assert not np.array_equal(s0[0], s0[1])
    # Batches run across epoch boundaries: 2 epochs of 21 rows make 10 batches of 4.
    assert _epoch_ids(43, batch_size=4, seed=5, num_epochs=2, shard_count=2, shard_index=0).shape == (40,)


def test_shards_from_config(cfg, tok):
    kw = dict(shuffle=True, seed=1, batch_size=4)
    a = _all_batches(cfg, tok, shard_index=0, shard_count=2, **kw)
    b = _all_batches(cfg, tok, shard_index=1, shard_count=2, **kw)
    assert a[0]["tokens"].shape == (2, 16)  # global batch 4 = 2 shards x 2 rows
    key = lambda row: tuple(row.tolist())  # noqa: E731
    rows_a = {key(r) for x in a for r in x["doc_ids"] * 100003 + x["tokens"]}
    rows_b = {key(r) for x in b for r in x["doc_ids"] * 100003 + x["tokens"]}
    assert rows_a and rows_b and not rows_a & rows_b
    with pytest.raises(ValueError, match="multiple"):
        D.make_dataset(dataclasses.replace(cfg, batch_size=3, shard_index=0, shard_count=2), tok)


def test_iterator_state_resumes_exactly(cfg, tok):
    c = dataclasses.replace(cfg, shuffle=True, seed=7, num_epochs=None)
    per_epoch = len(_all_batches(cfg, tok))
    it = D.make_iterator(c, tok)
    for _ in range(per_epoch - 2):
        next(it)
    state = it.get_state()
    json.dumps(state)  # small and serializable
    want = [next(it) for _ in range(5)]  # crosses an epoch boundary
    resumed = D.make_iterator(c, tok, state=json.loads(json.dumps(state)))
    got = [next(resumed) for _ in range(5)]
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    it2 = D.make_iterator(c, tok)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["tokens"], want[0]["tokens"])


def test_iterator_state_is_the_same_on_every_shard(cfg, tok):
    """Multi-host checkpoints hold process 0's iterator state (one JSON for all processes): it is
    positional, so restoring it on another shard resumes that shard exactly."""
    c = dataclasses.replace(cfg, shuffle=True, seed=3, num_epochs=None, batch_size=4, shard_count=2)
    its = [D.make_iterator(dataclasses.replace(c, shard_index=i), tok) for i in range(2)]
    for _ in range(3):
        for it in its:
            next(it)
    assert its[0].get_state() == its[1].get_state()
    state = json.loads(json.dumps(its[0].get_state()))
    want = next(its[1])
    resumed = D.make_iterator(dataclasses.replace(c, shard_index=1), tok, state=state)
    got = next(resumed)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


# ------------------------------------------------------------------------------------ chunks
def test_chunk_texts(tok):
    toks = np.arange(150, dtype=np.int32) % 200 + 3
    chunks = D.chunk_texts(toks, 64)
    assert [len(c) for c in chunks] == [64, 64, 22]
    np.testing.assert_array_equal(np.concatenate(chunks), toks)
    mask = np.ones(150, bool)
    mask[140:] = False
    assert [len(c) for c in D.chunk_texts(toks, 64, mask=mask)] == [64, 64, 12]
    text = "Alpha beta gamma. Delta epsilon."
    ids = np.asarray([tok.bos_id] + tok.encode(text), np.int32)
    texts = D.chunk_texts(ids, 4, tokenizer=tok)
    assert "".join(texts) == text  # BOS skipped when decoding
    with pytest.raises(ValueError):
        D.chunk_texts(ids[None], 4)


# ------------------------------------------------------------------------------------ config
def test_data_config_validation():
    with pytest.raises(ValueError, match="seq_len"):
        D.DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        D.DataConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="together"):
        D.DataConfig(shard_index=0)
    with pytest.raises(ValueError, match="shard_index"):
        D.DataConfig(shard_index=2, shard_count=2)
    assert D.DataConfig().shard() == (0, 1)  # one JAX process


# ------------------------------------------------------------------------------------ real corpus
def test_default_corpus_wiki_leads(tmp_path):
    """The shipped Wikipedia leads: prepared, split ~5% held out by title, tokenized and packed."""
    from m3jax.assets import wiki_leads

    arts = wiki_leads()
    cfg = D.DataConfig(data_dir=str(tmp_path), seq_len=128, batch_size=8, seed=0)
    assert D.prepare(cfg) == "m3jax_text/wiki_leads:1.0.0"
    train = D.data_source(cfg, "train")
    held = D.data_source(cfg, "heldout")
    assert len(train) + len(held) == len(arts)
    assert 0.04 < len(held) / len(arts) < 0.06
    r = held[0]
    art = arts[int(r["doc_id"])]
    assert r["title"].decode() == art.title and r["text"].decode() == art.text
    assert D.is_heldout(art.title, 0.05)
    tok = train_bpe([a.text for a in arts[:1000]], vocab_size=2048)
    it = D.make_iterator(cfg, tok)
    b = next(it)
    assert b["tokens"].shape == (8, 128) and b["loss_mask"].all()
    held_ids = {int(held[i]["doc_id"]) for i in range(len(held))}
    assert not held_ids & set(np.unique(b["doc_ids"]).tolist())
    assert "tensorflow" not in sys.modules
