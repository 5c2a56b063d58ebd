"""The main job (`make demo` = `m3jax demo`): explicit memory making a pretrained model know things.

    load SmolLM2-135M made memory-capable (the shipped adapter, `m3jax.convert.load_model`)
    -> a knowledge base of Wikipedia leads (memory bank + index, written by that model)
    -> add documents of invented facts the model never saw (`KnowledgeBase.add`)
    -> evaluate memory / RAG / none: the new facts, description -> title of held-out leads,
       held-out perplexity, decode tokens/s, bytes stored per document
    -> delete a fact document (`KnowledgeBase.delete`) and ask again
    -> metrics.json, report.md (answers with the titles of the references they read), PNG plots

Everything goes under one output directory; `model/` is the memory-capable model (a directory any
`--model` reads). Each finished stage is recorded in `stages.json`; a re-run skips finished
stages and resumes unfinished ones (the knowledge base from its last committed shard). The
from-scratch two-stage pipeline is `m3jax demo --from-scratch` (`m3jax.demo_scratch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from matplotlib.figure import Figure  # no pyplot: leaves the session's backend alone

from m3jax.config import DecodeConfig, ModelConfig
from m3jax.convert import load_model, model_dir
from m3jax.decode import MODES, Generator
from m3jax.eval import EvalConfig, evaluate, heldout_split, leads_in_order, make_generator, score_facts
from m3jax.facts import FactDoc, make_facts
from m3jax.memory.build import KnowledgeBase, build_knowledge_base, default_embedder, open_knowledge_base
from m3jax.memory.retrieve import Retriever

FACT_DOC_IDS = 10_000_000  # doc ids of the invented-fact documents (after every Wikipedia lead)
FACT_BATCH = 16  # probes per generate call (probe counts that are multiples of it compile one shape)


# ------------------------------------------------------------------------------ stages
def log(msg: str) -> None:
    print(msg, flush=True)


class Stages:
    """stages.json: which stages are done, with their timings and small results."""

    def __init__(self, out: str, fingerprint: str):
        self.path = os.path.join(out, "stages.json")
        self.data: dict[str, Any] = {"config": fingerprint, "stages": {}}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("config") != fingerprint:
                raise ValueError(f"{out!r} holds a demo run with other settings; use another --out "
                                 "or delete it")
            self.data = old

    def done(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def mark(self, name: str, seconds: float, **info: Any) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 2), **info}
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def run_stage(stages: Stages, name: str, title: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """Run `fn` unless `stages` records it done; record its seconds and returned info."""
    prev = stages.done(name)
    if prev is not None:
        log(f"[{name}] {title}: done ({prev['seconds']:.0f} s), skipped")
        return prev
    log(f"[{name}] {title} ...")
    t0 = time.perf_counter()
    info = fn() or {}
    dt = time.perf_counter() - t0
    stages.mark(name, dt, **info)
    log(f"[{name}] done in {dt:.0f} s")
    return stages.done(name)


def save_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults fit in 15 minutes on a 2-core CPU; `quick()` in ~2."""

    model: str = "smollm2-135m-memory"  # a shipped model name or a model directory
    n_leads: int = 320  # Wikipedia leads in the knowledge base (the evaluated held-out ones first)
    n_facts: int = 40  # invented-fact documents added after training (2 probes each)
    n_new_wording: int = 24  # of them, the first ones also asked in wordings never used in training
    n_eval_qa: int = 24  # held-out leads asked "Description: ... Title:"
    n_eval_ppl: int = 24  # held-out leads scored for perplexity
    codec: str = "int8"
    bench_batch: int = 8
    bench_prompt: int = 128
    bench_new: int = 32
    max_new_tokens: int = 12
    n_samples: int = 4
    seed: int = 0

    @classmethod
    def quick(cls, model: str = "smollm2-135m-memory") -> "DemoConfig":
        return cls(model=model, n_leads=24, n_facts=6, n_new_wording=3, n_eval_qa=6, n_eval_ppl=4, bench_batch=2,
                   bench_prompt=64, bench_new=8, max_new_tokens=8, n_samples=2)


