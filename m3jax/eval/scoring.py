"""Scoring sequences in a mode: summed log-probabilities of their scored tokens, one jitted forward
per batch, and perplexity on top of it.

How a sequence is scored (MEMORY3.md, "Reading memories" and "Retrieval"):

- **memory**: the sequence (BOS + text) is cut into `chunk_size` chunks from its start; chunk c
  retrieves `memories_per_chunk` memories with its own tokens (`chunk_queries`), the blocks are
  arranged with `ChunkMemory.from_memories`, and ONE jitted forward scores every token (no loop
  over chunks). For a continuation task (prompt + answer, context + choice) only the prompt
  retrieves: a chunk holding prompt tokens retrieves with its prompt tokens, a chunk holding only
  answer tokens reads the memories of the prompt's last chunk (as in generation, where the first
  generated chunk keeps the last prompt chunk's memories). The answer text is never used to
  retrieve.
- **rag**: one retrieval with the first `chunk_size` tokens (the same query as `Generator` in rag
  mode; prompt tokens only), the references' tokens are put after BOS (`rag_prompt`):
  `[BOS] ref_1 .. ref_k text`; only the text's tokens are scored. When the sequence exceeds
  `max_len`, reference tokens are dropped from the left.
- **none**: a plain forward.

Leakage filter: every retrieved reference is compared with the WHOLE evaluated text (the
document, or prompt + answer), threshold 2/3 (`EVAL_THRESHOLD`), so a knowledge base that holds
the evaluated text verbatim does not hand it to the model.

Sequences are padded to length buckets (`chunk_size` * 2^j, capped at `max_len`) and to a fixed
batch size, so an evaluation compiles a handful of times. Texts longer than `max_len` (or
`max_tokens`) are truncated at the end for perplexity; prompts of continuation tasks are
truncated at the start.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from m3jax.config import ModelConfig
from m3jax.decode import arrange_memory, check_mode
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.memory.retrieve import chunk_queries, rag_prompt
from m3jax.model.memory import ChunkMemory
from m3jax.model.transformer import Params, forward, prefix_kv


@dataclass
class ScoreInput:
    """One sequence to score.

    tokens: BOS + text token ids. start: index of the first scored token (tokens[start:] are
    scored, each given everything before it). query_end: only tokens[:query_end] may be used to
    retrieve (None: all; a continuation task sets it to the prompt length). filter_tokens: the
    text retrieved references must not leak (None: tokens[1:], the whole evaluated text).
    """

    tokens: list[int]
    start: int = 1
    query_end: int | None = None
    filter_tokens: list[int] | None = None


@dataclass
class SeqScore:
    """logprob: sum of the scored tokens' log-probabilities; n: how many were scored; ids: the
    reference ids used (memory: [chunks, memories_per_chunk], rag: [k], none: None; -1 = none)."""

    logprob: float
    n: int
    ids: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_scores(params: Params, tokens_BT: jax.Array, weights_BT: jax.Array,
                    memory: ChunkMemory | None, prefix, *, config: ModelConfig):
    """One forward over the whole batch: (sum of scored log-probs [B], scored count [B])."""
    logits = forward(params, tokens_BT, config, memory=memory, prefix=prefix)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok_lp = jnp.take_along_axis(lp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    w = weights_BT[:, 1:]
    return jnp.sum(jnp.where(w, tok_lp, 0.0), axis=1), jnp.sum(w, axis=1)


@functools.partial(jax.jit, static_argnums=(1,))
def _prefix(params: Params, config: ModelConfig):
    return prefix_kv(params, config)


def _bucket(n: int, chunk_size: int, max_len: int) -> int:
    """Padded length: chunk_size * 2^j >= n, capped at max_len."""
    b = chunk_size
    while b < n:
        b *= 2
    return max(n, min(b, max_len))


def _fit(x: ScoreInput, config: ModelConfig) -> ScoreInput:
    """Validate and left-truncate (keeping BOS) a sequence longer than max_len."""
    toks = [int(t) for t in x.tokens]
    if len(toks) < 1 or toks[0] != config.bos_id:
        raise ValueError(f"a scored sequence must start with BOS ({config.bos_id}), got {toks[:3]}")
    qe = len(toks) if x.query_end is None else int(x.query_end)
    if not 1 <= x.start <= len(toks) or not 1 <= qe <= len(toks):
        raise ValueError(f"start={x.start} / query_end={qe} outside a sequence of {len(toks)} tokens")
    filt = list(x.filter_tokens) if x.filter_tokens is not None else toks[1:]
    start = x.start
    cut = len(toks) - config.max_len
    if cut > 0:
        if start - cut < 1:
            raise ValueError(f"the scored span ({len(toks) - start} tokens) does not fit max_len="
                             f"{config.max_len} of config {config.name!r}")
        toks = [toks[0]] + toks[1 + cut:]
        start -= cut
        qe = max(1, qe - cut)
    return ScoreInput(toks, start, qe, filt)




def _rag_inputs(inputs: list[ScoreInput], config: ModelConfig, retriever: Any, k: int,
                threshold: float) -> tuple[list[ScoreInput], list[np.ndarray]]:
    """Prepend the references retrieved with the first chunk_size prompt tokens after BOS
    (`rag_prompt`; reference tokens dropped from the left beyond max_len)."""
    cs = config.chunk_size
    out, all_ids = [], []
    step = 256
    for i in range(0, len(inputs), step):
        part = inputs[i:i + step]
        ids = np.asarray(retriever.search([x.tokens[: min(cs, x.query_end)] for x in part],
                                          filter_tokens=[x.filter_tokens for x in part],
                                          threshold=threshold, k=k))
        refs = retriever.reference_tokens(ids)
        for x, row, rs in zip(part, ids, refs):
            tokens = rag_prompt(x.tokens, rs, room=config.max_len - len(x.tokens))
            n = len(tokens) - len(x.tokens)
            out.append(ScoreInput(tokens, x.start + n, x.query_end + n, x.filter_tokens))
            all_ids.append(row)
    return out, all_ids


def _chunk_memory(batch: list[ScoreInput], B: int, C: int, config: ModelConfig, retriever: Any,
                  threshold: float) -> tuple[ChunkMemory, np.ndarray]:
    """Retrieve per chunk (prompt chunks with their own prompt tokens; answer-only chunks reuse the
    last prompt chunk's memories; padding chunks and rows read nothing) and arrange [B, C]."""
    cs, m = config.chunk_size, config.memories_per_chunk
    ids = np.full((B, C, m), -1, np.int64)
    queries, filters, where = [], [], []
    for b, x in enumerate(batch):
        n_chunks = -(-len(x.tokens) // cs)
        last = (x.query_end - 1) // cs
        for c, q in enumerate(chunk_queries(x.tokens[: x.query_end], cs, min(n_chunks, last + 1))):
            queries.append(q)
            filters.append(x.filter_tokens)
            where.append((b, [c] if c < last else list(range(last, n_chunks))))
    if queries:
        found = np.asarray(retriever.search(queries, filter_tokens=filters, threshold=threshold, k=m))
        if found.shape != (len(queries), m):
            raise ValueError(f"retriever.search returned ids of shape {found.shape}, expected "
                             f"({len(queries)}, {m})")
        for (b, chunks), row in zip(where, found):
            ids[b, chunks] = row
    mem = retriever.memories(ids.reshape(B * C, m))
    mem.check(config)
    return arrange_memory(mem, B, C, jnp.dtype(config.dtype)), ids


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """`iterable` with a progress bar of batches when `enabled`."""
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False) if enabled else iterable


def score_sequences(params: Params, config: ModelConfig, inputs: Sequence[ScoreInput], *, mode: str,
                    retriever: Any = None, batch_size: int = 8, threshold: float = EVAL_THRESHOLD,
                    rag_k: int | None = None, progress: bool = False, desc: str = "scoring"
                    ) -> list[SeqScore]:
    """Summed log-probabilities of `inputs[i].tokens[start:]` in `mode` (see the module doc).

    retriever: needs `search(queries, filter_tokens=, threshold=, k=) -> ids [n, k]`,
    `memories(ids) -> MemoryKV` (memory mode) and `reference_tokens(ids)` (rag mode), as
    `m3jax.memory.retrieve.Retriever`. rag_k: references per sequence (default retriever.k).
    """
    check_mode(mode, config, retriever is not None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    xs = [_fit(x, config) for x in inputs]
    if not xs:
        return []
    rag_ids: list[np.ndarray] | None = None
    if mode == "rag":
        xs, rag_ids = _rag_inputs(xs, config, retriever, rag_k or retriever.k, threshold)
    prefix = _prefix(params, config) if config.reference_prefix is not None else None
    cs = config.chunk_size
    order = sorted(range(len(xs)), key=lambda i: len(xs[i].tokens))
    B = min(batch_size, len(xs))
    results: list[SeqScore | None] = [None] * len(xs)
    batches = [order[i:i + B] for i in range(0, len(order), B)]
    for idx in progress_bar(batches, len(batches), f"{desc} ({mode})", progress):
        batch = [xs[i] for i in idx]
        T = _bucket(max(len(x.tokens) for x in batch), cs, config.max_len)
        tok = np.full((B, T), config.pad_id, np.int32)
        w = np.zeros((B, T), bool)
        for b, x in enumerate(batch):
            tok[b, : len(x.tokens)] = x.tokens
            w[b, x.start: len(x.tokens)] = True
        memory, ids = None, None
        if mode == "memory":
            memory, ids = _chunk_memory(batch, B, -(-T // cs), config, retriever, threshold)
        lp, n = _forward_scores(params, jnp.asarray(tok), jnp.asarray(w), memory, prefix, config=config)
        lp, n = np.asarray(lp), np.asarray(n)
        for b, i in enumerate(idx):
            if mode == "memory":
                got = ids[b, : -(-len(xs[i].tokens) // cs)]
            elif mode == "rag":
                got = rag_ids[i]
            else:
                got = None
            results[i] = SeqScore(float(lp[b]), int(n[b]), got)
    return results  # type: ignore[return-value]




def as_sequence(x: str | Sequence[int], config: ModelConfig, tokenizer: Any) -> list[int]:
    """A text (encoded with the model's BOS, as `Generator` does) or token ids (BOS added when
    missing) as a scored sequence."""
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError("texts need a tokenizer; pass token id lists or a tokenizer")
        return [config.bos_id] + tokenizer.encode(x)
    ids = [int(t) for t in x]
    return ids if ids and ids[0] == config.bos_id else [config.bos_id] + ids


def perplexity(params: Params, config: ModelConfig, texts_or_token_lists: Sequence[str | Sequence[int]], *,
               mode: str, retriever: Any = None, tokenizer: Any = None, batch_size: int = 8,
               max_tokens: int | None = None, threshold: float = EVAL_THRESHOLD, progress: bool = True
               ) -> dict[str, float]:
    """Perplexity of texts (or token id lists; BOS is prepended when missing) in `mode`.

    Each sequence (BOS + text) is truncated to min(max_tokens, max_len) tokens; every token after
    BOS is scored. Retrieved references are filtered against the whole (untruncated) text. Returns
    {"ppl": exp(nll), "nll": mean NLL per token, "tokens": count, "texts": number of texts scored}.
    """
    limit = config.max_len if max_tokens is None else min(int(max_tokens), config.max_len)
    inputs = []
    for x in texts_or_token_lists:
        full = as_sequence(x, config, tokenizer)
        ids = full[:limit]
        if len(ids) >= 2:
            # the leakage filter compares references with the WHOLE text, not the scored part:
            # a reference holding the rest of a truncated text would otherwise pass
            inputs.append(ScoreInput(ids, filter_tokens=list(full[1:])))
    if not inputs:
        raise ValueError("no text with at least one token to score")
    scores = score_sequences(params, config, inputs, mode=mode, retriever=retriever, batch_size=batch_size,
                             threshold=threshold, progress=progress, desc="perplexity")
    n = sum(s.n for s in scores)
    nll = -sum(s.logprob for s in scores) / n
    return {"ppl": float(math.exp(nll)), "nll": float(nll), "tokens": int(n), "texts": len(scores)}

