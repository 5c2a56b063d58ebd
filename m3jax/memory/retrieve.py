"""Retrieval: text chunks -> reference ids -> leakage filter -> memories from the bank.

    queries (token chunks or texts) --embed--> unit vectors --index.search--> candidates
    (minus excluded ids: the deleted references of a knowledge base, searched past)
    candidates --overlap filter (drop overlap > threshold with the filter text)--> top-k ids
    top-k ids --LRU cache / bank.gather--> MemoryKV (masked where no reference is left)

Evaluation filters every query against the whole text of its sequence (`SequenceFilter`,
`Retriever.per_sequence`); `chunk_queries` and `rag_prompt` are the queries a sequence retrieves with
and the context RAG reads.

Adjacent chunks often retrieve the same references, so decoded memories are kept in a host LRU
cache (MEMORY3.md allows a RAM cache of recently used memories). All counters are in `stats`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from m3jax.memory.embed import Embedder
from m3jax.memory.index import VectorIndex
from m3jax.memory.overlap import EVAL_THRESHOLD, leak_mask
from m3jax.model.memory import MemoryKV


@dataclass
class RetrievalStats:
    calls: int = 0
    queries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    filtered: int = 0  # candidates dropped by the leakage filter
    excluded: int = 0  # candidates skipped as excluded (deleted references)
    embed_s: float = 0.0
    search_s: float = 0.0
    filter_s: float = 0.0
    fetch_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Retriever:
    """Finds the references (and their memories) for text chunks.

    Args:
      index: vector index over reference embeddings, ids = reference / memory ids.
      embedder: texts -> unit vectors (the one that built the index).
      reference_tokens: token ids of every reference, indexed by id (for the leakage filter and
        for RAG), or None to read them from `bank.metadata`.
      bank: the `MemoryBank` to gather memories from (None: search only, e.g. training pairs).
      tokenizer: detokenizes token queries for the embedder.
      k: references per query (the model's memories_per_chunk).
      threshold: leakage filter threshold (2/3 at evaluation, 0.9 for training pairs).
      candidates: how many neighbours to search before filtering (>= k).
      cache_size: memories kept in the LRU cache (0 disables it).
      exclude: `exclude(ids) -> bool mask` of the same shape, True for ids never to return (the
        deleted references of a knowledge base). It is called at every search, so what it excludes
        may change between searches. Excluded ids do not count as candidates: the index is searched
        deeper until `candidates` live neighbours are found (or the index is exhausted), so
        deletions cost no recall while live references are left.
    """

    def __init__(self, index: VectorIndex, embedder: Embedder, *, reference_tokens=None, bank=None,
                 tokenizer=None, k: int = 5, threshold: float = EVAL_THRESHOLD, candidates: int | None = None,
                 cache_size: int = 4096, exclude: Callable[[np.ndarray], np.ndarray] | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if index.dim != embedder.dim:
            raise ValueError(f"index vectors have dim {index.dim} but the embedder gives {embedder.dim}: "
                             "the index was built with another embedder")
        if reference_tokens is None and bank is None:
            raise ValueError("give reference_tokens or a bank to read them from")
        self.index, self.embedder, self.bank, self.tokenizer = index, embedder, bank, tokenizer
        self._ref_tokens = reference_tokens
        self.k = k
        self.threshold = threshold
        self.candidates = max(k, candidates if candidates is not None else 3 * k)
        self.cache_size = cache_size
        self.exclude = exclude
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = RetrievalStats()

    # ---------------------------------------------------------------- pieces
    def _texts(self, queries: Sequence[Any]) -> list[str]:
        out = []
        for q in queries:
            if isinstance(q, str):
                out.append(q)
            else:
                if self.tokenizer is None:
                    raise ValueError("token queries need a tokenizer to be embedded")
                out.append(self.tokenizer.decode(q))
        return out

    def reference_tokens(self, ids: np.ndarray) -> list[list[list[int]]]:
        """ids [n, k] (-1 = none) -> token ids of each reference (none skipped)."""
        ids = np.asarray(ids)
        if self._ref_tokens is not None:
            return [[list(self._ref_tokens[i]) for i in row if i >= 0] for row in ids]
        flat = sorted({int(i) for i in ids.reshape(-1) if i >= 0})
        toks: dict[int, list[int]] = {}
        if flat:
            meta = self.bank.metadata(np.asarray(flat, np.int64))
            toks = {i: meta.tokens[j, : meta.lengths[j]].tolist() for j, i in enumerate(flat)}
        return [[toks[int(i)] for i in row if i >= 0] for row in ids]

    def prepare(self, queries: Sequence[Any]) -> Callable[[], np.ndarray]:
        """Start embedding `queries` now (detokenize, enqueue the encoder on the device); pass the
        result as `prepared=` to `search` / `retrieve` of the same queries, which may run on
        another thread. Embedders without `dispatch` embed when the result is called. Empty
        queries are not embedded (`search` gives them no references)."""
        t0 = time.perf_counter()
        texts = self._texts([q for q in queries if len(q)])
        dispatch = getattr(self.embedder, "dispatch", None)
        if not texts:
            pending = lambda: np.zeros((0, self.embedder.dim), np.float32)  # noqa: E731
        else:
            pending = dispatch(texts) if dispatch is not None else (lambda: self.embedder(texts))
        self.stats.embed_s += time.perf_counter() - t0
        return pending

    def search(self, queries: Sequence[Any], *, filter_tokens: Sequence[Sequence[int]] | None = None,
               threshold: float | None = None, k: int | None = None,
               prepared: Callable[[], np.ndarray] | None = None, with_scores: bool = False):
        """Top-k reference ids [n, k] (-1 where fewer than k survive the leakage filter); with
        `with_scores`, (ids, scores [n, k] float32: the index's inner product, nan where id -1).

        filter_tokens[i]: the text reference i must not leak (default: the query's own tokens,
        for text queries their tokenization). threshold None -> the retriever's; > 1 disables.
        prepared: `prepare(queries)`, when the embedding was started earlier. An empty query (a
        chunk past the end of a prompt, a finished sequence) gets no references and costs nothing.
        """
        k = self.k if k is None else k
        threshold = self.threshold if threshold is None else threshold
        n = len(queries)
        out = np.full((n, k), -1, np.int64)
        out_scores = np.full((n, k), np.nan, np.float32)
        rows = [i for i, q in enumerate(queries) if len(q)]
        if filter_tokens is not None and len(filter_tokens) != n:
            raise ValueError(f"{len(filter_tokens)} filter texts for {n} queries")
        t0 = time.perf_counter()
        if prepared is not None:
            vecs = prepared()
        else:
            vecs = self.embedder(self._texts([queries[i] for i in rows])) if rows else np.zeros((0, 1), np.float32)
        if len(vecs) != len(rows):
            raise ValueError(f"{len(vecs)} prepared query vectors for {len(rows)} non-empty queries")
        self.stats.calls += 1
        self.stats.queries += n
        if not rows:
            return (out, out_scores) if with_scores else out
        queries = [queries[i] for i in rows]
        if filter_tokens is not None:
            filter_tokens = [filter_tokens[i] for i in rows]
        n = len(rows)
        t1 = time.perf_counter()
        cand_ids, cand_scores = self._candidates(vecs, max(self.candidates, k))
        t2 = time.perf_counter()
        keep = np.ones(cand_ids.shape, bool)
        if threshold <= 1.0:
            if filter_tokens is None:
                filter_tokens = [q if not isinstance(q, str) else self.tokenizer.encode(q) for q in queries]
            refs = self.reference_tokens(cand_ids)  # skips -1 (an index row with fewer hits)
            pairs_q = [filter_tokens[i] for i in range(n) for _ in refs[i]]
            pairs_r = [r for row in refs for r in row]
            leak = leak_mask(pairs_q, pairs_r, threshold) if pairs_r else np.zeros(0, bool)
            keep[cand_ids >= 0] = ~leak  # row-major over the valid candidates, as the pairs
            self.stats.filtered += int(leak.sum())
        keep &= cand_ids >= 0
        t3 = time.perf_counter()
        for i, row in enumerate(rows):
            kept = cand_ids[i][keep[i]][:k]
            out[row, : len(kept)] = kept
            out_scores[row, : len(kept)] = cand_scores[i][keep[i]][:k]
        self.stats.embed_s += t1 - t0
        self.stats.search_s += t2 - t1
        self.stats.filter_s += t3 - t2
        return (out, out_scores) if with_scores else out

    def _candidates(self, vecs: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) [n, want] of the nearest `want` references that `exclude` lets through
        (-1 where fewer exist). Searches `want` neighbours, then twice as many while a row lacks
        live ones."""
        n_index = len(self.index)
        cand = min(want, n_index)
        ids, scores = self.index.search(vecs, cand)
        if self.exclude is None:
            return ids, scores
        while True:
            valid = ids >= 0
            dead = np.zeros(ids.shape, bool)
            dead[valid] = np.asarray(self.exclude(ids[valid]), bool)
            live = valid & ~dead
            if cand >= n_index or int(live.sum(1).min()) >= min(want, n_index):
                break
            cand = min(n_index, 2 * cand)
            ids, scores = self.index.search(vecs, cand)
        self.stats.excluded += int(dead.sum())
        out = np.full((len(ids), min(want, n_index)), -1, np.int64)
        out_scores = np.full(out.shape, np.nan, np.float32)
        for i in range(len(ids)):
            row = ids[i][live[i]][: out.shape[1]]
            out[i, : len(row)] = row
            out_scores[i, : len(row)] = scores[i][live[i]][: out.shape[1]]
        return out, out_scores

    def memories(self, ids: np.ndarray) -> MemoryKV:
        """ids [n, k] (-1 = none) -> MemoryKV of n * k memories (masked where id == -1).

        Codes (compact for int8 / pq) are cached on the host; the batch is decoded once, on
        device, by the bank's codec.
        """
        if self.bank is None:
            raise ValueError("this retriever has no memory bank: it can only search")
        t0 = time.perf_counter()
        flat = np.asarray(ids, np.int64).reshape(-1)
        with self._lock:
            want = [int(i) for i in dict.fromkeys(flat.tolist()) if i >= 0]
            misses = [i for i in want if i not in self._cache]
            missed = set(misses)
            self.stats.cache_hits += int(sum(1 for i in flat.tolist() if i >= 0 and i not in missed))
            self.stats.cache_misses += len(misses)
            rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            if misses:
                codes, mask = self.bank.gather_codes(np.asarray(misses, np.int64))
                for j, i in enumerate(misses):
                    rows[i] = (codes[j].copy(), mask[j].copy())  # a cached row must not pin the batch
                    if self.cache_size > 0:
                        self._cache[i] = rows[i]
            for i in want:
                if i not in rows:
                    rows[i] = self._cache[i]
                    self._cache.move_to_end(i)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if rows:
            c0, m0 = next(iter(rows.values()))
            codes = np.zeros((len(flat),) + c0.shape, c0.dtype)
            mask = np.zeros((len(flat),) + m0.shape, bool)
            for j, i in enumerate(flat):
                if i >= 0:
                    codes[j], mask[j] = rows[int(i)]
        else:  # nothing retrieved: any valid memory's codes, fully masked
            codes, mask = self.bank.gather_codes(np.zeros(len(flat), np.int64))
            mask = np.zeros_like(mask)
        mem = self.bank.decode(codes, mask)
        self.stats.fetch_s += time.perf_counter() - t0
        return mem

    # ---------------------------------------------------------------- decoding protocol
    def retrieve(self, queries: Sequence[Any], *, filter_tokens=None, threshold: float | None = None,
                 prepared: Callable[[], np.ndarray] | None = None) -> tuple[np.ndarray, MemoryKV]:
        """Queries (token chunks or texts) -> (ids [n, k], MemoryKV of n * k memories)."""
        ids = self.search(queries, filter_tokens=filter_tokens, threshold=threshold, prepared=prepared)
        return ids, self.memories(ids)

    def per_sequence(self, threshold: float | None = None) -> "SequenceFilter":
        """This retriever as a memory source whose leakage filter compares each query's references
        with the whole text of its sequence (`SequenceFilter`; threshold default: this retriever's)."""
        return SequenceFilter(self, self.threshold if threshold is None else threshold)


# ---------------------------------------------------------------------- queries and RAG contexts
def chunk_queries(tokens: Sequence[int], chunk_size: int, chunks: int) -> list[list[int]]:
    """The retrieval queries of the first `chunks` chunks of a sequence: each chunk's own tokens
    (empty past the end of the sequence: such a query retrieves nothing)."""
    return [[int(t) for t in tokens[c * chunk_size:(c + 1) * chunk_size]] for c in range(chunks)]


def rag_tokens(references: Sequence[Sequence[int]], room: int | None = None) -> list[int]:
    """The tokens RAG puts in the context: the references' tokens in order, cut from the left to
    at most `room` tokens (None: all)."""
    flat = [int(t) for r in references for t in r]
    if room is not None and len(flat) > max(room, 0):
        flat = flat[len(flat) - max(room, 0):]
    return flat


def rag_prompt(prompt: Sequence[int], references: Sequence[Sequence[int]], room: int | None = None) -> list[int]:
    """A RAG prompt: the prompt's first token (BOS), `rag_tokens(references, room)`, then the rest
    of the prompt."""
    return [int(prompt[0])] + rag_tokens(references, room) + [int(t) for t in prompt[1:]]


# ---------------------------------------------------------------------- the leakage filter per sequence
class SequenceFilter:
    """A memory source (`m3jax.decode.MemorySource`) over a retriever, whose leakage filter compares
    every query's references with the whole text of the sequence the query comes from, not with
    the query chunk alone: at evaluation a knowledge base that holds the evaluated text verbatim
    must not hand it to the model, whichever chunk retrieves.

        source = retriever.per_sequence()               # or SequenceFilter(retriever, threshold)
        gen = Generator(params, config, tokenizer, source)
        with source.sequences([p[1:] for p in prompts]):  # the text each sequence must not read
            gen.generate(prompts, mode="memory")

    Queries come sequence-major, the same number for every sequence of the batch (a prefill asks
    batch x chunks, a memory swap or a RAG retrieval one per sequence): query i of n belongs to
    sequence i // (n // batch). Outside `sequences` it is the plain retriever. `reference_room`:
    per sequence, the RAG references are cut from the left to that many tokens (so that the
    prompt fits a KV cache). `retriever` needs `search(queries, filter_tokens=, threshold=)`,
    `memories(ids)`, `reference_tokens(ids)` and `k` (`Retriever` has them; its `prepare` is used
    when present).
    """

    def __init__(self, retriever: Any, threshold: float = EVAL_THRESHOLD):
        self.retriever, self.k, self.threshold = retriever, retriever.k, threshold
        self._filters: list[list[int]] | None = None
        self._room: Sequence[int] | None = None
        self._threshold = threshold
        prepare = getattr(retriever, "prepare", None)
        if prepare is not None:  # the Generator starts the query embedding early through it
            self.prepare = prepare

    @contextlib.contextmanager
    def sequences(self, filter_tokens: Sequence[Sequence[int]], *, reference_room: Sequence[int] | None = None,
                  threshold: float | None = None) -> Iterator["SequenceFilter"]:
        """Within the block, queries are filtered against `filter_tokens[b]` of their sequence b
        (threshold default: this source's)."""
        if not len(filter_tokens):
            raise ValueError("give the filter text of at least one sequence")
        if reference_room is not None and len(reference_room) != len(filter_tokens):
            raise ValueError(f"{len(reference_room)} reference rooms for {len(filter_tokens)} sequences")
        saved = self._filters, self._room, self._threshold
        self._filters = [[int(t) for t in f] for f in filter_tokens]
        self._room = reference_room
        self._threshold = self.threshold if threshold is None else threshold
        try:
            yield self
        finally:
            self._filters, self._room, self._threshold = saved

    def search(self, queries: Sequence[Any], **kwargs: Any) -> np.ndarray:
        """Reference ids [n, k] (-1 = none) of the queries, filtered per sequence."""
        if self._filters is None:
            return self.retriever.search(queries, **kwargs)
        per = max(1, len(queries) // len(self._filters))
        filters = [self._filters[min(i // per, len(self._filters) - 1)] for i in range(len(queries))]
        return self.retriever.search(queries, filter_tokens=filters, threshold=self._threshold, **kwargs)

    def retrieve(self, queries: Sequence[Any], *, prepared: Callable[[], np.ndarray] | None = None
                 ) -> tuple[np.ndarray, MemoryKV]:
        """Queries -> (ids [n, k], MemoryKV of n * k memories), filtered per sequence."""
        ids = self.search(queries, **({} if prepared is None else {"prepared": prepared}))
        return ids, self.retriever.memories(ids)

    def reference_tokens(self, ids: np.ndarray) -> list[list[list[int]]]:
        """Token ids of the references `ids` [n, k]; with a reference room, each row's tokens as
        one reference cut from the left to its sequence's room."""
        refs = self.retriever.reference_tokens(ids)
        if self._room is None:
            return refs
        out = []
        for row, room in zip(refs, self._room):
            flat = rag_tokens(row, room)
            out.append([flat] if flat else [])
        return out
