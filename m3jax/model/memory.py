"""Explicit-memory pytrees: what the encoder and the bank produce, and what the model reads.

`MemoryKV` is a batch of stored memories, one per reference, in the bank's layout
`(memory_layers, 2, kv_heads, tokens_per_memory, head_dim)` per memory (2 = key, value; keys
are post-RoPE). `ChunkMemory` is the model's read-side input: for every sequence and every
context chunk, the memory tokens that chunk may see, stacked over memory layers.

Shape letters (docs/ARCHITECTURE.md): I stored memories, L memory layers, Z key/value, K kv
heads, E tokens kept per memory, H head dim; B batch, C chunks, M memory tokens one chunk reads
(memories per chunk x E, lookback windows included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m3jax.config import ModelConfig
from m3jax.sharding import constrain

Array = jax.Array

# Logical axes (m3jax.sharding's rule table) of the ChunkMemory arrays: k, v and the mask.
MEMORY_AXES = ("layers", "batch", "chunks", "memories", "kv_heads", "head_dim")
MEMORY_MASK_AXES = ("batch", "chunks", "memories")


@struct.dataclass
class MemoryKV:
    """I memories. kv: [I, L, 2, K, E, H] (L memory layers, post-RoPE keys at index 0, values at
    1); mask: [I, E] bool, False for slots of references shorter than E tokens."""

    kv_ILZKEH: Array
    mask_IE: Array

    @property
    def num(self) -> int:
        return self.kv_ILZKEH.shape[0]

    def check(self, config: ModelConfig) -> None:
        want = (config.memory_layers, 2, config.num_kv_heads, config.tokens_per_memory, config.head_dim)
        got = tuple(self.kv_ILZKEH.shape[1:])
        if self.kv_ILZKEH.ndim != 6 or got != want:
            raise ValueError(f"MemoryKV of shape {tuple(self.kv_ILZKEH.shape)} does not fit the model "
                             f"{config.name!r}: expected [I, {', '.join(map(str, want))}]")
        if tuple(self.mask_IE.shape) != (self.num, config.tokens_per_memory):
            raise ValueError(f"MemoryKV mask of shape {tuple(self.mask_IE.shape)}, expected "
                             f"({self.num}, {config.tokens_per_memory})")

    def take(self, idx) -> "MemoryKV":
        return MemoryKV(self.kv_ILZKEH[idx], self.mask_IE[idx])

    @staticmethod
    def concat(items: "list[MemoryKV]") -> "MemoryKV":
        return MemoryKV(jnp.concatenate([m.kv_ILZKEH for m in items]),
                        jnp.concatenate([m.mask_IE for m in items]))


@struct.dataclass
class ChunkMemory:
    """Memory read by the model, per sequence and chunk.

    k, v: [L, B, C, M, K, H] (L memory layers) with M = memories per chunk * tokens per memory;
    mask: [B, C, M]. Chunk c attends to blocks c - lookback .. c (lookback 0 at inference: its
    own block; 4 in training, where each chunk owns one memory and sees five).
    """

    k_LBCMKH: Array
    v_LBCMKH: Array
    mask_BCM: Array
    lookback: int = struct.field(pytree_node=False, default=0)

    @property
    def num_chunks(self) -> int:
        return self.k_LBCMKH.shape[2]




    @classmethod
    def from_memories(cls, mem: MemoryKV, batch: int, chunks: int, lookback: int = 0) -> "ChunkMemory":
        """Arrange I = batch * chunks * m memories (sequence-major, then chunk, then rank) by chunk."""
        I, L, _, K, E, H = mem.kv_ILZKEH.shape
        if I % (batch * chunks):
            raise ValueError(f"{I} memories cannot be split over batch {batch} x {chunks} chunks")
        m = I // (batch * chunks)
        kv = mem.kv_ILZKEH.reshape(batch, chunks, m, L, 2, K, E, H)
        kv = jnp.transpose(kv, (3, 4, 0, 1, 2, 6, 5, 7)).reshape(L, 2, batch, chunks, m * E, K, H)
        mask = mem.mask_IE.reshape(batch, chunks, m * E)
        return cls(kv[:, 0], kv[:, 1], mask, lookback)

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, chunks: int, per_chunk: int | None = None,
              dtype=jnp.float32) -> "ChunkMemory":
        """All-masked memory (reads nothing): the shape of `per_chunk` memories per chunk."""
        m = config.memories_per_chunk if per_chunk is None else per_chunk
        M = m * config.tokens_per_memory
        shape = (config.memory_layers, batch, chunks, M, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, chunks, M), bool))

    def check(self, config: ModelConfig, batch: int, chunks: int) -> None:
        L, K, H = config.memory_layers, config.num_kv_heads, config.head_dim
        s = tuple(self.k_LBCMKH.shape)
        ok = (len(s) == 6 and s[0] == L and s[1] == batch and s[2] == chunks and s[4] == K and s[5] == H
              and tuple(self.v_LBCMKH.shape) == s and tuple(self.mask_BCM.shape) == (batch, chunks, s[3]))
        if not ok:
            raise ValueError(
                f"memory has k {s}, v {tuple(self.v_LBCMKH.shape)}, mask {tuple(self.mask_BCM.shape)}; "
                f"the model {config.name!r} with batch {batch} and {chunks} chunks of {config.chunk_size} "
                f"tokens expects k and v [{L}, {batch}, {chunks}, M, {K}, {H}] and mask [{batch}, {chunks}, M]")

    def constrain(self) -> "ChunkMemory":
        """Inside jit on a mesh: shard like the batch (layers, chunks and memory tokens
        replicated, kv heads on tensor when they divide); a no-op without a mesh."""
        return self.replace(k_LBCMKH=constrain(self.k_LBCMKH, MEMORY_AXES),
                            v_LBCMKH=constrain(self.v_LBCMKH, MEMORY_AXES),
                            mask_BCM=constrain(self.mask_BCM, MEMORY_MASK_AXES))

    def last_chunk(self, last_B: Array) -> "ChunkMemory":
        """One block per sequence: block `last_B[b]` of sequence b ([L, B, 1, M, K, H]); what the
        first generated chunk reads after a prefill (its prompt's last chunk)."""
        B = last_B.shape[0]
        pick = lambda x: jnp.take_along_axis(x, last_B.reshape((1, B, 1) + (1,) * (x.ndim - 3)), axis=2)  # noqa: E731
        return ChunkMemory(pick(self.k_LBCMKH), pick(self.v_LBCMKH),
                           jnp.take_along_axis(self.mask_BCM, last_B[:, None, None], axis=1))

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
        k = jnp.concatenate([shift(self.k_LBCMKH, 2, j) for j in range(w, -1, -1)], axis=3)
        v = jnp.concatenate([shift(self.v_LBCMKH, 2, j) for j in range(w, -1, -1)], axis=3)
        mask = jnp.concatenate([shift(self.mask_BCM, 1, j) for j in range(w, -1, -1)], axis=2)
        return ChunkMemory(k, v, mask, 0)
