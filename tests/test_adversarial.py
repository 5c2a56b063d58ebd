"""Knowledge bases and checkpoints opened and written as an adversary would (issue 13).

One section per row of the issue's table: no code execution on open (a planted pickle), one
writer at a time (two processes), out-of-range token ids, duplicate doc ids, sizes checked against
the files present, atomic model directories, stale derived files, one-line errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import cli, convert
from m3jax import model as M
from m3jax.config import preset
from m3jax.memory import build as B
from m3jax.memory import lease as LS
from m3jax.memory import manifest as MF
from m3jax.memory import store as ST
from m3jax.memory.bank import MemoryBank
from m3jax.memory.build import KnowledgeBaseError, build_knowledge_base, embed_cached, open_knowledge_base
from m3jax.memory.embed import FunctionEmbedder
from m3jax.memory.errors import BankCorruptError, BankError, BankExistsError, BankLockedError
from m3jax.memory.index import VectorIndex
from m3jax.memory.populate import build_bank
from m3jax.memory.references import CorpusError, read_jsonl_corpus
from m3jax.model.memory import MemoryKV
from m3jax.tokenizer import train_bpe

import test_bank as tb
import test_convert as tc
from test_kb_updates import DIM, EMB, _text, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tb.CFG  # preset("tiny")


def _tree_digest(path) -> dict[str, str]:
    """sha256 of every file under `path` (what "nothing was touched" compares)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_line(e: BaseException, *needles: str) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def kb_setup():
    rng = np.random.default_rng(3)
    docs = [(20 + i, _text(rng, int(rng.integers(15, 30))), f"T{i}") for i in range(6)]
    return (docs, *tiny_model(docs, 1))


def _build_kb(path, setup, docs, **kw):
    _, tok, cfg, params = setup
    kw.setdefault("embedder", EMB)
    return build_knowledge_base(str(path), params, cfg, tok, docs, codec="bf16", batch_size=8,
                                show_progress=False, log=lambda *a: None, **kw)


# ============================================================================ no code on open
class _Evil:
    """Unpickling this creates the file `marker` (any code would run the same way)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_never_unpickled(kb_setup, tmp_path):
    from scann.scann_ops.py import scann_ops_pybind

    kb_dir = tmp_path / "kb"
    kb = _build_kb(kb_dir, kb_setup, kb_setup[0], index_method="scann")
    sdir = kb_dir / kb.info["index_dir"] / "scann"
    assert kb.index.method == "scann" and not (sdir / "scann_docids.pkl").exists()  # never written
    marker = tmp_path / "pwned"
    (sdir / "scann_docids.pkl").write_bytes(pickle.dumps(_Evil(str(marker))))
    # the planted file is live: ScaNN's own loader runs it (on a copy)
    import shutil

    shutil.copytree(sdir, tmp_path / "copy")
    with pytest.raises(Exception):  # noqa: B017 - it fails only after running the pickle's code
        scann_ops_pybind.load_searcher(str(tmp_path / "copy"))
    assert marker.exists()
    marker.unlink()
    # every way in: open (generate --kb, eval), search, the index alone, a resumed build, kb add
    kb2 = open_knowledge_base(str(kb_dir), kb_setup[2], kb_setup[3])
    text = kb_setup[0][0][1][:40]
    assert kb2.retriever(EMB, k=2, threshold=2.0).search([text])[0][0] >= 0
    VectorIndex.load(str(kb_dir / kb.info["index_dir"]))
    _build_kb(kb_dir, kb_setup, kb_setup[0])
    kb2.add([(99, "zo ka lo mi ne su ta.")], kb_setup[3], kb_setup[2], kb_setup[1], embedder=EMB, batch_size=8,
            show_progress=False, log=lambda *a: None)
    assert kb2.retriever(EMB, k=2, threshold=2.0).search(["zo ka lo mi ne su ta."])[0][0] == kb2.references - 1
    assert not marker.exists()


def test_scann_assets_outside_the_index_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    d = tmp_path / "idx"
    VectorIndex.build(v, method="scann").save(str(d))
    assets = d / "scann" / "scann_assets.pbtxt"
    assets.write_text(assets.read_text().replace('"dataset.npy"', '"/etc/passwd"'))
    with pytest.raises(ValueError, match="only files inside"):
        VectorIndex.load(str(d))
    meta = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps(dict(meta, ids_file="../../ids.npy")))
    with pytest.raises(ValueError, match="not a file name inside"):
        VectorIndex.load(str(d))


# ============================================================================ one writer
_WRITER = textwrap.dedent("""
    import json, os, random, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp, numpy as np
    from m3jax.config import preset
    from m3jax.memory.bank import MemoryBank
    from m3jax.memory.errors import BankError
    from m3jax.model.memory import MemoryKV
    path, w, n, go = {path!r}, {w}, {n}, {go!r}
    cfg = preset("tiny")
    bank = MemoryBank.open(path, cfg, "fp-A", mode="a")
    shape = (1, cfg.memory_layers, 2, cfg.num_kv_heads, cfg.tokens_per_memory, cfg.head_dim)
    acked, refused, rng = [], 0, random.Random(w)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    for i in range(n):
        tag = w * 1000 + i
        mem = MemoryKV(jnp.full(shape, float(tag)), jnp.ones((1, cfg.tokens_per_memory), bool))
        meta = dict(tokens=np.full((1, 3), 7), lengths=[3], doc_id=[tag], char_start=[0], char_end=[1])
        while True:
            try:
                acked.append([int(bank.append(mem, meta)[0]), tag])  # acknowledged: committed
                break
            except BankError:  # lease held or the manifest moved on: the loser touched nothing
                refused += 1
                bank.refresh()
                time.sleep(rng.random() * 0.004)
    print(json.dumps({{"acked": acked, "refused": refused}}), flush=True)
