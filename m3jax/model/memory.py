"""Explicit-memory pytrees: what the encoder and the bank produce, and what the model reads.

`MemoryKV` is a batch of stored memories, one per reference, in the bank's layout
`(memory_layers, 2, kv_heads, tokens_per_memory, head_dim)` per memory (2 = key, value; keys
are post-RoPE). `ChunkMemory` is the model's read-side input: for every sequence and every
context chunk, the memory tokens that chunk may see, stacked over memory layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m3jax.config import ModelConfig

Array = jax.Array


@struct.dataclass
class MemoryKV:
    """N memories. kv: [N, Lm, 2, K, T, H] (post-RoPE keys at index 0, values at 1);
    mask: [N, T] bool, False for slots of references shorter than T tokens."""

    kv_NLZKTH: Array
    mask_NT: Array

    @property
    def num(self) -> int:
        return self.kv_NLZKTH.shape[0]

    def check(self, config: ModelConfig) -> None:
        want = (config.memory_layers, 2, config.num_kv_heads, config.tokens_per_memory, config.head_dim)
        got = tuple(self.kv_NLZKTH.shape[1:])
        if self.kv_NLZKTH.ndim != 6 or got != want:
            raise ValueError(f"MemoryKV of shape {tuple(self.kv_NLZKTH.shape)} does not fit the model "
                             f"{config.name!r}: expected [N, {', '.join(map(str, want))}]")
        if tuple(self.mask_NT.shape) != (self.num, config.tokens_per_memory):
            raise ValueError(f"MemoryKV mask of shape {tuple(self.mask_NT.shape)}, expected "
                             f"({self.num}, {config.tokens_per_memory})")

    def take(self, idx) -> "MemoryKV":
        return MemoryKV(self.kv_NLZKTH[idx], self.mask_NT[idx])

    @staticmethod
    def concat(items: "list[MemoryKV]") -> "MemoryKV":
        return MemoryKV(jnp.concatenate([m.kv_NLZKTH for m in items]),
                        jnp.concatenate([m.mask_NT for m in items]))


@struct.dataclass
class ChunkMemory:
    """Memory read by the model, per sequence and chunk.

    k, v: [Lm, B, C, S, K, H] with S = memories per chunk * tokens per memory; mask: [B, C, S].
    Chunk c attends to blocks c - lookback .. c (lookback 0 at inference: its own block; 4 in
    training, where each chunk owns one memory and sees five).
    """

    k_LBCSKH: Array
    v_LBCSKH: Array
    mask_BCS: Array
    lookback: int = struct.field(pytree_node=False, default=0)

    @property
    def num_chunks(self) -> int:
        return self.k_LBCSKH.shape[2]

    @classmethod
    def from_memories(cls, mem: MemoryKV, batch: int, chunks: int, lookback: int = 0) -> "ChunkMemory":
        """Arrange N = batch * chunks * m memories (sequence-major, then chunk, then rank) by chunk."""
        N, Lm, _, K, T, H = mem.kv_NLZKTH.shape
        if N % (batch * chunks):
            raise ValueError(f"{N} memories cannot be split over batch {batch} x {chunks} chunks")
        m = N // (batch * chunks)
        kv = mem.kv_NLZKTH.reshape(batch, chunks, m, Lm, 2, K, T, H)
        kv = jnp.transpose(kv, (3, 4, 0, 1, 2, 6, 5, 7)).reshape(Lm, 2, batch, chunks, m * T, K, H)
        mask = mem.mask_NT.reshape(batch, chunks, m * T)
        return cls(kv[:, 0], kv[:, 1], mask, lookback)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, chunks: int, per_chunk: int | None = None,
              dtype=jnp.float32) -> "ChunkMemory":
        """All-masked memory (reads nothing): the shape of `per_chunk` memories per chunk."""
        m = config.memories_per_chunk if per_chunk is None else per_chunk
        S = m * config.tokens_per_memory
        shape = (config.memory_layers, batch, chunks, S, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, chunks, S), bool))

    def check(self, config: ModelConfig, batch: int, chunks: int) -> None:
        Lm, K, H = config.memory_layers, config.num_kv_heads, config.head_dim
        s = tuple(self.k_LBCSKH.shape)
        ok = (len(s) == 6 and s[0] == Lm and s[1] == batch and s[2] == chunks and s[4] == K and s[5] == H
              and tuple(self.v_LBCSKH.shape) == s and tuple(self.mask_BCS.shape) == (batch, chunks, s[3]))
        if not ok:
            raise ValueError(
                f"memory has k {s}, v {tuple(self.v_LBCSKH.shape)}, mask {tuple(self.mask_BCS.shape)}; "
                f"the model {config.name!r} with batch {batch} and {chunks} chunks of {config.chunk_size} "
                f"tokens expects k and v [{Lm}, {batch}, {chunks}, S, {K}, {H}] and mask [{batch}, {chunks}, S]")

    def windowed(self) -> "ChunkMemory":
        """Fold the lookback into each chunk's block: block c becomes blocks c-lookback..c."""
        if self.lookback == 0:
            return self
        w = self.lookback
        def shift(x, axis, j):  # block c gets block c - j (zeros / False before the start)
            pad = [(0, 0)] * x.ndim
            pad[axis] = (j, 0)
            x = jnp.pad(x, pad)
            return jax.lax.slice_in_dim(x, 0, x.shape[axis] - j, axis=axis)
        k = jnp.concatenate([shift(self.k_LBCSKH, 2, j) for j in range(w, -1, -1)], axis=3)
        v = jnp.concatenate([shift(self.v_LBCSKH, 2, j) for j in range(w, -1, -1)], axis=3)
        mask = jnp.concatenate([shift(self.mask_BCS, 1, j) for j in range(w, -1, -1)], axis=2)
        return ChunkMemory(k, v, mask, 0)
