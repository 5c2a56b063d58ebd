"""Generation with explicit memory (MEMORY3.md, "Reading memories"), RAG and no-memory baselines.

Shape of one `generate` call (all three modes share the model and this code path):

1. Prompts are left-aligned and padded to a bucket (a multiple of `chunk_size`), so a handful of
   prompt lengths compile once each. In `memory` mode every 64-token prompt chunk retrieves its
   own memories with its own text, and the whole prompt is prefilled in ONE jitted call with a
   chunk-to-memory-block mask (no loop over chunks).
2. A round, `decode_round` (a jitted `lax.while_loop`), generates at most one chunk (64 tokens)
   and returns to the host. What a batch carries between rounds is one `DecodeState` pytree
   (KV cache, logits, per-row done / budget / step / key / sampling / stop tokens); the memory
   block is a read-only input beside it. The first generated chunk keeps the memories of the
   last prompt chunk; after each generated chunk the host retrieves with those tokens and swaps
   the result into the fixed-size memory buffer (memories are replaced, the KV cache is kept).
   Shapes are static: no recompiles. The serving engine (`m3jax.serve.engine`) runs the same
   `prefill` and `decode_round`, its rows joining and leaving between rounds.
3. `rag` retrieves once with the first 64 prompt tokens and prepends the references' tokens to
   the prompt (a conversation retrieves with its last user turn and gets the references inside
   that turn, before the question: `rag_query`, `rag_prompt`); `none` reads nothing.

Retrieval runs on a background thread. Within one batch the memories of generated chunk k+1 are
retrieved with the text of chunk k, so they cannot be fetched before chunk k ends: `generate`
(one batch) waits for each swap. `generate_many` keeps `DecodeConfig.pipeline` batches in flight
and gives them the device one chunk at a time: while batch A decodes a chunk, batch B's next
memories (and the next batch's prompt memories) are embedded, searched, read from the bank and
decoded, so waiting on memory is hidden whenever a retrieval is shorter than a chunk of decoding.
The query encoder is enqueued on the device before the other batch's chunk, so on an accelerator
it does not queue behind it. `GenerationStats` separates the retrieval time decoding waited for
from the retrieval time that was hidden, and compilation from tokens/s.

`Generator(..., mesh=mesh)` runs the same jitted calls on a device mesh: params, cache, memory
and state placed by the logical axis rules (`m3jax.model.placement`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from m3jax.config import DecodeConfig, ModelConfig
from m3jax.model.cache import KVCache, extend, grow_cache, init_cache
from m3jax.memory.retrieve import chunk_queries
from m3jax.memory.retrieve import rag_prompt as token_rag_prompt
from m3jax.model.memory import ChunkMemory, MemoryKV
from m3jax.model.placement import cache_sharding, memory_sharding, shard_params
from m3jax.model.transformer import Params, check_params, check_token_ids, prefix_kv, decode_layers, is_decode_layout
from m3jax.runtime import EIGEN_CPU_OPTIONS, CompileMeter, eigen_on_cpu
from m3jax.sharding import batch_sharding, named_sharding
from m3jax.tokenizer import chat_question

Array = jax.Array
Mode = Literal["memory", "rag", "none"]
MODES: tuple[str, ...] = ("memory", "rag", "none")


class MemorySource(Protocol):
    """What decoding needs from a retriever (`m3jax.memory.retrieve.Retriever` implements it).

    Optionally `prepare(queries) -> handle` starts the query embedding early (on the calling
    thread, which enqueues device work in order); the generator then calls
    `retrieve(queries, prepared=handle)` on its background thread.
    """

    k: int

    def retrieve(self, queries: Sequence[Sequence[int]]) -> tuple[np.ndarray, MemoryKV]:
        """Token chunks -> (reference ids [n, k] with -1 for none, MemoryKV of n * k memories,
        masked where there is no reference)."""

    def search(self, queries: Sequence[Sequence[int]]) -> np.ndarray:
        """Token chunks -> reference ids [n, k] (-1 for none), without reading memories (RAG)."""

    def reference_tokens(self, ids: np.ndarray) -> list[list[list[int]]]:
        """Reference ids [n, k] -> their token ids (for RAG)."""


# ------------------------------------------------------------------------------ prompts
def _is_message(x) -> bool:
    """A chat message: a mapping with "role" and "content"."""
    return isinstance(x, dict) and "role" in x and "content" in x


class ChatPrompt(list):
    """The token ids of a conversation (the model's BOS, then the chat template's rendering) that
    keep the conversation itself, so that RAG can put its references inside it (`rag_prompt`)."""

    def __init__(self, ids: Iterable[int], messages: Sequence[dict]):
        super().__init__(ids)
        self.messages = [dict(m) for m in messages]


def encode_conversation(tokenizer, bos_id: int, messages: Sequence[dict]) -> ChatPrompt:
    """A conversation as a prompt: `bos_id` + `Tokenizer.encode_chat(messages)`."""
    return ChatPrompt([bos_id] + tokenizer.encode_chat(messages), messages)


# Tokens that putting one reference inside a conversation may add beyond the reference's own: its
# "Reference: " header, the paragraph break, and re-tokenization at the edges (a server sizes the
# cache of a chat RAG request with it).
RAG_CHAT_TOKENS_PER_REFERENCE = 16


def rag_query(prompt: Sequence[int], tokenizer, chunk_size: int) -> list[int]:
    """The tokens RAG retrieves with: the prompt's first chunk; for a conversation (`ChatPrompt`)
    the first chunk of its last user turn, the question (not the system turn a template puts
    first)."""
    if isinstance(prompt, ChatPrompt):
        return tokenizer.encode(chat_question(prompt.messages))[:chunk_size]
    return list(prompt[:chunk_size])


def rag_prompt(prompt: Sequence[int], references: Sequence[Sequence[int]], tokenizer, bos_id: int) -> list[int]:
    """The prompt RAG decodes: the references' tokens after BOS, before a text prompt; for a
    conversation, the references' texts inside it, in the last user turn before the question
    (`Tokenizer.encode_chat(..., references=)`), rendered again by the chat template."""
    if isinstance(prompt, ChatPrompt):
        texts = [tokenizer.decode(r) for r in references]
        return [bos_id] + tokenizer.encode_chat(prompt.messages, references=texts)
    return [bos_id] + token_rag_prompt(prompt, references)[1:]


# ------------------------------------------------------------------------------ sampling
def sample(logits_BV: Array, key_B: Array, temperature_B: Array, top_k_B: Array, top_p_B: Array) -> Array:
    """One token per row, each row with its own key and settings: greedy (argmax) where the
    temperature is 0; else the logits divided by the temperature, cut to the top-k (0 = off), then
    to the smallest set whose probability reaches top_p (1 = off), and sampled."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def filtered(logits):
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        V = logits.shape[-1]
        k = jnp.clip(jnp.where(top_k_B > 0, top_k_B, V), 1, V)
        kth = jnp.take_along_axis(sorted_l, (k - 1)[:, None], axis=-1)  # ties with the k-th are kept
        logits, sorted_l = (jnp.where(x < kth, -jnp.inf, x) for x in (logits, sorted_l))
        probs = jax.nn.softmax(sorted_l, axis=-1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass < top_p
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p_B[:, None]) | (top_p_B >= 1.0)[:, None]
        cutoff = jnp.min(jnp.where(keep, sorted_l, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits < cutoff, -jnp.inf, logits)

    def sampled(logits_BV):
        t = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        logits = logits_BV.astype(jnp.float32) / t
        logits = jax.lax.cond(jnp.any((top_k_B > 0) | (top_p_B < 1.0)), filtered, lambda x: x, logits)
        tok = jax.vmap(jax.random.categorical)(key_B, logits).astype(jnp.int32)
        return jnp.where(temperature_B > 0, tok, greedy)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda _: greedy, logits_BV)


