"""One benchmark harness over m3jax's pure functions; prints a table and writes JSON.

    python experiments/bench.py --preset demo --out bench.json
    python experiments/bench.py --sections forward,encode,train --batch 8 --seq-len 1024 dtype=bfloat16
    python experiments/bench.py --preset smollm2-135m --decode-batch 32 --references 2000 --out b.json

Sections (`--sections`, default all), on one random-weight model of `--preset` (throughput does
not depend on the weights) whose tokenizer and knowledge base are those of
`experiments/bench_decode.py` (BPE trained on the shipped Wikipedia leads; first `--references`
leads encoded into a bank of `--codec` and indexed):

  forward    `model.forward` on [batch, seq_len] tokens, without memory and with
             memories_per_chunk memories per 64-token chunk (a `ChunkMemory`): tokens/s.
  encode     `memory.encode.encode` (jitted) of `--encode-refs` full-length references: references/s.
  bank       per codec (bf16, int8, pq): `bench_bank.bench_codec_bank` on a bank of `--bank-n`
             random memories of the model's geometry: gather of 5 and 160 memories (cold after
             evicting the files from the page cache, warm, and warm + decode on device).
  retrieval  `Retriever.search` (MiniLM embedding + index search + leakage filter) on batches of
             64-token query chunks (`--query-batches`), and `Retriever.retrieve` (+ bank gather
             and decode), LRU cache off.
  train      `bench_train.Mode` steps: warmup, continual without and with memory_grad.
  decode     `Generator.generate` in modes none / memory / rag (`bench_decode.py`'s setting,
             smaller by default): tokens/s over the whole call.

Timing (see `_bench_utils`): compile time measured alone (AOT `lower().compile()`; for the
Generator and the retriever, the first call), then the median of repeated runs after warm-up;
cases compared by a ratio (forward memory/none, train continual/warmup, decode memory/none and
memory/rag) run interleaved in one process. MFU is reported on accelerators with a known peak
(`m3jax.train.metrics.PEAK_FLOPS`: H100 989 TFLOP/s dense bf16, TPU per generation) from the model
FLOPs of `m3jax.train.metrics.flops_per_token` (forward = 1/3 of it, plus memory reads) and, for
encoding, `cost_model.write_flops`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_utils as U  # noqa: E402  (also puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("forward", "encode", "bank", "retrieval", "train", "decode")


def row(section: str, case: str, median_s: float, *, items: float | None = None, unit: str = "",
        compile_s: float | None = None, flops: float | None = None, info: dict | None = None,
        **extra: Any) -> dict[str, Any]:
    """One table row: `items` per run -> throughput items/s; `flops` per run -> FLOP/s, MFU."""
    r = {"section": section, "case": case, "median_ms": median_s * 1e3, "compile_s": compile_s,
         "throughput": items / median_s if items else None, "unit": unit}
    if flops:
        r["flops_per_s"] = flops / median_s
        r["mfu"] = U.mfu(r["flops_per_s"], info)
    r.update(extra)
    return r


# ---------------------------------------------------------------------------- sections
def bench_forward(cfg, params, args, info) -> tuple[list[dict], dict]:
    from cost_model import forward_flops_per_token
    from m3jax import model as M
    from m3jax.model.memory import ChunkMemory, MemoryKV

    B, T = args.batch, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 0] = cfg.bos_id
    tokens = jnp.asarray(tokens)
    C = -(-T // cfg.chunk_size)
    m = cfg.memories_per_chunk
    kv = jax.random.normal(jax.random.PRNGKey(1), (B * C * m, cfg.memory_layers, 2, cfg.num_kv_heads,
                                                   cfg.tokens_per_memory, cfg.head_dim), jnp.dtype(cfg.dtype))
    memory = ChunkMemory.from_memories(MemoryKV(kv, jnp.ones((B * C * m, cfg.tokens_per_memory), bool)), B, C)
    prefix = jax.jit(M.prefix_kv, static_argnums=1)(params, cfg)
    f_none = jax.jit(lambda p, t, pre: M.forward(p, t, cfg, prefix=pre))
    f_mem = jax.jit(lambda p, t, pre, mem: M.forward(p, t, cfg, prefix=pre, memory=mem))
    c_none, s_none = U.compile_timed(f_none, params, tokens, prefix)
    c_mem, s_mem = U.compile_timed(f_mem, params, tokens, prefix, memory)
    runners = [U.Runner("none", lambda: c_none(params, tokens, prefix)),
               U.Runner("memory", lambda: c_mem(params, tokens, prefix, memory))]
    U.interleaved(runners, args.repeats, args.warmup)
    rows = []
    for r, cs, mt in ((runners[0], s_none, 0), (runners[1], s_mem, cfg.memory_block_len)):
        fpt = forward_flops_per_token(cfg, T, memory_tokens=mt)
        rows.append(row("forward", f"{r.name} B{B}xT{T}", r.median_s, items=B * T, unit="tok/s", compile_s=cs,
                        flops=fpt * B * T, info=info, runs_s=r.times, flops_per_token=fpt))
    ratio = runners[1].median_s / runners[0].median_s
    rounds = float(np.median([a / b for a, b in zip(runners[1].times, runners[0].times)]))
    return rows, {"time_ratio_memory_none": ratio, "time_ratio_memory_none_rounds": rounds,
                  "batch": B, "seq_len": T, "memory_tokens_per_chunk": cfg.memory_block_len}


def bench_encode(cfg, params, args, info) -> tuple[list[dict], dict]:
    from cost_model import write_flops
    from m3jax.memory.encode import encode

    N, R = args.encode_refs, cfg.reference_len
    rng = np.random.default_rng(2)
    tok = jnp.asarray(rng.integers(3, cfg.vocab_size, (N, R)).astype(np.int32))
    mask = jnp.ones((N, R), bool)
    # a fresh jit of `encode` (what `encode_jit` runs): the knowledge-base build already compiled
    # encode_jit for this batch, and its cached executable would hide the compile time
    fresh = jax.jit(lambda p, t, m: encode(p, cfg, t, m))
    comp, cs = U.compile_timed(fresh, params, tok, mask)
    r = U.Runner("encode", lambda: comp(params, tok, mask))
    U.interleaved([r], args.repeats, args.warmup)
    w = write_flops(cfg)["total"]
    return ([row("encode", f"{N} refs x {R} tokens", r.median_s, items=N, unit="ref/s", compile_s=cs,
                 flops=w * N, info=info, runs_s=r.times, write_flops_per_ref=w)],
            {"references": N, "write_flops_per_reference": w})


def bench_bank_section(cfg, args) -> tuple[list[dict], dict]:
    import bench_bank

    root = tempfile.mkdtemp(prefix="m3jax-bench-bank-")
    ns = argparse.Namespace(n=args.bank_n, repeats=max(3, args.repeats), shard_size=None, drop_caches=False,
                            keep=False)
    rows, detail = [], {}
    try:
        for name in args.codecs.split(","):
            res = bench_bank.bench_codec_bank(cfg, name, root, ns)
            detail[name] = res
            for k in (5, 160):
                for kind, key in (("cold", f"gather{k}_cold_ms"), ("warm", f"gather{k}_warm_ms"),
                                  ("warm+decode", f"gather{k}_decoded_warm_ms")):
                    rows.append(row("bank", f"{name} gather {k} {kind}", res[key] / 1e3, items=k, unit="mem/s",
                                    bytes_per_memory=res["bytes_per_memory"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, {"bank_memories": args.bank_n, "codecs": detail}


def bench_retrieval(setup, args) -> tuple[list[dict], dict]:
    ret = setup.retriever(cache_size=0)
    chunks = [p[i: i + setup.cfg.chunk_size] for p in setup.prompts(max(int(b) for b in args.query_batches.split(",")), 128)
              for i in (0, 64)]
    rows, detail = [], {"index_method": ret.index.method, "index_size": len(ret.index),
                        "embedder": type(ret.embedder).__name__, "candidates": ret.candidates,
                        "threshold": ret.threshold}
    for b in (int(x) for x in args.query_batches.split(",")):
        q = chunks[:b]
        runners = [U.Runner("search", lambda q=q: ret.search(q)),
                   U.Runner("retrieve", lambda q=q: ret.retrieve(q)[1].kv_ILZKEH)]
        first = {}
        for r in runners:  # the first call compiles the embedder for this batch bucket
            t0 = time.perf_counter()
            r.run(timed=False)
            first[r.name] = time.perf_counter() - t0
        before = ret.stats.as_dict()
        U.interleaved(runners, args.repeats, max(0, args.warmup - 1))
        after = ret.stats.as_dict()
        calls = after["calls"] - before["calls"]  # search calls (retrieve calls search once)
        parts = {k.replace("_s", "_ms"): (after[k] - before[k]) / max(1, calls) * 1e3
                 for k in ("embed_s", "search_s", "filter_s")}
        parts["fetch_ms"] = (after["fetch_s"] - before["fetch_s"]) / max(1, calls // 2) * 1e3
        for r in runners:
            rows.append(row("retrieval", f"{r.name} batch {b}", r.median_s, items=b, unit="query/s",
                            compile_s=first[r.name], runs_s=r.times,
                            **({"ms_per_part": parts} if r.name == "retrieve" else {})))
        detail[f"batch_{b}_ms_per_part"] = parts
    return rows, detail


def bench_train_section(cfg, args, info) -> tuple[list[dict], dict]:
    import bench_train as BT
    from m3jax import sharding as S
    from m3jax.config import MeshConfig, TrainConfig
    from m3jax.model.placement import init_sharded
    from m3jax.train import metrics as L

    T = args.train_seq_len
    mesh_cfg = MeshConfig(1, -1, 1)
    mesh = S.make_mesh(mesh_cfg)
    base = TrainConfig(seq_len=T, batch_size=args.train_batch, steps=1000, warmup_steps=10, mesh=mesh_cfg)
    params = init_sharded(cfg, jax.random.key(0), mesh)
    batch = BT.make_batch(cfg, args.train_batch, T)
    modes = []
    for name, stage, mg in BT.MODES:
        modes.append(BT.Mode(name, cfg, dataclasses.replace(base, stage=stage, memory_grad=mg), mesh, params, batch))
        U.log(f"  train: compiled {name} in {modes[-1].compile_s:.1f}s")
    BT.bench(modes, args.train_steps, args.warmup)
    rows, detail = [], {"batch": args.train_batch, "seq_len": T, "lookback": base.memory_lookback}
    warm = modes[0]
    for m in modes:
        fpt = L.flops_per_token(cfg, T, stage=m.tc.stage, memory_grad=m.tc.memory_grad, lookback=m.tc.memory_lookback)
        med = float(np.median(m.times))
        ntok = args.train_batch * T
        rows.append(row("train", m.name, med, items=ntok, unit="tok/s", compile_s=m.compile_s, flops=fpt * ntok,
                        info=info, runs_s=m.times, flops_per_token=fpt, loss_last=m.losses[-1]))
        detail[f"ratio_{m.name}_warmup"] = med / float(np.median(warm.times))
        detail[f"ratio_rounds_{m.name}_warmup"] = float(np.median([a / b for a, b in zip(m.times, warm.times)]))
    return rows, detail


def bench_decode_section(setup, args, info) -> tuple[list[dict], dict]:
    from cost_model import forward_flops_per_token

    cfg = setup.cfg
    prompts = setup.prompts(args.decode_batch, args.prompt_len)
    gen = setup.generator(U.decode_config_for(cfg, args.prompt_len, args.new_tokens))
    res = U.run_generate_interleaved({m: (gen, m) for m in ("none", "memory", "rag")}, [prompts],
                                      args.decode_repeats)
    for mode, r in res.items():
        U.log(f"  decode {mode}: {r['tokens_per_s']:.1f} tok/s")
    rows = []
    for mode, r in res.items():
        ctx = r["prompt_tokens"] / len(prompts) + args.new_tokens / 2
        fpt = forward_flops_per_token(cfg, int(ctx), cfg.memory_block_len if mode == "memory" else 0)
        flops = (r["prompt_tokens"] + r["new_tokens"]) * fpt  # approximate model FLOPs of the call
        rows.append(row("decode", f"{mode} B{len(prompts)} {args.prompt_len}+{args.new_tokens}", r["total_s"],
                        items=r["new_tokens"], unit="tok/s", compile_s=r["first_call_s"], flops=flops, info=info,
                        prefill_s=r["prefill_s"], decode_s=r["decode_s"], retrieval_s=r["retrieval_s"],
                        retrievals=r["retrievals"], tokens_per_s_median=r["tokens_per_s"]))
    tps = {m: r["tokens_per_s"] for m, r in res.items()}
    return rows, {"modes": res, "tokens_per_s": tps, "ratio_memory_none": tps["memory"] / tps["none"],
                  "ratio_memory_rag": tps["memory"] / tps["rag"], "batch": len(prompts),
                  "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "codec": args.codec,
                  "references": len(setup.kb.bank), "retriever": gen.retriever.stats.as_dict()}


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per case (forward, encode, bank, retrieval)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    ap.add_argument("--batch", type=int, default=4, help="forward: sequences")
    ap.add_argument("--seq-len", type=int, default=512, help="forward: tokens per sequence")
    ap.add_argument("--encode-refs", type=int, default=64, help="encode: references per call")
    ap.add_argument("--bank-n", type=int, default=2048, help="bank: memories per benchmark bank")
    ap.add_argument("--codecs", default="bf16,int8,pq", help="bank: codecs")
    ap.add_argument("--query-batches", default="1,8,32", help="retrieval: query batch sizes")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--train-seq-len", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=3, help="train: timed steps per mode")
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="128 = 2 chunks: one memory swap")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--references", type=int, default=200, help="knowledge base: Wikipedia leads")
    ap.add_argument("--codec", default="int8", choices=["bf16", "int8", "pq", "f32"], help="knowledge base codec")
    ap.add_argument("--work", default=None, help=f"knowledge-base cache dir (default {U.default_work_dir()})")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="ModelConfig key=value overrides (e.g. dtype=bfloat16)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")

    t_all = time.perf_counter()
    info = U.device_info()
    U.log(f"device {info['device']} ({info['kind']}, {info['count']} device(s)), peak "
          f"{info['peak_flops'] / 1e12 if info['peak_flops'] else '-'} TFLOP/s")
    if {"retrieval", "decode"} & set(sections):  # the model of bench_decode.py + a knowledge base
        setup = U.decode_setup(args.preset, references=args.references, codec=args.codec,
                               work=args.work or U.default_work_dir(), overrides=args.overrides,
                               show_progress=False)
        cfg, params, setup_s = setup.cfg, setup.params, setup.setup_s
        U.log(f"setup (tokenizer, model, knowledge base of {len(setup.kb.bank)} references) {setup_s:.1f}s")
    else:  # no knowledge base needed: the preset as is
        from m3jax import model as M
        from m3jax.config import apply_overrides, preset

        setup, t0 = None, time.perf_counter()
        cfg = apply_overrides(preset(args.preset), args.overrides)
        params = M.init(cfg, jax.random.PRNGKey(0))
        setup_s = time.perf_counter() - t0
    rows: list[dict] = []
    details: dict[str, Any] = {"setup_s": setup_s}
    for s in sections:
        t0 = time.perf_counter()
        U.log(f"[{s}]")
        if s == "forward":
            r, d = bench_forward(cfg, params, args, info)
        elif s == "encode":
            r, d = bench_encode(cfg, params, args, info)
        elif s == "bank":
            r, d = bench_bank_section(cfg, args)
        elif s == "retrieval":
            r, d = bench_retrieval(setup, args)
        elif s == "train":
            r, d = bench_train_section(cfg, args, info)
        else:
            r, d = bench_decode_section(setup, args, info)
        d["section_s"] = time.perf_counter() - t0
        rows += r
        details[s] = d

    ratios = {}
    if "forward" in details:
        ratios["forward time memory/none"] = details["forward"]["time_ratio_memory_none"]
    if "train" in details:
        for k in ("continual_nograd", "continual_grad"):
            ratios[f"train step {k}/warmup"] = details["train"][f"ratio_{k}_warmup"]
    if "decode" in details:
        ratios["decode tokens/s memory/none"] = details["decode"]["ratio_memory_none"]
        ratios["decode tokens/s memory/rag"] = details["decode"]["ratio_memory_rag"]
    paper = {"decode tokens/s memory/none": 733 / 1131, "train step continual_nograd/warmup": 2.0,
             "train step continual_grad/warmup": 2.0}

    cols = [("section", "section", ""), ("case", "case", ""), ("median_ms", "median ms", ",.2f"),
            ("throughput", "throughput", ",.1f"), ("unit", "unit", ""), ("compile_s", "compile/1st s", ".2f")]
    if info["peak_flops"]:
        cols += [("flops_per_s", "TFLOP/s", ".3g"), ("mfu", "MFU", ".1%")]
        for r in rows:
            if r.get("flops_per_s"):
                r["flops_per_s"] = r["flops_per_s"] / 1e12
    print(f"\nm3jax bench: {cfg.name} ({cfg.num_params() / 1e6:.2f}M non-embedding params, dtype {cfg.dtype}) "
          f"on {info['device']} [{info['kind']}]")
    print(U.table(rows, cols))
    print()
    for k, v in ratios.items():
        p = paper.get(k)
        print(f"{k:<36} {v:6.3f}" + (f"   (paper {p:.3f})" if p else ""))
    if "retrieval" in details:
        d = details["retrieval"]
        print(f"retrieval ({d['index_method']} index of {d['index_size']} references, {d['embedder']}), "
              "ms per call:")
        for k, v in d.items():
            if k.endswith("_ms_per_part"):
                print(f"  {k.replace('_ms_per_part', ''):<9} " + "  ".join(f"{p} {x:.2f}" for p, x in v.items()))
    total = time.perf_counter() - t_all
    print(f"total {total:.1f}s")
    if info["peak_flops"]:
        for r in rows:  # back to FLOP/s in the JSON
            if r.get("flops_per_s"):
                r["flops_per_s"] = r["flops_per_s"] * 1e12
    out = {"device": info, "preset": args.preset, "model_config": cfg.to_dict(),
           "num_params": cfg.num_params(), "settings": {k: v for k, v in vars(args).items()},
           "rows": rows, "ratios": ratios, "paper": paper, "details": details, "total_s": total}
    U.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
