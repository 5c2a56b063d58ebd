"""The serving engine: one decode loop owns the device; requests join and leave at round boundaries.

    submit(request) --bounded queue--> admit into a free slot of a group (a fixed batch of slots
    with one KV cache) --prompt retrieval (pool thread)--> prefill of the joiners (decode's
    jitted `prefill`) --> rows inserted into the group's `DecodeState` (jitted scatter) -->
    64-token rounds (decode's `decode_round`, the Generator's own, each row with its own
    sampling) --> tokens and the references each chunk read, streamed to the request --> its
    slot freed at the next boundary

Static shapes: a group holds `slots` rows in a cache of S positions (S from a few powers of two,
chosen when the group is empty for what its first request needs), so rounds compile once per S
and prefills once per (joiner batch, prompt bucket, S). Groups take turns on the device: while
one decodes a round, the memories the other needs next (retrieved with the chunk it just
generated) and the prompt memories of its joiners are retrieved on the host, as
`Generator.generate_many` overlaps batches. The next group's round is enqueued before the
previous one is collected, so the device never waits for the host's bookkeeping.

Modes share a group: a `rag` or `none` row reads an all-masked memory block (all-masked memory
== no memory). Knowledge updates run on the retrieval thread, between two retrievals, so they
never race a search; a retriever over the new index replaces the old one for the next round.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ModelConfig
from m3jax.decode import (RAG_CHAT_TOKENS_PER_REFERENCE, ChatPrompt, DecodeState, arrange_memory, check_mode,
                          compute_prefix, decode_round, first_round_memory, prefill, prepared_round_params,
                          rag_prompt, rag_query, row_keys)
from m3jax.memory.retrieve import chunk_queries
from m3jax.model.cache import init_cache
from m3jax.model.memory import ChunkMemory
from m3jax.model.transformer import Params, check_params

log = logging.getLogger("m3jax.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Slots, cache sizes, queue and timeouts of the serving engine."""

    slots: int = 16  # rows per group (the batch of one decode round)
    groups: int = 2  # groups taking turns on the device (retrieval of one hides behind another)
    cache_len: int = 1024  # largest KV cache per row: prompt (+ RAG references) + generated
    min_cache_len: int = 256  # smallest group cache (groups use powers of two in between)
    queue_size: int = 256  # waiting requests beyond which submit() refuses (HTTP 429)
    request_timeout_s: float = 300.0  # a request still running after this is ended, its slot freed
    max_tokens_default: int = 256  # when the request gives none (chat)
    retry_after_s: int = 1  # the Retry-After a refused request is told

    def __post_init__(self) -> None:
        for name in ("slots", "groups", "cache_len", "min_cache_len", "queue_size", "max_tokens_default"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"ServeConfig.request_timeout_s must be > 0, got {self.request_timeout_s}")


class QueueFull(RuntimeError):
    """The engine's queue is full: try again after `retry_after_s`."""


