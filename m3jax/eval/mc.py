"""Multiple choice by log-likelihood (HellaSwag / BoolQ style): each choice is scored as the
continuation of its context (the context alone retrieves). `accuracy`: the choice with the highest
summed log-likelihood; `accuracy_norm`: log-likelihood divided by the continuation's length in
characters (the `acc_norm` of lm-evaluation-harness).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from m3jax.config import ModelConfig
from m3jax.eval.scoring import ScoreInput, as_sequence, score_sequences
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.model.transformer import Params


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    label: int


_CONTEXT_KEYS = ("context", "question", "ctx")
_CHOICE_KEYS = ("choices", "endings")
_LABEL_KEYS = ("label", "answer")


def _first(rec: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    for k in keys:
        if k in rec:
            return rec[k]
    raise ValueError(f"{where}: missing field {' / '.join(repr(k) for k in keys)} (fields: {sorted(rec)})")


def _label_index(label: Any, choices: tuple[str, ...], where: str) -> int:
    if isinstance(label, bool):
        raise ValueError(f"{where}: label {label!r} is a boolean; give the index of the correct choice")
    idx: int | None = None
    if isinstance(label, int):
        idx = label
    elif isinstance(label, str):
        s = label.strip()
        if re.fullmatch(r"-?\d+", s):
            idx = int(s)
        elif s in choices:
            idx = choices.index(s)
        elif len(s) == 1 and s.upper().isalpha():
            idx = ord(s.upper()) - ord("A")
    if idx is None:
        raise ValueError(f"{where}: label {label!r} is neither a choice index, a letter nor a choice text")
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: label {label!r} is out of range for {len(choices)} choices")
    return idx


def load_mc_jsonl(path: str) -> list[MCItem]:
    """Multiple-choice items from JSONL, one object a line: context ("context" / "question" /
    "ctx"), choices ("choices" / "endings": a list of at least 2 strings) and the correct one
    ("label" / "answer": an index, a digit string, a letter A.. or the choice's text)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            ctx = _first(rec, _CONTEXT_KEYS, where)
            choices = _first(rec, _CHOICE_KEYS, where)
            label = _first(rec, _LABEL_KEYS, where)
            if not isinstance(ctx, str):
                raise ValueError(f"{where}: the context must be a string, got {type(ctx).__name__}")
            if (not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c.strip() for c in choices)):
                raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
            choices = tuple(choices)
            out.append(MCItem(ctx, choices, _label_index(label, choices, where)))
    if not out:
        raise ValueError(f"{path}: no items")
    return out


def _continuation(context: str, choice: str) -> str:
    """A choice as the continuation of its context: a space is added between two non-spaces."""
    if context and not context[-1].isspace() and not choice[:1].isspace():
        return " " + choice
    return choice


def score_mc(params: Params, config: ModelConfig, items: Sequence[MCItem], *, mode: str, retriever: Any = None,
             tokenizer: Any, batch_size: int = 8, threshold: float = EVAL_THRESHOLD, progress: bool = True
             ) -> dict[str, Any]:
    """Log-likelihood multiple choice (HellaSwag / BoolQ style): each choice is scored as the
    continuation of the context (the context alone retrieves). Returns {"accuracy",
    "accuracy_norm" (log-likelihood per character of the continuation), "n"}."""
    if not items:
        raise ValueError("no multiple-choice items to score")
    inputs, owner, lengths = [], [], []
    for i, it in enumerate(items):
        ctx = as_sequence(it.context, config, tokenizer)
        for ch in it.choices:
            cont = _continuation(it.context, ch)
            toks = tokenizer.encode(cont)
            if not toks:
                raise ValueError(f"choice {ch!r} encodes to no tokens")
            inputs.append(ScoreInput(ctx + toks, start=len(ctx), query_end=len(ctx)))
            owner.append(i)
            lengths.append(max(1, len(cont)))
    scores = score_sequences(params, config, inputs, mode=mode, retriever=retriever, batch_size=batch_size,
                             threshold=threshold, progress=progress, desc="multiple choice")
    lp = np.array([s.logprob for s in scores])
    norm = lp / np.array(lengths, np.float64)
    owner_a = np.array(owner)
    hits = hits_norm = 0
    for i, it in enumerate(items):
        sel = np.flatnonzero(owner_a == i)
        hits += int(np.argmax(lp[sel]) == it.label)
        hits_norm += int(np.argmax(norm[sel]) == it.label)
    return {"accuracy": hits / len(items), "accuracy_norm": hits_norm / len(items), "n": len(items)}


