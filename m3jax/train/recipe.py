"""The continual recipe that teaches a *pretrained* model to read explicit memory.

The paper's continual stage pairs every 64-token chunk of plain text with one retrieved
reference (`m3jax.train.pairs`); a model pretrained for a long time with it learns to read memory.
An imported model needs a denser signal: text whose next tokens can only be known from a memory.
`reading_rows` builds rows in the same layout (one reference per chunk, chunk c reading the
memories of chunks c-lookback..c, `m3jax.train.step`), but every chunk is one *example* whose
own reference holds what it asks for, and the other chunks of the row are about neighbouring
documents, so their memories are the distractors it must tell apart:

  * **fact probes**: "The Vorlix Institute was founded in 1893 by" -> " Selva Kurnath." with the
    invented document that states it (`m3jax.facts`, training split); rows gather documents of
    one kind, so the distractors are worded alike; the loss covers the answer only;
  * **fact reconstruction**: the document itself, read back from its memory (every token);
  * **description -> title**: "Description: ...\\nTitle:" -> " <title>\\n" of a training-split
    document with a description, its first reference as the chunk's memory; rows gather nearest
    neighbours (MiniLM), the loss covers the title;
  * **text**: the first chunk of a training document, with the reference of its nearest
    neighbour as memory (the paper's signal: related knowledge, never the document itself).

Each reference is encoded once per row and read by up to `lookback + 1` chunks, so a row of
`chunks` examples costs `chunks` encodings (a retrieval-style row reading 5 memories per example
would cost 5 per example). Rows of one kind are laid out in blocks of `batch_size`, so a batch
holds references of similar lengths (`m3jax.train.data.rows_dataset(blocks=True)`).

No evaluation entity, answer or wording reaches training: facts come from the "train" split of
`m3jax.facts` (disjoint names, evaluation-only wordings held back) and documents from the
training split of the corpus. Measurements behind the recipe: experiments/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from m3jax.config import ModelConfig
from m3jax.eval import QA_TEMPLATE
from m3jax.facts import make_facts
from m3jax.memory.build import default_embedder, embed_cached
from m3jax.memory.references import split_references
from m3jax.train.pairs import PairedRows


@dataclass(frozen=True)
class ReadingMix:
    """How many examples of each kind the recipe builds, and how rows hold them."""

    facts: int = 3000  # invented documents: 2 probe examples + 1 reconstruction each
    qa: int = 2000  # description -> title examples (at most one per training document)
    text: int = 2000  # text examples (at most one per training document)
    chunks: int = 8  # examples per row (one chunk each)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("facts", "qa", "text"):
            if getattr(self, f) < 0:
                raise ValueError(f"ReadingMix.{f} must be >= 0, got {getattr(self, f)}")
        if self.chunks < 1:
            raise ValueError(f"ReadingMix.chunks must be >= 1, got {self.chunks}")


@dataclass
class _Example:
    tokens: list[int]
    loss: list[bool]
    ref: int  # index into the reference list


def _example(parts: Sequence[tuple[Sequence[int], bool]], ref: int, T: int) -> _Example:
    toks: list[int] = []
    loss: list[bool] = []
    for ids, on in parts:
        toks.extend(ids)
        loss.extend([on] * len(ids))
    return _Example(toks[:T], loss[:T], ref)


def _nearest(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices [n, k] of each unit vector's k nearest others (cosine), best first."""
    n = len(vectors)
    k = min(k, n - 1)
    out = np.zeros((n, k), np.int64)
    for s in range(0, n, 1024):
        sim = vectors[s:s + 1024] @ vectors.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        out[s:s + 1024] = np.argsort(-sim, axis=1)[:, :k]
    return out


def _clusters(near: np.ndarray, size: int, rng: np.random.Generator) -> list[list[int]]:
    """Greedy groups of `size` documents: a random unused seed and its nearest unused neighbours
    (topped up with other unused documents when the neighbours are used up)."""
    n = len(near)
    used = np.zeros(n, bool)
    out = []
    pool = list(rng.permutation(n))
    for s in pool:
        if used[s]:
            continue
        group = [int(s)]
        used[s] = True
        for j in near[s]:
            if len(group) == size:
                break
            if not used[j]:
                group.append(int(j))
                used[j] = True
        out.append(group)
    return out


