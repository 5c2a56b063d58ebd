"""Building and opening a knowledge base: references -> memory bank + vector index on disk.

Layout of a knowledge-base directory (the `m3jax build-memory` output):

    kb.json            what was built: model name, fingerprint, embedder, codec, counts
    bank/              the MemoryBank (TensorStore zarr3): coded memories + reference metadata
    embeddings.npy     reference vectors (cached; the build resumes here after a kill)
    index/             the VectorIndex (ScaNN or exact) over the embeddings, ids = memory ids

Every stage resumes: the bank build continues from its committed count, embeddings are written
in blocks (`embeddings.partial.npy` + a count) and the index is rebuilt only if missing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from m3jax.config import ModelConfig
from m3jax.memory.bank import MemoryBank, build_bank, params_fingerprint
from m3jax.memory.embed import Embedder, SentenceEmbedder
from m3jax.memory.encode import make_encode_fn
from m3jax.memory.index import VectorIndex
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.memory.references import Reference, split_references
from m3jax.memory.retrieve import Retriever

KB_FORMAT = "m3jax-knowledge-base"


def embed_cached(texts: Sequence[str], embedder: Embedder, path: str, *, block: int = 1024,
                 show_progress: bool = True) -> np.ndarray:
    """Embed `texts` into float32 [n, dim] saved at `path`, resuming from a partial file."""
    from tqdm.auto import tqdm

    n = len(texts)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        v = np.load(path)
        if v.shape == (n, embedder.dim):
            return v
    partial = path + ".partial.npy"
    done = 0
    out = np.zeros((n, embedder.dim), np.float32)
    if os.path.exists(partial):
        p = np.load(partial)
        if p.ndim == 2 and p.shape[1] == embedder.dim and len(p) <= n:
            done = len(p)
            out[:done] = p
    bar = tqdm(total=n, initial=done, desc="embedding references", unit="ref", disable=not show_progress)
    while done < n:
        end = min(n, done + block)
        out[done:end] = embedder(list(texts[done:end]))
        done = end
        tmp = partial + ".tmp.npy"
        np.save(tmp, out[:done])
        os.replace(tmp, partial)
        bar.update(end - bar.n)
    bar.close()
    tmp = path + ".tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, path)
    if os.path.exists(partial):
        os.remove(partial)
    return out


@dataclass
class KnowledgeBase:
    """An opened knowledge base: the bank, the index, and the reference texts' token ids."""

    directory: str
    bank: MemoryBank
    index: VectorIndex
    info: dict[str, Any]

    def retriever(self, embedder: Embedder | None = None, *, tokenizer=None, k: int | None = None,
                  threshold: float = EVAL_THRESHOLD, cache_size: int = 4096) -> Retriever:
        embedder = embedder if embedder is not None else default_embedder(self.info.get("embedder"))
        meta = self.bank.metadata(np.arange(len(self.bank)))
        refs = [meta.tokens[i, : meta.lengths[i]].tolist() for i in range(len(meta))]
        k = self.bank.config.memories_per_chunk if k is None else k
        return Retriever(self.index, embedder, reference_tokens=refs, bank=self.bank, tokenizer=tokenizer,
                         k=k, threshold=threshold, cache_size=cache_size)


def default_embedder(name: str | None = None, **kwargs: Any) -> Embedder:
    """The embedder named in kb.json: "minilm" (the shipped all-MiniLM-L6-v2) or a model dir."""
    if name in (None, "minilm"):
        return SentenceEmbedder(**kwargs)
    return SentenceEmbedder(name, **kwargs)


def build_knowledge_base(directory: str, params, config: ModelConfig, tokenizer,
                         documents: Sequence[tuple[int, str]], *, embedder: Embedder | None = None,
                         embedder_name: str = "minilm", codec: str = "bf16", batch_size: int = 64,
                         show_progress: bool = True, log=print) -> KnowledgeBase:
    """Split documents into references, encode them into a bank with `params`, embed and index.

    documents: (doc_id, text) pairs. Resumes a partial build in `directory`.
    """
    t0 = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    refs: list[Reference] = split_references(documents, tokenizer, max_tokens=config.reference_len)
    if not refs:
        raise ValueError("no references: the documents are empty")
    log(f"  {len(documents)} documents -> {len(refs)} references of <= {config.reference_len} tokens")
    fingerprint = params_fingerprint(params)
    bank = build_bank(os.path.join(directory, "bank"), config, fingerprint, refs,
                      make_encode_fn(params, config), codec=codec, batch_size=batch_size,
                      show_progress=show_progress)
    texts = {d: t for d, t in documents}
    ref_texts = [texts[r.doc_id][r.char_start:r.char_end] for r in refs]
    embedder = embedder if embedder is not None else default_embedder(embedder_name)
    vecs = embed_cached(ref_texts, embedder, os.path.join(directory, "embeddings.npy"),
                        show_progress=show_progress)
    index_dir = os.path.join(directory, "index")
    if os.path.exists(os.path.join(index_dir, "index.json")):
        index = VectorIndex.load(index_dir)
        if len(index) != len(refs):
            index = None
    else:
        index = None
    if index is None:
        index = VectorIndex.build(vecs, np.arange(len(refs), dtype=np.int64))
        index.save(index_dir)
    info = {"format": KB_FORMAT, "model": config.name, "fingerprint": fingerprint,
            "embedder": embedder_name, "dim": int(vecs.shape[1]), "references": len(refs),
            "documents": len(documents), "codec": codec, "index_method": index.method,
            "bank": bank.summary(), "build_s": round(time.perf_counter() - t0, 2)}
    with open(os.path.join(directory, "kb.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return KnowledgeBase(directory, bank, index, info)


def open_knowledge_base(directory: str, config: ModelConfig | None = None, params=None) -> KnowledgeBase:
    """Open a knowledge base; with `params` the bank refuses memories written by other weights."""
    path = os.path.join(directory, "kb.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no knowledge base at {directory!r} (kb.json missing): build one with "
                                "`m3jax build-memory`")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    fingerprint = params_fingerprint(params) if params is not None else None
    bank = MemoryBank.open(os.path.join(directory, "bank"), config, fingerprint)
    index = VectorIndex.load(os.path.join(directory, "index"))
    if len(index) != len(bank):
        raise ValueError(f"knowledge base {directory!r}: the index holds {len(index)} vectors but the bank "
                         f"{len(bank)} memories: rebuild it")
    return KnowledgeBase(directory, bank, index, info)
