"""Serving: an OpenAI-compatible HTTP server with explicit memory (`m3jax serve`).

    engine.py   continuous batching over the 64-token rounds (slots, groups, live knowledge)
    app.py      the HTTP surface (FastAPI): completions, chat, models, knowledge, health, metrics
    metrics.py  Prometheus metrics and JSON logs

Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

from m3jax.serve.engine import Engine, ServeConfig

__all__ = ["Engine", "ServeConfig", "build_app", "run"]


def build_app(model: str, kb: str | None, serve_config: ServeConfig = ServeConfig(), *, embedder=None,
              drain_s: float = 30.0):
    """(app, engine) for a model directory (or shipped model name) and a knowledge-base directory."""
    from m3jax.convert import load_model
    from m3jax.memory.build import open_knowledge_base
    from m3jax.serve.app import create_app, model_name_of
    from m3jax.serve.metrics import ServeMetrics

    config, params, tok = load_model(model)
    knowledge = open_knowledge_base(kb, config, params) if kb else None
    sc = serve_config
    if sc.cache_len > config.max_len:  # the model's context bounds the server's
        sc = ServeConfig(**{**sc.__dict__, "cache_len": config.max_len,
                            "min_cache_len": min(sc.min_cache_len, config.max_len)})
    engine = Engine(params, config, tok, knowledge, sc, embedder=embedder, metrics=ServeMetrics())
    return create_app(engine, model_name_of(model), drain_s=drain_s), engine


def run(model: str, kb: str | None, *, host: str = "127.0.0.1", port: int = 8000,
        serve_config: ServeConfig = ServeConfig(), drain_s: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM; then stop taking requests, let running ones finish for up to
    `drain_s` seconds and fail the rest cleanly."""
    import uvicorn

    from m3jax.serve.metrics import configure_logging

    configure_logging(log_level)
    app, _ = build_app(model, kb, serve_config, drain_s=drain_s)
    uvicorn.run(app, host=host, port=port, log_config=None, log_level=log_level,
                timeout_graceful_shutdown=int(drain_s) + 5)