def row_keys(seed: int, rows: int) -> Array:
    """Raw PRNG keys [rows, 2] of a batch's rows: row b's key is fold_in(PRNGKey(seed), b), so a
    prompt samples the same tokens at the same row of any batch (and a served request with
    `seed` samples as row 0 of `Generator.generate` with that seed)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), jnp.arange(rows))


# ------------------------------------------------------------------------------ decode state
@struct.dataclass
class DecodeState:
    """What a batch of B rows carries from one decode round to the next (all on the device).

    cache: the KV cache; logits_BV: float32 logits of each row's next token; done_B: the row
    has finished (stop token, budget spent, or a free serving slot); budget_B: tokens it may
    still generate; step_B: tokens generated so far, folded into key_B (raw uint32 [B, 2]) to
    sample token i; temperature_B (0 = greedy), top_k_B (0 = off), top_p_B (1 = off): its
    sampling; stops_BX: token ids that end the row ([B, X], -1 pads: never sampled).
    """

    cache: KVCache
    logits_BV: Array
    done_B: Array
    budget_B: Array
    step_B: Array
    key_B: Array
    temperature_B: Array
    top_k_B: Array
    top_p_B: Array
    stops_BX: Array

    @classmethod
    def create(cls, cache: KVCache, logits_BV: Array, *, budget, key_B, stops_BX, temperature=0.0, top_k=0,
               top_p=1.0, done=False) -> "DecodeState":
        """A state after a prefill: scalars (or per-row arrays) broadcast to the B rows; `stops_BX`
        one list of stop ids for every row, or one per row."""
        B = logits_BV.shape[0]
        row = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (B,))  # noqa: E731
        stops = jnp.asarray(stops_BX, jnp.int32)  # one list for every row, or [B, X]
        return cls(cache=cache, logits_BV=logits_BV.astype(jnp.float32), done_B=row(done, bool),
                   budget_B=row(budget, jnp.int32), step_B=jnp.zeros((B,), jnp.int32),
                   key_B=jnp.asarray(key_B, jnp.uint32), temperature_B=row(temperature, jnp.float32),
                   top_k_B=row(top_k, jnp.int32), top_p_B=row(top_p, jnp.float32),
                   stops_BX=jnp.broadcast_to(stops, (B, stops.shape[-1])))

    @staticmethod
    def sharding(config: ModelConfig, mesh, batch: int, stops: int) -> "DecodeState":
        """A DecodeState of NamedShardings on `mesh`: rows over the batch axes (data x fsdp, as the
        cache), logits' vocabulary over tensor."""
        row = named_sharding(mesh, ("batch",), (batch,), label="decode")
        pair = named_sharding(mesh, ("batch", None), (batch, 2), label="decode.key")
        return DecodeState(cache=cache_sharding(config, mesh, batch=batch),
                           logits_BV=named_sharding(mesh, ("batch", "vocab"), (batch, config.vocab_size),
                                                    label="decode.logits"),
                           done_B=row, budget_B=row, step_B=row, key_B=pair, temperature_B=row, top_k_B=row,
                           top_p_B=row, stops_BX=named_sharding(mesh, ("batch", None), (batch, stops),
                                                                label="decode.stops"))


