"""Shared helpers of the benchmark scripts in `experiments/` (timing, device facts, tables, JSON,
and the decode setup: tokenizer + random-weight model + knowledge base + Generator).

Timing rules used by every script:
  * compile time is measured alone: `compile_timed` runs `jitted.lower(...).compile()` (AOT), or,
    for paths that are not one jitted function (the Generator), the first call is reported as
    `first_call_s` (compile + one run);
  * a figure is the median of `repeats` runs after `warmup` untimed runs, each run ending in
    `jax.block_until_ready`;
  * ratios (memory / none, continual / warmup) come from runs of the same process, interleaved
    where the scripts can (`interleaved`), so load from other jobs hits all cases alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------- device
def device_info() -> dict[str, Any]:
    """The first device, named: platform, kind, count, dense bf16 peak FLOP/s (None on CPU or
    unknown accelerators; `m3jax.train.metrics.PEAK_FLOPS`), and the string `jax.devices()[0]`."""
    from m3jax.train.metrics import peak_flops

    dev = jax.devices()[0]
    return {"platform": dev.platform, "kind": str(getattr(dev, "device_kind", dev.platform)),
            "count": jax.device_count(), "peak_flops": peak_flops(dev), "device": str(dev),
            "jax": jax.__version__, "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS",
                                                 "JAX_PLATFORMS") if k in os.environ}}


def device_name() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)}"


def mfu(flops_per_s: float | None, info: dict[str, Any] | None = None) -> float | None:
    """Model FLOP/s over the peak of all devices (None without a known peak)."""
    info = info or device_info()
    if not flops_per_s or not info.get("peak_flops"):
        return None
    return flops_per_s / (info["peak_flops"] * info["count"])


# ---------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn()` in milliseconds over `repeats` calls (no warm-up)."""
    ts_ = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts_.append(time.perf_counter() - t)
    return float(np.median(ts_) * 1e3)


class Runner:
    """A named zero-argument callable timed by `interleaved`: `run(timed)` calls it, blocks until
    its result is ready and, when timed, records the seconds in `times`."""

    def __init__(self, name: str, fn: Callable[[], Any]):
        self.name, self.fn, self.times = name, fn, []

    def run(self, timed: bool = True) -> None:
        t = time.perf_counter()
        jax.block_until_ready(self.fn())
        if timed:
            self.times.append(time.perf_counter() - t)

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.times))


def compile_timed(jitted: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(compiled executable, seconds) of `jitted.lower(*args, **kwargs).compile()`."""
    t = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - t


def interleaved(runners: Sequence[Any], steps: int, warmup: int) -> None:
    """Run `warmup` untimed then `steps` timed rounds; each round calls `r.run(timed=...)` of
    every runner, in an order rotated by one per round, so that load from other processes on a
    shared host hits all runners alike (their medians and per-round ratios are comparable)."""
    runners = list(runners)
    for _ in range(warmup):
        for r in runners:
            r.run(timed=False)
    for i in range(steps):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            r.run(timed=True)


# ---------------------------------------------------------------------------- output
def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (v != v):
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: cols = (key, header, format spec) per column."""
    cells = [[h for _, h, _ in cols]] + [[fmt(r.get(k), s) for k, _, s in cols] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)))
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_json(path: str | None, obj: Any) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(obj), f, indent=1)
    print(f"wrote {path}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- decode setup
@dataclasses.dataclass
class DecodeSetup:
    """What the decode benchmarks share: a BPE tokenizer trained on the shipped Wikipedia leads,
    a random-weight model of `preset` (throughput does not depend on the weights), a knowledge
    base of the first `references` leads (bank of `codec` + index), and prompts from other leads."""

    cfg: Any
    params: Any
    tokenizer: Any
    kb: Any
    articles: Any
    references: int
    work: str
    setup_s: float

    def retriever(self, k: int | None = None, cache_size: int = 0):
        """A retriever with the LRU cache off by default (every read hits the bank)."""
        return self.kb.retriever(tokenizer=self.tokenizer, k=k, cache_size=cache_size)

    def prompts(self, batch: int, prompt_len: int) -> list[list[int]]:
        """`batch` prompts of exactly `prompt_len` tokens (BOS first) from leads outside the
        knowledge base: whole leads that are long enough, else consecutive leads concatenated."""
        tok, arts, start = self.tokenizer, self.articles, self.references
        out = []
        for a in arts[start: start + 4 * batch]:
            ids = tok.encode(a.text, bos=True)
            if len(ids) >= prompt_len:
                out.append(ids[:prompt_len])
            if len(out) == batch:
                return out
        i = start + 4 * batch
        while len(out) < batch:  # too few long leads: concatenate consecutive ones
            ids = [self.cfg.bos_id]
            while len(ids) < prompt_len and i < len(arts):
                ids += tok.encode(arts[i].text, bos=False)
                i += 1
            if len(ids) < prompt_len:
                raise ValueError(f"not enough text for {batch} prompts of {prompt_len} tokens")
            out.append(ids[:prompt_len])
        return out

    def generator(self, decode_config, memories_per_chunk: int | None = None, cache_size: int = 0):
        """A Generator over this model and knowledge base; `memories_per_chunk` overrides the
        model's (the bank serves any value: it is not a memory-writing field)."""
        from m3jax.decode import Generator

        cfg = self.cfg
        if memories_per_chunk is not None and memories_per_chunk != cfg.memories_per_chunk:
            cfg = dataclasses.replace(cfg, memories_per_chunk=memories_per_chunk)
        return Generator(self.params, cfg, self.tokenizer, self.retriever(cfg.memories_per_chunk, cache_size),
                         decode_config)


def default_work_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "m3jax_bench_cache")


