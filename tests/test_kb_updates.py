"""Knowledge-base updates without retraining: add, delete, resume after a kill, ScaNN, the CLI."""

import json
import os
import zlib

import jax
import numpy as np
import pytest

from m3jax import cli
from m3jax import model as M
from m3jax.config import preset
from m3jax.memory import build as B
from m3jax.memory.bank import MemoryBank
from m3jax.memory.build import KnowledgeBaseError, build_knowledge_base, open_knowledge_base
from m3jax.memory.embed import FunctionEmbedder
from m3jax.memory.errors import BankFingerprintError
from m3jax.memory.index import VectorIndex
from m3jax.memory.retrieve import Retriever
from m3jax.tokenizer import train_bpe

DIM = 512
SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "vo", "ri", "pe", "du", "ga", "zo"]


def _text(rng, n_words):
    words = ["".join(rng.choice(SYLLABLES, int(rng.integers(2, 4)))) for _ in range(n_words)]
    return " ".join(words) + "."


def _bow(texts):
    """Bag of words hashed into DIM buckets: a text's own vector has cosine 1 with itself only."""
    out = np.zeros((len(texts), DIM), np.float32)
    for i, t in enumerate(texts):
        for w in t.replace(".", " ").split():
            out[i, zlib.crc32(w.encode()) % DIM] += 1.0
    out[:, 0] += 1e-3
    return out


EMB = FunctionEmbedder(_bow, DIM)


