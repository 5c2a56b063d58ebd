"""Explicit memories: writing (encode), storing (codec, bank), finding (embed, index, retrieve)."""

from m3jax.memory.encode import encode, make_encode_fn
from m3jax.model.memory import ChunkMemory, MemoryKV

__all__ = ["encode", "make_encode_fn", "ChunkMemory", "MemoryKV"]
