"""Question answering at evaluation: knowledge QA from held-out articles ("Description: ...
Title:"), FanOutQA single-hop questions and invented-fact probes, scored by answer log-probability
(prompt + answer, one forward per batch) and by the greedy answer (`generate_answers`).

Exact match of a greedy answer, cut at its first newline: knowledge QA items (`match="exact"`)
when the stripped line equals the title, case-insensitively; FanOutQA items (`match="contains"`)
when every answer string (a list / dict answer has several), normalized (lowercase, punctuation
to spaces, digit-group commas removed, whitespace collapsed), occurs as whole words in the
normalized line. Fact probes are correct when the answer string occurs in the continuation
(`m3jax.facts.answer_in`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from m3jax import assets
from m3jax.config import ModelConfig
from m3jax.eval.generation import generate_answers
from m3jax.eval.scoring import ScoreInput, as_sequence, score_sequences
from m3jax.facts import answer_in
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.model.transformer import Params

QA_TEMPLATE = "Description: {description}\nTitle:"
FANOUTQA_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class QAItem:
    """A question scored as `prompt` + `answer` (the answer starts with a space).

    match: "exact" (the generated line equals the answer, case-insensitively) or "contains"
    (every string of `parts` occurs in the generated line, normalized). answer_in_lead: whether
    the answer strings occur in the lead of the cited article (FanOutQA; None when unknown).
    """

    prompt: str
    answer: str
    doc_id: int
    match: str = "exact"
    parts: tuple[str, ...] = ()
    answer_in_lead: bool | None = None
    qid: str = ""


def qa_text(article: Any) -> str:
    """The knowledge-QA format rendered for training: prompt + answer + newline (use it on
    training-split articles only; `qa_items` builds the same format from held-out ones)."""
    return QA_TEMPLATE.format(description=article.description) + f" {article.title}\n"


def qa_items(articles: Iterable[Any]) -> list[QAItem]:
    """Knowledge QA from corpus articles: "Description: {description}\\nTitle:" -> " {title}".
    Articles without a description are skipped."""
    out = []
    for a in articles:
        if a.description.strip() and a.title.strip():
            out.append(QAItem(QA_TEMPLATE.format(description=a.description), f" {a.title}", a.doc_id,
                              "exact", (a.title,), None, str(a.doc_id)))
    return out


def render_answer(a: Any) -> str:
    """A FanOutQA answer as text: lists joined with ", ", dicts as "key: value" pairs, booleans as
    yes / no, integral floats without ".0"."""
    if isinstance(a, bool):
        return "yes" if a else "no"
    if isinstance(a, (list, tuple)):
        return ", ".join(render_answer(v) for v in a)
    if isinstance(a, dict):
        return ", ".join(f"{k}: {render_answer(v)}" for k, v in a.items())
    if isinstance(a, float) and a.is_integer():
        return str(int(a))
    return str(a)


def answer_parts(a: Any) -> tuple[str, ...]:
    """The answer strings that must all appear (list elements, dict values, or the answer)."""
    if isinstance(a, (list, tuple)):
        return tuple(p for v in a for p in answer_parts(v))
    if isinstance(a, dict):
        return tuple(p for v in a.values() for p in answer_parts(v))
    s = render_answer(a).strip()
    return (s,) if s else ()


def fanoutqa_items(articles: Iterable[Any], path: str | None = None) -> list[QAItem]:
    """Single-hop FanOutQA dev sub-questions (found recursively under "decomposition") whose
    evidence page is one of `articles` (matched by title): "Question: {q}\\nAnswer:" ->
    " {answer}", `match="contains"`. `answer_in_lead`: every answer string occurs in the cited
    article's text (case-insensitive). A sub-question shared by several questions (same id) is
    kept once: 546 items from the shipped leads (90 with the answer in the lead).
    path: the dev JSON (default: the shipped asset)."""
    path = path or assets.fanoutqa_dev_path()
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    by_title = {a.title: a for a in articles}
    out: list[QAItem] = []
    seen: set[str] = set()

    def walk(q: dict[str, Any]) -> None:
        for s in q.get("decomposition") or ():
            ev = s.get("evidence") or {}
            art = by_title.get(ev.get("title"))
            parts = answer_parts(s.get("answer"))
            qid = str(s.get("id", ""))
            if art is not None and parts and s.get("question") and qid not in seen:
                seen.add(qid)
                lead = art.text.lower()
                out.append(QAItem(FANOUTQA_TEMPLATE.format(question=s["question"].strip()),
                                  f" {render_answer(s['answer']).strip()}", art.doc_id, "contains", parts,
                                  all(p.lower() in lead for p in parts), qid))
            walk(s)

    for q in data:
        walk(q)
    return out


def normalize_answer(s: str) -> str:
    """Lowercase, drop commas between digits, punctuation to spaces, collapse whitespace."""
    s = re.sub(r"(?<=\d),(?=\d)", "", s.lower())
    s = re.sub(r"[^\w\s]|_", " ", s)
    return " ".join(s.split())


def answer_correct(item: QAItem, generated: str) -> bool:
    """Exact match of a generated answer (cut at its first newline) for `item` (see QAItem.match)."""
    line = generated.split("\n", 1)[0].strip()
    if item.match == "exact":
        return line.casefold() == item.answer.strip().casefold()
    if item.match == "contains":
        text = f" {normalize_answer(line)} "
        parts = [normalize_answer(p) for p in (item.parts or (item.answer,))]
        parts = [p for p in parts if p]
        return bool(parts) and all(f" {p} " in text for p in parts)
    raise ValueError(f"QAItem.match must be 'exact' or 'contains', got {item.match!r}")


def score_qa(params: Params, config: ModelConfig, items: Sequence[QAItem], *, mode: str, retriever: Any = None,
             tokenizer: Any, generator: Any = None, max_new_tokens: int = 16, batch_size: int = 8,
             threshold: float = EVAL_THRESHOLD, decode_kwargs: dict[str, Any] | None = None,
             return_items: bool = False, progress: bool = True) -> dict[str, Any]:
    """Answer log-probabilities (prompt + answer, one forward per batch) and greedy exact match.

    Returns {"answer_logprob": mean over items of the summed answer log-prob,
    "answer_logprob_per_token": pooled over answer tokens, "exact_match": fraction correct (None
    when max_new_tokens == 0), "n": items} and, with return_items, "items": per-item dicts
    (logprob, tokens, generated, correct).
    """
    if not items:
        raise ValueError("no QA items to score")
    prompts, inputs = [], []
    for it in items:
        p = as_sequence(it.prompt, config, tokenizer)
        a = tokenizer.encode(it.answer)
        if not a:
            raise ValueError(f"QA item {it.qid!r} has an empty answer")
        prompts.append(p)
        inputs.append(ScoreInput(p + a, start=len(p), query_end=len(p)))
    scores = score_sequences(params, config, inputs, mode=mode, retriever=retriever, batch_size=batch_size,
                             threshold=threshold, progress=progress, desc="qa log-prob")
    out: dict[str, Any] = {
        "answer_logprob": float(np.mean([s.logprob for s in scores])),
        "answer_logprob_per_token": float(sum(s.logprob for s in scores) / sum(s.n for s in scores)),
        "exact_match": None, "n": len(items)}
    gens: list[str | None] = [None] * len(items)
    correct: list[bool | None] = [None] * len(items)
    if max_new_tokens > 0:
        gens = generate_answers(params, config, prompts, mode=mode, retriever=retriever, tokenizer=tokenizer,
                                generator=generator, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                threshold=threshold, decode_kwargs=decode_kwargs, progress=progress)
        correct = [answer_correct(it, g) for it, g in zip(items, gens)]
        out["exact_match"] = float(np.mean(correct))
    if return_items:
        out["items"] = [{"qid": it.qid, "doc_id": it.doc_id, "logprob": s.logprob, "tokens": s.n,
                         "generated": g, "correct": c, "answer_in_lead": it.answer_in_lead}
                        for it, s, g, c in zip(items, scores, gens, correct)]
    return out


def score_facts(params: Params, config: ModelConfig, probes: Sequence[Any], *, mode: str, retriever: Any = None,
                tokenizer: Any, generator: Any = None, max_new_tokens: int = 12, batch_size: int = 16,
                threshold: float = EVAL_THRESHOLD, progress: bool = True) -> dict[str, Any]:
    """Completion probes about documents the model cannot know (`m3jax.facts.Probe`: prompt,
    answer): greedy continuations in `mode`, correct when the answer string occurs in them
    (`m3jax.facts.answer_in`). Returns {"accuracy", "n", "items": [{prompt, answer, generated,
    correct, retrieved: the reference ids the answer read}]}."""
    if not probes:
        raise ValueError("no fact probes to score")
    prompts = [[config.bos_id] + tokenizer.encode(p.prompt) for p in probes]
    texts, retrieved = generate_answers(params, config, prompts, mode=mode, retriever=retriever, tokenizer=tokenizer,
                                        generator=generator, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        threshold=threshold, progress=progress, return_retrieved=True)
    items = [{"prompt": p.prompt, "answer": p.answer, "generated": t, "correct": answer_in(p.answer, t),
              "retrieved": r} for p, t, r in zip(probes, texts, retrieved)]
    return {"accuracy": float(np.mean([it["correct"] for it in items])), "n": len(items), "items": items}


