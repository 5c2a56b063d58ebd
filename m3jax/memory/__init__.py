"""Explicit memories: writing (encode), storing (codec, bank), finding (embed, index, retrieve),
and the knowledge base that ties them together (build).

    kb = m3jax.memory.build_knowledge_base(directory, params, config, tokenizer, documents)
    kb = m3jax.memory.open_knowledge_base(directory, config, params)
    kb.retriever(tokenizer=tokenizer)  -> Retriever (embedder + VectorIndex + MemoryBank)
    kb.add(documents, params, config, tokenizer); kb.delete(doc_ids); kb.describe(ids, tokenizer)

`documents` are `(doc_id, text)` or `(doc_id, text, title)` tuples with unique integer doc ids.
The knowledge base, bank, index, embedder and retriever load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# eager: `encode` is also the name of a submodule, which the import system would bind here
from m3jax.memory.encode import encode, make_encode_fn
from m3jax.model.memory import ChunkMemory, MemoryKV

_LAZY = {
    # the knowledge base: bank + index + document records
    "KnowledgeBase": "m3jax.memory.build",
    "KnowledgeBaseError": "m3jax.memory.build",
    "build_knowledge_base": "m3jax.memory.build",
    "open_knowledge_base": "m3jax.memory.build",
    "default_embedder": "m3jax.memory.build",
    # storing
    "MemoryBank": "m3jax.memory.bank",
    "build_bank": "m3jax.memory.populate",
    "params_fingerprint": "m3jax.memory.fingerprint",
    "Reference": "m3jax.memory.references",
    "ReferenceBatch": "m3jax.memory.references",
    "make_codec": "m3jax.memory.codec",
    # finding
    "Retriever": "m3jax.memory.retrieve",
    "VectorIndex": "m3jax.memory.index",
    "SentenceEmbedder": "m3jax.memory.embed",
    "FunctionEmbedder": "m3jax.memory.embed",
    "Embedder": "m3jax.memory.embed",
}

__all__ = ["encode", "make_encode_fn", "ChunkMemory", "MemoryKV", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'm3jax.memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
