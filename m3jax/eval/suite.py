"""The whole evaluation (`m3jax eval`): perplexity of held-out texts, knowledge QA, FanOutQA and
multiple-choice sets, in every mode, with one generator for all of them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from m3jax import assets
from m3jax.config import ModelConfig
from m3jax.decode import MODES, check_mode
from m3jax.eval.generation import make_generator
from m3jax.eval.mc import MCItem, load_mc_jsonl, score_mc
from m3jax.eval.qa import QAItem, fanoutqa_items, qa_items, score_qa
from m3jax.eval.scoring import as_sequence, perplexity
from m3jax.memory.build import open_knowledge_base
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.memory.retrieve import Retriever
from m3jax.model.transformer import Params, check_params
from m3jax.train.split import DEFAULT_HELDOUT_FRACTION, heldout_key, is_heldout


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` runs. n_*: how many items of each task (None: all; 0: none)."""

    modes: tuple[str, ...] = MODES
    n_ppl: int | None = 100  # held-out texts scored for perplexity
    n_qa: int | None = 100  # knowledge QA items from the held-out articles' descriptions
    fanoutqa: bool = True
    n_fanoutqa: int | None = None
    mc_paths: tuple[str, ...] = ()  # multiple-choice JSONL files (`load_mc_jsonl`)
    batch_size: int = 8
    max_tokens: int | None = None  # perplexity: tokens per text (default: max_len)
    max_new_tokens: int = 16  # greedy answers for exact match (0: log-probabilities only)
    decode_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # DecodeConfig overrides
    threshold: float = EVAL_THRESHOLD  # the leakage filter


def leads_in_order(salt: bytes) -> list[assets.Article]:
    """The shipped leads with a text and a description, in a fixed pseudo-random order set by `salt`
    (varied topics; salted: the held-out split hashes the bare title, an order by it alone would
    put the held-out leads first)."""
    pool = [a for a in assets.wiki_leads() if a.text.strip() and a.description.strip()]
    pool.sort(key=lambda a: hashlib.sha256(salt + a.title.encode()).hexdigest())
    return pool


def select_leads(n_docs: int, n_heldout: int, fraction: float | None = None, *, salt: bytes
                 ) -> tuple[list[assets.Article], list[assets.Article]]:
    """(all selected leads, the held-out ones), in doc_id order: the first `n_heldout` leads of
    `leads_in_order(salt)` that the training pipeline holds out (`heldout_split`'s rule at `fraction`)
    and the first `n_docs - n_heldout` it trains on."""
    frac = DEFAULT_HELDOUT_FRACTION if fraction is None else fraction
    held, train = [], []
    for a in leads_in_order(salt):
        if is_heldout(heldout_key(a.title, a.text), frac):
            if len(held) < n_heldout:
                held.append(a)
        elif len(train) < n_docs - n_heldout:
            train.append(a)
        if len(held) == n_heldout and len(train) == n_docs - n_heldout:
            break
    if len(held) < n_heldout:
        raise ValueError(f"only {len(held)} leads are held out at fraction {frac}; ask for fewer held-out leads")
    by_id = lambda xs: sorted(xs, key=lambda a: a.doc_id)  # noqa: E731
    return by_id(held + train), by_id(held)


def heldout_split(articles: Sequence[Any] | None = None, fraction: float | None = None) -> list[Any]:
    """The articles of the held-out split (the training pipeline's hash rule,
    `m3jax.train.split.is_heldout`); default: the shipped Wikipedia leads."""
    arts = assets.wiki_leads() if articles is None else articles
    frac = DEFAULT_HELDOUT_FRACTION if fraction is None else fraction
    return [a for a in arts if is_heldout(heldout_key(a.title, a.text), frac)]


@dataclasses.dataclass
class _Tasks:
    """The items of one evaluation."""

    texts: list[str]
    qa: list[QAItem]
    fanoutqa: list[QAItem]
    mc: dict[str, list[MCItem]]


def _tasks(ec: EvalConfig, heldout_articles: Sequence[Any], corpus_articles: Sequence[Any] | None) -> _Tasks:
    held = list(heldout_articles)
    fq: list[QAItem] = []
    if ec.fanoutqa:
        fq = fanoutqa_items(corpus_articles if corpus_articles is not None else assets.wiki_leads())[:ec.n_fanoutqa]
    return _Tasks(texts=[a.text for a in held if a.text.strip()][:ec.n_ppl], qa=qa_items(held)[:ec.n_qa],
                  fanoutqa=fq, mc={os.path.splitext(os.path.basename(p))[0]: load_mc_jsonl(p) for p in ec.mc_paths})