def _tfidf(texts: list[str], dim: int = 1 << 12) -> np.ndarray:
    """Unit rows of hashed TF-IDF vectors (sublinear term frequency) of `texts`."""
    rows = []
    df = np.zeros(dim, np.float32)
    for t in texts:
        h = np.array([zlib.crc32(w.encode()) % dim for w in re.findall(r"[a-z0-9]+", t.lower())], np.int64)
        idx, cnt = np.unique(h, return_counts=True)
        rows.append((idx, 1.0 + np.log(cnt)))
        df[idx] += 1
    idf = np.log((1 + len(texts)) / (1 + df)).astype(np.float32)
    out = np.zeros((len(texts), dim), np.float32)
    for i, (idx, tf) in enumerate(rows):
        out[i, idx] = tf * idf[idx]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def leads_in_demo_order() -> list[Any]:
    """The shipped leads with a text and a description, in the demos' fixed pseudo-random order."""
    return leads_in_order(b"m3jax-demo:")


def _articles(n: int, n_held: int) -> tuple[list[Any], list[Any]]:
    """(knowledge-base leads, held-out evaluation leads): `n_held` leads of the held-out split
    (never trained on: `m3jax.train.split.is_heldout`) with a description, in a fixed pseudo-random
    order, then their nearest neighbours among all leads (TF-IDF cosine of the texts, taken
    round-robin) up to `n`: the knowledge base covers what the evaluated leads are about."""
    pool = leads_in_demo_order()
    held_ids = {a.doc_id for a in heldout_split(pool)}
    held = [a for a in pool if a.doc_id in held_ids][:n_held]
    chosen = {a.doc_id: a for a in held}
    if n > len(chosen):
        vecs = _tfidf([f"{a.title} {a.text}" for a in pool])
        at = {a.doc_id: i for i, a in enumerate(pool)}
        order = np.argsort(-(vecs[[at[a.doc_id] for a in held]] @ vecs.T), axis=1)
        for rank in range(order.shape[1]):
            for row in order[:, rank]:
                a = pool[int(row)]
                if len(chosen) < n and a.doc_id not in chosen:
                    chosen[a.doc_id] = a
            if len(chosen) >= n:
                break
    return sorted(chosen.values(), key=lambda a: a.doc_id), held


# ------------------------------------------------------------------------------ the job
@dataclass
class _Demo:
    """One demo run: its settings, output directory, model, and the documents and probes it uses."""

    out: str
    cfg: DemoConfig
    stages: Stages
    config: ModelConfig
    params: Any
    tok: Any
    load_s: float
    embedder: Any
    leads: list[Any]  # the knowledge base's Wikipedia leads
    held: list[Any]  # the held-out leads evaluated
    facts: list[FactDoc]  # the invented-fact documents added after training

    @property
    def kb_dir(self) -> str:
        return os.path.join(self.out, "kb")

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def kb(self) -> KnowledgeBase:
        return open_knowledge_base(self.kb_dir, self.config, self.params)

    @property
    def probes(self) -> list[Any]:
        return [p for f in self.facts for p in f.probes]

    @property
    def new_wording(self) -> list[Any]:
        return [p for f in self.facts[:self.cfg.n_new_wording] for p in f.new_wording_probes]


def _load(out: str, cfg: DemoConfig) -> _Demo:
    """The model, the stage record, the leads and the invented facts of a run."""
    fp = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    stages = Stages(out, fp)
    t0 = time.perf_counter()
    config, params, tok = load_model(cfg.model)
    load_s = time.perf_counter() - t0
    log(f"model {cfg.model}: {config.num_params(embedding=True) / 1e6:.1f}M parameters, memory layers "
        f"0..{config.memory_layers - 1} of {config.num_layers}, {config.tokens_per_memory} tokens per kv head "
        f"(selection {config.score}), {config.memories_per_chunk} memories per {config.chunk_size}-token chunk "
        f"({load_s:.0f} s to load)")
    leads, held = _articles(cfg.n_leads, max(cfg.n_eval_qa, cfg.n_eval_ppl))
    facts = make_facts(cfg.n_facts, split="eval", seed=cfg.seed, start_id=FACT_DOC_IDS)
    return _Demo(out, cfg, stages, config, params, tok, load_s, default_embedder(), leads, held, facts)


def _export_model(d: _Demo) -> dict[str, Any]:
    """The model any --model reads (an adapter dir stays an adapter dir), in out/model."""
    src, dst = model_dir(d.cfg.model), d.path("model")
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return {"load_s": round(d.load_s, 1)}


