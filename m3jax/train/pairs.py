"""Reference pairing for the continual stage (MEMORY3.md, "Training: two stages").

Every 64-token chunk of every training sequence gets ONE reference, retrieved with the chunk's
own text; a candidate is dropped when it leaks the training text (overlap with the whole
sequence > 0.9, with the 2|r| span rule). Pairs are computed once per dataset, stored beside it
as an .npy of reference ids [rows, chunks] (-1 = none), and looked up by the data pipeline, so
training steps never wait on retrieval.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from m3jax.memory.overlap import TRAIN_THRESHOLD


def pair_references(tokens: np.ndarray, loss_mask: np.ndarray, retriever, *, chunk_size: int = 64,
                    threshold: float = TRAIN_THRESHOLD, batch_rows: int = 64,
                    show_progress: bool = True) -> np.ndarray:
    """Reference id per chunk: int32 [rows, ceil(T / chunk_size)] (-1 where none survives).

    tokens / loss_mask: [rows, T] training sequences and their real-token masks.
    retriever: a `Retriever` (search only is enough) with k >= 1; its best surviving
    candidate is taken.
    """
    from tqdm.auto import tqdm

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
    bool [B, C, R] from `batch["ref_ids"]` [B, C] (a chunk with id -1 gets an all-False mask)."""
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
        out["ref_tokens"], out["ref_mask"] = table[rows], mask[rows]
        return out

    return add