""")


def test_two_processes_appending_lose_no_acknowledged_memory(tmp_path):
    path, go, n = str(tmp_path / "bank"), str(tmp_path / "go"), 40
    MemoryBank.create(path, CFG, "f32", "fp-A", shard_size=4)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=REPO, path=path, w=w, n=n, go=go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    open(go, "w").close()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    acked = np.array([a for r in results for a in r["acked"]])
    bank = MemoryBank.open(path, CFG, "fp-A", check="full")
    assert len(bank) == len(acked) == 2 * n  # every commit acknowledged once, nothing else
    ids, tags = acked[:, 0], acked[:, 1]
    assert len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(bank.metadata(ids).doc_id, tags)
    codes, _ = bank.gather_codes(ids)
    np.testing.assert_array_equal(codes.reshape(len(ids), -1), np.repeat(tags[:, None], codes[0].size, 1))


def _live_lease(path, pid: int) -> None:
    kv = ST.open_kvstore(ST.kvstore_spec(path), ST.default_context())
    rec = {"format": LS.LOCK_FORMAT, "host": LS.host_id(), "pid": pid, "start": LS.process_start(pid),
           "token": "x", "since": 0.0}
    kv.write(LS.LOCK_KEY, json.dumps(rec).encode()).result()


def _one_memory(value: float = 1.0):
    shape = (1, CFG.memory_layers, 2, CFG.num_kv_heads, CFG.tokens_per_memory, CFG.head_dim)
    meta = dict(tokens=np.full((1, 3), 7), lengths=[3], doc_id=[5], char_start=[0], char_end=[1])
    return MemoryKV(jnp.full(shape, value), jnp.ones((1, CFG.tokens_per_memory), bool)), meta


def test_losing_writer_fails_before_touching_anything_and_stale_leases_are_taken_over(tmp_path):
    path = tmp_path / "bank"
    tb.build(path, tb.make_refs(20))
    bank = MemoryBank.open(str(path), CFG, "fp-A", mode="a")
    holder = subprocess.Popen(["sleep", "60"])  # a live writer holds the lease
    try:
        _live_lease(str(path), holder.pid)
        before = _tree_digest(path)
        with pytest.raises(BankLockedError, match=f"process {holder.pid}.*one writer at a time"):
            bank.append(*_one_memory())
        _live_lease(str(tmp_path / "b2"), holder.pid)
        with pytest.raises(BankLockedError):
            MemoryBank.create(str(tmp_path / "b2"), CFG, "bf16", "fp-A")
        assert _tree_digest(path) == before and len(MemoryBank.open(str(path))) == 20
        assert sorted(os.listdir(tmp_path / "b2")) == [LS.LOCK_KEY]  # the refused create wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): its lease is taken over, and released after the append
    assert bank.append(*_one_memory()).tolist() == [20]
    assert not (path / LS.LOCK_KEY).exists()
    # a writer that opened before another one committed fails before writing (manifest moved on)
    other = MemoryBank.open(str(path), CFG, "fp-A", mode="a")
    other.append(*_one_memory(2.0))
    before = _tree_digest(path)
    with pytest.raises(BankError, match="another writer"):
        bank.append(*_one_memory(3.0))
    assert _tree_digest(path) == before


def test_create_never_deletes_a_committed_bank(tmp_path):
    path = tmp_path / "bank"
    tb.build(path, tb.make_refs(20))
    before = _tree_digest(path)
    with pytest.raises(BankExistsError):
        MemoryBank.create(str(path), CFG, "bf16", "fp-A", shard_size=16)
    assert len(MemoryBank.create(str(path), CFG, "bf16", "fp-A", exist_ok=True)) == 20
    assert _tree_digest(path) == before


# ============================================================================ token ids
def test_out_of_range_token_ids_are_refused_at_the_api_boundary():
    params = M.init(CFG, jax.random.PRNGKey(0))
    ok = jnp.array([[1, 7, 9, 11]], jnp.int32)
    V = CFG.vocab_size
    for bad in (V, V + 5, -1):
        t = ok.at[0, 2].set(bad)
        with pytest.raises(ValueError, match=f"tokens: token id {bad} is outside the vocabulary"):
            M.forward(params, t, CFG)
        with pytest.raises(ValueError, match="is outside the vocabulary"):
            M.forward(params, np.asarray(t), CFG)
    # inside jit ids cannot raise: an out-of-range one (negative too: no wrap-around to V - 1)
    # reads NaN, and its sequence's logits are all NaN, never plausible numbers; other rows unharmed
    fwd = jax.jit(M.forward, static_argnums=2)
    for bad in (-1, V):
        logits = fwd(params, jnp.concatenate([ok, ok.at[0, 2].set(bad)]), CFG)
        assert np.all(np.isnan(logits[1])) and np.all(np.isfinite(logits[0]))
    np.testing.assert_allclose(fwd(params, ok, CFG)[0], logits[0], rtol=1e-4, atol=1e-6)
    # the write path
    from m3jax.memory.encode import encode, make_encode_fn

    ref = np.array([[7, 8, 9, V]], np.int32)
    with pytest.raises(ValueError, match=f"reference tokens: token id {V} is outside"):
        encode(params, CFG, ref, np.ones_like(ref, bool))
    with pytest.raises(ValueError, match=f"reference tokens: token id {V} is outside"):
        make_encode_fn(params, CFG)(ref, np.ones_like(ref, bool))
    # generation: text prompts through a tokenizer of a bigger vocabulary, token-id prompts
    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator

    gen = Generator(params, CFG, decode_config=DecodeConfig(max_cache_len=64, prompt_bucket=16))
    with pytest.raises(ValueError, match=f"prompt 1: token id {V + 3} is outside"):
        gen.generate([[1, 5, 6], [1, V + 3]], mode="none", max_new_tokens=2)
    with pytest.raises(ValueError, match="token id -2"):
        gen.generate([[5, -2]], mode="none", max_new_tokens=2)


def test_the_bank_refuses_non_finite_memories(tmp_path):
    path = tmp_path / "bank"
    for codec in ("bf16", "int8"):
        bank = MemoryBank.create(str(path / codec), CFG, codec, "fp-A", shard_size=4)
        for value in (np.nan, np.inf, -np.inf):
            mem, meta = _one_memory()
            mem = MemoryKV(mem.kv_ILZKEH.at[0, 0, 0, 0, 0, 3].set(value), mem.mask_IE)
            with pytest.raises(BankError, match="NaN or inf"):
                bank.append(mem, meta)
            with pytest.raises(BankError, match="NaN or inf"):
                bank.append_codes(np.full((1, *bank.manifest["code_shape"]), np.nan, bank.codec.code_dtype)
                                  if codec == "bf16" else _nan_int8(bank), np.asarray(mem.mask_IE), meta)
        assert len(MemoryBank.open(str(path / codec))) == 0

    def nan_encoder(tokens, mask):
        m = tb.fake_encode(tokens, mask)
        return MemoryKV(m.kv_ILZKEH.at[2].set(jnp.nan), m.mask_IE)

    with pytest.raises(BankError, match="NaN or inf"):
        build_bank(str(path / "built"), CFG, "fp-A", tb.make_refs(5), nan_encoder, batch_size=8, shard_size=4,
                      show_progress=False)


def _nan_int8(bank):
    codes = np.zeros((1, *bank.manifest["code_shape"]), np.uint8)
    codes[..., -2:] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # the float16 scale
    return codes


# ============================================================================ duplicate doc ids
def test_duplicate_doc_ids_are_refused_with_file_and_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"doc_id": 3, "text": "a"}\n\n{"doc_id": 4, "text": "b"}\n{"doc_id": 3, "text": "c"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:4: doc_id 3 repeats the one of line 1"):
        read_jsonl_corpus(str(corpus))
    # a line without doc_id: its line index, which may clash with a given one
    corpus.write_text('{"text": "a"}\n{"doc_id": 0, "text": "b"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: doc_id 0 repeats"):
        read_jsonl_corpus(str(corpus))
    corpus.write_text('{"text": "same"}\n{"text": "same"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: .*the same text"):
        read_jsonl_corpus(str(corpus), missing_id="hash")
    assert [d.doc_id for d in read_jsonl_corpus(str(corpus), missing_id="ordinal")] == [0, 1]
    # the CLI: before any model is loaded, one line naming the file and line
    corpus.write_text('{"doc_id": 3, "text": "a"}\n{"doc_id": 3, "text": "c"}\n')
    with pytest.raises(SystemExit, match=r"m3jax build-memory: error: .*c.jsonl:2: doc_id 3 repeats"):
        cli.main(["build-memory", "--model", str(tmp_path / "no-model"), "--corpus", str(corpus),
                  "--out", str(tmp_path / "kb")])
    assert not (tmp_path / "kb").exists()


# ============================================================================ sizes vs files
def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_sizes_are_checked_against_the_files_before_allocating(tmp_path):
    cfg = tc.hf_config(**tc.CASES["untied"])
    W = tc.random_tensors(cfg)
    src = tc.write_hf(tmp_path / "hf", dict(cfg, num_hidden_layers=10**9), W)

    def hf():
        with pytest.raises(convert.ConvertError, match="says 1000000000 layers but the checkpoint holds tensors of 3"):
            convert.load_hf(src)

    assert _peak_mib(hf) < 32
    tokens, _, _ = tc.tiny_gguf_vocab()
    gcfg = tc.hf_config(**dict(tc.CASES["untied"], vocab_size=len(tokens)))
    gguf_path = str(tmp_path / "m.gguf")
    tc.write_tiny_gguf(gguf_path, gcfg, tc.random_tensors(gcfg))
    _set_gguf_block_count(gguf_path, 10**9)

    def gg():
        with pytest.raises(convert.ConvertError, match="says 1000000000 layers"):
            convert.load_gguf(gguf_path)

    assert _peak_mib(gg) < 32
    # a bank manifest: count 2**44 (also with the arrays' shapes edited to match), count true
    path = tmp_path / "bank"
    tb.build(path, tb.make_refs(20))
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(man, count=2**44)))
    with pytest.raises(BankCorruptError, match="fewer than the 17592186044416 committed"):
        MemoryBank.open(str(path))
    for name in ("codes", "mask", "refs/tokens", "refs/info"):
        z = json.loads((path / name / "zarr.json").read_text())
        z["shape"][0] = 2**44
        (path / name / "zarr.json").write_text(json.dumps(z))

    def bank():
        with pytest.raises(BankCorruptError, match="lacks 1099511627774 of its 1099511627776 committed shards"):
            MemoryBank.open(str(path))

    assert _peak_mib(bank) < 32
    (path / "manifest.json").write_text(json.dumps(dict(man, count=True)))
    with pytest.raises(BankCorruptError, match="bad count True"):
        MemoryBank.open(str(path))


def _set_gguf_block_count(path: str, n: int) -> None:
    """Rewrite llama.block_count (a uint32 in the header) in place."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields["llama.block_count"]
    start = field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data  # views of one memory map
    del reader, field
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.uint32(n).tobytes())