def _build_kb(d: _Demo) -> dict[str, Any]:
    kb = build_knowledge_base(d.kb_dir, d.params, d.config, d.tok, [(a.doc_id, a.text, a.title) for a in d.leads],
                              embedder=d.embedder, codec=d.cfg.codec, log=log)
    return {"documents": len(d.leads), "references": kb.info["references"]}


def _add_facts(d: _Demo) -> dict[str, Any]:
    kb = d.kb()
    have = {doc.doc_id for doc in kb.documents()}
    new = [(f.doc_id, f.text, f.title) for f in d.facts if f.doc_id not in have]
    if new:
        kb.add(new, d.params, d.config, d.tok, embedder=d.embedder, log=log)
    return {"fact_documents": len(d.facts)}


def _ask_facts(d: _Demo, retriever: Retriever) -> None:
    """The fact probes (seen and new wordings) in every mode -> facts_eval.json."""
    res: dict[str, Any] = {}
    longest = 1 + max(len(d.tok.encode(p.prompt)) for p in d.probes + d.new_wording)
    for mode in MODES:  # one generator per mode for both probe sets: compiled once
        gen = make_generator(d.params, d.config, d.tok, retriever if mode != "none" else None, longest,
                             d.cfg.max_new_tokens, rag=mode == "rag")
        for name, ps in (("new_facts", d.probes), ("new_facts_new_wording", d.new_wording)):
            r = score_facts(d.params, d.config, ps, mode=mode, retriever=retriever, tokenizer=d.tok, generator=gen,
                            max_new_tokens=d.cfg.max_new_tokens, batch_size=FACT_BATCH, progress=False)
            res.setdefault(name, {})[mode] = r
            log(f"  [{mode}] {name}: {r['accuracy']:.3f} of {r['n']} probes")
    save_json(d.path("facts_eval.json"), res)


def _eval_wiki(d: _Demo, retriever: Retriever) -> None:
    """Held-out leads: perplexity and description -> title in every mode -> wiki_eval.json."""
    settings = EvalConfig(modes=MODES, n_ppl=d.cfg.n_eval_ppl, n_qa=d.cfg.n_eval_qa, fanoutqa=False,
                          max_new_tokens=d.cfg.max_new_tokens)
    res = evaluate(d.params, d.config, d.tok, settings, retriever=retriever, heldout_articles=d.held,
                   progress=False, log=lambda s: log("  " + s))
    save_json(d.path("wiki_eval.json"), res)


