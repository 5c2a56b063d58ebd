"""The pure-functional Memory3 model: `init`, `forward`, the write path and the KV cache."""

from m3jax.model.attention import MemoryBlocks, PrefixKV, attention
from m3jax.model.cache import KVCache, extend, grow_cache, init_cache
from m3jax.model.memory import ChunkMemory, MemoryKV
from m3jax.model.transformer import (STACKS, attention_mass, check_params, check_token_ids, encode_states, forward,
                                     init, num_params, param_axes, param_shapes, prefix_kv, restack, stack_sizes)

__all__ = ["MemoryBlocks", "PrefixKV", "attention", "KVCache", "extend", "grow_cache", "init_cache", "ChunkMemory",
           "MemoryKV", "STACKS", "attention_mass", "check_params", "check_token_ids", "encode_states", "forward", "init", "num_params",
           "param_axes", "param_shapes", "prefix_kv", "restack", "stack_sizes"]