class ContextTooLong(ValueError):
    """A prompt and its max_tokens do not fit in the server's context."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


# ------------------------------------------------------------------------------ jitted pieces
@functools.partial(jax.jit, donate_argnums=(0,))
def _insert_rows(state: DecodeState, rows: DecodeState, slots: jax.Array) -> DecodeState:
    """Write the joiners' rows into a group's state at `slots` (one per row; a slot >= the
    group's rows drops the row: padding of the joiner batch). Every leaf is row-major."""
    return jax.tree.map(lambda big, small: big.at[slots].set(small.astype(big.dtype), mode="drop"), state, rows)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert_memory(memory: ChunkMemory, rows: ChunkMemory, slots: jax.Array) -> ChunkMemory:
    """`_insert_rows` for a group's memory block (k, v carry the rows on axis 1)."""
    put = lambda big, small, axis: big.at[(slice(None),) * axis + (slots,)].set(  # noqa: E731
        small.astype(big.dtype), mode="drop")
    return ChunkMemory(put(memory.k_LBCMKH, rows.k_LBCMKH, 1), put(memory.v_LBCMKH, rows.v_LBCMKH, 1),
                       put(memory.mask_BCM, rows.mask_BCM, 0))


@functools.partial(jax.jit, donate_argnums=(0,))
def _merge_memory(old: ChunkMemory, new: ChunkMemory, rows_B: jax.Array) -> ChunkMemory:
    """Swap in the memories of rows `rows_B` (the others keep theirs)."""
    sel = lambda a, b: jnp.where(rows_B.reshape((1, -1) + (1,) * (a.ndim - 2)), b.astype(a.dtype), a)  # noqa: E731
    return ChunkMemory(sel(old.k_LBCMKH, new.k_LBCMKH), sel(old.v_LBCMKH, new.v_LBCMKH),
                       jnp.where(rows_B[:, None, None], new.mask_BCM, old.mask_BCM))


# ------------------------------------------------------------------------------ requests
@dataclass(eq=False)
class Request:
    """One generation request. Events go to `on_event(kind, payload)` from the engine thread:
    ("chunk", {"tokens", "references"}), ("done", {"finish_reason"}), ("error", {"message"})."""

    prompt: list[int]
    mode: str = "memory"
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens whatever is sampled (benchmarks)
    on_event: Callable[[str, dict], None] = lambda kind, payload: None
    id: int = field(default_factory=itertools.count().__next__)
    t_submit: float = 0.0
    t_first: float | None = None
    cancelled: str | None = None  # why, once cancelled (client gone, stop string, timeout)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_references: list = field(default_factory=list)  # per prompt chunk (memory) / the RAG refs

    def cancel(self, reason: str = "cancelled") -> None:
        """Free the request's slot at the next round boundary (thread-safe)."""
        if self.cancelled is None:
            self.cancelled = reason


@dataclass(eq=False)
class _Row:
    """A request in a slot: the tokens generated so far and the references its next chunk reads."""

    req: Request
    prompt: list[int]  # with RAG references when mode == "rag"
    refs: list  # what the chunk being generated reads
    generated: list[int] = field(default_factory=list)
    chunk: int = 0


@dataclass(eq=False)
class _Group:
    index: int
    slots: int
    S: int = 0  # cache positions per row (0: not allocated)
    state: DecodeState | None = None
    memory: ChunkMemory | None = None  # the block each row's next round reads (None: no memory rows)
    rows: list = field(default_factory=list)  # _Row | None per slot
    joining: list = field(default_factory=list)  # (slot, Request) reserved, not yet prefilled
    join_future: concurrent.futures.Future | None = None
    swap_future: concurrent.futures.Future | None = None
    swap_rows: np.ndarray | None = None
    draining: bool = False
    out: tuple | None = None  # the dispatched round's outputs
    t_dispatch: float = 0.0
    last_turn: float = 0.0

    def __post_init__(self) -> None:
        self.rows = [None] * self.slots

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free(self) -> list[int]:
        taken = {s for s, _ in self.joining}
        return [i for i, r in enumerate(self.rows) if r is None and i not in taken]

    @property
    def empty(self) -> bool:
        return self.active == 0 and not self.joining and self.out is None


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(0, n - 1).bit_length()))