def reading_rows(documents: Sequence[Mapping[str, Any]], tokenizer, config: ModelConfig,
                 mix: ReadingMix = ReadingMix(), *, batch_size: int = 1, embeddings_path: str,
                 embedder=None, show_progress: bool = True) -> PairedRows:
    """The recipe's training rows and references (see the module docstring).

    documents: training-split records {"doc_id", "text", "title"?, "description"?}; they give the
    description -> title and text examples and the references those read.
    batch_size: rows of one kind come in blocks of this many (read them with
    `rows_dataset(blocks=True)`), so batches do not mix short fact references with long ones.
    embeddings_path: a .npy cache of the documents' first-reference embeddings (resumable).
    Returns rows {"tokens" [n, chunks * chunk_size], "loss_mask", "ref_ids" [n, chunks]}.
    """
    T, R, C = config.chunk_size, config.reference_len, mix.chunks
    bos = config.bos_id
    rng = np.random.default_rng(mix.seed)
    refs: list[list[int]] = []
    groups: list[tuple[str, list[_Example]]] = []  # (kind, examples of one row)

    # ------------------------------------------------------------ invented facts
    if mix.facts:
        facts = make_facts(mix.facts, split="train", seed=mix.seed)
        first = len(refs)
        refs.extend(t[:R] for t in tokenizer.encode_batch([f.text for f in facts]))
        by_kind: dict[str, list[_Example]] = {}
        for i, f in enumerate(facts):
            ex = [_example([([bos] + tokenizer.encode(p.prompt), False),
                            (tokenizer.encode(" " + p.answer + "."), True)], first + i, T) for p in f.probes]
            ex.append(_example([([bos], False), (refs[first + i], True)], first + i, T))
            by_kind.setdefault(f.kind, []).append(ex)
        for kind, docs in by_kind.items():
            # a row: examples of C different documents of one kind (no document twice in a row)
            flat = [(d, e) for d, exs in enumerate(docs) for e in exs]
            order = rng.permutation(len(flat))
            pending: list[list[_Example]] = []
            rows_docs: list[set[int]] = []
            for j in order:
                d, e = flat[j]
                for r, seen in zip(pending, rows_docs):
                    if len(r) < C and d not in seen:
                        r.append(e)
                        seen.add(d)
                        break
                else:
                    pending.append([e])
                    rows_docs.append({d})
            groups.extend(("facts", r) for r in pending if len(r) == C)

    # ------------------------------------------------------------ the corpus: QA and text
    docs = [d for d in documents if str(d.get("text", "")).strip()]
    if docs and (mix.qa or mix.text):
        order = rng.permutation(len(docs))
        docs = [docs[i] for i in order[: max(mix.qa, mix.text)]]
        pieces = split_references([(k, d["text"]) for k, d in enumerate(docs)], tokenizer, max_tokens=R)
        first_ref: dict[int, Any] = {}
        for r in pieces:
            first_ref.setdefault(r.doc_id, r)
        base = len(refs)
        refs.extend(list(first_ref[k].tokens) for k in range(len(docs)))
        embedder = embedder if embedder is not None else default_embedder()
        vecs = embed_cached([first_ref[k].text(d["text"]) for k, d in enumerate(docs)], embedder,
                            embeddings_path, show_progress=show_progress)
        near = _nearest(vecs, max(C, 2))
        qa: dict[int, _Example] = {}
        text: dict[int, _Example] = {}
        for k, d in enumerate(docs):
            desc, title = str(d.get("description") or "").strip(), str(d.get("title") or "").strip()
            if len(qa) < mix.qa and desc and title:
                answer = tokenizer.encode(f" {title}\n")
                prompt = tokenizer.encode(QA_TEMPLATE.format(description=desc))
                prompt = prompt[max(0, len(prompt) + len(answer) + 1 - T):]
                qa[k] = _example([([bos] + prompt, False), (answer, True)], base + k, T)
            if len(text) < mix.text and len(near[k]):
                text[k] = _example([([bos], False), (list(first_ref[k].tokens)[: T - 1], True)],
                                   base + int(near[k, 0]), T)
        for kind, pool in (("qa", qa), ("text", text)):
            for group in _clusters(near, C, rng):
                row = [pool[k] for k in group if k in pool]
                if len(row) == C:
                    groups.append((kind, row))
    if not groups:
        raise ValueError(f"the reading recipe built no full row of {C} examples: give more facts or documents")

    # ------------------------------------------------------------ rows, in blocks of one kind
    order = rng.permutation(len(groups))
    by_kind_rows: dict[str, list[list[_Example]]] = {}
    for j in order:
        kind, row = groups[j]
        by_kind_rows.setdefault("short" if kind == "facts" else "long", []).append(row)
    blocks = []
    for rows_of in by_kind_rows.values():
        n = len(rows_of) // batch_size * batch_size or len(rows_of)
        blocks.extend(rows_of[s:s + batch_size] for s in range(0, n, batch_size))
    rng.shuffle(blocks)
    tokens = np.full((sum(len(b) for b in blocks), C * T), config.pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    ids = np.full((len(tokens), C), -1, np.int32)
    r = 0
    for block in blocks:
        for row in block:
            for c, e in enumerate(row):
                tokens[r, c * T:c * T + len(e.tokens)] = e.tokens
                mask[r, c * T:c * T + len(e.loss)] = e.loss
                ids[r, c] = e.ref
            r += 1
    return PairedRows({"tokens": tokens, "loss_mask": mask, "ref_ids": ids}, refs)


def describe(rows: PairedRows) -> dict[str, Any]:
    """Counts for logs: rows, examples, references, target tokens."""
    ids = rows.rows["ref_ids"]
    return {"rows": len(rows), "examples": int((ids >= 0).sum()), "references": len(rows.reference_tokens or ()),
            "target_tokens": int(rows.rows["loss_mask"].sum())}
