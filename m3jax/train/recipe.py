"""The continual recipe that teaches a *pretrained* model to read explicit memory.

The paper's continual stage (one retrieved reference per 64-token chunk of plain text, chunk c
reading the memories of chunks c-4..c, `m3jax.train.pairs`) assumes a model that will learn to
read memory over a long pretraining. An imported model needs a denser signal: text whose next
tokens can only be known from a memory. `reading_rows` builds one-chunk training rows in the
retrieval layout of inference (the chunk reads `memories` references, the right one among
distractors: `ref_ids` [n, 1, M], see `m3jax.train.step`):

  * **fact probes**: "The Vorlix Institute was founded in 1893 by" -> " Selva Kurnath." with the
    invented document that states it (`m3jax.facts`, training split) among same-kind documents;
    the loss covers the answer only;
  * **fact reconstruction**: the document itself, read back from its memory (every token);
  * **description -> title**: "Description: ...\\nTitle:" -> " <title>" for training-split
    documents that have a description, the document's first reference among its nearest
    neighbours (MiniLM); the loss covers the title;
  * **text**: the first chunk of a training document with the references of its nearest
    neighbouring documents (the paper's signal: related knowledge, never the document itself).

No evaluation entity, answer or wording reaches training: facts come from the "train" split of
`m3jax.facts` (disjoint names, evaluation-only wordings held back) and documents from the
training split of the corpus. Measurements behind the recipe: experiments/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from m3jax.config import ModelConfig
from m3jax.train.pairs import PairedRows


@dataclass(frozen=True)
class ReadingMix:
    """How many rows of each kind the recipe builds (see the module docstring)."""

    facts: int = 3000  # invented documents: 2 probe rows + 1 reconstruction row each
    qa: int = 2000  # description -> title rows (at most one per training document)
    text: int = 2000  # text rows (at most one per training document)
    memories: int = 5  # references each row reads (the model's memories_per_chunk at inference)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("facts", "qa", "text"):
            if getattr(self, f) < 0:
                raise ValueError(f"ReadingMix.{f} must be >= 0, got {getattr(self, f)}")
        if self.memories < 1:
            raise ValueError(f"ReadingMix.memories must be >= 1, got {self.memories}")


def _row(T: int, pad_id: int, parts: Sequence[tuple[Sequence[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
    """One row of T tokens from (tokens, in_loss) parts, cut at T, padded with `pad_id`."""
    toks, loss = [], []
    for ids, on in parts:
        toks.extend(ids)
        loss.extend([on] * len(ids))
    toks, loss = toks[:T], loss[:T]
    t = np.full(T, pad_id, np.int32)
    m = np.zeros(T, bool)
    t[: len(toks)], m[: len(loss)] = toks, loss
    return t, m


def _nearest(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices [n, k] of each unit vector's k nearest others (cosine), best first."""
    n = len(vectors)
    out = np.zeros((n, k), np.int64)
    for s in range(0, n, 1024):
        sim = vectors[s:s + 1024] @ vectors.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        out[s:s + 1024] = np.argsort(-sim, axis=1)[:, :k]
    return out


def reading_rows(documents: Sequence[Mapping[str, Any]], tokenizer, config: ModelConfig,
                 mix: ReadingMix = ReadingMix(), *, embeddings_path: str, embedder=None,
                 show_progress: bool = True) -> PairedRows:
    """The recipe's training rows (one chunk of `config.chunk_size` tokens each) and references.

    documents: training-split records {"doc_id", "text", "title"?, "description"?}; they give the
    description -> title and text rows and the references those rows read.
    embeddings_path: a .npy cache of the documents' first-reference embeddings (resumable).
    """
    from m3jax.facts import make_facts
    from m3jax.memory.build import default_embedder, embed_cached
    from m3jax.memory.references import split_references

    T, R, M = config.chunk_size, config.reference_len, mix.memories
    bos, pad = config.bos_id, config.pad_id
    rng = np.random.default_rng(mix.seed)
    refs: list[list[int]] = []
    tokens, losses, ids = [], [], []

    def add(parts, mem):
        t, m = _row(T, pad, parts)
        tokens.append(t), losses.append(m), ids.append(mem)

    # ------------------------------------------------------------ invented facts
    if mix.facts:
        facts = make_facts(mix.facts, split="train", seed=mix.seed)
        first = len(refs)
        refs.extend(t[:R] for t in tokenizer.encode_batch([f.text for f in facts]))
        kinds = np.array([f.kind for f in facts])
        by_kind = {k: np.flatnonzero(kinds == k) for k in set(kinds.tolist())}
        for i, f in enumerate(facts):
            pool = by_kind[f.kind]
            for rows in ([("probe", p) for p in f.probes] + [("recon", None)]):
                others = [int(j) for j in rng.choice(pool[pool != i], M - 1, replace=len(pool) <= M)]
                mem = [first + i] + [first + j for j in others]
                rng.shuffle(mem)
                if rows[0] == "probe":
                    p = rows[1]
                    add([([bos] + tokenizer.encode(p.prompt), False),
                         (tokenizer.encode(" " + p.answer + "."), True)], mem)
                else:
                    add([([bos], False), (refs[first + i], True)], mem)

    # ------------------------------------------------------------ the corpus: QA and text rows
    docs = [d for d in documents if str(d.get("text", "")).strip()]
    if docs and (mix.qa or mix.text) and M > 1:
        order = rng.permutation(len(docs))
        docs = [docs[i] for i in order[: max(mix.qa, mix.text)]]
        pieces = split_references([(k, d["text"]) for k, d in enumerate(docs)], tokenizer, max_tokens=R)
        first_ref: dict[int, Any] = {}
        for r in pieces:
            first_ref.setdefault(r.doc_id, r)
        base = len(refs)
        refs.extend(list(first_ref[k].tokens) for k in range(len(docs)))
        embedder = embedder if embedder is not None else default_embedder()
        vecs = embed_cached([first_ref[k].text(d["text"]) for k, d in enumerate(docs)], embedder, embeddings_path,
                            show_progress=show_progress)
        near = _nearest(vecs, M)
        from m3jax.eval import QA_TEMPLATE

        n_qa = 0
        for k, d in enumerate(docs):
            desc, title = str(d.get("description") or "").strip(), str(d.get("title") or "").strip()
            if n_qa < mix.qa and desc and title:
                mem = [base + k] + [base + int(j) for j in near[k, : M - 1]]
                rng.shuffle(mem)
                prompt = tokenizer.encode(QA_TEMPLATE.format(description=desc))
                answer = tokenizer.encode(f" {title}\n")
                prompt = prompt[-(T - 1 - len(answer)):] if len(prompt) + len(answer) >= T else prompt
                add([([bos] + prompt, False), (answer, True)], mem)
                n_qa += 1
            if k < mix.text:
                add([([bos], False), (list(first_ref[k].tokens)[: T - 1], True)],
                    [base + int(j) for j in near[k, :M]])
    if not tokens:
        raise ValueError("the reading recipe built no rows: give facts > 0 or documents with text")
    rows = {"tokens": np.stack(tokens), "loss_mask": np.stack(losses),
            "ref_ids": np.asarray(ids, np.int32)[:, None, :]}
    return PairedRows(rows, refs)


def describe(rows: PairedRows) -> dict[str, Any]:
    """Counts for logs: rows, references, target tokens."""
    return {"rows": len(rows), "references": len(rows.reference_tokens or ()),
            "target_tokens": int(rows.rows["loss_mask"].sum()), "memories_per_row": int(rows.rows["ref_ids"].shape[-1])}