# ------------------------------------------------------------------------------ jitted steps
def decode_lanes() -> int:
    """Column blocks per matrix of the decode layout (`transformer.decode_layers`): 2 on a CPU
    with two or more cores, else 1. XLA:CPU runs one matrix product on one thread but
    independent products side by side, so two half-width products per matrix keep two cores
    busy while a round decodes (measured on the 2-core CPU, smollm2-135m, batch 32: 1 block
    ~128 ms per step, 2 blocks ~117 ms, 4 blocks ~133 ms)."""
    return 2 if jax.default_backend() == "cpu" and (os.cpu_count() or 1) >= 2 else 1


@functools.partial(jax.jit, static_argnums=(1,))
def round_params(params: Params, config: ModelConfig) -> Params:
    """The weights as `decode_round` reads them (`decode_layers` in the activation dtype, with
    `decode_lanes()` blocks). Given these instead of the params, a round skips preparing them
    (on CPU ~4% of a 64-token round), at the cost of a second copy of the layer weights: the
    Generator and the serving engine keep one on CPU, where memory is plentiful."""
    return decode_layers(params, jnp.dtype(config.dtype), decode_lanes())


def prepared_round_params(params: Params, config: ModelConfig, mesh: Any = None) -> Params:
    """`round_params(params, config)` on a CPU without a mesh, else `params` unchanged (on an
    accelerator the per-round preparation is cheap next to a second copy of the weights in
    HBM)."""
    return round_params(params, config) if mesh is None and jax.default_backend() == "cpu" else params


compute_prefix = jax.jit(prefix_kv, static_argnums=1)  # module level: new generators reuse the compiled prefix


def _prefill(params: Params, config: ModelConfig, prefix, tokens_BP: Array, cache: KVCache,
            lengths_B: Array, memory: ChunkMemory | None) -> tuple[Array, KVCache]:
    logits, cache = extend(params, config, tokens_BP, cache, memory=memory, prefix=prefix,
                           new_lengths=lengths_B, fresh=True, logits_at=lengths_B - 1)
    return logits[:, 0], cache


_prefill_jit = jax.jit(_prefill, static_argnums=(1,), donate_argnums=(4,))
_prefill_eigen = jax.jit(_prefill, static_argnums=(1,), donate_argnums=(4,), compiler_options=EIGEN_CPU_OPTIONS)


def prefill(params: Params, config: ModelConfig, prefix, tokens_BP: Array, cache: KVCache,
            lengths_B: Array, memory: ChunkMemory | None) -> tuple[Array, KVCache]:
    """Prompts [B, P] (left-aligned, `lengths_B` tokens each) into an empty cache (donated), with
    one memory block per prompt chunk; returns the logits [B, V] of each row's last prompt token
    and the cache. Jitted (float32 on CPU compiled without XLA's YNNPACK fusions: faster there)."""
    fn = _prefill_eigen if eigen_on_cpu(config.dtype) else _prefill_jit
    return fn(params, config, prefix, tokens_BP, cache, lengths_B, memory)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(4,))
def decode_round(params: Params, config: ModelConfig, prefix, memory: ChunkMemory | None, state: DecodeState,
                 n_steps: Array) -> tuple[DecodeState, Array, Array]:
    """One round: up to `n_steps` (<= chunk_size) tokens per row, each sampled, then fed back with
    `memory` (one block per row, [L, B, 1, M, K, H], or None). The jitted `lax.while_loop` stops
    early when every row is done; a done row samples nothing and its cache does not grow.
    `params`: the model's, or `round_params`'s (prepared once for many rounds).

    Returns (the new state, tokens [B, Q] (Q = chunk_size; pad after a row is done or past the
    steps run), steps run). The Generator and the serving engine both decode with it.
    """
    B = state.done_B.shape[0]
    dt = jnp.dtype(config.dtype)
    # per-layer weights in the activation dtype and the decode layout, prepared once per round,
    # not once per step
    layers = params if is_decode_layout(params) else decode_layers(params, dt, decode_lanes())
    out0 = jnp.full((B, config.chunk_size), config.pad_id, jnp.int32)

    def cond(carry):
        i, _, st = carry
        return (i < n_steps) & ~jnp.all(st.done_B)

    def body(carry):
        i, out, st = carry
        keys = jax.vmap(jax.random.fold_in)(st.key_B, st.step_B + i)
        tok = sample(st.logits_BV, keys, st.temperature_B, st.top_k_B, st.top_p_B)
        tok = jnp.where(st.done_B, config.pad_id, tok)
        out = out.at[:, i].set(tok)
        budget = st.budget_B - jnp.where(st.done_B, 0, 1)
        logits, cache = extend(layers, config, tok[:, None], st.cache, memory=memory, prefix=prefix)
        cache = cache.replace(lengths=jnp.where(st.done_B, st.cache.lengths, cache.lengths))  # done rows stay put
        done = st.done_B | jnp.any(tok[:, None] == st.stops_BX, axis=-1) | (budget <= 0)
        return i + 1, out, st.replace(cache=cache, logits_BV=logits[:, 0].astype(jnp.float32), done_B=done,
                                      budget_B=budget)

    as_bits = _carries_bits(state.cache, dt)
    if as_bits:  # the loop carries the cache's bits (see _carries_bits)
        state = state.replace(cache=_bitcast_kv(state.cache, jnp.uint16))
    i, out, state = jax.lax.while_loop(cond, body, (jnp.int32(0), out0, state))
    if as_bits:
        state = state.replace(cache=_bitcast_kv(state.cache, dt))
    return state.replace(step_B=state.step_B + i), out, i


