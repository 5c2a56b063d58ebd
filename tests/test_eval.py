"""Evaluation: perplexity / QA / MC scores equal hand computations from forward logits; memory
mode is one forward with per-chunk memories; the leakage filter compares with the whole text."""

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import config as C
from m3jax import eval as ev
from m3jax.eval import scoring
from m3jax import model as M
from m3jax.assets import Article, wiki_leads
from m3jax.memory import encode
from m3jax.memory.embed import FunctionEmbedder
from m3jax.memory.index import VectorIndex
from m3jax.memory.retrieve import Retriever

CFG = C.preset("tiny")  # chunk_size 16, memories_per_chunk 2, reference_len 32, max_len 256
CS = CFG.chunk_size


@functools.lru_cache(maxsize=None)
def _params():
    return jax.tree_util.tree_map(lambda x: x * 3.0, M.init(CFG, jax.random.PRNGKey(0)))


_fwd = jax.jit(M.forward, static_argnums=2)


class CharTokenizer:
    """One token per character (code points 3..255); BOS 1, EOS 2, PAD 0."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False):
        ids = [ord(c) if 3 <= ord(c) < 256 else ord("?") for c in text]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids if int(i) >= 3)


TOK = CharTokenizer()


def _encode_refs(params, refs):
    toks = np.zeros((len(refs), CFG.reference_len), np.int32)
    mask = np.zeros((len(refs), CFG.reference_len), bool)
    for i, r in enumerate(refs):
        toks[i, : len(r)], mask[i, : len(r)] = r, True
    return encode(params, CFG, jnp.asarray(toks), jnp.asarray(mask))


class StubRetriever:
    """Deterministic stand-in: ids are a hash of the query; memories really encoded."""

    def __init__(self, params, n=10, seed=0):
        rng = np.random.default_rng(seed)
        self.refs = [list(map(int, rng.integers(3, 256, rng.integers(4, CFG.reference_len + 1)))) for _ in range(n)]
        self.mem = _encode_refs(params, self.refs)
        self.k = CFG.memories_per_chunk
        self.calls = []

    def ids_for(self, query):
        h = sum(int(t) * (i + 1) for i, t in enumerate(query))
        return [(h + 3 * j) % len(self.refs) for j in range(self.k)]

    def search(self, queries, filter_tokens=None, threshold=None, k=None):
        self.calls.append(([list(map(int, q)) for q in queries], filter_tokens, threshold))
        return np.array([self.ids_for(q) for q in queries], np.int64).reshape(len(queries), k or self.k)

    def memories(self, ids):
        flat = np.asarray(ids).reshape(-1)
        mem = self.mem.take(jnp.asarray(np.maximum(flat, 0)))
        return M.MemoryKV(mem.kv_ILZKEH, mem.mask_IE & jnp.asarray(flat >= 0)[:, None])

    def retrieve(self, queries):
        ids = self.search(queries)
        return ids, self.memories(ids)

    def reference_tokens(self, ids):
        return [[self.refs[i] for i in row if i >= 0] for row in np.asarray(ids)]


@functools.lru_cache(maxsize=None)
def _stub():
    return StubRetriever(_params())


def _logprobs(tokens, memory=None):
    """Per-position log p(tokens[t] | tokens[:t]) for t >= 1, from the model's forward logits
    (without memory the sequence is padded at the end to max_len: one compile, same logits)."""
    n = len(tokens)
    if memory is None:
        tokens = list(tokens) + [CFG.pad_id] * (CFG.max_len - n)
    logits = np.asarray(_fwd(_params(), jnp.asarray([tokens], jnp.int32), CFG, memory=memory), np.float64)[0, :n]
    tokens = tokens[:n]
    logits = logits - logits.max(-1, keepdims=True)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return lsm[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def _seq(rng, n):
    return [CFG.bos_id] + list(map(int, rng.integers(3, 256, n - 1)))


# ------------------------------------------------------------------------------ perplexity
def test_perplexity_none_equals_numpy_and_ignores_batching():
    rng = np.random.default_rng(1)
    seqs = [_seq(rng, n) for n in (5, 20, 37)]
    nll = [-_logprobs(s) for s in seqs]
    want = float(np.exp(np.concatenate(nll).mean()))
    runs = [ev.perplexity(_params(), CFG, seqs, mode="none", batch_size=b, progress=False) for b in (1, 2)]
    for r in runs:
        assert r["tokens"] == sum(len(s) - 1 for s in seqs)
        np.testing.assert_allclose(r["ppl"], want, rtol=2e-5)
    # token lists without BOS get one; max_tokens truncates the sequence (BOS included)
    r = ev.perplexity(_params(), CFG, [s[1:] for s in seqs], mode="none", max_tokens=10, progress=False)
    np.testing.assert_allclose(r["nll"], np.concatenate([x[:9] for x in nll]).mean(), rtol=2e-5)
    assert r["tokens"] == 4 + 9 + 9
    with pytest.raises(ValueError, match="needs a retriever"):
        ev.perplexity(_params(), CFG, seqs, mode="memory", progress=False)


def test_memory_mode_is_one_forward_with_per_chunk_memories(monkeypatch):
    p, ret = _params(), _stub()
    rng = np.random.default_rng(2)
    doc = _seq(rng, 40)  # 3 chunks; bucket 64 adds a padding chunk that must read nothing
    prompt, answer = _seq(rng, 20), list(map(int, rng.integers(3, 256, 30)))  # answer fills chunks 1..3
    qa = prompt + answer
    calls = []
    real = scoring._forward_scores
    monkeypatch.setattr(scoring, "_forward_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    ret.calls.clear()
    got = ev.score_sequences(p, CFG, [ev.ScoreInput(doc), ev.ScoreInput(qa, start=20, query_end=20)],
                             mode="memory", retriever=ret, batch_size=2)
    assert len(calls) == 1 and len(ret.calls) == 1  # one forward, one batched search
    queries, filters, threshold = ret.calls[0]
    want_q = [doc[:16], doc[16:32], doc[32:40], qa[:16], qa[16:20]]  # the answer never retrieves
    assert queries == want_q and threshold == pytest.approx(2 / 3)
    assert filters == [doc[1:]] * 3 + [qa[1:]] * 2  # the whole evaluated text
    # manual construction: chunk c reads the memories retrieved with its own (prompt) tokens
    blocks = {0: [doc[:16], doc[16:32], doc[32:40]], 1: [qa[:16], qa[16:20], qa[16:20], qa[16:20]]}
    for i, (toks, start) in enumerate([(doc, 1), (qa, 20)]):
        mem = M.MemoryKV.concat([ret.mem.take(jnp.asarray(ret.ids_for(q))) for q in blocks[i]])
        cm = M.ChunkMemory.from_memories(mem, 1, len(blocks[i]))
        lp = _logprobs(toks, cm)[start - 1:]
        np.testing.assert_allclose(got[i].logprob, lp.sum(), rtol=2e-5)
        assert got[i].n == len(toks) - start
        np.testing.assert_array_equal(got[i].ids, [ret.ids_for(q) for q in blocks[i]])
    # memory matters: the no-memory score differs
    plain = ev.score_sequences(p, CFG, [ev.ScoreInput(doc)], mode="none")
    assert abs(plain[0].logprob - got[0].logprob) > 1e-2


def test_rag_prepends_references_and_scores_text_only():
    p, ret = _params(), _stub()
    rng = np.random.default_rng(3)
    doc = _seq(rng, 30)
    got = ev.score_sequences(p, CFG, [ev.ScoreInput(doc)], mode="rag", retriever=ret)[0]
    ids = ret.ids_for(doc[:CS])
    refs = [t for i in ids for t in ret.refs[i]]
    full = [CFG.bos_id] + refs + doc[1:]
    np.testing.assert_allclose(got.logprob, _logprobs(full)[len(refs):].sum(), rtol=2e-5)
    assert got.n == len(doc) - 1 and list(got.ids) == ids
    # too long for max_len: reference tokens are dropped from the left
    long = _seq(rng, CFG.max_len - 10)
    got = ev.score_sequences(p, CFG, [ev.ScoreInput(long)], mode="rag", retriever=ret)[0]
    refs = [t for i in ret.ids_for(long[:CS]) for t in ret.refs[i]][-10:]
    full = [CFG.bos_id] + refs + long[1:]
    assert len(full) == CFG.max_len
    np.testing.assert_allclose(got.logprob, _logprobs(full)[10:].sum(), rtol=2e-5)


# ------------------------------------------------------------------------------ leakage filter
_WORDS = ["alpha", "brick", "cider", "dune", "ember", "fjord", "gamut", "hazel", "ivory", "jolt",
          "kiwi", "lumen", "mango", "nadir", "onyx", "plume", "quark", "rivet", "sable", "tundra",
          "umber", "vapor", "waltz", "xenon", "yodel", "zinc"]


def _bow(texts):
    out = np.full((len(texts), 64), 1e-3, np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            if w in _WORDS:
                out[i, _WORDS.index(w)] += 1.0
    return out


class EncodedBank:
    """A bank whose "codes" are the float memories themselves."""

    def __init__(self, mem):
        self.kv, self.mask = np.asarray(mem.kv_ILZKEH), np.asarray(mem.mask_IE)

    def gather_codes(self, ids):
        return self.kv[np.asarray(ids)], self.mask[np.asarray(ids)]

    def decode(self, codes, mask):
        return M.MemoryKV(jnp.asarray(codes), jnp.asarray(mask))


def test_leakage_filter_compares_with_the_whole_text():
    p = _params()
    texts = [" ".join(_WORDS[i:i + 5]) for i in range(0, 25, 5)]  # 5 references of 25..32 chars
    assert all(25 <= len(t) <= CFG.reference_len for t in texts)
    refs = [TOK.encode(t) for t in texts]
    emb = FunctionEmbedder(_bow, 64)
    ret = Retriever(VectorIndex.build(emb(texts)), emb, reference_tokens=refs,
                    bank=EncodedBank(_encode_refs(p, refs)), tokenizer=TOK, k=2, candidates=6)
    doc = TOK.encode(texts[0] + " " + texts[1], bos=True)  # the knowledge base holds it verbatim
    # a 16-token chunk overlaps a 25+ token reference by < 2/3: only the whole text catches the leak
    chunks = [doc[c * CS:(c + 1) * CS] for c in range(-(-len(doc) // CS))]
    assert {0, 1} <= set(ret.search(chunks).ravel().tolist())
    other = TOK.encode(_WORDS[0] + " " + _WORDS[5] + ", and the rest is unrelated", bos=True)
    for mode in ("memory", "rag"):
        got = ev.score_sequences(p, CFG, [ev.ScoreInput(doc), ev.ScoreInput(other)], mode=mode, retriever=ret)
        assert not {0, 1} & set(np.asarray(got[0].ids).ravel().tolist()), mode
        assert {0, 1} <= set(np.asarray(got[1].ids).ravel().tolist()), mode
        off = ev.score_sequences(p, CFG, [ev.ScoreInput(doc)], mode=mode, retriever=ret, threshold=2.0)
        assert {0, 1} & set(np.asarray(off[0].ids).ravel().tolist()), mode  # the filter did the work


def test_truncated_perplexity_filters_against_the_whole_text():
    """Scoring only the first tokens of a text must not let a reference holding the rest through."""
    p = _params()
    texts = [" ".join(_WORDS[i:i + 5]) for i in range(0, 25, 5)]
    refs = [TOK.encode(t) for t in texts]
    emb = FunctionEmbedder(_bow, 64)
    ret = Retriever(VectorIndex.build(emb(texts)), emb, reference_tokens=refs,
                    bank=EncodedBank(_encode_refs(p, refs)), tokenizer=TOK, k=2, candidates=6)
    seen = []
    search = ret.search

    def spy(queries, **kw):
        seen.append(kw["filter_tokens"])
        return search(queries, **kw)

    ret.search = spy
    full = texts[0] + " " + texts[1] + " " + texts[2]
    ev.perplexity(p, CFG, [full], mode="memory", retriever=ret, tokenizer=TOK, max_tokens=CS, progress=False)
    assert seen and all(list(f) == TOK.encode(full) for f in seen[0])


# ------------------------------------------------------------------------------ QA
ARTS = [Article(0, "Paris", "Paris is the capital of France.", "capital of France", "geo"),
        Article(1, "Zinc", "Zinc is a chemical element.", "chemical element", "sci"),
        Article(2, "Nameless", "No description here.", "", "misc"),
        Article(3, "Macau", "Macau is a city of about 680000 people.", "city in China", "geo")]


class FixedGenerator:
    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, prompts, *, mode, max_new_tokens, stop_tokens=None):
        self.calls.append((prompts, mode, max_new_tokens))
        out = self.texts[: len(prompts)]
        self.texts = self.texts[len(prompts):]
        return SimpleNamespace(texts=out, tokens=[TOK.encode(t) for t in out])


def test_qa_items_logprob_and_exact_match():
    items = ev.qa_items(ARTS)
    assert [i.doc_id for i in items] == [0, 1, 3]  # no description: skipped
    assert items[0].prompt == "Description: capital of France\nTitle:" and items[0].answer == " Paris"
    assert ev.qa_text(ARTS[1]) == "Description: chemical element\nTitle: Zinc\n"
    gen = FixedGenerator([" paris \nDescription: x", " Zinc is", "Macau"])
    r = ev.score_qa(_params(), CFG, items, mode="none", tokenizer=TOK, generator=gen, max_new_tokens=5,
                    batch_size=2, return_items=True, progress=False)
    assert r["exact_match"] == pytest.approx(2 / 3) and r["n"] == 3
    assert [x["correct"] for x in r["items"]] == [True, False, True]
    assert gen.calls[0][0][0] == TOK.encode(items[0].prompt, bos=True) and gen.calls[0][2] == 5
    lps, n = [], 0
    for it in items:
        pr, ans = TOK.encode(it.prompt, bos=True), TOK.encode(it.answer)
        lp = _logprobs(pr + ans)[len(pr) - 1:]
        lps.append(lp.sum())
        n += len(ans)
    np.testing.assert_allclose(r["answer_logprob"], np.mean(lps), rtol=2e-5)
    np.testing.assert_allclose(r["answer_logprob_per_token"], np.sum(lps) / n, rtol=2e-5)


def test_answer_matching_rules():
    exact = ev.QAItem("p", " Paris", 0)
    assert ev.answer_correct(exact, " PARIS\nmore") and not ev.answer_correct(exact, " Paris.")
    lst = ev.QAItem("p", " Alex Padilla, Laphonza Butler", 0, "contains", ("Alex Padilla", "Laphonza Butler"))
    assert ev.answer_correct(lst, " Laphonza Butler and Alex Padilla.")
    assert not ev.answer_correct(lst, " Alex Padilla\nLaphonza Butler")  # cut at the first newline
    num = ev.QAItem("p", " 680000", 0, "contains", ("680000",))
    assert ev.answer_correct(num, " about 680,000 people") and not ev.answer_correct(num, " 6800001")
    assert ev.render_answer([1, 2.0, True]) == "1, 2, yes" and ev.answer_parts({"a": "x", "b": ["y"]}) == ("x", "y")


def test_generation_uses_the_whole_prompt_as_leakage_filter():
    """The real Generator in memory mode, through the evaluation's retriever view."""
    p, ret = _params(), _stub()
    prompts = [TOK.encode("Description: capital of France\nTitle:", bos=True), TOK.encode("Q: x?\nA:", bos=True)]
    ret.calls.clear()
    texts = ev.generate_answers(p, CFG, prompts, mode="memory", retriever=ret, tokenizer=TOK, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    queries, filters, threshold = ret.calls[0]  # prefill: [B * chunks] sequence-major
    per = len(queries) // 2
    assert filters == [prompts[0][1:]] * per + [prompts[1][1:]] * per and threshold == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ FanOutQA
def test_fanoutqa_items_from_the_real_asset():
    arts = wiki_leads()
    items = ev.fanoutqa_items(arts)
    titles = {a.doc_id: a.title for a in arts}
    # 558 sub-questions cite a corpus page (98 with the answer in the lead); 12 of them repeat an
    # earlier sub-question (same id, e.g. "What is the capital of China?") and are kept once
    assert len(items) == 546 and sum(i.answer_in_lead for i in items) == 90
    assert all(i.doc_id in titles and i.prompt.startswith("Question: ") and i.prompt.endswith("\nAnswer:")
               and i.answer.startswith(" ") and i.match == "contains" and i.parts for i in items)
    assert len({i.qid for i in items}) == len(items)
    few = ev.fanoutqa_items(ARTS)  # only pages of the given corpus are cited
    assert few and {i.doc_id for i in few} <= {0, 1, 3}
    macau = [i for i in few if i.prompt == "Question: What is the population of Macau?\nAnswer:"]
    assert len(macau) == 1 and macau[0].answer == " 680000" and macau[0].answer_in_lead


# ------------------------------------------------------------------------------ multiple choice
def _write(tmp_path, rows, name="mc.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_mc_loader_formats_and_errors(tmp_path):
    items = ev.load_mc_jsonl(_write(tmp_path, [
        {"ctx": "a", "endings": ["x", "y"], "label": 1},
        {"question": "b", "choices": ["no", "yes"], "answer": "yes"},
        {"context": "c", "choices": ["p", "q", "r"], "answer": "C"},
        "", {"context": "d", "choices": ["p", "q"], "label": "0"}]))
    assert [(i.context, i.label) for i in items] == [("a", 1), ("b", 1), ("c", 2), ("d", 0)]
    with pytest.raises(ValueError, match=r"mc\.jsonl:2: missing field 'choices' / 'endings'"):
        ev.load_mc_jsonl(_write(tmp_path, [{"ctx": "a", "endings": ["x", "y"], "label": 0},
                                           {"ctx": "a", "label": 0}]))
    with pytest.raises(ValueError, match=r":1: missing field 'label' / 'answer'"):
        ev.load_mc_jsonl(_write(tmp_path, [{"ctx": "a", "endings": ["x", "y"]}]))
    with pytest.raises(ValueError, match=r":1: missing field 'context' / 'question' / 'ctx'"):
        ev.load_mc_jsonl(_write(tmp_path, [{"endings": ["x", "y"], "label": 0}]))
    with pytest.raises(ValueError, match=r":1: label 5 is out of range"):
        ev.load_mc_jsonl(_write(tmp_path, [{"ctx": "a", "endings": ["x", "y"], "label": 5}]))
    with pytest.raises(ValueError, match=r":2: not valid JSON"):
        ev.load_mc_jsonl(_write(tmp_path, [{"ctx": "a", "endings": ["x", "y"], "label": 0}, "{oops"]))


def test_mc_scoring_equals_hand_computation():
    ctxs = ["The cat sat on the", "Water boils at", "Snow is"]
    choices = [("mat", "moon", "equation of state"), ("100 degrees", "noon"), ("white", "very very hot", "up")]
    ll = []  # hand: summed log-likelihood of " choice" after the context, and per character
    for c, chs in zip(ctxs, choices):
        row = []
        for ch in chs:
            ctx, cont = TOK.encode(c, bos=True), TOK.encode(" " + ch)
            row.append(_logprobs(ctx + cont)[len(ctx) - 1:].sum())
        ll.append(np.array(row))
    # labels: the best choice for item 0, the worst for the others -> accuracy 1/3 by hand
    labels = [int(np.argmax(ll[0]))] + [int(np.argmin(x)) for x in ll[1:]]
    items = [ev.MCItem(c, chs, y) for c, chs, y in zip(ctxs, choices, labels)]
    r = ev.score_mc(_params(), CFG, items, mode="none", tokenizer=TOK, batch_size=4, progress=False)
    assert r["n"] == 3 and r["accuracy"] == pytest.approx(1 / 3)
    norm = [x / np.array([len(" " + ch) for ch in chs]) for x, chs in zip(ll, choices)]
    want = np.mean([int(np.argmax(x)) == y for x, y in zip(norm, labels)])
    assert r["accuracy_norm"] == pytest.approx(want)


# ------------------------------------------------------------------------------ end to end
def test_evaluate_all_modes_and_cli(tmp_path, capsys, monkeypatch):
    p, ret = _params(), _stub()
    mc = _write(tmp_path, [{"ctx": "Snow is", "endings": ["white", "hot"], "label": 0}], "toy.jsonl")
    settings = ev.EvalConfig(n_ppl=2, n_qa=2, n_fanoutqa=2, mc_paths=(mc,), max_new_tokens=2)
    res = ev.evaluate(p, CFG, TOK, settings, retriever=ret, heldout_articles=ARTS, corpus_articles=ARTS,
                      progress=False, log=None)
    for key in ("ppl", "qa_exact_match", "qa_logprob"):
        assert set(res[key]) == set(ev.MODES) and all(v is not None for v in res[key].values())
    assert res["ppl"]["memory"] != res["ppl"]["none"] and res["fanoutqa"]["n"] == 2
    assert set(res["fanoutqa"]["exact_match"]) == set(ev.MODES)
    assert res["mc"]["toy"]["n"] == 1 and set(res["mc"]["toy"]["accuracy"]) == set(ev.MODES)
    out = tmp_path / "m.json"
    # the command (`m3jax eval`), with the model loader replaced by these params
    from m3jax import cli, convert

    monkeypatch.setattr(convert, "load_model", lambda d: (CFG, p, TOK))
    rc = cli.main(["eval", "--model", "ckpt", "--modes", "none", "--n-ppl", "2", "--n-qa", "2",
                   "--max-tokens", "48", "--tasks", "ppl,qa", "--max-new-tokens", "0", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert set(saved["ppl"]) == {"none"} and saved["counts"]["qa"] == 2
    assert saved["qa_exact_match"]["none"] is None and "fanoutqa" not in saved and "mc" not in saved
    assert saved["seconds"]["compile"] >= 0 and saved["tasks"] == ["ppl", "qa"]
    # --mc alone scores only the multiple-choice file (not the whole suite)
    assert cli.main(["eval", "--model", "ckpt", "--modes", "none", "--mc", mc, "--out", str(out),
                     "--no-progress"]) == 0
    saved = json.loads(out.read_text())
    assert saved["tasks"] == ["mc"] and saved["mc"]["toy"]["n"] == 1 and "fanoutqa" not in saved
    assert saved["ppl"] == {} and saved["counts"]["qa"] == 0 and saved["counts"]["ppl_texts"] == 0
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's message, exit status 2
        cli.main(["eval", "--model", "ckpt"])
    assert e.value.code == 2 and "need --kb" in capsys.readouterr().err