# ============================================================================ atomic model dirs
def _tiny_model(vocab_texts, seed):
    tok = train_bpe(vocab_texts, vocab_size=280)
    cfg = preset("tiny", vocab_size=tok.vocab_size, reference_prefix=tok.reference_prefix(),
                 bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return cfg, jax.device_get(M.init(cfg, jax.random.PRNGKey(seed))), tok


def test_model_directories_are_written_atomically(tmp_path, monkeypatch):
    d = tmp_path / "model"
    cfg_a, params_a, tok_a = _tiny_model(["alpha beta gamma delta " * 20], 0)
    convert.save_checkpoint_dir(str(d), cfg_a, params_a, tok_a)
    (d / "README.md").write_text("notes")
    before = _tree_digest(d)
    cfg_b, params_b, tok_b = _tiny_model(["zeta eta theta iota kappa lambda mu " * 20], 1)

    def killed(self, directory):  # the convert dies while writing the tokenizer
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(convert.Tokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        convert.save_checkpoint_dir(str(d), cfg_b, params_b, tok_b)
    monkeypatch.undo()
    assert _tree_digest(d) == before  # the old model, whole: never new params with the old tokenizer
    assert [x for x in os.listdir(tmp_path) if x != "model"] == []
    convert.save_checkpoint_dir(str(d), cfg_b, params_b, tok_b)
    c, p, t = convert.load_checkpoint_dir(str(d))
    assert c == cfg_b and t.vocab_size == tok_b.vocab_size and (d / "README.md").read_text() == "notes"
    # a kill -9 mid-write (a subprocess) leaves the previous model loadable
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r}); os.environ["JAX_PLATFORMS"] = "cpu"
        from m3jax import convert
        c, p, t = convert.load_checkpoint_dir({str(d)!r})
        convert.Tokenizer.save = lambda self, directory: os.kill(os.getpid(), signal.SIGKILL)
        convert.save_checkpoint_dir({str(d)!r}, c, p, t)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert convert.load_checkpoint_dir(str(d))[0] == cfg_b
    # a tokenizer that is not the model's (more tokens than embeddings) is refused at load
    big = train_bpe(["one two three four five six seven eight nine ten " * 30 + "".join(map(chr, range(300, 700)))],
                    vocab_size=600)
    assert big.vocab_size > cfg_b.vocab_size
    big.save(str(d / "tokenizer"))
    with pytest.raises(convert.ConvertError, match="tokenizer has .* tokens but the model"):
        convert.load_checkpoint_dir(str(d))
    # a non-empty directory that holds no model is never replaced
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(convert.ConvertError, match="holds no m3jax model"):
        convert.save_checkpoint_dir(str(other), cfg_b, params_b, tok_b)
    assert os.listdir(other) == ["thesis.tex"]


