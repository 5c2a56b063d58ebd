"""Greedy answers from `Generator` at evaluation: a cache sized for the prompts, the leakage filter
applied per sequence (`m3jax.memory.retrieve.SequenceFilter`: every reference is compared with the
whole prompt, threshold 2/3) and RAG references cut to fit the cache.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from m3jax.config import DecodeConfig, ModelConfig
from m3jax.decode import Generator, check_mode
from m3jax.eval.scoring import progress_bar
from m3jax.memory.overlap import EVAL_THRESHOLD
from m3jax.memory.retrieve import SequenceFilter
from m3jax.model.transformer import Params


def _stop_tokens(tokenizer: Any) -> list[int]:
    try:
        nl = tokenizer.encode("\n")
    except Exception:  # noqa: BLE001 - a stand-in tokenizer may not encode; EOS still stops
        return []
    return nl if len(nl) == 1 else []


def make_generator(params: Params, config: ModelConfig, tokenizer: Any, retriever: Any, longest_prompt: int,
                   max_new_tokens: int, *, rag: bool = False, decode_kwargs: dict[str, Any] | None = None
                   ) -> Generator:
    """A greedy `Generator` whose KV cache just fits prompts of `longest_prompt` tokens plus
    `max_new_tokens` (plus k * reference_len when `rag`), capped at max_len, reading `retriever`
    through a `SequenceFilter` (what `generate_answers` needs). `decode_kwargs` override the
    DecodeConfig."""
    cs = config.chunk_size
    extra = retriever.k * config.reference_len if rag and retriever is not None else 0
    need = longest_prompt + max_new_tokens + extra
    kw = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "prompt_bucket": cs,
          "max_cache_len": min(config.max_len, -(-need // cs) * cs)}
    kw.update(decode_kwargs or {})
    source = retriever if retriever is None or isinstance(retriever, SequenceFilter) else SequenceFilter(retriever)
    return Generator(params, config, tokenizer, source, DecodeConfig(**kw))


def _source(generator: Any, retriever: Any, mode: str) -> SequenceFilter | None:
    """The generator's per-sequence filtered source (None in mode none)."""
    if mode == "none":
        return None
    source = getattr(generator, "retriever", None)
    if not isinstance(source, SequenceFilter):
        raise ValueError(f"mode {mode!r} at evaluation needs a generator reading a SequenceFilter (the leakage "
                         f"filter per sequence): build it with m3jax.eval.make_generator")
    if retriever is not None and source.retriever is not retriever:
        raise ValueError("the generator reads another retriever than the one given")
    return source


def generate_answers(params: Params, config: ModelConfig, prompts: Sequence[Sequence[int]], *, mode: str,
                     retriever: Any, tokenizer: Any, generator: Any = None, max_new_tokens: int = 16,
                     batch_size: int = 8, threshold: float = EVAL_THRESHOLD,
                     decode_kwargs: dict[str, Any] | None = None, progress: bool = False,
                     return_retrieved: bool = False):
    """Greedy answers (texts) for token prompts (BOS first) with `Generator` in `mode`; with
    `return_retrieved`, (texts, retrieved): per prompt the reference ids read by its first chunk
    (memory: the last prompt chunk's memories, which the first generated chunk keeps; rag: the
    references put in the context; none: empty).

    Without `generator`, one is built by `make_generator` (cache just large enough for the prompts;
    `decode_kwargs` override its DecodeConfig). The leakage filter compares references with the
    whole prompt (`threshold`) and RAG references are cut to fit the cache."""
    check_mode(mode, config, retriever is not None)
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if generator is None:
        generator = make_generator(params, config, tokenizer, retriever, max(len(p) for p in prompts),
                                   max_new_tokens, rag=mode == "rag", decode_kwargs=decode_kwargs)
    source = _source(generator, retriever, mode)
    cache = getattr(getattr(generator, "decode_config", None), "max_cache_len", config.max_len)
    stops = _stop_tokens(tokenizer)
    texts: list[str] = []
    retrieved: list[list[int]] = []
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in progress_bar(batches, len(batches), f"generating ({mode})", progress):
        filtered = (contextlib.nullcontext() if source is None else
                    source.sequences([p[1:] for p in batch], threshold=threshold,
                                     reference_room=[cache - len(p) - max_new_tokens for p in batch]))
        with filtered:
            res = generator.generate(batch, mode=mode, max_new_tokens=max_new_tokens, stop_tokens=stops)
        if res.texts is not None:
            texts.extend(res.texts)
        else:
            texts.extend(tokenizer.decode(t) for t in res.tokens)
        if return_retrieved:
            retrieved.extend(_first_chunk_ids(res, batch, mode, config.chunk_size))
    return (texts, retrieved) if return_retrieved else texts


def _first_chunk_ids(res: Any, batch: Sequence[Sequence[int]], mode: str, chunk_size: int) -> list[list[int]]:
    """Per prompt, the reference ids its first generated chunk read."""
    read = getattr(res, "retrieved", None)
    out = []
    for b, p in enumerate(batch):
        chunks = read[b] if read else []
        at = min((len(p) - 1) // chunk_size, len(chunks) - 1) if mode == "memory" else 0
        out.append([int(i) for i in chunks[at] if i >= 0] if chunks else [])
    return out