def tiny_model(docs, seed: int = 0):
    """(tokenizer, config, params): a BPE trained on the docs' texts and a random `tiny` model."""
    tok = train_bpe([t for _, t, _ in docs], vocab_size=300)
    cfg = preset("tiny", vocab_size=tok.vocab_size, reference_prefix=tok.reference_prefix(),
                 bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return tok, cfg, M.init(cfg, jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    docs = [(10 + i, _text(rng, int(rng.integers(20, 40))), f"Title {10 + i}") for i in range(10)]
    return (docs, *tiny_model(docs, 0))


def _build(path, setup, docs, **kw):
    _, tok, cfg, params = setup
    return build_knowledge_base(str(path), params, cfg, tok, docs, embedder=EMB, codec="bf16", batch_size=8,
                                show_progress=False, log=lambda *a: None, **kw)


def _add(kb, setup, docs):
    _, tok, cfg, params = setup
    return kb.add(docs, params, cfg, tok, embedder=EMB, batch_size=8, show_progress=False, log=lambda *a: None)


def _ref_text(kb, docs, i):
    """The text of reference i, from the bank's metadata (doc_id and character span)."""
    texts = {d: t for d, t, *_ in docs}
    m = kb.bank.metadata([i])
    return texts[int(m.doc_id[0])][int(m.char_start[0]):int(m.char_end[0])]


def _top(ret, text, k=None):
    return ret.search([text], k=k)[0]


def _consistent(kb, directory):
    """Counts agree on disk, ids are 0..n-1 once each, nothing pending or stray."""
    n = kb.references
    kb2 = open_knowledge_base(str(directory))
    assert kb2.references == n == len(kb2.bank) == len(kb2.index)
    np.testing.assert_array_equal(np.sort(kb2.index.ids), np.arange(n))
    spans = sorted((r.first, r.first + r.count) for r in kb2.records)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no overlap, no gap
    np.testing.assert_array_equal(kb2.doc_ids(np.arange(n)), kb2.bank.metadata(np.arange(n)).doc_id)
    assert not os.path.exists(directory / B.JOURNAL_FILE)
    assert sorted(x for x in os.listdir(directory) if x.startswith("index")) == [kb2.info["index_dir"]]
    assert not [x for x in os.listdir(directory) if "pending" in x or x.endswith(".tmp")]
    assert np.load(directory / B.EMBEDDINGS_FILE).shape == (n, DIM)
    return kb2


# ---------------------------------------------------------------------------------------- add
def test_add_then_retrieve_and_same_memories_as_a_full_build(setup, tmp_path):
    docs = setup[0]
    kb = _build(tmp_path / "kb", setup, docs[:6])
    base = kb.references
    ret_before = kb.retriever(EMB, k=2, threshold=2.0)
    new = _add(kb, setup, docs[6:8])
    assert [r.doc_id for r in new] == [16, 17] and new[0].first == base
    n = kb.references
    assert n == base + sum(r.count for r in new) == len(kb.bank) == len(kb.index)
    assert kb.info["documents"] == 8 and kb.info["live_references"] == n
    for directory_kb in (kb, _consistent(kb, tmp_path / "kb")):  # in memory and reopened from disk
        ret = directory_kb.retriever(EMB, k=2, threshold=2.0)
        for i in range(base, n):
            assert _top(ret, _ref_text(kb, docs, i))[0] == i
        assert directory_kb.doc_ids([[base, -1], [n - 1, 0]]).tolist() == [[16, -1], [17, 10]]
        assert directory_kb.titles([base, -1, n - 1]) == ["Title 16", None, "Title 17"]
    # a retriever made before the add searches the index as it was (new ids never show up)
    assert _top(ret_before, _ref_text(kb, docs, base))[0] < base
    # the appended memories are exactly those a build of all the documents writes
    full = _build(tmp_path / "full", setup, docs[:8])
    assert full.references == n
    ids = np.arange(n)
    ca, ma = kb.bank.gather_codes(ids)
    cb, mb = full.bank.gather_codes(ids)
    np.testing.assert_array_equal(ca.view(np.uint16), cb.view(np.uint16))
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(kb.bank.metadata(ids).tokens, full.bank.metadata(ids).tokens)
    np.testing.assert_array_equal(np.load(tmp_path / "kb" / B.EMBEDDINGS_FILE),
                                  np.load(tmp_path / "full" / B.EMBEDDINGS_FILE))
    # building again with the same documents is a no-op; with more it adds the new ones
    again = _build(tmp_path / "kb", setup, docs[:8])
    assert again.references == n
    again = _build(tmp_path / "kb", setup, docs[:9])
    assert again.documents()[-1].doc_id == 18 and again.references > n


def test_refusals_duplicate_unknown_and_other_weights(setup, tmp_path):
    docs, tok, cfg, params = setup
    kb = _build(tmp_path / "kb", setup, docs[:3])
    with pytest.raises(KnowledgeBaseError, match=r"doc_id 11 is already in knowledge base '.*kb'"):
        _add(kb, setup, [docs[1]])
    with pytest.raises(KnowledgeBaseError, match="doc_id 12 appears twice"):
        _add(kb, setup, [docs[2], (12, "other text")])
    with pytest.raises(KnowledgeBaseError, match=r"doc_id 999 is not in knowledge base '.*kb'"):
        kb.delete([999])
    with pytest.raises(KnowledgeBaseError, match="not an integer"):
        kb.delete(["abc"])
    other = jax.tree_util.tree_map(lambda x: x + 1, params)
    with pytest.raises(BankFingerprintError, match="other weights"):
        kb.add([docs[5]], other, cfg, tok, embedder=EMB, batch_size=8, show_progress=False, log=lambda *a: None)
    with pytest.raises(KnowledgeBaseError, match="dim"):
        kb.add([docs[5]], params, cfg, tok, embedder=FunctionEmbedder(lambda t: _bow(t)[:, :64], 64),
               show_progress=False, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "kb" / B.JOURNAL_FILE)  # refused before anything was written
    _consistent(kb, tmp_path / "kb")


# ---------------------------------------------------------------------------------------- delete
@pytest.mark.parametrize("method", ["exact", "scann"])
def test_delete_is_never_returned_and_persists(setup, tmp_path, method):
    docs = setup[0]
    d = tmp_path / "kb"
    kb = _build(d, setup, docs[:6], index_method=method)
    assert kb.index.method == method
    early = kb.retriever(EMB, k=2, threshold=2.0)  # made before the delete: must honour it too
    gone = [r for r in kb.records if r.doc_id == 12][0]
    gone_ids = set(range(gone.first, gone.first + gone.count))
    assert kb.delete([12]) == gone.count
    assert kb.info["deleted_documents"] == 1 and kb.info["deleted_references"] == gone.count

    def check(k):
        for ret in (early, k.retriever(EMB, k=2, threshold=2.0)):
            for i in sorted(gone_ids):
                ids = _top(ret, _ref_text(k, docs, i))
                assert not gone_ids & set(ids.tolist()) and (ids >= 0).all()  # k live results
            ids, mem = ret.retrieve([_ref_text(k, docs, i) for i in sorted(gone_ids)])
            assert not gone_ids & set(ids.reshape(-1).tolist())
            assert np.asarray(mem.mask_IE).any(axis=1).all()
        assert k.is_deleted(sorted(gone_ids)).all() and not k.is_deleted([-1, 0]).any()

    check(kb)
    kb2 = open_knowledge_base(str(d))
    early = kb2.retriever(EMB, k=2, threshold=2.0)
    check(kb2)
    with pytest.raises(KnowledgeBaseError, match=r"doc_id 12 was already deleted from knowledge base"):
        kb2.delete([12])
    # add the deleted doc_id again: new memory ids, retrievable, the old ones stay deleted
    new = _add(kb2, setup, [docs[2]])
    assert new[0].doc_id == 12 and new[0].first == gone.first + gone.count + sum(
        r.count for r in kb.records if r.first > gone.first)
    ret = kb2.retriever(EMB, k=2, threshold=2.0)
    top = _top(ret, _ref_text(kb2, docs, new[0].first))
    assert top[0] == new[0].first and not gone_ids & set(top.tolist())
    assert kb2.doc_ids([new[0].first, min(gone_ids)]).tolist() == [12, 12]
    kb3 = _consistent(kb2, d)
    assert kb3.index.method == method and kb3.is_deleted(sorted(gone_ids)).all()
    assert not kb3.is_deleted(list(range(new[0].first, new[0].first + new[0].count))).any()


def test_deep_search_returns_every_live_reference(setup, tmp_path):
    """Most references deleted: a search for k = the live count still returns them all."""
    docs = setup[0]
    kb = _build(tmp_path / "kb", setup, docs[:6])
    kb.delete([10, 11, 12, 13, 14])
    live = sorted(set(range(kb.references)) - set(np.flatnonzero(kb.is_deleted(np.arange(kb.references)))))
    ret = kb.retriever(EMB, k=len(live), threshold=2.0)
    ret.candidates = len(live)  # the first search sees mostly deleted ones
    ids = _top(ret, _ref_text(kb, docs, 0))
    assert sorted(ids.tolist()) == live and ret.stats.excluded > 0


def test_legacy_knowledge_base_without_documents_file(setup, tmp_path):
    """A knowledge base built before documents.jsonl existed: doc ids come from the bank."""
    docs = setup[0]
    kb = _build(tmp_path / "kb", setup, docs[:4])
    os.remove(tmp_path / "kb" / B.DOCUMENTS_FILE)
    info = json.loads((tmp_path / "kb" / "kb.json").read_text())
    for key in ("index_dir", "documents", "deleted_documents", "live_references", "deleted_references"):
        info.pop(key)
    (tmp_path / "kb" / "kb.json").write_text(json.dumps(info))
    kb = open_knowledge_base(str(tmp_path / "kb"))
    assert [r.doc_id for r in kb.records] == [10, 11, 12, 13] and kb.titles([0]) == [None]
    kb.delete([11])
    _add(kb, setup, [docs[4]])
    kb2 = _consistent(kb, tmp_path / "kb")
    assert [r.doc_id for r in kb2.documents()] == [10, 12, 13, 14]


def test_scann_index_with_excluded_ids(tmp_path):
    """A ScaNN (asymmetric hashing) index of a few hundred vectors: excluded ids never come back,
    k live results still do; loaded from disk, it takes added vectors (what an add does)."""
    rng = np.random.default_rng(1)
    db = rng.standard_normal((400, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    index = VectorIndex.build(db, method="scann")
    assert not index.params.brute_force
    emb = FunctionEmbedder(lambda texts: db[[int(t) for t in texts]], 32)
    dead = np.zeros(400, bool)
    dead[rng.choice(400, 150, replace=False)] = True
    ret = Retriever(index, emb, reference_tokens=[[1]] * 400, k=5, threshold=2.0, exclude=lambda ids: dead[ids])
    queries = [str(i) for i in range(0, 400, 7)]
    ids = ret.search(queries)
    assert (ids >= 0).all() and not dead[ids].any()
    for q, row in zip(queries, ids):
        if not dead[int(q)]:
            assert row[0] == int(q)
    index.save(str(tmp_path / "idx"))
    loaded = VectorIndex.load(str(tmp_path / "idx"))
    new = rng.standard_normal((20, 32)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    loaded.add(new, np.arange(400, 420))
    got, _ = loaded.search(new, 1)
    np.testing.assert_array_equal(got[:, 0], np.arange(400, 420))


# ---------------------------------------------------------------------------------------- resume
def test_bank_append_from_first_id_resumes_mid_append(tmp_path):
    """build_bank(first_id=n) appends references as memories n.. and resumes a killed append."""
    from test_bank import CFG, Boom, build, exploding, make_refs, same_bank

    from m3jax.memory.errors import BankError, BankNotFoundError
    from m3jax.memory.populate import build_bank

    refs = make_refs(61)
    full = build(tmp_path / "full", refs)
    path = str(tmp_path / "part")
    build(path, refs[:20])
    with pytest.raises(Boom):  # dies in the 3rd batch of the append: memories 20..31 committed
        build_bank(path, CFG, "fp-A", refs[20:], exploding(2), batch_size=8, show_progress=False, first_id=20)
    assert len(MemoryBank.open(path)) == 32
    with pytest.raises(BankError, match="differs from"):  # other references for the resumed part
        build(path, refs[21:], first_id=20)
    same_bank(full, build(path, refs[20:], first_id=20))
    assert len(build(path, refs[20:], first_id=20)) == 61  # finished: nothing to do
    with pytest.raises(BankError, match="fewer than first_id=70"):
        build(path, refs[:5], first_id=70)
    with pytest.raises(BankNotFoundError, match="to append memories 5"):
        build(tmp_path / "none", refs[:5], first_id=5)


STAGES = [("build_bank", False), ("build_bank", True), ("embed_cached", True), ("_save_index", False),
          ("_save_index", True), ("_merge_embeddings", True), ("_write_documents", True), ("_write_info", False),
          ("_write_info", True), ("_cleanup", False), ("_cleanup", True)]


@pytest.mark.parametrize("stage,after", STAGES)
def test_add_killed_anywhere_resumes_to_one_copy(setup, tmp_path, monkeypatch, stage, after):
    """A kill before or after each step of an add (simulated by an exception), then the same add
    again: exactly one copy of each new reference, counts consistent, nothing left over."""
    docs = setup[0]
    d = tmp_path / "kb"
    kb = _build(d, setup, docs[:5])
    base = kb.references
    real = getattr(B, stage)

    def killed(*a, **kw):
        if after:
            real(*a, **kw)
        raise KeyboardInterrupt(f"killed {'after' if after else 'before'} {stage}")

    monkeypatch.setattr(B, stage, killed)
    with pytest.raises(KeyboardInterrupt):
        _add(kb, setup, docs[5:7])
    monkeypatch.setattr(B, stage, real)
    committed = (stage, after) in (("_write_info", True), ("_cleanup", False), ("_cleanup", True))
    mid = open_knowledge_base(str(d))  # meanwhile the committed state is served
    assert mid.references == len(mid.index) <= len(mid.bank)
    assert (mid.references > base) == committed
    assert mid.records[-1].doc_id == (16 if committed else 14)
    bank_mid = len(mid.bank)
    if not committed:
        with pytest.raises(KnowledgeBaseError, match=r"unfinished add of 2 documents \(doc ids 15, 16\)"):
            _add(mid, setup, docs[7:8])
    if (stage, after) == ("_cleanup", True):  # the add had finished: running it again is a duplicate
        with pytest.raises(KnowledgeBaseError, match="doc_id 15 is already in"):
            _add(kb, setup, docs[5:7])
    else:
        _add(kb, setup, docs[5:7])  # run again (the same, stale object) with the same documents
    kb2 = _consistent(kb, d)
    n_new = sum(r.count for r in kb2.records if r.doc_id in (15, 16))
    assert kb2.references == base + n_new == kb.references
    assert bank_mid == (base if (stage, after) == ("build_bank", False) else kb2.references)
    assert [r.doc_id for r in kb2.records] == [10, 11, 12, 13, 14, 15, 16]
    ret = kb2.retriever(EMB, k=2, threshold=2.0)
    for i in range(base, kb2.references):
        assert _top(ret, _ref_text(kb2, docs, i))[0] == i
    with pytest.raises(KnowledgeBaseError, match="doc_id 15 is already in"):
        _add(kb2, setup, docs[5:7])


# ---------------------------------------------------------------------------------------- CLI
def test_cli_kb_add_delete_info(setup, tmp_path, monkeypatch, capsys):
    from m3jax.convert import save_checkpoint_dir
    from m3jax import load_model

    docs, tok, cfg, params = setup
    save_checkpoint_dir(str(tmp_path / "model"), cfg, params, tok)
    cfg, params, tok = load_model(str(tmp_path / "model"))
    kb_dir = tmp_path / "kb"
    build_knowledge_base(str(kb_dir), params, cfg, tok, docs[:3], embedder=EMB, codec="int8", batch_size=8,
                         show_progress=False, log=lambda *a: None)
    monkeypatch.setattr(B, "default_embedder", lambda name=None, **kw: EMB)
    corpus = tmp_path / "new.jsonl"
    corpus.write_text(json.dumps({"doc_id": 100, "title": "Hundred", "text": docs[5][1]}) + "\n\n"
                      + json.dumps({"text": docs[6][1]}) + "\n")
    base = ["--kb", str(kb_dir)]
    assert cli.main(["kb", "add", *base, "--model", str(tmp_path / "model"), "--corpus", str(corpus),
                     "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "added 2 documents" in out and "now 5 documents" in out
    kb = open_knowledge_base(str(kb_dir))
    rec = kb.documents()[-2:]
    assert rec[0].doc_id == 100 and rec[0].title == "Hundred" and rec[1].title is None
    with pytest.raises(SystemExit, match=r"doc_id 100 is already in knowledge base"):
        cli.main(["kb", "add", *base, "--model", str(tmp_path / "model"), "--corpus", str(corpus)])
    assert cli.main(["kb", "delete", *base, "--doc-id", "100", "--doc-id", str(rec[1].doc_id)]) == 0
    assert "deleted 2 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="doc_id 100 was already deleted"):
        cli.main(["kb", "delete", *base, "--doc-id", "100"])
    with pytest.raises(SystemExit, match="doc_id 7 is not in"):
        cli.main(["kb", "delete", *base, "--doc-id", "7"])
    assert cli.main(["kb", "info", *base, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["documents"] == 3 and s["deleted_documents"] == 2 and s["codec"] == "int8"
    assert s["references"] == s["live_references"] + s["deleted_references"] == s["index_vectors"]
    assert s["disk_bytes"] > s["bank_bytes"] > 0 and not s["pending_add"]
    assert cli.main(["kb", "info", *base, "--documents"]) == 0
    out = capsys.readouterr().out
    assert "2 deleted" in out and "int8" in out and "100\t" in out and "Hundred" in out
    with pytest.raises(SystemExit, match="no knowledge base"):
        cli.main(["kb", "info", "--kb", str(tmp_path / "nope")])
