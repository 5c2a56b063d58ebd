"""Generation with explicit memory (MEMORY3.md, "Reading memories"), RAG and no-memory baselines.

Shape of one `generate` call (all three modes share the model and this code path):

1. Prompts are left-aligned and padded to a bucket (a multiple of `chunk_size`), so a handful of
   prompt lengths compile once each. In `memory` mode every 64-token prompt chunk retrieves its
   own memories with its own text, and the whole prompt is prefilled in ONE jitted call with a
   chunk-to-memory-block mask (no loop over chunks).
2. A jitted `lax.while_loop` generates at most one chunk (64 tokens) and returns to the host.
   The first generated chunk keeps the memories of the last prompt chunk; after each generated
   chunk the host retrieves with those tokens and swaps the result into the fixed-size memory
   buffer (memories are replaced, the KV cache is kept). Shapes are static: no recompiles.
3. `rag` retrieves once with the first 64 prompt tokens and prepends the references' tokens to
   the prompt; `none` reads nothing.

Retrieval runs on a background thread: the prompt retrieval of the next batch in
`generate_many` overlaps the decoding of the current one, and the bank reads of one retrieval
are issued together. The memory used by generated chunk k+1 depends on the text of chunk k, so
that one swap per chunk is on the critical path by construction; `GenerationStats` measures it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import DecodeConfig, ModelConfig
from m3jax.model.cache import KVCache, extend, init_cache
from m3jax.model.memory import ChunkMemory, MemoryKV
from m3jax.model.transformer import Params, check_params, prefix_kv

Array = jax.Array
Mode = Literal["memory", "rag", "none"]
MODES: tuple[str, ...] = ("memory", "rag", "none")


class MemorySource(Protocol):
    """What decoding needs from a retriever (`m3jax.memory.retrieve.Retriever` implements it)."""

    k: int

    def retrieve(self, queries: Sequence[Sequence[int]]) -> tuple[np.ndarray, MemoryKV]:
        """Token chunks -> (reference ids [n, k] with -1 for none, MemoryKV of n * k memories,
        masked where there is no reference)."""

    def reference_tokens(self, ids: np.ndarray) -> list[list[list[int]]]:
        """Reference ids [n, k] -> their token ids (for RAG)."""


# ------------------------------------------------------------------------------ sampling
def sample(logits_BV: Array, key: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """Greedy when temperature == 0; else temperature / top-k / top-p (nucleus) sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_l, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass < top_p
        keep = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_l, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ jitted steps
@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(4,))
def _prefill(params: Params, config: ModelConfig, prefix, tokens_BP: Array, cache: KVCache,
             lengths_B: Array, memory: ChunkMemory | None):
    logits, cache = extend(params, config, tokens_BP, cache, memory=memory, prefix=prefix,
                           new_lengths=lengths_B)
    last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


@functools.partial(jax.jit, static_argnums=(1, 2), donate_argnums=(4,))
def _decode_chunk(params: Params, config: ModelConfig, sampling: tuple[float, int, float], prefix,
                  cache: KVCache, memory: ChunkMemory | None, logits_BV: Array, key: Array,
                  step0: Array, n_steps: Array, done_B: Array, budget_B: Array, stop_S: Array):
    """Generate up to `n_steps` (<= chunk_size) tokens: sample, feed with `memory`, repeat.

    Returns (tokens [B, chunk_size] (pad after a sequence is done), steps run, cache, logits,
    done, budget). Sequence b stops after `budget_B[b]` more tokens or a stop token.
    """
    temperature, top_k, top_p = sampling
    B = logits_BV.shape[0]
    out0 = jnp.full((B, config.chunk_size), config.pad_id, jnp.int32)

    def cond(s):
        i, _, _, _, done, _ = s
        return (i < n_steps) & ~jnp.all(done)

    def body(s):
        i, out, cache, logits, done, budget = s
        tok = sample(logits, jax.random.fold_in(key, step0 + i), temperature, top_k, top_p)
        tok = jnp.where(done, config.pad_id, tok)
        out = out.at[:, i].set(tok)
        budget = budget - jnp.where(done, 0, 1)
        done = done | jnp.any(tok[:, None] == stop_S[None, :], axis=-1) | (budget <= 0)
        lo, cache = extend(params, config, tok[:, None], cache, memory=memory, prefix=prefix)
        return i + 1, out, cache, lo[:, 0], done, budget

    i, out, cache, logits, done, budget = jax.lax.while_loop(
        cond, body, (jnp.int32(0), out0, cache, logits_BV, done_B, budget_B))
    return out, i, cache, logits, done, budget


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _arrange(mem: MemoryKV, batch: int, chunks: int, dtype) -> ChunkMemory:
    cm = ChunkMemory.from_memories(mem, batch, chunks)
    return cm.replace(k_LBCSKH=cm.k_LBCSKH.astype(dtype), v_LBCSKH=cm.v_LBCSKH.astype(dtype))