def decode_setup(preset_name: str = "demo", *, references: int = 2000, codec: str = "bf16",
                 tokenizer_extra: int = 128, dtype: str | None = None, work: str | None = None,
                 overrides: Sequence[str] = (), show_progress: bool = True) -> DecodeSetup:
    """Build (or reopen from `work`) the model + knowledge base of the decode benchmarks.

    The tokenizer is trained on the first `references + tokenizer_extra` leads (vocab
    min(preset vocab, 8192)); the model gets its "BOS Reference:" prefix and special ids, then
    the `key=value` `overrides` (`m3jax.config.apply_overrides`). The
    knowledge base directory is keyed by every input that changes its contents, so a cached one
    is only reused when it matches (the bank also checks the weights' fingerprint).
    """
    from m3jax import model as M
    from m3jax.assets import wiki_leads
    from m3jax.config import apply_overrides, preset
    from m3jax.memory.build import build_knowledge_base, open_knowledge_base
    from m3jax.tokenizer import train_bpe

    t0 = time.perf_counter()
    arts = wiki_leads()
    base = preset(preset_name)
    tok = train_bpe((a.text for a in arts[: references + tokenizer_extra]), min(base.vocab_size, 8192))
    over = dict(reference_prefix=tok.reference_prefix(), bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    if dtype:
        over.update(dtype=dtype)
    cfg = apply_overrides(dataclasses.replace(base, **over), list(overrides))
    params = M.init(cfg, jax.random.PRNGKey(0))
    work = work or tempfile.mkdtemp(prefix="m3jax_bench_")
    import hashlib

    key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    kb_dir = os.path.join(work, f"kb_{cfg.name}_{codec}_r{references}_t{tokenizer_extra}_{key}")
    docs = [(a.doc_id, a.text) for a in arts[:references]]
    try:
        kb = open_knowledge_base(kb_dir, cfg, params)
    except Exception:  # missing, partial or built by other weights: (re)build
        if os.path.exists(os.path.join(kb_dir, "kb.json")):
            import shutil

            shutil.rmtree(kb_dir, ignore_errors=True)
        build_knowledge_base(kb_dir, params, cfg, tok, docs, codec=codec, show_progress=show_progress, log=log)
        kb = open_knowledge_base(kb_dir, cfg, params)
    return DecodeSetup(cfg, params, tok, kb, arts, references, work, time.perf_counter() - t0)


def decode_config_for(cfg, prompt_len: int, new_tokens: int, rag: bool = True):
    """A DecodeConfig whose cache holds a RAG prompt (prompt + memories_per_chunk references)."""
    from m3jax.config import DecodeConfig

    need = prompt_len + (cfg.memories_per_chunk * cfg.reference_len if rag else 0) + new_tokens
    return DecodeConfig(max_new_tokens=new_tokens, max_cache_len=min(cfg.max_len, need),
                        prompt_bucket=cfg.chunk_size)


def _summarize(runs: list[tuple[float, list[Any]]], first: float) -> dict[str, Any]:
    """runs: (wall seconds, per-batch GenerationStats) of each timed call -> the median call's
    figures, summed over its batches; tokens/s = generated tokens / wall time of the call."""
    tps = [sum(s.new_tokens for s in stats) / wall for wall, stats in runs]
    wall, med = runs[int(np.argsort(tps)[len(tps) // 2])]
    total = lambda name: float(sum(getattr(s, name) for s in med))
    return {"tokens_per_s": statistics.median(tps), "runs_tokens_per_s": tps, "first_call_s": first,
            "batches": len(med), "prefill_s": total("prefill_s"), "decode_s": total("decode_s"),
            "retrieval_s": total("retrieval_s"), "retrieval_work_s": total("retrieval_work_s"),
            "retrieval_hidden_s": total("retrieval_hidden_s"),
            "retrievals": int(total("retrievals")), "memory_swaps": int(total("memory_swaps")),
            "prompt_tokens": int(total("prompt_tokens")), "new_tokens": int(total("new_tokens")),
            "total_s": wall}


def run_generate_interleaved(cases: dict[str, tuple], prompt_batches: Sequence[Sequence[Any]],
                             repeats: int) -> dict[str, dict[str, Any]]:
    """Generation throughput of several cases whose ratios matter, over the same prompt batches.

    cases: name -> (generator, mode) or (generator, mode, pipeline). Each case first runs one
    untimed warm-up call (the same call: it compiles every prompt and cache bucket, the decoding
    chunk and the memory swap), then `repeats` rounds each run every case once, in a rotating order, as one fixed-length
    `generate_many(prompt_batches, pipeline=...)` call timed from start to end (retrieval,
    prefill and decoding). Figures are the median call's (`_summarize`).
    """
    first, runs = {}, {name: [] for name in cases}

    def call(name: str) -> tuple[float, list[Any]]:
        gen, mode, *rest = cases[name]
        t0 = time.perf_counter()
        res = gen.generate_many(prompt_batches, mode=mode, ignore_eos=True, pipeline=rest[0] if rest else None)
        return time.perf_counter() - t0, [r.stats for r in res]

    for name in cases:
        first[name] = call(name)[0]
    names = list(cases)
    for i in range(max(1, repeats)):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(call(name))
    return {name: _summarize(runs[name], first[name]) for name in names}
