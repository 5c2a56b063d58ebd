"""Load test of `m3jax serve` on loopback: concurrent clients with mixed modes, bounded, stops by itself.

The server (Engine + FastAPI app under uvicorn) runs in this process on 127.0.0.1 (a free port)
over a random-weight model of `--preset` and a knowledge base of shipped Wikipedia leads (the
decode benchmarks' setup). Clients are the official `openai` AsyncOpenAI client, streaming, each
sending requests one after another (closed loop) with prompts of `--prompt-len` tokens (token
ids) and `--new-tokens` generated (ignore_eos), modes mixed round-robin.

Phases (each bounded by `--requests-per-client` and `--time-limit` seconds, each after an untimed
pass of a few concurrent requests, every mode of the phase present, that compiles its shapes):
  1. N concurrent clients for N in --clients (1, 8, 32, 64), mixed modes: throughput, p50/p95
     latency and time to first token per mode; every request is answered or refused with 429.
  2. --ratio-clients (32) clients all in memory mode, then all in RAG mode: aggregate tokens/s.
  3. `Generator.generate_many` on the same prompts, batch `--slots`, pipeline `--groups` (as many
     sequences in flight as the server's slots), memory mode.
  4. a stream cancelled after its first event: its slot is free again; /health is 200 after all.

It prints a table and the two goal ratios, and writes JSON:
  serve/generate_many = server tokens/s (32 clients, memory) / generate_many tokens/s  (goal >= 0.8)
  memory/rag          = server tokens/s (32 clients, memory) / (32 clients, RAG)      (goal >= 2.0)

    python experiments/bench_serve.py --preset demo --out bench_serve_demo.json
    python experiments/bench_serve.py --preset smollm2-135m --dtype bfloat16 --out bench_serve_smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _bench_utils (and the repo root, via it)

MODES = ("memory", "rag", "none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _client(client, model, prompts, modes, n_req, t_end, new_tokens, records, offset):
    import openai

    for i in range(n_req):
        if time.monotonic() > t_end:
            return
        mode = modes[(offset + i) % len(modes)]
        prompt = prompts[(offset * 7 + i) % len(prompts)]
        t0 = time.monotonic()
        rec = {"mode": mode, "status": "ok", "tokens": 0, "ttft_s": None, "latency_s": None}
        try:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                                     stream=True, extra_body={"mode": mode, "ignore_eos": True},
                                                     stream_options={"include_usage": True})
            async for ev in stream:
                if ev.choices and rec["ttft_s"] is None:  # the first round's tokens (text may be empty)
                    rec["ttft_s"] = time.monotonic() - t0
                if ev.usage is not None:
                    rec["tokens"] = ev.usage.completion_tokens
            rec["latency_s"] = time.monotonic() - t0
        except openai.RateLimitError as e:
            rec["status"] = "429"
            await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
        except Exception as e:  # noqa: BLE001 - counted as lost
            rec["status"] = f"error: {type(e).__name__}: {e}"
        records.append(rec)


def _phase(url, model, prompts, n_clients, modes, n_req, limit_s, new_tokens, warm_clients=0):
    """One load phase; with `warm_clients`, first an untimed pass of that many concurrent clients (one
    request each, modes round-robin) in which the shapes this mix needs compile: groups take the
    cache size of the requests they hold, and every client count above the slots of one group
    reuses those shapes (static slots)."""
    import openai

    if warm_clients:
        n_warm = min(warm_clients, n_clients)
        _phase(url, model, prompts, n_warm, modes, 1 if n_warm >= len(modes) else len(modes), limit_s, new_tokens)

    async def go():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=limit_s + 120)
        records: list[dict] = []
        t0 = time.monotonic()
        await asyncio.gather(*(_client(client, model, prompts, modes, n_req, t0 + limit_s, new_tokens, records, c)
                               for c in range(n_clients)))
        await client.close()
        return records, time.monotonic() - t0

    records, wall = asyncio.run(go())
    ok = [r for r in records if r["status"] == "ok"]
    row = {"clients": n_clients, "modes": "+".join(modes), "requests": len(records), "ok": len(ok),
           "refused_429": sum(r["status"] == "429" for r in records),
           "lost": sum(r["status"] not in ("ok", "429") for r in records),
           "tokens": sum(r["tokens"] for r in ok), "wall_s": wall}
    row["tokens_per_s"] = row["tokens"] / wall if wall > 0 else 0.0
    row["errors"] = sorted({r["status"] for r in records if r["status"] not in ("ok", "429")})[:5]
    per_mode = {}
    for m in modes:
        lat = [r["latency_s"] for r in ok if r["mode"] == m]
        ttft = [r["ttft_s"] for r in ok if r["mode"] == m and r["ttft_s"] is not None]
        per_mode[m] = {"requests": len(lat), "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95),
                       "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
                       "tokens": sum(r["tokens"] for r in ok if r["mode"] == m)}
    row["per_mode"] = per_mode
    return row


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return r.status, json.loads(r.read())


def _cancel_frees_slot(url, model, prompt, new_tokens) -> bool:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
                                       extra_body={"mode": "memory", "ignore_eos": True})
    next(iter(stream))
    stream.close()
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        if _health(url)[1]["busy"] == 0:
            return True
        time.sleep(0.1)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--dtype", default=None, help="activation dtype override (e.g. bfloat16 on GPU)")
    ap.add_argument("--references", type=int, default=2000, help="knowledge base size (Wikipedia leads)")
    ap.add_argument("--codec", default="bf16", choices=["bf16", "int8", "pq", "f32"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,8,32,64", help="comma-separated client counts (mixed modes)")
    ap.add_argument("--ratio-clients", type=int, default=32, help="clients of the memory vs RAG vs generate_many runs")
    ap.add_argument("--slots", type=int, default=16, help="server slots per group")
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase (no new request after)")
    ap.add_argument("--work", default=None, help="cache dir for the bank / index")
    ap.add_argument("--out", default="bench_serve.json")
    args = ap.parse_args(argv)

    import uvicorn
    from _bench_utils import (decode_config_for, decode_setup, default_work_dir, device_info, device_name, log, table,
                              write_json)

    from m3jax.serve.app import create_app
    from m3jax.serve.engine import Engine, ServeConfig
    from m3jax.serve.metrics import ServeMetrics

    clients = [int(x) for x in args.clients.split(",") if x]
    n_prompts = max(clients + [args.ratio_clients, args.slots * args.groups]) * 2
    setup = decode_setup(args.preset, references=args.references, codec=args.codec, tokenizer_extra=n_prompts,
                         dtype=args.dtype, work=args.work or default_work_dir())
    cfg, kb = setup.cfg, setup.kb
    prompts = setup.prompts(n_prompts, args.prompt_len)
    sc = ServeConfig(slots=args.slots, groups=args.groups, cache_len=min(args.cache_len, cfg.max_len),
                     min_cache_len=min(256, args.cache_len), queue_size=args.queue_size,
                     request_timeout_s=args.time_limit + 60)
    engine = Engine(setup.params, cfg, setup.tokenizer, kb, sc, metrics=ServeMetrics())
    app = create_app(engine, cfg.name, drain_s=10)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    log(f"setup {setup.setup_s:.1f}s; server on {url}")

    rows = []
    for n in clients:
        log(f"{n} clients, mixed modes")
        rows.append(_phase(url, cfg.name, prompts, n, MODES, args.requests_per_client, args.time_limit,
                           args.new_tokens, warm_clients=len(MODES) * args.groups))
    ratio_rows = {}
    for m in ("memory", "rag"):
        log(f"{args.ratio_clients} clients, {m} only")
        ratio_rows[m] = _phase(url, cfg.name, prompts, args.ratio_clients, (m,), args.requests_per_client,
                               args.time_limit, args.new_tokens, warm_clients=args.groups)
    cancel_ok = _cancel_frees_slot(url, cfg.name, prompts[0], args.new_tokens * 4)
    code, health = _health(url)
    srv.should_exit = True
    th.join(timeout=120)

    # generate_many on the same prompts: `slots` per batch, `groups` batches in flight
    from m3jax.decode import Generator

    n_seq = args.ratio_clients * args.requests_per_client
    seqs = [prompts[i % len(prompts)] for i in range(n_seq)]
    batches = [seqs[i:i + args.slots] for i in range(0, n_seq, args.slots)]
    dc = decode_config_for(cfg, args.prompt_len, args.new_tokens)
    gen = Generator(setup.params, cfg, setup.tokenizer, kb.retriever(tokenizer=setup.tokenizer), dc)
    gen.generate_many(batches[: args.groups], mode="memory", max_new_tokens=args.new_tokens, ignore_eos=True,
                      pipeline=args.groups)  # warm-up
    t0 = time.perf_counter()
    res = gen.generate_many(batches, mode="memory", max_new_tokens=args.new_tokens, ignore_eos=True,
                            pipeline=args.groups)
    gm_tps = sum(r.stats.new_tokens for r in res) / (time.perf_counter() - t0)

    serve_vs_gm = ratio_rows["memory"]["tokens_per_s"] / gm_tps
    mem_vs_rag = ratio_rows["memory"]["tokens_per_s"] / max(ratio_rows["rag"]["tokens_per_s"], 1e-9)
    all_rows = rows + [ratio_rows["memory"], ratio_rows["rag"]]
    out = {"device": device_name(), "device_info": device_info(), "preset": cfg.name, "dtype": cfg.dtype,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "slots": args.slots, "groups": args.groups,
           "references": len(kb.bank), "runs": all_rows, "generate_many_tokens_per_s": gm_tps,
           "ratio_serve_generate_many": serve_vs_gm, "ratio_memory_rag": mem_vs_rag,
           "cancel_frees_slot": cancel_ok, "health_after": {"code": code, **health},
           "nothing_lost": all(r["lost"] == 0 for r in all_rows)}

    print(f"\nm3jax serve on {out['device']}: {cfg.name}, {args.slots} slots x {args.groups} groups, "
          f"{args.prompt_len} prompt + {args.new_tokens} new tokens")
    flat = []
    for r in all_rows:
        for m, pm in r["per_mode"].items():
            flat.append({"clients": r["clients"], "run": r["modes"], "mode": m, "requests": pm["requests"],
                         "tps": r["tokens_per_s"], "p50": pm["p50_s"], "p95": pm["p95_s"], "ttft50": pm["ttft_p50_s"],
                         "ttft95": pm["ttft_p95_s"], "refused": r["refused_429"], "lost": r["lost"]})
    print(table(flat, [("clients", "clients", "d"), ("run", "run", ""), ("mode", "mode", ""),
                       ("requests", "ok", "d"), ("tps", "run tokens/s", ".1f"), ("p50", "p50 s", ".2f"),
                       ("p95", "p95 s", ".2f"), ("ttft50", "ttft p50 s", ".2f"), ("ttft95", "ttft p95 s", ".2f"),
                       ("refused", "429", "d"), ("lost", "lost", "d")]))
    print(f"generate_many (batch {args.slots}, pipeline {args.groups}, memory): {gm_tps:.1f} tokens/s")
    print(f"serve/generate_many = {serve_vs_gm:.3f} (goal >= 0.80)   memory/rag = {mem_vs_rag:.2f} (goal >= 2.0)")
    print(f"nothing lost: {out['nothing_lost']}   cancelled stream freed its slot: {cancel_ok}   "
          f"health after: {code} {health['status']}")
    write_json(args.out, out)
    return 0 if out["nothing_lost"] and cancel_ok and code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