def run(out: str = "demo_out", cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run (or resume) the demo; returns the metrics written to `out/metrics.json`."""
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    d = _load(out, cfg)
    run_stage(d.stages, "model", f"export the memory-capable model to {out}/model", lambda: _export_model(d))
    run_stage(d.stages, "kb", f"knowledge base of {len(d.leads)} Wikipedia leads, written by the model "
                              f"({cfg.codec})", lambda: _build_kb(d))
    run_stage(d.stages, "add", f"add {len(d.facts)} documents of invented facts (never seen in training)",
              lambda: _add_facts(d))
    retriever = d.kb().retriever(d.embedder, tokenizer=d.tok)
    run_stage(d.stages, "facts", f"new facts: {len(d.probes)} completion probes (+ {len(d.new_wording)} in wordings "
                                 "never trained on) in memory / rag / none", lambda: _ask_facts(d, retriever))
    run_stage(d.stages, "wiki", f"held-out leads: perplexity ({cfg.n_eval_ppl}) and description -> title "
                                f"({cfg.n_eval_qa}) in memory / rag / none", lambda: _eval_wiki(d, retriever))
    run_stage(d.stages, "bench", f"decode throughput by mode (batch {cfg.bench_batch}, {cfg.bench_prompt} prompt + "
                                 f"{cfg.bench_new} new tokens)",
              lambda: save_json(d.path("decode_bench.json"), _decode_bench(d, retriever)))
    run_stage(d.stages, "update", "knowledge update: delete a fact document, ask again, add it back",
              lambda: save_json(d.path("update.json"), _update_demo(d)))
    return _finish(d, t_start)


def _finish(d: _Demo, t_start: float) -> dict[str, Any]:
    """metrics.json, the plots and report.md from the stages' results."""
    fe, we, be, ue = (load_json(d.path(name)) for name in
                      ("facts_eval.json", "wiki_eval.json", "decode_bench.json", "update.json"))
    kb = d.kb()
    bank = kb.bank.summary()
    config, cfg = d.config, d.cfg
    stage_s = {k: v["seconds"] for k, v in d.stages.data["stages"].items()}
    metrics = {
        "wall_s": round(sum(stage_s.values()) + d.load_s, 1),
        "wall_s_this_run": round(time.perf_counter() - t_start, 1),
        "device": str(jax.devices()[0].device_kind),
        "model": {"name": cfg.model, "params": config.num_params(embedding=True),
                  "memory_layers": config.memory_layers, "num_layers": config.num_layers,
                  "tokens_per_memory": config.tokens_per_memory, "score": config.score},
        "new_facts_accuracy": {m: fe["new_facts"][m]["accuracy"] for m in MODES},
        "new_facts_accuracy_new_wording": {m: fe["new_facts_new_wording"][m]["accuracy"] for m in MODES},
        "new_facts_probes": len(d.probes),
        "ppl": we["ppl"], "qa_exact_match": we["qa_exact_match"], "qa_logprob": we.get("qa_logprob"),
        "decode_tokens_per_s": be["tokens_per_s"],
        "bytes_per_document": _bytes_per_document(kb, d.tok, d.leads, d.facts, bank),
        "knowledge_update": {k: v for k, v in ue.items() if k != "answers"},
        "stages": stage_s,
        "bank": bank,
    }
    save_json(d.path("metrics.json"), metrics)
    _plots(d.out, metrics)
    _report(d.out, cfg, metrics, fe, ue, kb)
    log(f"demo finished: {d.out}/report.md; new facts: " + ", ".join(
        f"{m} {metrics['new_facts_accuracy'][m]:.2f}" for m in MODES)
        + f" (total {metrics['wall_s']:.0f} s of stage time)")
    return metrics


def bench_prompts(articles: list[Any], tok: Any, bos_id: int, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` tokens (BOS first) cut from the texts of `articles` drawn at random
    (a short text is repeated until it is long enough)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for a in rng.choice(np.array(articles, dtype=object), size=n, replace=len(articles) < n):
        ids = tok.encode(a.text)
        while len(ids) < length:
            ids = ids + tok.encode(" " + a.text)
        prompts.append([bos_id] + ids[: length - 1])
    return prompts


def decode_throughput(gen: Generator, retriever: Retriever, prompts: list[list[int]], new_tokens: int,
                      modes: tuple[str, ...] = MODES) -> dict[str, dict[str, float]]:
    """Decode tokens/s and the retrieval seconds waited for, of one batch in each mode: a first call
    compiles, EOS is ignored, the retriever's cache is off so that every mode retrieves for real."""
    cache, retriever.cache_size = retriever.cache_size, 0
    out: dict[str, dict[str, float]] = {"tokens_per_s": {}, "retrieval_s": {}}
    try:
        for mode in modes:
            gen.generate(prompts, mode=mode, max_new_tokens=new_tokens, ignore_eos=True)  # compile
            r = gen.generate(prompts, mode=mode, max_new_tokens=new_tokens, ignore_eos=True)
            out["tokens_per_s"][mode] = r.stats.tokens_per_s
            out["retrieval_s"][mode] = r.stats.retrieval_s
            log(f"  [{mode}] {r.stats.tokens_per_s:.1f} tokens/s")
    finally:
        retriever.cache_size = cache
    return out


def _decode_bench(d: _Demo, retriever: Retriever) -> dict[str, Any]:
    """Decode tokens/s of one batch in each mode, prompts cut from held-out leads."""
    cfg, config = d.cfg, d.config
    prompts = bench_prompts(d.held, d.tok, config.bos_id, cfg.bench_batch, cfg.bench_prompt, cfg.seed)
    need = cfg.bench_prompt + cfg.bench_new + config.memories_per_chunk * config.reference_len
    dc = DecodeConfig(max_new_tokens=cfg.bench_new, max_cache_len=min(config.max_len, -(-need // 64) * 64),
                      prompt_bucket=config.chunk_size)
    gen = Generator(d.params, config, d.tok, retriever, dc)
    return {**decode_throughput(gen, retriever, prompts, cfg.bench_new), "batch": cfg.bench_batch,
            "prompt": cfg.bench_prompt, "new": cfg.bench_new}


def _update_demo(d: _Demo) -> dict[str, Any]:
    """Delete the document of a fact that memory answered, ask its probes again (the retriever never
    returns a deleted reference), then add the document back and ask once more."""
    res = load_json(d.path("facts_eval.json"))["new_facts"]["memory"]["items"]
    by_prompt = {p.prompt: f for f in d.facts for p in f.probes}
    hit = next((by_prompt[it["prompt"]] for it in res if it["correct"]), d.facts[0])
    kb = d.kb()

    def ask(stage):
        r = score_facts(d.params, d.config, list(hit.probes), mode="memory",
                        retriever=kb.retriever(d.embedder, tokenizer=d.tok), tokenizer=d.tok,
                        max_new_tokens=d.cfg.max_new_tokens, progress=False)
        log(f"  {stage}: {r['accuracy']:.2f} of {r['n']} probes of {hit.title!r} answered")
        return r

    before = ask("in the knowledge base")
    if hit.doc_id in {doc.doc_id for doc in kb.documents()}:
        kb.delete([hit.doc_id])
    deleted = ask("deleted")
    kb.add([(hit.doc_id, hit.text, hit.title)], d.params, d.config, d.tok, embedder=d.embedder, log=lambda s: None)
    kb = d.kb()
    added = ask("added back")
    return {"document": hit.title, "doc_id": hit.doc_id, "accuracy_before": before["accuracy"],
            "accuracy_deleted": deleted["accuracy"], "accuracy_added_back": added["accuracy"],
            "answers": {"before": before["items"], "deleted": deleted["items"], "added_back": added["items"]}}


def _bytes_per_document(kb, tok, leads, facts, bank: dict[str, Any]) -> dict[str, float]:
    """Stored bytes per document, by mode: memory = its memories in the bank (codes + reference
    metadata), rag = its text (UTF-8) and token ids (int32), none = 0."""
    docs = [d for d in kb.documents()]
    refs_per_doc = float(np.mean([d.count for d in docs])) if docs else 0.0
    texts = [a.text for a in leads] + [f.text for f in facts]
    text_bytes = float(np.mean([len(t.encode("utf-8")) + 4 * len(tok.encode(t)) for t in texts]))
    mem = refs_per_doc * (bank["bytes_per_memory"] + bank["metadata_bytes_per_memory"])
    return {"memory": round(mem, 1), "rag": round(text_bytes, 1), "none": 0.0,
            "references_per_document": round(refs_per_doc, 3), "bytes_per_memory": bank["bytes_per_memory"]}


# ------------------------------------------------------------------------------ goals
def goals(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of explicit memory as rows (goal, measured, target, met, detail) from the demo's
    metrics:

        new facts:   memory accuracy >= 0.7 x RAG accuracy   and   >= none + 0.4
        decoding:    memory tokens/s >= 2 x RAG on the same batch
        perplexity:  held-out perplexity with memory >= 5% below none
    """
    acc, tps, ppl = m["new_facts_accuracy"], m["decode_tokens_per_s"], m["ppl"]
    rows = [
        {"goal": "new facts: memory >= 0.7 x RAG", "measured": acc["memory"], "target": 0.7 * acc["rag"],
         "detail": f"memory {acc['memory']:.3f}, RAG {acc['rag']:.3f}"},
        {"goal": "new facts: memory >= none + 0.4", "measured": acc["memory"], "target": acc["none"] + 0.4,
         "detail": f"memory {acc['memory']:.3f}, none {acc['none']:.3f}"},
        {"goal": "decode: memory >= 2 x RAG tokens/s", "measured": tps["memory"] / tps["rag"], "target": 2.0,
         "detail": f"memory {tps['memory']:.1f}, RAG {tps['rag']:.1f} tokens/s"},
        {"goal": "held-out perplexity: memory >= 5% below none", "measured": 1 - ppl["memory"] / ppl["none"],
         "target": 0.05, "detail": f"memory {ppl['memory']:.3f}, none {ppl['none']:.3f}"},
    ]
    for r in rows:
        r["met"] = bool(r["measured"] >= r["target"])
    return rows


def goals_table(m: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results by mode and the goal rows as Markdown tables."""
    lines = ["| mode | new facts | new facts, new wordings | description -> title | perplexity | tokens/s |",
             "|---|---|---|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | {m['new_facts_accuracy'][mode]:.3f} | {m['new_facts_accuracy_new_wording'][mode]:.3f} | "
                     f"{m['qa_exact_match'][mode]:.3f} | {m['ppl'][mode]:.3f} | {m['decode_tokens_per_s'][mode]:.1f} |")
    lines += ["", "| goal | measured | target | met | |", "|---|---|---|---|---|"]
    lines += [f"| {r['goal']} | {r['measured']:.3f} | {r['target']:.3f} | {'yes' if r['met'] else 'NO'} | {r['detail']} |"
              for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report
def _plots(out: str, m: dict[str, Any]) -> None:
    colors = ["tab:green", "tab:orange", "tab:gray"]
    panels = [("new_facts_accuracy", "new facts: accuracy"), ("qa_exact_match", "held-out description -> title"),
              ("ppl", "held-out perplexity (lower is better)"), ("decode_tokens_per_s", "decode tokens/s")]
    fig = Figure(figsize=(14, 3.6))
    for ax, (key, title) in zip(fig.subplots(1, len(panels)), panels):
        vals = [float(m[key].get(k) if m[key].get(k) is not None else float("nan")) for k in MODES]
        ax.bar(MODES, vals, color=colors)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "modes.png"), dpi=110)
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    b = m["bytes_per_document"]
    ax.bar(["memory", "rag"], [b["memory"], b["rag"]], color=colors[:2])
    ax.set_ylabel("bytes stored per document")
    ax.set_title("storage (memory: int8 sparse KV; rag: text + token ids)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "storage.png"), dpi=110)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(float(x), spec)


def _report(out: str, cfg: DemoConfig, m: dict[str, Any], fe: dict[str, Any], ue: dict[str, Any],
            kb: KnowledgeBase) -> None:
    def titles(ids):
        return [t or f"#{i}" for i, t in zip(ids, kb.titles(np.asarray(ids, np.int64)))] if ids else []

    mo = m["model"]
    lines = [
        "# m3jax demo: explicit memory in a pretrained model", "",
        f"Model `{mo['name']}` ({mo['params'] / 1e6:.1f}M parameters): memory layers 0..{mo['memory_layers'] - 1} of "
        f"{mo['num_layers']}, {mo['tokens_per_memory']} stored tokens per KV head (selection `{mo['score']}`). "
        f"Knowledge base: {cfg.n_leads} Wikipedia leads (CC BY-SA 4.0, Wikipedia contributors) written by the "
        f"model, then {cfg.n_facts} documents of invented facts added (never seen in training). "
        f"Device `{m['device']}`, total stage time {m['wall_s']:.0f} s.", "",
        "| mode | new facts (seen wordings) | new facts (new wordings) | held-out description -> title | "
        "held-out perplexity | decode tokens/s | bytes per document |",
        "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | {_fmt(m['new_facts_accuracy'][mode])} | {_fmt(m['new_facts_accuracy_new_wording'][mode])}"
                     f" | {_fmt(m['qa_exact_match'].get(mode))} | {_fmt(m['ppl'].get(mode), '.2f')} | "
                     f"{_fmt(m['decode_tokens_per_s'].get(mode), '.1f')} | {_fmt(m['bytes_per_document'][mode], ',.0f')} |")
    lines += ["", f"{m['new_facts_probes']} completion probes, correct when the answer appears in the greedy "
              "continuation. In memory mode the model reads only the stored sparse keys and values: no "
              "reference text enters its context.", "", "![by mode](modes.png) ![storage](storage.png)", "",
              "## Knowledge update", "",
              f"`{ue['document']}`: answered {ue['accuracy_before']:.2f} of its probes in the knowledge base, "
              f"{ue['accuracy_deleted']:.2f} after `KnowledgeBase.delete`, {ue['accuracy_added_back']:.2f} after "
              "adding it back (no retraining).", "", "## Sample answers: new facts", ""]
    items = {mode: fe["new_facts"][mode]["items"] for mode in MODES}
    # as many probes that memory answered as ones it missed (the first of each), in probe order
    right = [i for i, it in enumerate(items["memory"]) if it["correct"]]
    wrong = [i for i, it in enumerate(items["memory"]) if not it["correct"]]
    half = (cfg.n_samples + 1) // 2
    shown = sorted(right[:half] + wrong[:cfg.n_samples - min(half, len(right))])[:cfg.n_samples]
    for i in shown:
        it = items["memory"][i]
        lines.append(f"- **{it['prompt']}** (answer: {it['answer']})")
        for mode in MODES:
            r = items[mode][i]
            read = f" (read: {'; '.join(titles(r['retrieved']))})" if r["retrieved"] else ""
            lines.append(f"  - {mode}: `{r['generated'].strip()}` {'✓' if r['correct'] else '✗'}{read}")
    lines += ["", "## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in m["stages"].items()]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
