"""m3jax: Memory3 (language modeling with explicit memory) in JAX.

The names a notebook needs, importable from the top (each loads its module on first use, so
`import m3jax` stays fast):

    cfg, params, tok = m3jax.load_model("smollm2-135m-memory")     # or a model dir / training run
    kb = m3jax.build_knowledge_base("kb", params, cfg, tok, documents)   # (doc_id, text[, title])
    kb = m3jax.open_knowledge_base("kb", cfg, params)
    gen = m3jax.Generator(params, cfg, tok, kb.retriever(tokenizer=tok), m3jax.DecodeConfig())
    gen.generate(["The capital of France is"], mode="memory")    # or "rag", "none"

Configs: `ModelConfig`, `DecodeConfig`, `TrainConfig`, `MeshConfig`, `preset(name)`. The memory
nouns (bank, index, embedder, retriever, encode): `m3jax.memory`. The pure-functional model:
`m3jax.model`. `enable_compile_cache()` turns on JAX's persistent compilation cache (the `m3jax`
command does so by default).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_model": "m3jax.convert",
    "ConvertError": "m3jax.convert",
    "SHIPPED_MODELS": "m3jax.convert",
    "Generator": "m3jax.decode",
    "GenerationResult": "m3jax.decode",
    "GenerationStats": "m3jax.decode",
    "build_knowledge_base": "m3jax.memory.build",
    "open_knowledge_base": "m3jax.memory.build",
    "KnowledgeBase": "m3jax.memory.build",
    "ModelConfig": "m3jax.config",
    "DecodeConfig": "m3jax.config",
    "TrainConfig": "m3jax.config",
    "MeshConfig": "m3jax.config",
    "ConfigError": "m3jax.config",
    "preset": "m3jax.config",
    "preset_names": "m3jax.config",
    "enable_compile_cache": "m3jax.runtime",
}
_SUBMODULES = ("config", "convert", "decode", "eval", "memory", "model", "runtime", "sharding", "tokenizer",
               "train", "assets", "cli", "demo")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"m3jax.{name}")
    else:
        raise AttributeError(f"module 'm3jax' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
