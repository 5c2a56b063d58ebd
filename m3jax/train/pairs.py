"""Reference pairing for the continual stage (MEMORY3.md, "Training: two stages").

Every 64-token chunk of every training sequence gets ONE reference, retrieved with the chunk's
own text; a candidate is dropped when it leaks the training text (overlap with the whole
sequence > 0.9, with the 2|r| span rule). Pairs are computed once per dataset, stored beside it
as an .npy of reference ids [rows, chunks] (-1 = none), and looked up by the data pipeline, so
training steps never wait on retrieval.

    corpus documents --split_references--> references --embed_cached (MiniLM)--> VectorIndex
    training rows + Retriever(k=1, threshold=0.9) --load_or_pair--> ids [rows, chunks]

`pair_corpus` runs that whole chain (each piece cached on disk); `PairedRows` holds the result
as training rows {"tokens", "loss_mask", "ref_ids"} plus the token ids of every reference, and
concatenates several such sources (e.g. corpus rows and synthetic QA rows with their own
references) into one training set. `reference_lookup` (references in memory) and
`bank_reference_fn` (references read from a memory bank) turn `ref_ids` into the `ref_tokens` /
`ref_mask` of a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from m3jax.memory.bank import MemoryBank
from m3jax.memory.build import default_embedder, embed_cached
from m3jax.memory.index import VectorIndex
from m3jax.memory.overlap import TRAIN_THRESHOLD
from m3jax.memory.references import split_references
from m3jax.memory.retrieve import Retriever


def pair_references(tokens: np.ndarray, loss_mask: np.ndarray, retriever, *, chunk_size: int = 64,
                    threshold: float = TRAIN_THRESHOLD, batch_rows: int = 64,
                    show_progress: bool = True) -> np.ndarray:
    """Reference id per chunk: int32 [rows, ceil(T / chunk_size)] (-1 where none survives).

    tokens / loss_mask: [rows, T] training sequences and their real-token masks.
    retriever: a `Retriever` (search only is enough) with k >= 1; its best surviving
    candidate is taken.
    """
    tokens = np.asarray(tokens)
    loss_mask = np.asarray(loss_mask, bool)
    n, T = tokens.shape
    C = -(-T // chunk_size)
    out = np.full((n, C), -1, np.int32)
    bar = tqdm(total=n, desc="pairing references", unit="seq", disable=not show_progress)
    for start in range(0, n, batch_rows):
        rows = range(start, min(n, start + batch_rows))
        queries, filters, where = [], [], []
        for r in rows:
            seq = tokens[r][loss_mask[r]]
            for c in range(C):
                chunk_mask = loss_mask[r, c * chunk_size:(c + 1) * chunk_size]
                chunk = tokens[r, c * chunk_size:(c + 1) * chunk_size][chunk_mask]
                if len(chunk) == 0:
                    continue
                queries.append(chunk.tolist())
                filters.append(seq.tolist())
                where.append((r, c))
        if queries:
            ids = retriever.search(queries, filter_tokens=filters, threshold=threshold, k=1)
            for (r, c), i in zip(where, ids[:, 0]):
                out[r, c] = i
        bar.update(len(rows))
    bar.close()
    return out


def pairs_key(tokens: np.ndarray, *parts: str) -> str:
    """A short hash of the training rows and any other identity strings (index, tokenizer)."""
    h = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


def load_or_pair(path: str, tokens: np.ndarray, loss_mask: np.ndarray, retriever, **kwargs) -> np.ndarray:
    """`pair_references`, cached at `path` (.npy); recomputed if the cached shape does not fit."""
    n, T = tokens.shape
    C = -(-T // kwargs.get("chunk_size", 64))
    if os.path.exists(path):
        ids = np.load(path)
        if ids.shape == (n, C):
            return ids
    ids = pair_references(tokens, loss_mask, retriever, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, ids)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written pairs file
    return ids


def reference_lookup(reference_tokens: Sequence[Sequence[int]], reference_len: int, pad_id: int = 0
                     ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A host function batch -> batch that adds `ref_tokens` int32 [B, C, R] and `ref_mask`
    bool [B, C, R] from `batch["ref_ids"]` [B, C] (a chunk with id -1 gets an all-False mask).
    R is the batch's longest reference rounded up to a multiple of 32 (at most reference_len)."""
    n = len(reference_tokens)
    table = np.full((n + 1, reference_len), pad_id, np.int32)  # last row: "no reference"
    mask = np.zeros((n + 1, reference_len), bool)
    for i, t in enumerate(reference_tokens):
        t = list(t)[:reference_len]
        table[i, : len(t)], mask[i, : len(t)] = t, True

    def add(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["ref_ids"])
        rows = np.where(ids >= 0, ids, n)
        out = dict(batch)
        tok, msk = table[rows], mask[rows]
        # only as long as the batch's longest reference (in steps of 32: a few shapes compile)
        longest = int(msk.sum(-1).max(initial=1))
        R = min(reference_len, -(-max(longest, 1) // 32) * 32)
        out["ref_tokens"], out["ref_mask"] = tok[..., :R], msk[..., :R]
        return out

    return add


def bank_reference_fn(bank_path: str, reference_len: int, pad_id: int, vocab_size: int | None = None
                      ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """Like `reference_lookup`, reading the references' token ids from the memory bank at
    `bank_path` (TensorStore; any kvstore URL: gs://, file://, memory://, or a path), batch by
    batch: for a bank too large to hold its references in host memory."""
    bank = MemoryBank.open(bank_path)
    bc = bank.config
    if vocab_size is not None and bc.vocab_size != vocab_size:
        raise ValueError(f"memory bank {bank.url} was built for a vocab of {bc.vocab_size}, the model has "
                         f"{vocab_size}: its references were tokenized by another tokenizer")
    R = reference_len
    n = len(bank)

    def add(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["ref_ids"])
        if ids.size and ids.max() >= n:
            raise ValueError(f"reference id {int(ids.max())} is past the {n} memories of bank {bank.url}")
        valid = ids >= 0
        tokens = np.full(ids.shape + (R,), pad_id, np.int32)
        mask = np.zeros(ids.shape + (R,), bool)
        if valid.any():
            meta = bank.metadata(ids[valid])
            t = meta.tokens[:, :R]
            lengths = np.minimum(meta.lengths, R)
            tokens[valid, : t.shape[1]] = t
            mask[valid] = np.arange(R)[None, :] < lengths[:, None]
        out = dict(batch)
        out["ref_tokens"], out["ref_mask"] = tokens, mask
        return out

    add.bank = bank  # type: ignore[attr-defined]
    return add


# ------------------------------------------------------------------------------ a corpus, paired
@dataclasses.dataclass
class CorpusPairs:
    """What `pair_corpus` gives: `ids` int32 [rows, chunks] (-1 = none) index `references`.

    filtered: candidates dropped by the leakage filter (0 when the pairs came from the cache).
    index: the VectorIndex over the references' embeddings; built from the cached embeddings on
      first use when the pairs themselves came from the cache (pairing then needs no index).
    """

    ids: np.ndarray
    references: list[Any]  # m3jax.memory.references.Reference, ref_id = position
    filtered: int
    embeddings_path: str
    _index: Any = None

    @property
    def reference_tokens(self) -> list[list[int]]:
        return [list(r.tokens) for r in self.references]

    @property
    def index(self):
        if self._index is None:
            if not os.path.exists(self.embeddings_path):
                raise FileNotFoundError(f"{self.embeddings_path} is missing: delete the pairs file to pair anew")
            self._index = VectorIndex.build(np.load(self.embeddings_path),
                                            np.arange(len(self.references), dtype=np.int64))
        return self._index


def _cached_pairs(path: str, n: int, chunks: int) -> np.ndarray | None:
    if os.path.exists(path):
        ids = np.load(path)
        if ids.shape == (n, chunks):
            return ids
    return None


def pair_corpus(documents: Sequence[tuple[int, str]], rows: Mapping[str, np.ndarray], tokenizer, *,
                reference_len: int, chunk_size: int, pairs_path: str, embeddings_path: str,
                embedder=None, index_dir: str | None = None, threshold: float = TRAIN_THRESHOLD,
                show_progress: bool = True) -> CorpusPairs:
    """One reference of the corpus for every chunk of every training row (MEMORY3.md, stage 2).

    documents: `(doc_id, text)` of the knowledge base (references are cut from them with
      `split_references(documents, tokenizer, max_tokens=reference_len)`, ids 0, 1, ... in order).
    rows: {"tokens": int32 [n, T], "loss_mask": bool [n, T]} training rows.
    pairs_path / embeddings_path: .npy caches (`load_or_pair`, `embed_cached`; both resume and are
      written atomically). A pairs file of the right shape is taken as is: no embedder, no index,
      no retrieval; key the file name by the data (`pairs_key`) when the data can change.
    embedder: the sentence encoder (default: `default_embedder()`, MiniLM, loaded only if needed).
    index_dir: also save the reference index there (a knowledge base's `index/`).
    """
    documents = list(documents)
    refs = split_references(documents, tokenizer, max_tokens=reference_len)
    if not refs:
        raise ValueError("no references: the documents are empty")
    tokens, mask = np.asarray(rows["tokens"]), np.asarray(rows["loss_mask"], bool)
    n, T = tokens.shape
    ids = _cached_pairs(pairs_path, n, -(-T // chunk_size))
    if ids is not None:
        out = CorpusPairs(ids, refs, 0, embeddings_path)
        if index_dir is not None and not os.path.exists(os.path.join(index_dir, "index.json")):
            out.index.save(index_dir)
        return out
    texts = dict(documents)
    embedder = embedder if embedder is not None else default_embedder()
    vecs = embed_cached([r.text(texts[r.doc_id]) for r in refs], embedder, embeddings_path,
                        show_progress=show_progress)
    index = VectorIndex.build(vecs, np.arange(len(refs), dtype=np.int64))
    if index_dir is not None:
        index.save(index_dir)
    ret = Retriever(index, embedder, reference_tokens=[list(r.tokens) for r in refs], tokenizer=tokenizer, k=1,
                    threshold=threshold)
    ids = load_or_pair(pairs_path, tokens, mask, ret, chunk_size=chunk_size, threshold=threshold,
                       show_progress=show_progress)
    return CorpusPairs(ids, refs, int(ret.stats.filtered), embeddings_path, index)


# ------------------------------------------------------------------------------ training rows
ROW_KEYS = ("tokens", "loss_mask", "ref_ids")


@dataclasses.dataclass
class PairedRows:
    """Continual-stage training data: `rows` {"tokens": int32 [n, T], "loss_mask": bool [n, T],
    "ref_ids": int32 [n, C]} (C = ceil(T / chunk_size), -1 = no reference; or [n, C, M] for M
    references per chunk, see `m3jax.train.step`) and the token ids of
    every reference, `reference_tokens[ref_id]`. With `bank` (a memory-bank URL) instead, the ids
    index that bank's memories and their tokens are read from it batch by batch.

    Sources concatenate: `corpus.concat(PairedRows(qa_rows, qa_refs))` renumbers the second
    source's ids after the first one's references.
    """

    rows: dict[str, np.ndarray]
    reference_tokens: list[list[int]] | None
    bank: str | None = None

    def __post_init__(self) -> None:
        missing = [k for k in ROW_KEYS if k not in self.rows]
        if missing:
            raise ValueError(f"PairedRows: rows lack {missing} (need {list(ROW_KEYS)})")
        self.rows = {k: np.asarray(self.rows[k]) for k in ROW_KEYS}
        n, T = self.rows["tokens"].shape
        if self.rows["loss_mask"].shape != (n, T) or self.rows["ref_ids"].ndim not in (2, 3) or \
                len(self.rows["ref_ids"]) != n:
            raise ValueError(f"PairedRows: tokens {self.rows['tokens'].shape}, loss_mask "
                             f"{self.rows['loss_mask'].shape} and ref_ids {self.rows['ref_ids'].shape} do not agree")
        if (self.reference_tokens is None) == (self.bank is None):
            raise ValueError("PairedRows: give reference_tokens or a bank (one of them)")
        if self.reference_tokens is not None and self.rows["ref_ids"].size and \
                self.rows["ref_ids"].max() >= len(self.reference_tokens):
            raise ValueError(f"PairedRows: reference id {int(self.rows['ref_ids'].max())} is past the "
                             f"{len(self.reference_tokens)} references")

    def __len__(self) -> int:
        return len(self.rows["tokens"])

    def concat(self, other: "PairedRows") -> "PairedRows":
        """These rows followed by `other`'s (same T), `other`'s references after these ones."""
        if self.bank is not None or other.bank is not None:
            raise ValueError("rows whose references live in a memory bank cannot be concatenated")
        if self.rows["tokens"].shape[1:] != other.rows["tokens"].shape[1:] or \
                self.rows["ref_ids"].shape[1:] != other.rows["ref_ids"].shape[1:]:
            raise ValueError(f"cannot concatenate rows of shapes {self.rows['tokens'].shape} / "
                             f"{self.rows['ref_ids'].shape} and {other.rows['tokens'].shape} / "
                             f"{other.rows['ref_ids'].shape}")
        base = len(self.reference_tokens)
        ids = np.where(other.rows["ref_ids"] >= 0, other.rows["ref_ids"] + base, -1).astype(np.int32)
        rows = {"tokens": np.concatenate([self.rows["tokens"], other.rows["tokens"]]).astype(np.int32),
                "loss_mask": np.concatenate([self.rows["loss_mask"], other.rows["loss_mask"]]).astype(bool),
                "ref_ids": np.concatenate([self.rows["ref_ids"].astype(np.int32), ids])}
        return PairedRows(rows, list(self.reference_tokens) + list(other.reference_tokens))

    def reference_fn(self, reference_len: int, pad_id: int, vocab_size: int | None = None
                     ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """The host function adding `ref_tokens` / `ref_mask` to a batch of these rows."""
        if self.bank is not None:
            return bank_reference_fn(self.bank, reference_len, pad_id, vocab_size)
        return reference_lookup(self.reference_tokens, reference_len, pad_id)