def _carries_bits(cache: KVCache, dt) -> bool:
    """Whether a round carries the cache as its uint16 bits: a 16-bit float cache on CPU. Each
    step writes one token per row (a scatter, which XLA:CPU does not run on bf16); written on the
    bits inside the loop, the cache is bitcast once per round instead of twice per step and layer
    (`transformer._set_slots`; the same values, bit for bit)."""
    return (jax.default_backend() == "cpu" and dt.itemsize == 2 and jnp.issubdtype(dt, jnp.floating)
            and all(a.dtype == dt for a in jax.tree.leaves(cache.kv)))


def _bitcast_kv(cache: KVCache, dtype) -> KVCache:
    return cache.replace(kv=jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, dtype), cache.kv))


def check_mode(mode: str, config: ModelConfig, has_retriever: bool,
               needs: str = "a retriever (memory bank + index)") -> None:
    """Raise ValueError unless `mode` is one of MODES and can run: memory and rag need a
    retriever (`needs` says how to give one), memory needs a model with memory layers."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode in ("memory", "rag") and not has_retriever:
        raise ValueError(f"mode {mode!r} needs {needs}")
    if mode == "memory" and not config.memory_enabled:
        raise ValueError(f"model {config.name!r} has memory off: use mode 'rag' or 'none'")


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def arrange_memory(mem: MemoryKV, batch: int, chunks: int, dtype) -> ChunkMemory:
    """I = batch * chunks * k memories -> the `ChunkMemory` the model reads, in `dtype` (jitted)."""
    cm = ChunkMemory.from_memories(mem, batch, chunks)
    return cm.replace(k_LBCMKH=cm.k_LBCMKH.astype(dtype), v_LBCMKH=cm.v_LBCMKH.astype(dtype))


@jax.jit
def first_round_memory(memory: ChunkMemory, last_B: Array) -> ChunkMemory:
    """After a prefill: each row's memories of its last prompt chunk `last_B[b]`, what its first
    generated chunk reads."""
    return memory.last_chunk(last_B)


# ------------------------------------------------------------------------------ results
@dataclass
class GenerationStats:
    """Counters and timings of one batch's generation (seconds unless noted).

    In a pipelined `generate_many` the batches in flight share the wall clock: `total_s` of one
    batch overlaps the others', so throughput is measured over the whole call.
    """

    mode: str = "none"
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    retrievals: int = 0  # retrieval calls (a prefill retrieval counts once per chunk column)
    memory_swaps: int = 0  # memory buffer replacements during generation
    swap_steps: list[int] = field(default_factory=list)  # generated-token index of each swap
    retrieval_s: float = 0.0  # time decoding waited for retrieval (on the critical path)
    retrieval_work_s: float = 0.0  # time the retrievals took, waited for or hidden behind decoding
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    # JAX compiling (or loading from the persistent cache) while this batch ran: the first call
    # with new shapes; prefill_s, decode_s and total_s include it, tokens_per_s does not
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the batch's wall time, compilation excluded."""
        run_s = self.total_s - self.compile_s
        return self.new_tokens / run_s if run_s > 0 else 0.0

    @property
    def retrieval_hidden_s(self) -> float:
        """Retrieval time that overlapped decoding instead of delaying it."""
        return max(0.0, self.retrieval_work_s - self.retrieval_s)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence (stop token included if hit)
    texts: list[str] | None
    stats: GenerationStats
    retrieved: list[list[np.ndarray]]  # per sequence, per chunk used: reference ids [k]


class _Retrieval:
    """A retrieval running on the generator's background thread: `wait()` -> its result, and the
    seconds the caller waited for it are kept apart from the seconds it worked. `prep_s`: time
    the calling thread already spent on it (starting the query encoder), counted as both."""

    def __init__(self, pool: concurrent.futures.Executor, fn: Callable, *args, prep_s: float = 0.0):
        self.prep_s = prep_s
        self.work_s = prep_s

        def timed():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.work_s = self.prep_s + time.perf_counter() - t0

        self._future = pool.submit(timed)

    def wait(self) -> tuple[object, float]:
        """(result, seconds waited, including the caller's `prep_s`)."""
        t0 = time.perf_counter()
        out = self._future.result()
        return out, self.prep_s + time.perf_counter() - t0