# ------------------------------------------------------------------------------ results
@dataclass
class GenerationStats:
    """Counters and timings of one `generate` call (seconds unless noted)."""

    mode: str = "none"
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    retrievals: int = 0  # retrieval calls (a prefill retrieval counts once per chunk column)
    memory_swaps: int = 0  # memory buffer replacements during generation
    swap_steps: list[int] = field(default_factory=list)  # generated-token index of each swap
    retrieval_s: float = 0.0  # time spent waiting for retrieval on the critical path
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence (stop token included if hit)
    texts: list[str] | None
    stats: GenerationStats
    retrieved: list[list[np.ndarray]]  # per sequence, per chunk used: reference ids [k]


# ------------------------------------------------------------------------------ the generator
class Generator:
    """Batched generation in `memory`, `rag` or `none` mode from one model.

    >>> gen = Generator(params, config, tokenizer, retriever)
    >>> gen.generate(["The capital of France is"], mode="memory").texts
    """

    def __init__(self, params: Params, config: ModelConfig, tokenizer=None,
                 retriever: MemorySource | None = None, decode_config: DecodeConfig = DecodeConfig()):
        check_params(params, config)
        if decode_config.prompt_bucket % config.chunk_size:
            raise ValueError(f"DecodeConfig.prompt_bucket ({decode_config.prompt_bucket}) must be a "
                             f"multiple of chunk_size ({config.chunk_size})")
        if decode_config.max_cache_len > config.max_len:
            raise ValueError(f"DecodeConfig.max_cache_len ({decode_config.max_cache_len}) exceeds the "
                             f"model's max_len ({config.max_len})")
        if retriever is not None and retriever.k != config.memories_per_chunk:
            raise ValueError(f"retriever returns {retriever.k} memories per chunk but the model reads "
                             f"memories_per_chunk={config.memories_per_chunk}")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.retriever = retriever
        self.decode_config = decode_config
        self.prefix = jax.jit(prefix_kv, static_argnums=1)(params, config)  # constant: once
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3jax-retrieve")

    # ---------------------------------------------------------------- helpers
    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
                ids = [self.config.bos_id] + self.tokenizer.encode(p)  # the model's BOS, always
            else:
                ids = [int(t) for t in p]
                if not ids or ids[0] != self.config.bos_id:
                    ids = [self.config.bos_id] + ids
            if len(ids) <= 1:
                raise ValueError("empty prompt: give at least one token of text")
            out.append(ids)
        if not out:
            raise ValueError("no prompts given")
        return out

    def _chunk_memory(self, queries: list[list[int]], batch: int, chunks: int) -> tuple[ChunkMemory, np.ndarray]:
        """Retrieve for batch * chunks token queries (empty query -> masked block)."""
        ids, mem = self.retriever.retrieve(queries)
        mem.check(self.config)
        empty = np.array([len(q) == 0 for q in queries])
        if empty.any():  # chunks past the end of a prompt read nothing
            mask = np.asarray(mem.mask_NT).reshape(len(queries), -1, mem.mask_NT.shape[1]).copy()
            mask[empty] = False
            mem = MemoryKV(mem.kv_NLZKTH, jnp.asarray(mask.reshape(mem.mask_NT.shape)))
            ids = np.where(empty[:, None], -1, ids)
        return _arrange(mem, batch, chunks, jnp.dtype(self.config.dtype)), np.asarray(ids)

    def _prompt_queries(self, prompts: list[list[int]], chunks: int) -> list[list[int]]:
        cs = self.config.chunk_size
        return [p[c * cs:(c + 1) * cs] for p in prompts for c in range(chunks)]

    # ---------------------------------------------------------------- main entry
    def generate(self, prompts, *, mode: Mode = "memory", max_new_tokens: int | None = None,
                 stop_tokens: Iterable[int] | None = None, ignore_eos: bool = False,
                 seed: int | None = None,
                 stream: Callable[[list[list[int]]], None] | None = None,
                 _prefetched=None) -> GenerationResult:
        """Generate for a batch of prompts (texts or token ids; BOS is added if missing).

        stream(new_tokens_per_sequence) is called after every generated chunk. EOS stops a
        sequence unless `ignore_eos` (benchmarks generate fixed lengths); `stop_tokens` add more.
        """
        t_start = time.perf_counter()
        c, dc = self.config, self.decode_config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode in ("memory", "rag") and self.retriever is None:
            raise ValueError(f"mode {mode!r} needs a retriever (memory bank + index)")
        if mode == "memory" and not c.memory_enabled:
            raise ValueError(f"config {c.name!r} has memory off: use mode 'rag' or 'none'")
        max_new = dc.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stops = sorted(({c.eos_id} if not ignore_eos else set()) | set(stop_tokens or ()))
        stops = stops or [-1]  # nothing stops: -1 is never sampled
        prompts = self._encode_prompts(prompts)
        stats = GenerationStats(mode=mode, batch=len(prompts))
        B = len(prompts)
        retrieved: list[list[np.ndarray]] = [[] for _ in range(B)]

        if mode == "rag":  # one retrieval with the first chunk, references prepended
            t0 = time.perf_counter()
            first = [p[: c.chunk_size] for p in prompts]
            ids, _ = self.retriever.retrieve(first) if _prefetched is None else _prefetched
            refs = self.retriever.reference_tokens(np.asarray(ids))
            prompts = [[c.bos_id] + [t for r in rs for t in r] + p[1:] for p, rs in zip(prompts, refs)]
            for b in range(B):
                retrieved[b].append(np.asarray(ids[b]))
            stats.retrieval_s += time.perf_counter() - t0
            stats.retrievals += 1

        lengths = np.array([len(p) for p in prompts], np.int32)
        bucket = dc.prompt_bucket
        P = int(-(-lengths.max() // bucket) * bucket)
        if lengths.max() + max_new > dc.max_cache_len:
            raise ValueError(f"prompt of {lengths.max()} tokens + {max_new} new tokens exceeds the KV cache "
                             f"(max_cache_len={dc.max_cache_len})")
        # The cache is sized per call (bucketed to powers of two, so a few sizes compile): decoding
        # attends over all S slots, so a cache sized for RAG would slow the other modes down.
        need = max(P, int(lengths.max()) + max_new)
        S = min(max(dc.max_cache_len, P), max(P, 1 << (need - 1).bit_length()))
        if S > c.max_len:
            raise ValueError(f"prompt of {lengths.max()} tokens (bucket {P}) exceeds the model's max_len {c.max_len}")
        tok = np.full((B, P), c.pad_id, np.int32)
        for b, p in enumerate(prompts):
            tok[b, : len(p)] = p
        stats.prompt_tokens = int(lengths.sum())

        memory = None
        if mode == "memory":
            t0 = time.perf_counter()
            chunks = P // c.chunk_size
            if _prefetched is not None:
                memory, ids = _prefetched
            else:
                memory, ids = self._chunk_memory(self._prompt_queries(prompts, chunks), B, chunks)
            ids = ids.reshape(B, chunks, -1)
            last_chunk = (lengths - 1) // c.chunk_size
            for b in range(B):
                retrieved[b].extend(ids[b, : last_chunk[b] + 1])
            stats.retrieval_s += time.perf_counter() - t0
            stats.retrievals += int(last_chunk.max()) + 1

        t0 = time.perf_counter()
        cache = init_cache(c, B, S)
        logits, cache = _prefill(self.params, c, self.prefix, jnp.asarray(tok), cache, jnp.asarray(lengths), memory)
        if memory is not None:  # generated chunk 0 keeps the last prompt chunk's memories
            take = jnp.asarray(last_chunk)
            pick = lambda x: jnp.take_along_axis(x, take.reshape((1, B, 1) + (1,) * (x.ndim - 3)), axis=2)
            memory = ChunkMemory(pick(memory.k_LBCSKH), pick(memory.v_LBCSKH),
                                 jnp.take_along_axis(memory.mask_BCS, take[:, None, None], axis=1))
        jax.block_until_ready(logits)
        stats.prefill_s = time.perf_counter() - t0

        key = jax.random.PRNGKey(dc.seed if seed is None else seed)
        sampling = (float(dc.temperature), int(dc.top_k), float(dc.top_p))
        done = jnp.zeros((B,), bool)
        budget = jnp.full((B,), max_new, jnp.int32)
        stop_arr = jnp.asarray(stops, jnp.int32)
        generated: list[list[int]] = [[] for _ in range(B)]
        finished = np.zeros(B, bool)
        step = 0
        t_dec = 0.0
        while step < max_new and not finished.all():
            n = min(c.chunk_size, max_new - step)
            t0 = time.perf_counter()
            out, ran, cache, logits, done, budget = _decode_chunk(
                self.params, c, sampling, self.prefix, cache, memory, logits, key, jnp.int32(step),
                jnp.int32(n), done, budget, stop_arr)
            out_np, ran = np.asarray(out), int(ran)
            t_dec += time.perf_counter() - t0
            new = []
            for b in range(B):
                row = []
                for t in out_np[b, :ran]:
                    if finished[b]:
                        break
                    row.append(int(t))
                    if int(t) in stops or len(generated[b]) + len(row) >= max_new:
                        finished[b] = True
                generated[b].extend(row)
                new.append(row)
            step += ran
            if stream is not None:
                stream(new)
            if mode == "memory" and step < max_new and not finished.all() and ran == c.chunk_size:
                # swap: the next chunk reads memories retrieved with the chunk just generated
                t0 = time.perf_counter()
                queries = [generated[b][-c.chunk_size:] if not finished[b] else [] for b in range(B)]
                memory, ids = self._pool.submit(self._chunk_memory, queries, B, 1).result()
                for b in range(B):
                    if not finished[b]:
                        retrieved[b].append(ids[b])
                stats.retrieval_s += time.perf_counter() - t0
                stats.retrievals += 1
                stats.memory_swaps += 1
                stats.swap_steps.append(step)
        stats.decode_s = t_dec
        stats.new_tokens = int(sum(len(g) for g in generated))
        stats.total_s = time.perf_counter() - t_start
        texts = [self.tokenizer.decode(g) for g in generated] if self.tokenizer is not None else None
        return GenerationResult(generated, texts, stats, retrieved)

    def generate_many(self, prompt_batches: Sequence[Sequence], *, mode: Mode = "memory",
                      **kwargs) -> list[GenerationResult]:
        """Generate several batches; the prompt retrieval of batch i+1 runs on the background
        thread while batch i decodes."""
        c, dc = self.config, self.decode_config

        def prefetch(batch):
            prompts = self._encode_prompts(batch)
            if mode == "rag":
                return self.retriever.retrieve([p[: c.chunk_size] for p in prompts])
            lengths = np.array([len(p) for p in prompts])
            P = int(-(-lengths.max() // dc.prompt_bucket) * dc.prompt_bucket)
            chunks = P // c.chunk_size
            return self._chunk_memory(self._prompt_queries(prompts, chunks), len(prompts), chunks)

        results = []
        fut = self._pool.submit(prefetch, prompt_batches[0]) if mode != "none" and prompt_batches else None
        for i, batch in enumerate(prompt_batches):
            pre = fut.result() if fut is not None else None
            fut = (self._pool.submit(prefetch, prompt_batches[i + 1])
                   if mode != "none" and i + 1 < len(prompt_batches) else None)
            results.append(self.generate(batch, mode=mode, _prefetched=pre, **kwargs))
        return results