def evaluate(params: Params, config: ModelConfig, tokenizer: Any, settings: EvalConfig = EvalConfig(), *,
             retriever: Any = None, heldout_articles: Sequence[Any] = (),
             corpus_articles: Sequence[Any] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Every task of `settings` in every mode. Returns

        {"ppl": {mode: float}, "qa_exact_match": {mode: float}, "qa_logprob": {mode: float},
         "qa_logprob_per_token": {mode: float},
         "fanoutqa": {"exact_match": {mode}, "exact_match_answer_in_lead": {mode},
                      "logprob": {mode}, "n": int, "n_answer_in_lead": int},
         "mc": {file stem: {"accuracy": {mode}, "accuracy_norm": {mode}, "n": int}},
         "counts": {...}, "seconds": {...}}

    heldout_articles: articles never trained on (perplexity of their text, knowledge QA from their
    descriptions). FanOutQA questions cite pages of `corpus_articles` (default: the shipped
    leads; they should be the knowledge base's documents).
    """
    ec = settings
    for m in ec.modes:
        check_mode(m, config, retriever is not None)
    say = log or (lambda s: None)
    check_params(params, config)
    t = _tasks(ec, heldout_articles, corpus_articles)
    res: dict[str, Any] = {"ppl": {}, "qa_exact_match": {}, "qa_logprob": {}, "qa_logprob_per_token": {},
                           "counts": {"ppl_texts": len(t.texts), "qa": len(t.qa), "fanoutqa": len(t.fanoutqa),
                                      "mc": {k: len(v) for k, v in t.mc.items()}},
                           "seconds": {}}
    if ec.fanoutqa:
        res["fanoutqa"] = {"exact_match": {}, "exact_match_answer_in_lead": {}, "logprob": {}, "n": len(t.fanoutqa),
                           "n_answer_in_lead": sum(bool(q.answer_in_lead) for q in t.fanoutqa)}
    if t.mc:
        res["mc"] = {name: {"accuracy": {}, "accuracy_norm": {}, "n": len(items)} for name, items in t.mc.items()}
    common = dict(retriever=retriever, batch_size=ec.batch_size, threshold=ec.threshold, progress=progress)
    generator = None  # one generator for every mode and QA set (compiled once per shape)
    if ec.max_new_tokens > 0 and (t.qa or t.fanoutqa):
        longest = max(len(as_sequence(it.prompt, config, tokenizer)) for it in t.qa + t.fanoutqa)
        generator = make_generator(params, config, tokenizer, retriever, longest, ec.max_new_tokens,
                                   rag="rag" in ec.modes, decode_kwargs=ec.decode_kwargs)
    qa = dict(tokenizer=tokenizer, max_new_tokens=ec.max_new_tokens, generator=generator, **common)
    for mode in ec.modes:
        t0 = time.perf_counter()
        if t.texts:
            p = perplexity(params, config, t.texts, mode=mode, tokenizer=tokenizer, max_tokens=ec.max_tokens,
                           **common)
            res["ppl"][mode] = p["ppl"]
            res["counts"].setdefault("ppl_tokens", {})[mode] = p["tokens"]
            say(f"[{mode}] perplexity {p['ppl']:.3f} over {p['tokens']} tokens of {p['texts']} texts")
        if t.qa:
            q = score_qa(params, config, t.qa, mode=mode, **qa)
            res["qa_exact_match"][mode] = q["exact_match"]
            res["qa_logprob"][mode] = q["answer_logprob"]
            res["qa_logprob_per_token"][mode] = q["answer_logprob_per_token"]
            say(f"[{mode}] knowledge QA ({q['n']}): exact match {q['exact_match']}, "
                f"answer log-prob {q['answer_logprob']:.3f}")
        if t.fanoutqa:
            _fanoutqa(res["fanoutqa"], mode, score_qa(params, config, t.fanoutqa, mode=mode, return_items=True, **qa),
                      say)
        for name, items in t.mc.items():
            r = score_mc(params, config, items, mode=mode, tokenizer=tokenizer, **common)
            res["mc"][name]["accuracy"][mode] = r["accuracy"]
            res["mc"][name]["accuracy_norm"][mode] = r["accuracy_norm"]
            say(f"[{mode}] {name} ({r['n']}): accuracy {r['accuracy']:.4f}, norm {r['accuracy_norm']:.4f}")
        res["seconds"][mode] = round(time.perf_counter() - t0, 2)
    return res


def _fanoutqa(f: dict[str, Any], mode: str, q: dict[str, Any], say: Callable[[str], None]) -> None:
    """Record the FanOutQA scores of one mode, also over the questions answered in their lead."""
    f["exact_match"][mode] = q["exact_match"]
    f["logprob"][mode] = q["answer_logprob"]
    lead = [r["correct"] for r in q["items"] if r["answer_in_lead"]]
    f["exact_match_answer_in_lead"][mode] = float(np.mean(lead)) if lead and lead[0] is not None else None
    say(f"[{mode}] FanOutQA ({q['n']}): exact match {q['exact_match']} (answer in lead: "
        f"{f['exact_match_answer_in_lead'][mode]}), answer log-prob {q['answer_logprob']:.3f}")


def load_retriever(directory: str, config: ModelConfig, params: Params, tokenizer: Any) -> Retriever:
    """A knowledge-base directory (`m3jax build-memory` output) -> Retriever serving memories
    written by these weights, with the evaluation's leakage threshold (`m3jax eval --kb`)."""
    kb = open_knowledge_base(directory, config, params)
    return kb.retriever(tokenizer=tokenizer, k=config.memories_per_chunk, threshold=EVAL_THRESHOLD)