@dataclass(eq=False)
class _Run:
    """One batch between its jitted rounds: device state (`DecodeState`, the memory block its
    next round reads) and host state (tokens so far, the retrieval in flight for its next chunk)."""

    prompts: list[list[int]]
    mode: str
    max_new: int
    stops: list[int]
    stream: Callable[[list[list[int]]], None] | None
    stats: GenerationStats
    retrieved: list[list[np.ndarray]]
    state: DecodeState
    memory: ChunkMemory | None
    cache_len: int  # the most cache slots its rounds may run with (`Generator._cache_len`)
    t_start: float
    compile_s0: float  # the call's compile meter when this batch started
    generated: list[list[int]] = field(default_factory=list)
    finished: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    step: int = 0
    pending: _Retrieval | None = None  # memories of the next chunk, being retrieved
    out: tuple | None = None  # the dispatched round's (tokens, steps run)
    t_dispatch: float = 0.0

    @property
    def complete(self) -> bool:
        return self.out is None and (self.step >= self.max_new or bool(self.finished.all()))


# ------------------------------------------------------------------------------ the generator
class Generator:
    """Batched generation in `memory`, `rag` or `none` mode from one model.

    >>> gen = Generator(params, config, tokenizer, retriever)
    >>> gen.generate(["The capital of France is"], mode="memory").texts

    `generate` runs one batch; `generate_many` runs a list of batches with `decode_config.pipeline`
    of them in flight, so that each batch's per-chunk retrieval runs while another decodes.

    With `mesh` (`m3jax.sharding.make_mesh`) decoding runs sharded through the same jitted
    prefill and rounds: params, KV cache, memory and decode state are placed by the logical axis
    rules (`m3jax.model.placement`; rows over data x fsdp, heads over tensor) and the jitted calls
    run under `jax.set_mesh(mesh)`.

    The retrievals run on a background thread: `close()` (or `with Generator(...) as gen:`)
    ends it.
    """

    def __init__(self, params: Params, config: ModelConfig, tokenizer=None,
                 retriever: MemorySource | None = None, decode_config: DecodeConfig = DecodeConfig(), *,
                 mesh: Any = None):
        check_params(params, config)
        if decode_config.max_cache_len is None:  # the default follows the model
            decode_config = dataclasses.replace(decode_config, max_cache_len=config.max_len)
        if decode_config.prompt_bucket % config.chunk_size:
            raise ValueError(f"DecodeConfig.prompt_bucket ({decode_config.prompt_bucket}) must be a "
                             f"multiple of chunk_size ({config.chunk_size})")
        if decode_config.max_cache_len > config.max_len:
            raise ValueError(f"DecodeConfig.max_cache_len ({decode_config.max_cache_len}) exceeds the "
                             f"model's max_len ({config.max_len})")
        if retriever is not None and retriever.k != config.memories_per_chunk:
            raise ValueError(f"retriever returns {retriever.k} memories per chunk but the model reads "
                             f"memories_per_chunk={config.memories_per_chunk}")
        self.mesh = mesh
        self._cache_makers: dict[tuple[int, int], Callable[[], KVCache]] = {}
        if mesh is not None:
            params = shard_params(params, config, mesh)
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.retriever = retriever
        self.decode_config = decode_config
        with self._on_mesh():  # constant: once per generator, compiled once per config
            self.prefix = compute_prefix(params, config)
        self._round_params = prepared_round_params(params, config, mesh)
        # One worker: retrievals run in the order they were asked for, and the index and the bank
        # are never used by two threads at once (only the query encoder is enqueued, thread-safely,
        # from the calling thread by `prepare`).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3jax-retrieve")

    def close(self) -> None:
        """End the retrieval thread (waiting for a retrieval in flight). The generator cannot
        generate afterwards."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_mesh(self):
        """`jax.set_mesh(self.mesh)` around jitted calls (their `constrain`s read it); nothing
        without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _empty_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache; on a mesh made directly in its shards (one jitted maker per shape)."""
        if self.mesh is None:
            return init_cache(self.config, batch, length)
        if (batch, length) not in self._cache_makers:
            self._cache_makers[batch, length] = jax.jit(
                functools.partial(init_cache, self.config, batch, length),
                out_shardings=cache_sharding(self.config, self.mesh, batch=batch))
        return self._cache_makers[batch, length]()

    def _place(self, x, sharding):
        """`x` on the mesh with `sharding` (a pytree of shardings); unchanged without a mesh."""
        return x if self.mesh is None else jax.device_put(x, sharding)

    # ---------------------------------------------------------------- helpers
    def _encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_message(prompts[0])):
            prompts = [prompts]  # one text or one conversation
        out = []
        for p in prompts:
            if isinstance(p, (list, tuple)) and p and _is_message(p[0]):  # a conversation: the chat template
                if self.tokenizer is None:
                    raise ValueError("chat prompts need a tokenizer (its chat template)")
                ids = encode_conversation(self.tokenizer, self.config.bos_id, p)
            elif isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
                ids = [self.config.bos_id] + self.tokenizer.encode(p)  # the model's BOS, always
            else:
                ids = [int(t) for t in p]
                if not ids or ids[0] != self.config.bos_id:
                    ids = [self.config.bos_id] + ids
            if len(ids) <= 1:
                raise ValueError("empty prompt: give at least one token of text")
            check_token_ids(ids, self.config, f"prompt {len(out)}")
            out.append(ids)
        if not out:
            raise ValueError("no prompts given")
        return out

    def _chunk_memory(self, queries: list[list[int]], batch: int, chunks: int,
                      prepared=None) -> tuple[ChunkMemory, np.ndarray]:
        """Retrieve for batch * chunks token queries (empty query -> masked block)."""
        if prepared is not None:
            ids, mem = self.retriever.retrieve(queries, prepared=prepared)
        else:
            ids, mem = self.retriever.retrieve(queries)
        mem.check(self.config)
        # An empty query (a chunk past the end of a prompt, a finished sequence) is only read by
        # padding; `Retriever` gives it no references.
        memory = arrange_memory(mem, batch, chunks, jnp.dtype(self.config.dtype))
        if self.mesh is not None:
            memory = self._place(memory, memory_sharding(self.config, self.mesh, memory=memory))
        return memory, np.asarray(ids)

    def _retrieval(self, queries: list[list[int]], batch: int, chunks: int) -> _Retrieval:
        """Start retrieving memories for `queries` on the background thread. The query encoder is
        enqueued on the device first, from this thread, before the caller enqueues more decoding."""
        t0 = time.perf_counter()
        prepare = getattr(self.retriever, "prepare", None)
        prepared = prepare(queries) if prepare is not None else None
        return _Retrieval(self._pool, self._chunk_memory, queries, batch, chunks, prepared,
                          prep_s=time.perf_counter() - t0)

    def _prompt_queries(self, prompts: list[list[int]], chunks: int) -> list[list[int]]:
        return [q for p in prompts for q in chunk_queries(p, self.config.chunk_size, chunks)]

    def _padded_len(self, prompts: list[list[int]]) -> int:
        """The prompt bucket of a batch (a multiple of `prompt_bucket`, hence of chunk_size)."""
        bucket = self.decode_config.prompt_bucket
        return -(-max(len(p) for p in prompts) // bucket) * bucket

    def _cache_len(self, P: int, need: int) -> int:
        """Slots of a cache for `need` tokens (prompt bucket P): the next power of two, at least P,
        at most max_cache_len (a few sizes compile). Decoding attends over all slots, so a cache is
        sized per call (a cache sized for RAG would slow the other modes down)."""
        need = max(P, need)
        return min(max(self.decode_config.max_cache_len, P), max(P, 1 << (need - 1).bit_length()))

    def _round_cache_len(self, P: int, cache_len: int, need: int) -> int:
        """Slots of the cache a round runs with, for `need` tokens by its end: with
        `DecodeConfig.grow_cache`, `need` up to a multiple of chunk_size (at least P), else the
        call's `cache_len` (`_cache_len`), which it never exceeds."""
        if not self.decode_config.grow_cache:
            return cache_len
        cs = self.config.chunk_size
        return min(cache_len, max(P, -(-need // cs) * cs))

    def _check_mode(self, mode: str) -> None:
        check_mode(mode, self.config, self.retriever is not None)

    def _prompt_retrieval(self, prompts: list[list[int]], mode: str) -> _Retrieval | None:
        """The retrieval a batch needs before its prefill: each prompt chunk's memories (`memory`)
        or the first chunk's references (`rag`)."""
        if mode == "rag":
            first = [rag_query(p, self.tokenizer, self.config.chunk_size) for p in prompts]
            return _Retrieval(self._pool, self.retriever.search, first)
        if mode == "memory":
            chunks = self._padded_len(prompts) // self.config.chunk_size
            return self._retrieval(self._prompt_queries(prompts, chunks), len(prompts), chunks)
        return None

    # ---------------------------------------------------------------- one batch, step by step
    def _start(self, prompts: list[list[int]], mode: str, max_new: int, stops: list[int], seed: int | None,
               stream, retrieval: _Retrieval | None, meter: CompileMeter) -> _Run:
        """Retrieval for the prompt (given, or started here), then the prefill."""
        t_start, compile_s0 = time.perf_counter(), meter.seconds
        c, dc = self.config, self.decode_config
        B = len(prompts)
        stats = GenerationStats(mode=mode, batch=B)
        retrieved: list[list[np.ndarray]] = [[] for _ in range(B)]
        if retrieval is None:
            retrieval = self._prompt_retrieval(prompts, mode)

        if mode == "rag":  # one retrieval with the first chunk, references prepended
            ids, waited = retrieval.wait()
            t0 = time.perf_counter()
            refs = self.retriever.reference_tokens(np.asarray(ids))
            prompts = [rag_prompt(p, rs, self.tokenizer, c.bos_id) for p, rs in zip(prompts, refs)]
            for b in range(B):
                retrieved[b].append(np.asarray(ids[b]))
            stats.retrieval_s += waited + time.perf_counter() - t0
            stats.retrieval_work_s += retrieval.work_s + time.perf_counter() - t0
            stats.retrievals += 1

        lengths = np.array([len(p) for p in prompts], np.int32)
        P = self._padded_len(prompts)
        if lengths.max() + max_new > dc.max_cache_len:
            raise ValueError(f"prompt of {lengths.max()} tokens + {max_new} new tokens exceeds the KV cache "
                             f"(max_cache_len={dc.max_cache_len})")
        cache_len = self._cache_len(P, int(lengths.max()) + max_new)
        if cache_len > c.max_len:
            raise ValueError(f"prompt of {lengths.max()} tokens (bucket {P}) exceeds the model's max_len {c.max_len}")
        S = self._round_cache_len(P, cache_len, int(lengths.max()) + min(c.chunk_size, max_new))
        tok = np.full((B, P), c.pad_id, np.int32)
        for b, p in enumerate(prompts):
            tok[b, : len(p)] = p
        stats.prompt_tokens = int(lengths.sum())

        memory = None
        if mode == "memory":
            (memory, ids), waited = retrieval.wait()
            chunks = P // c.chunk_size
            ids = ids.reshape(B, chunks, -1)
            last_chunk = (lengths - 1) // c.chunk_size
            for b in range(B):
                retrieved[b].extend(ids[b, : last_chunk[b] + 1])
            stats.retrieval_s += waited
            stats.retrieval_work_s += retrieval.work_s
            stats.retrievals += int(last_chunk.max()) + 1

        t0 = time.perf_counter()
        seed = dc.seed if seed is None else seed
        with self._on_mesh():
            cache = self._empty_cache(B, S)
            rows = batch_sharding(self.mesh, (B,)) if self.mesh is not None else None
            tok_sh = batch_sharding(self.mesh, tok.shape) if self.mesh is not None else None
            logits, cache = prefill(self.params, c, self.prefix, self._place(jnp.asarray(tok), tok_sh), cache,
                                    self._place(jnp.asarray(lengths), rows), memory)
            if memory is not None:  # generated chunk 0 keeps the last prompt chunk's memories
                memory = first_round_memory(memory, self._place(jnp.asarray(last_chunk, jnp.int32), rows))
                if self.mesh is not None:
                    memory = self._place(memory, memory_sharding(c, self.mesh, memory=memory))
            state = DecodeState.create(cache, logits, budget=max_new, key_B=row_keys(seed, B), stops_BX=stops,
                                       temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p)
            if self.mesh is not None:
                state = self._place(state, DecodeState.sharding(c, self.mesh, B, len(stops)))
        jax.block_until_ready(logits)
        stats.prefill_s = time.perf_counter() - t0
        return _Run(prompts=prompts, mode=mode, max_new=max_new, stops=stops, stream=stream, stats=stats,
                    retrieved=retrieved, state=state, memory=memory, cache_len=cache_len, t_start=t_start,
                    compile_s0=compile_s0,
                    generated=[[] for _ in range(B)], finished=np.zeros(B, bool))

    def _dispatch(self, run: _Run) -> None:
        """Swap in the memories retrieved for the next chunk (waiting for them if they are not
        there yet), then enqueue the jitted round; returns without waiting for the device."""
        c = self.config
        if run.pending is not None:
            (run.memory, ids), waited = run.pending.wait()
            for b in range(len(run.prompts)):
                if not run.finished[b]:
                    run.retrieved[b].append(ids[b])
            run.stats.retrieval_s += waited
            run.stats.retrieval_work_s += run.pending.work_s
            run.pending = None
        n = min(c.chunk_size, run.max_new - run.step)
        run.t_dispatch = time.perf_counter()
        with self._on_mesh():
            need = max(len(p) for p in run.prompts) + run.step + n
            S = self._round_cache_len(self._padded_len(run.prompts), run.cache_len, need)
            if S > run.state.cache.max_len:  # room for this round (DecodeConfig.grow_cache)
                cache = grow_cache(run.state.cache, S)
                if self.mesh is not None:
                    cache = self._place(cache, cache_sharding(c, self.mesh, batch=len(run.prompts)))
                run.state = run.state.replace(cache=cache)
            run.state, out, ran = decode_round(self._round_params, c, self.prefix, run.memory, run.state,
                                               jnp.int32(n))
        run.out = (out, ran)

    def _collect(self, run: _Run) -> None:
        """Wait for the dispatched chunk, record its tokens, stream them, and start the retrieval
        of the next chunk's memories with the chunk just generated."""
        c = self.config
        out, ran = run.out
        out_np, ran = jax.device_get((out, ran))  # one transfer for both
        ran = int(ran)
        run.out = None
        run.stats.decode_s += time.perf_counter() - run.t_dispatch
        new = []
        for b in range(len(run.prompts)):
            row = []
            for t in out_np[b, :ran]:
                if run.finished[b]:
                    break
                row.append(int(t))
                if int(t) in run.stops or len(run.generated[b]) + len(row) >= run.max_new:
                    run.finished[b] = True
            run.generated[b].extend(row)
            new.append(row)
        run.step += ran
        if run.stream is not None:
            run.stream(new)
        if run.mode == "memory" and not run.complete and ran == c.chunk_size:
            # swap: the next chunk reads memories retrieved with the chunk just generated
            queries = [g[-c.chunk_size:] if not f else [] for g, f in zip(run.generated, run.finished)]
            run.pending = self._retrieval(queries, len(run.prompts), 1)
            run.stats.retrievals += 1
            run.stats.memory_swaps += 1
            run.stats.swap_steps.append(run.step)

    def _finish(self, run: _Run, meter: CompileMeter) -> GenerationResult:
        s = run.stats
        s.new_tokens = int(sum(len(g) for g in run.generated))
        s.total_s = time.perf_counter() - run.t_start
        s.compile_s = meter.seconds - run.compile_s0
        texts = [self.tokenizer.decode(g) for g in run.generated] if self.tokenizer is not None else None
        return GenerationResult(run.generated, texts, s, run.retrieved)

    def _options(self, mode: str, max_new_tokens: int | None, stop_tokens, ignore_eos: bool) -> tuple[int, list[int]]:
        self._check_mode(mode)
        c = self.config
        max_new = self.decode_config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stops = sorted((set(c.end_ids) if not ignore_eos else set()) | set(stop_tokens or ()))
        return max_new, stops or [-1]  # nothing stops: -1 is never sampled

    # ---------------------------------------------------------------- main entries
    def generate(self, prompts, *, mode: Mode = "memory", max_new_tokens: int | None = None,
                 stop_tokens: Iterable[int] | None = None, ignore_eos: bool = False,
                 seed: int | None = None,
                 stream: Callable[[list[list[int]]], None] | None = None) -> GenerationResult:
        """Generate for a batch of prompts (texts or token ids; BOS is added if missing). A prompt
        may also be a conversation, [{"role": "user", "content": ...}, ...], rendered by the
        tokenizer's chat template (`Tokenizer.encode_chat`) with the generation prompt, so an
        instruct model answers it; in `rag` mode the references go inside the conversation (the
        last user turn, before the question: `rag_prompt`), retrieved with that question.

        stream(new_tokens_per_sequence) is called after every generated chunk. EOS (any of the
        config's `end_ids`) stops a sequence unless `ignore_eos` (benchmarks generate fixed
        lengths); `stop_tokens` add more.
        One batch alone: each memory swap waits for its retrieval (use `generate_many` to hide it).
        """
        max_new, stops = self._options(mode, max_new_tokens, stop_tokens, ignore_eos)
        prompts = self._encode_prompts(prompts)
        with CompileMeter() as meter:
            run = self._start(prompts, mode, max_new, stops, seed, stream, None, meter)
            while not run.complete:
                self._dispatch(run)
                self._collect(run)
            return self._finish(run, meter)

    def generate_many(self, prompt_batches: Sequence[Sequence], *, mode: Mode = "memory",
                      max_new_tokens: int | None = None, stop_tokens: Iterable[int] | None = None,
                      ignore_eos: bool = False, seed: int | None = None, pipeline: int | None = None,
                      on_result: Callable[[int, GenerationResult], None] | None = None
                      ) -> list[GenerationResult]:
        """Generate several batches (results in order), `pipeline` of them in flight (default
        `decode_config.pipeline`).

        Batches take turns one chunk at a time: while batch A decodes a chunk on the device,
        the host retrieves the memories batch B needs next (with the chunk B just generated) and
        the prompt memories of the batch after them, so that no batch waits on memory as long as
        a retrieval takes less than a chunk of decoding. Each batch's tokens are those
        `generate` would give it alone (same seed). on_result(i, result) is called as soon as
        batch i is done (batches may finish out of order).
        """
        depth = self.decode_config.pipeline if pipeline is None else int(pipeline)
        if depth < 1:
            raise ValueError(f"pipeline must be >= 1, got {depth}")
        max_new, stops = self._options(mode, max_new_tokens, stop_tokens, ignore_eos)
        batches = [self._encode_prompts(b) for b in prompt_batches]
        for i, b in enumerate(batches):  # fail before any work (RAG lengths are known only later)
            longest = max(len(p) for p in b)
            if mode != "rag" and longest + max_new > self.decode_config.max_cache_len:
                raise ValueError(f"batch {i}: prompt of {longest} tokens + {max_new} new tokens exceeds the KV "
                                 f"cache (max_cache_len={self.decode_config.max_cache_len})")
        results: list[GenerationResult | None] = [None] * len(batches)
        with CompileMeter() as meter:
            self._turns(batches, mode, max_new, stops, seed, depth, on_result, results, meter)
        return results

    def _turns(self, batches, mode, max_new, stops, seed, depth, on_result, results, meter) -> None:
        """`generate_many`'s loop: batches take turns on the device, `depth` of them in flight."""
        prompt_retrievals: dict[int, _Retrieval | None] = {}

        def ask(i: int) -> None:  # start a batch's prompt retrieval ahead of its turn
            if i < len(batches) and i not in prompt_retrievals:
                prompt_retrievals[i] = self._prompt_retrieval(batches[i], mode)

        active: list[tuple[int, _Run]] = []
        nxt = 0
        while nxt < len(batches) or active:
            for j in range(nxt, nxt + depth - len(active)):  # free slots: their prompts retrieve together
                ask(j)
            while len(active) < depth and nxt < len(batches):
                active.append((nxt, self._start(batches[nxt], mode, max_new, stops, seed, None,
                                                prompt_retrievals.pop(nxt), meter)))
                nxt += 1
            for i, run in list(active):
                if not run.complete:
                    self._dispatch(run)
                    if run.step + self.config.chunk_size >= run.max_new:
                        ask(nxt)  # its last chunk: the next batch's prompt retrieves meanwhile
                    self._collect(run)
                if run.complete:
                    results[i] = self._finish(run, meter)
                    active.remove((i, run))
                    if on_result is not None:
                        on_result(i, results[i])