# ============================================================================ stale state
def test_stale_derived_files_are_rebuilt_or_refused(kb_setup, tmp_path):
    docs = kb_setup[0]
    kb_dir = tmp_path / "kb"
    _build_kb(kb_dir, kb_setup, docs[:4])
    rng = np.random.default_rng(11)
    other = [(d, _text(rng, 25), t) for d, _, t in docs[:4]]  # the same doc ids, other texts
    with pytest.raises(KnowledgeBaseError, match="already holds doc_id 20 with another text.*another corpus"):
        _build_kb(kb_dir, kb_setup, other)
    # leftovers of a build of another corpus (no kb.json, no bank, no journal): the embeddings
    # and the index there are derived from other texts and must not be reused
    for f in (B.INFO_FILE, B.DOCUMENTS_FILE):
        os.remove(kb_dir / f)
    import shutil

    shutil.rmtree(kb_dir / B.BANK_DIR)
    kb = _build_kb(kb_dir, kb_setup, other)
    fresh = _build_kb(tmp_path / "fresh", kb_setup, other)
    np.testing.assert_array_equal(np.load(kb_dir / B.EMBEDDINGS_FILE), np.load(tmp_path / "fresh" / B.EMBEDDINGS_FILE))
    assert kb.index.source == fresh.index.source
    ret = kb.retriever(EMB, k=1, threshold=2.0)
    for i in range(kb.references):
        m = kb.bank.metadata([i])
        text = dict((d, t) for d, t, _ in other)[int(m.doc_id[0])][int(m.char_start[0]):int(m.char_end[0])]
        assert ret.search([text])[0][0] == i
    # a truncated kb.json: one line naming the file
    info = (kb_dir / B.INFO_FILE).read_text()
    (kb_dir / B.INFO_FILE).write_text(info[: len(info) // 2])
    with pytest.raises(KnowledgeBaseError) as e:
        open_knowledge_base(str(kb_dir))
    _one_line(e.value, str(kb_dir / B.INFO_FILE), "not valid JSON")
    (kb_dir / B.INFO_FILE).write_bytes(b"\xff\xfe" + info.encode())
    with pytest.raises(KnowledgeBaseError, match="kb.json is not valid JSON"):
        open_knowledge_base(str(kb_dir))
    (kb_dir / B.INFO_FILE).write_text(json.dumps(dict(json.loads(info), index_dir="../../elsewhere")))
    with pytest.raises(KnowledgeBaseError, match="not an index directory"):
        open_knowledge_base(str(kb_dir))


def test_a_half_written_embeddings_partial_does_not_block_resume(tmp_path):
    texts = [f"text number {i} " * 3 for i in range(50)]
    calls = {"n": 0}

    def dying(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return EMB.fn(batch)

    path = str(tmp_path / "emb.npy")
    with pytest.raises(KeyboardInterrupt):
        embed_cached(texts, FunctionEmbedder(dying, DIM), path, block=16, show_progress=False)
    partial = path + ".partial.npy"
    data = open(partial, "rb").read()
    open(partial, "wb").write(data[: len(data) // 2])  # half written
    want = EMB(texts)
    np.testing.assert_array_equal(embed_cached(texts, FunctionEmbedder(dying, DIM), path, block=16,
                                               show_progress=False), want)
    # the cache answers only for its own texts: other texts recompute
    other = texts[::-1]
    np.testing.assert_array_equal(embed_cached(other, EMB, path, block=16, show_progress=False), EMB(other))


# ============================================================================ error messages
def _cli_error(argv, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code not in (0, None)
    return _one_line(e.value, *needles) if not isinstance(e.value.code, int) else str(e.value.code)


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "ok"}\n{"text": "broken\n', ":2: not a JSON object"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: not UTF-8 text (byte 0xe9"),
    (b'{"text": 5}\n', ":1: 'text' must be a string, got int"),
    (b'{"text": "a", "title": ["x"]}\n', ":1: 'title' must be a string"),
    (b'[1, 2]\n', ":1: a JSON list, not an object"),
    (b'{"text": "a", "doc_id": "7"}\n', ":1: doc_id '7' is not an integer"),
    (b'{"text": "\\ud800"}\n', ":1: 'text' holds an unpaired surrogate"),
    (b'[' * 100000 + b'\n', ":1: not a JSON object"),
])
def test_bad_corpus_lines_are_named(tmp_path, content, needle):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(content)
    for cmd in (["build-memory", "--out", str(tmp_path / "kb")], ["kb", "add", "--kb", str(tmp_path / "kb")]):
        _cli_error(cmd + ["--model", str(tmp_path / "m"), "--corpus", str(corpus)], str(corpus) + needle)


def test_bad_checkpoints_and_flags_get_one_line(tmp_path):
    tokens, _, _ = tc.tiny_gguf_vocab()
    gcfg = tc.hf_config(**dict(tc.CASES["untied"], vocab_size=len(tokens)))
    good = str(tmp_path / "m.gguf")
    tc.write_tiny_gguf(good, gcfg, tc.random_tensors(gcfg))
    data = open(good, "rb").read()
    out = ["--out", str(tmp_path / "out")]
    for cut in (24, len(data) // 3, len(data) - 7):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        _cli_error(["convert", "--from", "gguf", str(tmp_path / "t.gguf")] + out, str(tmp_path / "t.gguf"))
    # another architecture: its keys are gemma.*, not llama.*
    (tmp_path / "q.gguf").write_bytes(data.replace(b"llama", b"gemma"))
    _cli_error(["convert", "--from", "gguf", str(tmp_path / "q.gguf")] + out, "general.architecture='gemma'")
    cfg = tc.hf_config(**tc.CASES["tied"])
    W = tc.random_tensors(cfg)
    for key, value, needle in (("hidden_size", "36", "hidden_size must be an integer, got '36'"),
                               ("rope_theta", [1], "rope_theta must be a positive number"),
                               ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
                               ("max_position_embeddings", 64.5, "must be an integer, got 64.5"),
                               ("eos_token_id", {"a": 1}, "eos_token_id must be an integer")):
        src = tc.write_hf(tmp_path / f"hf-{key}", dict(cfg, **{key: value}), W)
        _cli_error(["convert", "--from", "hf", src] + out, os.path.join(src, "config.json"), needle)
    (tmp_path / "hf-hidden_size" / "config.json").write_text("[1,")
    _cli_error(["convert", "--from", "hf", str(tmp_path / "hf-hidden_size")] + out, "config.json: not valid JSON")
    assert not (tmp_path / "out").exists()
    # flags: argparse refuses them (exit status 2)
    with pytest.raises(SystemExit) as e:
        cli.main(["build-memory", "--model", "m", "--out", "o", "--limit", "-5"])
    assert e.value.code == 2
    # a bank manifest with "count": true, through the CLI
    kb_dir = tmp_path / "kb"
    (kb_dir / "bank").mkdir(parents=True)
    (kb_dir / "kb.json").write_text(json.dumps({"format": B.KB_FORMAT, "references": 1}))
    path = kb_dir / "bank"
    man = {"format": MF.FORMAT, "format_version": MF.FORMAT_VERSION, "config": CFG.to_dict(), "codec": {},
           "fingerprint": "fp", "count": True, "shard_size": 4, "code_shape": []}
    (path / "manifest.json").write_text(json.dumps(man))
    _cli_error(["kb", "info", "--kb", str(kb_dir)], "m3jax kb info: error:", "manifest.json has a bad count True")


def test_cli_user_errors_print_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"text": 1}\n')
    argv = ["build-memory", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "kb"), "--corpus", str(bad)]
    run = lambda extra: subprocess.run([sys.executable, "-m", "m3jax.cli"] + extra + argv,  # noqa: E731
                                       capture_output=True, text=True, timeout=120, cwd=REPO,
                                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    p = run([])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"m3jax build-memory: error: {bad}:1: 'text' must be a string, got int"
                                             "  (--debug shows the traceback)"]
    p = run(["--debug"])
    assert p.returncode == 1 and "Traceback" in p.stderr and "CorpusError" in p.stderr
