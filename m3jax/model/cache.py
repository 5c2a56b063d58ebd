"""Explicit KV cache: a pytree preallocated to a maximum length and donated through jitted steps.

Context token i of sequence b lives in slot i of its cache (prompts are left-aligned, so the
fixed 64-token chunks of every sequence start at slot 0). Keys are stored post-RoPE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from m3jax.config import ModelConfig
from m3jax.model.memory import ChunkMemory
from m3jax.model.layers import rope_angles, rope_table
from m3jax.model.transformer import (Params, Reads, Shared, _cached_layers, _check_tokens, _embed, _logits,
                                     grow_kv_layers, init_kv_layers, prefix_kv)

Array = jax.Array


ROPE_TABLE_MAX = 1 << 21  # cache slots x head_dim up to which `extend` gathers RoPE rows from a table (8 MiB)


@struct.dataclass
class KVCache:
    """kv: {stack: ((k, v) per layer)}, k [B, K, S_max, H], v [B, K, H, S_max] (`init_kv_layers`);
    lengths: int32 [B] tokens held per
    sequence. Per-layer arrays (not a stacked [L, ...] buffer) let each decoding step update
    its cache in place."""

    kv: dict
    lengths: Array

    @property
    def max_len(self) -> int:
        return next(iter(self.kv.values()))[0][0].shape[2]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(config.dtype) if dtype is None else dtype
    return KVCache(init_kv_layers(config, batch, max_len, dtype), jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnums=1)
def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The same cache with room for `max_len` tokens: held slots and lengths unchanged, the new
    slots empty. Lets a generator size each round's cache for that round (decoding attends over
    every slot) instead of for the whole call; one copy per growth."""
    if max_len < cache.max_len:
        raise ValueError(f"grow_cache: the cache already holds {cache.max_len} slots, more than {max_len}")
    return cache.replace(kv=grow_kv_layers(cache.kv, max_len))


def extend(params: Params, config: ModelConfig, tokens: Array, cache: KVCache, *,
           memory: ChunkMemory | None = None, prefix=None, new_lengths: Array | None = None,
           fresh: bool = False, logits_at: Array | None = None):
    """Append `tokens` [B, T] at each sequence's current length; return (logits [B, T, V], cache).

    Used for prefill (empty cache, T a multiple of chunk_size when memory is given, one memory
    block per chunk) and for decoding (T = 1, one memory block). `new_lengths` overrides the
    lengths after the call (prefill of right-padded prompts of different lengths).
    `fresh=True` promises an empty cache (every length 0): the tokens then attend to their own
    keys (causal, T keys) instead of every slot of the cache; the cache is written the same.
    `logits_at` [B]: only the logits of token `logits_at[b]` of each row ([B, 1, V]; a prefill
    needs the last prompt token's only).
    """
    c = config
    _check_tokens(tokens, c)
    B, T = tokens.shape
    if memory is not None:
        if not c.memory_enabled:
            raise ValueError(f"config {c.name!r} has memory off but memory was given")
        C = memory.num_chunks
        if T % C:
            raise ValueError(f"{T} tokens cannot be split into {C} memory chunks")
        memory.check(c, B, C)
        memory = memory.windowed().constrain()
    if prefix is None and c.reference_prefix is not None:
        prefix = prefix_kv(params, c)
    slots = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]
    if cache.max_len * c.head_dim <= ROPE_TABLE_MAX:  # rows gathered: no cos / sin in the step
        cos_SH, sin_SH = rope_table(c, cache.max_len)
        cos, sin = (jnp.take(jnp.asarray(t), slots, axis=0, mode="clip") for t in (cos_SH, sin_SH))
    else:  # a table this large would be a large constant in the program
        cos, sin = rope_angles(c.context_offset + slots, c)
    if fresh:  # keys = the new tokens' own: causal over T (right padding comes after each row)
        mask = jnp.broadcast_to(jnp.arange(T)[None, :] <= jnp.arange(T)[:, None], (B, T, T))
    else:
        mask = jnp.arange(cache.max_len)[None, None, :] <= slots[:, :, None]  # [B, T, S]
    x = _embed(params, c, tokens)
    x, kv = _cached_layers(params, c, x, Shared(cos, sin, mask, slots, fresh), Reads(prefix, memory, cache.kv))
    lengths = cache.lengths + T if new_lengths is None else new_lengths.astype(jnp.int32)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    return _logits(params, c, x), KVCache(kv, lengths)
