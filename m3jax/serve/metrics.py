"""Prometheus metrics of the server (prometheus_client, one registry per server) and JSON logs."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
    """Counters the engine and the app update; `render()` gives the Prometheus text format.

    requests (by mode and outcome), generated tokens, tokens/s over the last `window_s`, queue
    depth and busy slots (read from the engine at scrape time), retrieval latency, memory cache
    hits and misses, request latency and time to first token.
    """

    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("m3jax_requests", "requests by mode and outcome", ["mode", "outcome"], registry=r)
        self.tokens = Counter("m3jax_generated_tokens", "generated tokens", registry=r)
        self.prompt_tokens = Counter("m3jax_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.tokens_per_s = Gauge("m3jax_tokens_per_second", f"generated tokens per second over the last {window_s:g} s",
                                  registry=r)
        self.queue_depth = Gauge("m3jax_queue_depth", "requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("m3jax_busy_slots", "slots holding a request", registry=r)
        self.rounds = Counter("m3jax_decode_rounds", "64-token decode rounds run", registry=r)
        self.retrieval_s = Histogram("m3jax_retrieval_seconds", "one retrieval (search + memories)",
                                     buckets=_RETRIEVAL_BUCKETS, registry=r)
        self.cache_hits = Gauge("m3jax_memory_cache_hits", "memories served from the host LRU cache", registry=r)
        self.cache_misses = Gauge("m3jax_memory_cache_misses", "memories read from the bank", registry=r)
        self.latency_s = Histogram("m3jax_request_seconds", "request latency (submit to last token)", ["mode"],
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_s = Histogram("m3jax_time_to_first_token_seconds", "submit to the first chunk of tokens", ["mode"],
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.knowledge = Counter("m3jax_knowledge_updates", "documents added / deleted", ["op"], registry=r)
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._hits_base = self._misses_base = 0  # counts of retrievers replaced after an add
        self._last_stats = None

    # ---------------------------------------------------------------- engine hooks (engine threads)
    def round(self, tokens: int, seconds: float) -> None:
        self.rounds.inc()
        self.tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))

    def retrieval(self, seconds: float, stats) -> None:
        self.retrieval_s.observe(seconds)
        with self._lock:
            if self._last_stats is not None and stats is not self._last_stats:  # a new retriever
                self._hits_base += self._last_stats.cache_hits
                self._misses_base += self._last_stats.cache_misses
            self._last_stats = stats
            self.cache_hits.set(self._hits_base + stats.cache_hits)
            self.cache_misses.set(self._misses_base + stats.cache_misses)

    def finished(self, req, kind: str, payload: dict) -> None:
        outcome = payload.get("finish_reason") if kind == "done" else payload.get("type", "error")
        self.requests.labels(req.mode, outcome).inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        now = time.monotonic()
        if kind == "done":
            self.latency_s.labels(req.mode).observe(now - req.t_submit)
        if req.t_first is not None:
            self.ttft_s.labels(req.mode).observe(req.t_first - req.t_submit)

    # ---------------------------------------------------------------- scrape
    def render(self, engine) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            n = sum(t for _, t in self._recent)
        self.tokens_per_s.set(n / self.window_s)
        self.queue_depth.set(len(engine.queue))
        self.busy_slots.set(sum(g.active + len(g.joining) for g in engine.groups))
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
             "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        d.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the m3jax.serve logger (and uvicorn's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("m3jax.serve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