# ------------------------------------------------------------------------------ the engine
class Engine:
    """Continuous batching over Memory3's 64-token rounds, on one thread that owns the device.

    >>> eng = Engine(params, config, tokenizer, knowledge_base, ServeConfig(slots=8))
    >>> eng.start(); eng.submit(request); ...; eng.stop()

    `knowledge_base` (an opened `KnowledgeBase`, or None for `none` mode only) gives the
    retriever and takes live `add_documents` / `delete_documents` (written through to disk).
    """

    def __init__(self, params: Params, config: ModelConfig, tokenizer, knowledge_base=None,
                 serve_config: ServeConfig = ServeConfig(), *, embedder=None, metrics=None):
        check_params(params, config)
        sc = serve_config
        if sc.cache_len > config.max_len:
            raise ValueError(f"ServeConfig.cache_len ({sc.cache_len}) exceeds the model's max_len ({config.max_len})")
        if sc.cache_len % config.chunk_size or sc.min_cache_len % config.chunk_size:
            raise ValueError(f"ServeConfig.cache_len ({sc.cache_len}) and min_cache_len ({sc.min_cache_len}) must be "
                             f"multiples of the chunk size ({config.chunk_size})")
        self.params, self.config, self.tokenizer, self.kb = params, config, tokenizer, knowledge_base
        self.serve_config = sc
        self.embedder = embedder
        self.metrics = metrics
        self.retriever = None
        if knowledge_base is not None:
            self.retriever = knowledge_base.retriever(embedder, tokenizer=tokenizer, k=config.memories_per_chunk)
        self.prefix = compute_prefix(params, config)
        self._round_params = prepared_round_params(params, config)
        self.groups = [_Group(i, sc.slots) for i in range(sc.groups)]
        self.queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3jax-serve-retrieve")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.error: BaseException | None = None
        self._seeds = np.random.default_rng()
        self.rounds = 0
        self.tokens_out = 0
        self.max_ref_tokens = 0  # the longest reference: what RAG may prepend per reference
        self._measure_references()

    def _measure_references(self) -> None:
        if self.kb is not None and self.kb.references:
            meta = self.kb.bank.metadata(np.arange(self.kb.references))
            self.max_ref_tokens = int(np.max(meta.lengths))

    # ---------------------------------------------------------------- modes and sizes
    def check_mode(self, mode: str) -> None:
        check_mode(mode, self.config, self.retriever is not None, "a knowledge base (start the server with --kb)")

    def need(self, prompt_len: int, max_tokens: int, mode: str, chat: bool = False) -> int:
        """Cache positions a request needs (RAG: room for the references it will prepend, or put
        inside a conversation when `chat`)."""
        per_ref = self.max_ref_tokens + (RAG_CHAT_TOKENS_PER_REFERENCE if chat else 0)
        extra = self.config.memories_per_chunk * per_ref if mode == "rag" else 0
        return prompt_len + extra + max_tokens

    @property
    def context_len(self) -> int:
        return self.serve_config.cache_len

    # ---------------------------------------------------------------- life cycle
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._main, name="m3jax-serve-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking requests; let the running ones finish for up to `drain_s`, then end the rest
        with an error event and stop the loop."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
        t_end = time.monotonic() + drain_s
        while time.monotonic() < t_end and (self.queue or any(not g.empty for g in self.groups)) and self.alive:
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._pool.shutdown(wait=True)

    def submit(self, req: Request) -> Request:
        """Queue a request (QueueFull when the queue is full, EngineStopped when shutting down)."""
        self.check_mode(req.mode)
        chat = isinstance(req.prompt, ChatPrompt)
        if len(req.prompt) + req.max_tokens > self.context_len or self.need(len(req.prompt), req.max_tokens,
                                                                               req.mode, chat) > self.context_len:
            raise ContextTooLong(f"prompt of {len(req.prompt)} tokens + {req.max_tokens} new tokens"
                             + (f" + up to {self.need(0, 0, 'rag', chat)} reference tokens" if req.mode == "rag"
                                else "")
                             + f" exceeds the context of {self.context_len} tokens")
        with self._cv:
            if not self._accepting or not self.alive:
                raise EngineStopped("the server is shutting down" if not self._accepting else "the engine has stopped")
            if len(self.queue) >= self.serve_config.queue_size:
                raise QueueFull(f"{len(self.queue)} requests are waiting (queue_size={self.serve_config.queue_size})")
            req.t_submit = time.monotonic()
            req.prompt_tokens = len(req.prompt)
            if req.seed is None:
                req.seed = int(self._seeds.integers(0, 2**31 - 1))
            self.queue.append(req)
            self._cv.notify_all()
        return req

    # ---------------------------------------------------------------- knowledge (retrieval thread)
    def _knowledge_op(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        if self.kb is None:
            raise ValueError("the server has no knowledge base (start it with --kb)")
        return self._pool.submit(fn)

    def add_documents(self, documents: list[tuple[int, str, str | None]]) -> concurrent.futures.Future:
        """Add documents (doc_id, text, title) between retrievals; the future gives their records."""
        def op():
            recs = self.kb.add(documents, self.params, self.config, self.tokenizer, embedder=self.embedder,
                               show_progress=False, log=lambda *a: log.info(" ".join(map(str, a))))
            # a retriever over the new index (the old one searches the index it was made with)
            self.retriever = self.kb.retriever(self.embedder, tokenizer=self.tokenizer,
                                               k=self.config.memories_per_chunk)
            self._measure_references()
            return recs
        return self._knowledge_op(op)

    def delete_documents(self, doc_ids: list[int]) -> concurrent.futures.Future:
        """Delete documents between retrievals (retrievers skip them from the next search)."""
        return self._knowledge_op(lambda: self.kb.delete(doc_ids))

    def next_doc_id(self) -> int:
        recs = self.kb.documents(include_deleted=True) if self.kb is not None else []
        return 1 + max((r.doc_id for r in recs), default=-1)

    # ---------------------------------------------------------------- retrieval (pool thread)
    def _describe(self, ids: np.ndarray, scores: np.ndarray) -> list[list[dict]]:
        """ids/scores [n, k] -> per row the references read: id, doc_id, title, score."""
        ids = np.asarray(ids)
        docs = self.kb.doc_ids(ids)
        titles = self.kb.titles(ids)
        return [[{"id": int(i), "doc_id": int(d), "title": t, "score": round(float(s), 4)}
                 for i, d, t, s in zip(ids[r], docs[r], titles[r], scores[r]) if i >= 0] for r in range(len(ids))]

    def _retrieve(self, queries: list[list[int]], batch: int, chunks: int):
        """(ChunkMemory [.., batch, chunks, ..], references per query) for token queries."""
        t0 = time.perf_counter()
        ret = self.retriever
        ids, scores = ret.search(queries, with_scores=True)
        mem = ret.memories(ids)
        mem.check(self.config)
        out = arrange_memory(mem, batch, chunks, jnp.dtype(self.config.dtype)), self._describe(ids, scores)
        if self.metrics is not None:
            self.metrics.retrieval(time.perf_counter() - t0, ret.stats)
        return out

    def _rag_search(self, queries: list[list[int]]):
        t0 = time.perf_counter()
        ret = self.retriever
        ids, scores = ret.search(queries, with_scores=True)
        toks = ret.reference_tokens(ids)
        if self.metrics is not None:
            self.metrics.retrieval(time.perf_counter() - t0, ret.stats)
        return toks, self._describe(ids, scores)

    # ---------------------------------------------------------------- admission
    def _admit(self) -> None:
        """Reserve free slots for queued requests (FIFO; later requests may pass one that fits no
        group, which drains the least busy group to resize it) and start their prompt retrievals."""
        sc, now = self.serve_config, time.monotonic()
        with self._cv:
            waiting = list(self.queue)
        taken: list[Request] = []
        blocked = False
        for req in waiting:
            if req.cancelled or now - req.t_submit > sc.request_timeout_s:
                taken.append(req)
                self._end(req, "error", {"message": "request timed out in the queue", "type": "timeout"}
                          if not req.cancelled else {"message": req.cancelled, "type": "cancelled"})
                continue
            need = self.need(len(req.prompt), req.max_tokens, req.mode, isinstance(req.prompt, ChatPrompt))
            # a group whose joiners' retrieval has started takes more at its next turn
            fits = [g for g in self.groups
                    if not g.draining and g.free and g.S >= need and not g.empty and g.join_future is None]
            if not fits:  # an empty group takes the cache size this request needs
                fits = [g for g in self.groups if g.empty][:1]
                for g in fits:
                    g.draining = False
                    g.S = _pow2_at_least(need, sc.min_cache_len, sc.cache_len)
                    g.S = g.S if g.S >= need else sc.cache_len
            if fits:
                g = min(fits, key=lambda g: (g.S, -len(g.free)))
                g.joining.append((g.free[0], req))
                taken.append(req)
                continue
            too_big = all(g.S < need for g in self.groups if not g.empty)  # not only a lack of free slots
            if too_big and not blocked and not any(g.draining for g in self.groups):  # drain one group for it
                min(self.groups, key=lambda g: g.active + len(g.joining)).draining = True
            blocked = True
        if taken:
            with self._cv:
                for r in taken:
                    if r in self.queue:
                        self.queue.remove(r)
        for g in self.groups:
            if g.joining and g.join_future is None:
                g.join_future = self._pool.submit(self._join_retrieval, [r for _, r in g.joining])

    def _join_retrieval(self, reqs: list[Request]) -> dict:
        """The prompt retrieval of a group's joiners, in one go: RAG rows search with their first
        chunk and get the references prepended; then every memory row's prompt chunks retrieve
        their memories (one call; the other rows' chunks are empty queries: masked blocks)."""
        c = self.config
        prompts = [r.prompt for r in reqs]
        rag = [i for i, r in enumerate(reqs) if r.mode == "rag"]
        rag_refs: dict[int, list] = {}
        if rag:
            toks, described = self._rag_search([rag_query(reqs[i].prompt, self.tokenizer, c.chunk_size) for i in rag])
            for n, i in enumerate(rag):
                prompts[i] = rag_prompt(reqs[i].prompt, toks[n], self.tokenizer, c.bos_id)
                rag_refs[i] = described[n]
        J = _pow2_at_least(len(reqs), 1, self.serve_config.slots)
        P = self._bucket(max(len(p) for p in prompts))
        chunks = P // c.chunk_size
        out = {"prompts": prompts, "J": J, "P": P, "rag_refs": rag_refs, "memory": None, "mem_refs": None}
        if any(r.mode == "memory" for r in reqs):
            queries = []  # row-major: J rows x chunks
            for j in range(J):
                p = prompts[j] if j < len(reqs) and reqs[j].mode == "memory" else []
                queries.extend(chunk_queries(p, c.chunk_size, chunks))
            out["memory"], out["mem_refs"] = self._retrieve(queries, J, chunks)
        return out

    def _bucket(self, n: int) -> int:
        """Prompt bucket: a power-of-two number of chunks (few prefill shapes)."""
        cs = self.config.chunk_size
        return cs * _pow2_at_least(-(-n // cs), 1, self.serve_config.cache_len // cs)

    # ---------------------------------------------------------------- group state
    def _new_state(self, g: _Group) -> None:
        """A group's empty state: every row done (a free slot), a cache of `g.S` positions, and an
        all-masked memory block when the server reads memories."""
        c, B = self.config, g.slots
        g.memory = None
        if self.retriever is not None and c.memory_enabled:
            g.memory = ChunkMemory.empty(c, B, 1, dtype=jnp.dtype(c.dtype))
        g.state = DecodeState.create(init_cache(c, B, g.S), jnp.zeros((B, c.vocab_size), jnp.float32), budget=0,
                                     key_B=jnp.zeros((B, 2), jnp.uint32), stops_BX=list(c.end_ids), done=True)

    def _insert_joiners(self, g: _Group) -> None:
        """Prefill the reserved requests of `g` (their prompt retrieval done) in one call and
        write them into their slots. Rows that read no memory get an all-masked block."""
        c = self.config
        joining, fut = g.joining, g.join_future
        g.joining, g.join_future = [], None
        found = fut.result()
        if g.state is None or g.state.cache.max_len != g.S:
            self._new_state(g)
        J, P, chunks = found["J"], found["P"], found["P"] // c.chunk_size
        tok = np.full((J, P), c.pad_id, np.int32)
        tok[:, 0] = c.bos_id
        lengths = np.ones(J, np.int32)
        idx = np.full(J, g.slots, np.int32)  # padding rows (and cancelled requests) are dropped
        temp, top_p, stops = np.zeros(J, np.float32), np.ones(J, np.float32), np.full((J, len(c.end_ids)), -1, np.int32)
        budget, keys, last = np.zeros(J, np.int32), np.zeros((J, 2), np.uint32), np.zeros(J, np.int32)
        for j, (slot, req) in enumerate(joining):
            if req.cancelled:
                self._end(req, "error", {"message": req.cancelled, "type": "cancelled"})
                continue
            prompt = found["prompts"][j]
            tok[j, : len(prompt)] = prompt
            lengths[j], last[j] = len(prompt), (len(prompt) - 1) // c.chunk_size
            idx[j], temp[j], top_p[j], budget[j] = slot, req.temperature, req.top_p, req.max_tokens
            if not req.ignore_eos:  # -1 (the default): never sampled
                stops[j] = c.end_ids
            keys[j] = np.asarray(row_keys(req.seed, 1)[0])
            refs: list = []
            if req.mode == "rag":
                refs = found["rag_refs"][j]
                req.prompt_references = [{"chunk": "prompt", "references": refs}]
            elif req.mode == "memory":
                per_chunk = found["mem_refs"][j * chunks:(j + 1) * chunks][: last[j] + 1]
                req.prompt_references = [{"chunk": f"prompt:{i}", "references": r} for i, r in enumerate(per_chunk)]
                refs = per_chunk[-1]  # the first generated chunk reads the last prompt chunk's memories
            g.rows[slot] = _Row(req, prompt, refs)
        mem = None
        if g.memory is not None:
            mem = found["memory"] if found["memory"] is not None else ChunkMemory.empty(
                c, J, chunks, dtype=jnp.dtype(c.dtype))
        logits, cache = prefill(self.params, c, self.prefix, jnp.asarray(tok), init_cache(c, J, g.S),
                                jnp.asarray(lengths), mem)
        rows = DecodeState.create(cache, logits, budget=budget, key_B=keys, stops_BX=stops, temperature=temp,
                                  top_p=top_p)
        g.state = _insert_rows(g.state, rows, jnp.asarray(idx))
        if mem is not None:
            g.memory = _insert_memory(g.memory, first_round_memory(mem, jnp.asarray(last)), jnp.asarray(idx))

    # ---------------------------------------------------------------- rounds
    def _prepare(self, g: _Group) -> None:
        """Before a round: swap in the memories retrieved with the last chunk, insert joiners."""
        if g.swap_future is not None:
            new, described = g.swap_future.result()
            g.memory = _merge_memory(g.memory, new, jnp.asarray(g.swap_rows))
            for s, row in enumerate(g.rows):
                if row is not None and g.swap_rows[s]:
                    row.refs = described[s]
            g.swap_future = g.swap_rows = None
        if g.joining:
            self._insert_joiners(g)

    def _dispatch(self, g: _Group) -> None:
        g.t_dispatch = time.perf_counter()
        g.state, out, ran = decode_round(self._round_params, self.config, self.prefix, g.memory, g.state,
                                         jnp.int32(self.config.chunk_size))
        g.out = (out, ran)

    def _collect(self, g: _Group) -> None:
        """Wait for a group's round; hand each row its tokens and the references they read; free
        finished rows; start the retrieval of the next chunk's memories."""
        c, sc = self.config, self.serve_config
        out, ran = g.out
        out_np, ran = jax.device_get((out, ran))
        g.out = None
        ran = int(ran)
        now = time.monotonic()
        self.rounds += 1
        swap = np.zeros(g.slots, bool)
        queries: list[list[int]] = [[] for _ in range(g.slots)]
        free_rows: list[int] = []
        new_tokens = 0
        for s, row in enumerate(g.rows):
            if row is None:
                continue
            req = row.req
            toks, reason = [], None
            for t in out_np[s, :ran]:
                toks.append(int(t))
                if int(t) in c.end_ids and not req.ignore_eos:
                    reason = "stop"
                    break
                if len(row.generated) + len(toks) >= req.max_tokens:
                    reason = "length"
                    break
            row.generated.extend(toks)
            new_tokens += len(toks)
            self.tokens_out += len(toks)  # before the events: a client that hears "done" sees the count
            req.completion_tokens = len(row.generated)
            if req.t_first is None:
                req.t_first = now
            req.on_event("chunk", {"tokens": toks, "chunk": row.chunk, "references": row.refs})
            row.chunk += 1
            if reason is None and req.cancelled:
                reason = "cancelled"
            if reason is None and now - req.t_submit > sc.request_timeout_s:
                reason = "timeout"
            if reason is not None:
                if reason in ("stop", "length"):
                    self._end(req, "done", {"finish_reason": reason})
                elif reason == "timeout":
                    self._end(req, "error", {"message": f"request timed out after {sc.request_timeout_s:g} s",
                                             "type": "timeout"})
                else:
                    self._end(req, "done", {"finish_reason": req.cancelled or reason})
                g.rows[s] = None
                free_rows.append(s)
            elif req.mode == "memory" and ran == c.chunk_size:
                swap[s] = True
                queries[s] = row.generated[-c.chunk_size:]
        if free_rows:
            g.state = g.state.replace(done_B=g.state.done_B.at[jnp.asarray(free_rows)].set(True))
        if self.metrics is not None:
            self.metrics.round(new_tokens, time.perf_counter() - g.t_dispatch)
        if swap.any():
            g.swap_rows = swap
            g.swap_future = self._pool.submit(self._retrieve, queries, g.slots, 1)
        if g.empty and g.draining:
            g.draining = False

    def _end(self, req: Request, kind: str, payload: dict) -> None:
        if self.metrics is not None:
            self.metrics.finished(req, kind, payload)
        req.on_event(kind, payload)

    def _main(self) -> None:
        inflight: collections.deque[_Group] = collections.deque()
        try:
            while True:
                with self._cv:
                    if self._stopping:
                        break
                self._admit()
                busy = [g for g in self.groups if g.active or g.joining]
                # A group with only joiners waits for their prompt retrieval without holding up the
                # others (a group with rows waits for it in _prepare: the joiners then ride along).
                ready = sorted((g for g in busy if g.out is None
                                and (g.active or g.join_future is None or g.join_future.done())),
                               key=lambda g: g.last_turn)
                if not ready and not inflight:
                    with self._cv:  # idle (or the queue's head waits for a group to drain or a retrieval)
                        if not self._stopping:
                            self._cv.wait(timeout=0.005 if self.queue or busy else 0.05)
                    continue
                if ready:
                    g = ready[0]
                    g.last_turn = time.monotonic()
                    try:
                        self._prepare(g)
                        if g.active:
                            self._dispatch(g)
                            inflight.append(g)
                    except Exception as e:  # noqa: BLE001 - this group's requests fail, the others go on
                        self._fail_group(g, e)
                if inflight and (len(inflight) >= min(2, len(busy)) or not ready):
                    g = inflight.popleft()
                    while not g.out[0].is_ready():  # requests that come meanwhile start their retrieval
                        self._admit()
                        with self._cv:
                            if self._stopping:
                                break
                            self._cv.wait(timeout=0.002)
                    try:
                        self._collect(g)
                    except Exception as e:  # noqa: BLE001
                        self._fail_group(g, e)
        except BaseException as e:  # noqa: BLE001 - the loop dies: every request gets told
            self.error = e
            log.exception("engine loop failed")
        finally:
            self._fail_all("the server is shutting down" if self.error is None else f"engine failed: {self.error}")

    def _fail_group(self, g: _Group, e: Exception) -> None:
        """A round, retrieval or prefill of `g` failed: end its requests with the error and start
        the group afresh (the other groups and the queue are untouched)."""
        log.exception("group %d failed", g.index, exc_info=e)
        msg = f"generation failed: {type(e).__name__}: {e}"
        for s, row in enumerate(g.rows):
            if row is not None:
                self._end(row.req, "error", {"message": msg, "type": "server_error"})
        for _, req in g.joining:
            self._end(req, "error", {"message": msg, "type": "server_error"})
        fresh = _Group(g.index, g.slots)
        g.__dict__.update(fresh.__dict__)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            waiting, self.queue = list(self.queue), collections.deque()
        for req in waiting:
            self._end(req, "error", {"message": message, "type": "server_error"})
        for g in self.groups:
            for s, row in enumerate(g.rows):
                if row is not None:
                    self._end(row.req, "error", {"message": message, "type": "server_error"})
                    g.rows[s] = None
            for _, req in g.joining:
                self._end(req, "error", {"message": message, "type": "server_error"})
            g.joining = []
