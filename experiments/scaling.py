"""Scaling figures: decode throughput vs memories per chunk and vs context length; bank gather
latency and index search latency vs knowledge-base size. Writes PNGs and one JSON.

    python experiments/scaling.py                                  # default: sizes up to 100k
    python experiments/scaling.py --max-refs 1000000 --sections bank,index   # up to 1M references
    python experiments/scaling.py --sections decode --decode-batch 32 --preset smollm2-135m

Sections (`--sections`, default all):

  decode   `Generator.generate` on the knowledge base of `experiments/bench_decode.py` (random
           weights of `--preset`, BPE on the shipped Wikipedia leads, `--references` leads in a
           bank of `--codec`), batch `--decode-batch`, LRU cache off:
           (a) memories per chunk 0, 1, 5, 10 at prompt 128 + 128 new tokens (0 = mode none; the
               bank serves any memories_per_chunk, the model and retriever are rebuilt per value);
           (b) prompt length 64..512 (+ `--new-tokens`) in modes none and memory (and rag where
               prompt + 5 references + new tokens fit max_len, with `--context-modes`).
           tokens/s counts generated tokens over the whole call (retrieval, prefill, decoding);
           median of `--decode-repeats` runs after one warm-up (compile) call.
  bank     one TensorStore bank grown to each size of `--sizes` (10k, 30k, 100k, 300k, 1M, up to
           `--max-refs`), of random codes of `--bank-codec` at the geometry of `--bank-preset`
           (default: int8 codes of the demo geometry, 2 layers x 2 x 2 kv heads x 8 tokens x 34 B =
           2,176 B per memory, plus 552 B of metadata per reference; 1M references = 2.7 GB on
           disk), written with `MemoryBank.append_codes`; at each size the gather of 5 and 160
           random memories, cold (files evicted from the page cache, bank reopened with an empty
           cache pool) and warm, median of `--repeats`.
  index    `VectorIndex` over synthetic unit vectors (dim 384 like MiniLM; a mixture of 1,024
           Gaussian clusters, so that a partitioning tree has structure to use; the queries are
           fresh draws from the same mixture): build time, index bytes on disk, search latency
           for one query per call and for batches of 32, exact (NumPy) vs ScaNN (m3jax's
           defaults for the size: AH + reorder, a tree from 100k), and ScaNN's recall@5 against
           exact search. Exact search is skipped above `--exact-max` vectors. Exact search is
           NumPy: on a busy host run with OPENBLAS_NUM_THREADS=1 (multithreaded BLAS collapses
           under load: 20 ms instead of 0.6 ms per query over 10k vectors here).
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
import numpy as np  # noqa: E402

SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
FIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


# ---------------------------------------------------------------------------- decode
def decode_scaling(args) -> dict[str, Any]:
    setup = U.decode_setup(args.preset, references=args.references, codec=args.codec,
                           work=args.work or U.default_work_dir(), show_progress=False)
    cfg = setup.cfg
    U.log(f"decode setup {setup.setup_s:.1f}s ({len(setup.kb.bank)} references)")
    out: dict[str, Any] = {"preset": cfg.name, "batch": args.decode_batch, "references": len(setup.kb.bank),
                           "codec": args.codec, "new_tokens": args.new_tokens}
    B, P, new = args.decode_batch, 128, args.new_tokens
    prompts = setup.prompts(B, P)
    dc = U.decode_config_for(cfg, P, new, rag=False)
    cases = {m: (setup.generator(dc, memories_per_chunk=m or cfg.memories_per_chunk), "none" if m == 0 else "memory")
             for m in (int(x) for x in args.memories.split(","))}  # 0: mode none
    res = U.run_generate_interleaved(cases, [prompts], args.decode_repeats)
    mem_rows = []
    for m, r in res.items():
        r["memories_per_chunk"] = m
        mem_rows.append(r)
        U.log(f"  memories/chunk {m:>2}: {r['tokens_per_s']:8.1f} tok/s")
    out["vs_memories"] = {"prompt_len": P, "rows": mem_rows}
    ctx_rows = []
    dc = dataclasses.replace(U.decode_config_for(cfg, P, new, rag=False), max_cache_len=cfg.max_len)
    gen = setup.generator(dc)
    for P in (int(x) for x in args.prompt_lens.split(",")):
        prompts = setup.prompts(B, P)
        cases = {}
        for mode in args.context_modes.split(","):
            need = P + (cfg.memories_per_chunk * cfg.reference_len if mode == "rag" else 0) + new
            if need > cfg.max_len:
                U.log(f"  prompt {P} {mode}: skipped ({need} tokens > max_len {cfg.max_len})")
                continue
            cases[mode] = (gen, mode)
        for mode, r in U.run_generate_interleaved(cases, [prompts], args.decode_repeats).items():
            r.update(mode=mode, prompt_len=P)
            ctx_rows.append(r)
            U.log(f"  prompt {P:>4} {mode:<6}: {r['tokens_per_s']:8.1f} tok/s")
    out["vs_context"] = {"rows": ctx_rows}
    return out


# ---------------------------------------------------------------------------- bank
def bank_scaling(args, sizes: list[int]) -> dict[str, Any]:
    import tensorstore as ts

    from bench_bank import cold_warm_gather, evict, random_codes
    from m3jax.config import preset
    from m3jax.memory.bank import MemoryBank
    from m3jax.memory.codec import PQCodec, make_codec

    cfg = preset(args.bank_preset)
    rng = np.random.default_rng(0)
    if args.bank_codec == "pq":  # timing only: random codebooks of the geometry
        p = PQCodec(cfg.head_dim)
        codec = PQCodec(cfg.head_dim, codebooks=rng.standard_normal(
            (cfg.memory_layers, 2, cfg.num_kv_heads, p.subspaces, 256, p.dsub)).astype(np.float32))
    else:
        codec = make_codec(args.bank_codec, cfg.head_dim)
    root = args.dir or tempfile.mkdtemp(prefix="m3jax-scaling-bank-")
    path = os.path.join(root, f"bank_{cfg.name}_{codec.name}")
    shutil.rmtree(path, ignore_errors=True)
    bank = MemoryBank.create(path, cfg, codec, "scaling")
    R, T = cfg.reference_len, cfg.tokens_per_memory
    out: dict[str, Any] = {"preset": cfg.name, "codec": codec.name, "bytes_per_memory": codec.memory_bytes(cfg),
                           "shard_size": bank.shard_size, "repeats": args.repeats, "rows": []}
    step = 16384
    written, write_s = 0, 0.0
    try:
        for n in sizes:
            t0 = time.perf_counter()
            while written < n:
                k = min(step, n - written)
                meta = dict(tokens=rng.integers(0, cfg.vocab_size, (k, R)).astype(np.int32), lengths=np.full(k, R),
                            doc_id=np.arange(written, written + k), char_start=np.zeros(k, int),
                            char_end=np.zeros(k, int))
                bank.append_codes(random_codes(codec, cfg, k, rng), np.ones((k, T), bool), meta)
                written += k
            write_s += time.perf_counter() - t0
            disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
            row: dict[str, Any] = {"size": n, "write_s_total": write_s, "disk_bytes": disk}
            for k in (5, 160):
                cold, warm = [], []
                for _ in range(args.repeats):
                    row["evict"] = evict(path, False)
                    b = MemoryBank.open(path, cfg, "scaling", check="none",
                                        context=ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}}))
                    ids = rng.choice(n, k, replace=False)
                    c_s, w_s = cold_warm_gather(b, ids)
                    cold.append(c_s)
                    warm.append(w_s)
                row[f"gather{k}_cold_ms"] = float(np.median(cold) * 1e3)
                row[f"gather{k}_warm_ms"] = float(np.median(warm) * 1e3)
            out["rows"].append(row)
            U.log(f"  bank {n:>9,}: write {write_s:6.1f}s, disk {disk / 2**20:8.1f} MiB, gather5 cold "
                  f"{row['gather5_cold_ms']:.2f} warm {row['gather5_warm_ms']:.2f} ms, gather160 cold "
                  f"{row['gather160_cold_ms']:.2f} warm {row['gather160_warm_ms']:.2f} ms")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            if not args.dir:
                shutil.rmtree(root, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- index
def clustered(n: int, dim: int, seed: int, centers: np.ndarray, spread: float = 0.8) -> np.ndarray:
    """n unit vectors: a random one of `centers` plus Gaussian noise of norm ~`spread`."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        k = min(65536, n - s)
        x = centers[rng.integers(0, len(centers), k)] + rng.standard_normal((k, dim), np.float32) * (spread / dim ** 0.5)
        out[s:s + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_scaling(args, sizes: list[int]) -> dict[str, Any]:
    from m3jax.memory.index import VectorIndex

    dim, k = args.dim, 5
    crng = np.random.default_rng(123)
    centers = crng.standard_normal((1024, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    db_all = clustered(max(sizes), dim, 1, centers)
    queries = clustered(max(256, args.query_batch), dim, 2, centers)
    out: dict[str, Any] = {"dim": dim, "k": k, "query_batch": args.query_batch, "clusters": 1024, "rows": []}
    tmp = tempfile.mkdtemp(prefix="m3jax-scaling-index-")
    try:
        for n in sizes:
            db = db_all[:n]
            row: dict[str, Any] = {"size": n}
            methods = (["exact"] if n <= args.exact_max else []) + ["scann"]  # exact first: lower peak RAM
            truth = None
            for method in methods:
                t0 = time.perf_counter()
                idx = VectorIndex.build(db, method=method)
                build_s = time.perf_counter() - t0
                d = os.path.join(tmp, f"{method}_{n}")
                idx.save(d)
                disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
                shutil.rmtree(d, ignore_errors=True)
                idx.search(queries[:args.query_batch], k)  # warm
                one = [U.median_ms(lambda i=i: idx.search(queries[i:i + 1], k), 1) for i in range(args.single_queries)]
                batch = U.median_ms(lambda: idx.search(queries[:args.query_batch], k), args.repeats)
                ids, _ = idx.search(queries, k)
                row[method] = {"build_s": build_s, "disk_bytes": disk, "bytes_per_vector": disk / n,
                               "search1_ms": float(np.median(one)), f"search{args.query_batch}_ms": batch,
                               "qps_batched": args.query_batch / batch * 1e3,
                               "params": None if idx.params is None else idx.params.__dict__}
                if method == "exact":
                    truth = ids
                else:
                    scann_ids = ids
                del idx
            if truth is None:  # exact top-k of the queries by brute force, in blocks
                from m3jax.memory.index import exact_topk

                truth = exact_topk(db, queries, k)[0]
            row["scann"]["recall_at_5"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(scann_ids, truth)]))
            out["rows"].append(row)
            s = row["scann"]
            e = row.get("exact")
            U.log(f"  index {n:>9,}: scann build {s['build_s']:.1f}s, {s['bytes_per_vector']:.0f} B/vector, "
                  f"1 query {s['search1_ms']:.2f} ms, {args.query_batch} queries {s[f'search{args.query_batch}_ms']:.2f} ms, "
                  f"recall@5 {s['recall_at_5']:.3f}"
                  + (f"; exact 1 query {e['search1_ms']:.2f} ms, {args.query_batch} queries "
                     f"{e[f'search{args.query_batch}_ms']:.2f} ms" if e else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- figures
def plot(res: dict[str, Any], out_dir: str, dpi: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    dev = res["device"]["kind"]
    files = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(p)

    if "decode" in res:
        d = res["decode"]
        rows = d["vs_memories"]["rows"]
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        x = [r["memories_per_chunk"] for r in rows]
        ax.plot(x, [r["tokens_per_s"] for r in rows], "o-", label="tokens/s (whole call)")
        ax.set_xlabel("memories per 64-token chunk (0 = no memory)")
        ax.set_ylabel("generated tokens/s")
        ax.set_xticks(x)
        ax2 = ax.twinx()
        ax2.bar(x, [r["retrieval_s"] for r in rows], width=0.6, alpha=0.25, color="C1", label="retrieval s")
        ax2.set_ylabel("retrieval s per call", color="C1")
        ax.set_title(f"{d['preset']}, batch {d['batch']}, 128+{d['new_tokens']} tokens ({dev})", fontsize=8)
        ax.set_ylim(bottom=0)
        save(fig, "decode_vs_memories.png")
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for mode in ("none", "memory", "rag"):
            rs = [r for r in d["vs_context"]["rows"] if r["mode"] == mode]
            if rs:
                ax.plot([r["prompt_len"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("generated tokens/s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title(f"{d['preset']}, batch {d['batch']}, +{d['new_tokens']} new tokens ({dev})", fontsize=8)
        save(fig, "decode_vs_context.png")
    if "bank" in res:
        b = res["bank"]
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        n = [r["size"] for r in b["rows"]]
        for key, lab, st in (("gather5_cold_ms", "5 cold", "o--"), ("gather5_warm_ms", "5 warm", "o-"),
                             ("gather160_cold_ms", "160 cold", "s--"), ("gather160_warm_ms", "160 warm", "s-")):
            ax.plot(n, [r[key] for r in b["rows"]], st, label=lab)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memories in the bank")
        ax.set_ylabel("gather latency (ms)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"bank gather, {b['codec']} codes of {b['preset']} ({b['bytes_per_memory']} B/memory)",
                     fontsize=8)
        save(fig, "bank_gather_vs_size.png")
    if "index" in res:
        ix = res["index"]
        qb = ix["query_batch"]
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for method, st in (("scann", "-"), ("exact", "--")):
            rs = [r for r in ix["rows"] if method in r]
            if not rs:
                continue
            n = [r["size"] for r in rs]
            ax.plot(n, [r[method]["search1_ms"] for r in rs], "o" + st, label=f"{method}, 1 query")
            ax.plot(n, [r[method][f"search{qb}_ms"] for r in rs], "s" + st, label=f"{method}, {qb} queries")
        for r in ix["rows"]:
            ax.annotate(f"{r['scann']['recall_at_5']:.2f}", (r["size"], r["scann"]["search1_ms"]), fontsize=6,
                        textcoords="offset points", xytext=(0, 5), ha="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors in the index (dim %d)" % ix["dim"])
        ax.set_ylabel("search latency per call (ms)")
        ax.legend(fontsize=7)
        ax.set_title("index search (labels: ScaNN recall@5)", fontsize=8)
        save(fig, "index_search_vs_size.png")
    return files


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="decode,bank,index")
    ap.add_argument("--out-dir", default=FIG_DIR, help="where the PNGs and scaling.json go")
    ap.add_argument("--out", default=None, help="JSON path (default OUT_DIR/scaling.json, or "
                    "OUT_DIR/scaling_<sections>.json when not all sections run)")
    ap.add_argument("--dpi", type=int, default=80)
    # decode
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--references", type=int, default=200)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--memories", default="0,1,5,10")
    ap.add_argument("--prompt-lens", default="64,128,256,512")
    ap.add_argument("--context-modes", default="none,memory", help="add rag to include it where it fits")
    ap.add_argument("--work", default=None, help=f"knowledge-base cache dir (default {U.default_work_dir()})")
    # bank / index
    ap.add_argument("--max-refs", type=int, default=100_000, help="largest bank / index size (1000000 for 1M)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--bank-preset", default="demo")
    ap.add_argument("--bank-codec", default="int8", choices=["bf16", "int8", "pq", "f32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the bank (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the bank")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--query-batch", type=int, default=32)
    ap.add_argument("--single-queries", type=int, default=30, help="one-query calls timed per size")
    ap.add_argument("--exact-max", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    sizes = [s for s in (int(x) for x in args.sizes.split(",")) if s <= args.max_refs]
    t0 = time.perf_counter()
    res: dict[str, Any] = {"device": U.device_info(), "settings": vars(args), "sizes": sizes}
    for s in args.sections.split(","):
        U.log(f"[{s}]")
        t = time.perf_counter()
        if s == "decode":
            res["decode"] = decode_scaling(args)
        elif s == "bank":
            res["bank"] = bank_scaling(args, sizes)
        elif s == "index":
            res["index"] = index_scaling(args, sizes)
        else:
            ap.error(f"unknown section {s!r}")
        res[s]["section_s"] = time.perf_counter() - t
    res["figures"] = plot(res, args.out_dir, args.dpi)
    res["total_s"] = time.perf_counter() - t0
    print_tables(res)
    secs = args.sections.split(",")
    name = "scaling.json" if sorted(secs) == ["bank", "decode", "index"] else f"scaling_{'_'.join(secs)}.json"
    U.write_json(args.out or os.path.join(args.out_dir, name), res)
    return res


def print_tables(res: dict[str, Any]) -> None:
    print(f"\nscaling on {res['device']['device']} [{res['device']['kind']}], total {res['total_s']:.0f}s")
    if "decode" in res:
        d = res["decode"]
        print(f"\ndecode, {d['preset']}, batch {d['batch']}, prompt 128 + {d['new_tokens']} new tokens, vs memories per chunk")
        print(U.table(d["vs_memories"]["rows"], [("memories_per_chunk", "memories/chunk", "d"),
                                                  ("tokens_per_s", "tokens/s", ",.1f"), ("prefill_s", "prefill s", ".3f"),
                                                  ("decode_s", "decode s", ".3f"), ("retrieval_s", "retrieval s", ".3f"),
                                                  ("first_call_s", "1st call s", ".1f")]))
        print(f"\ndecode vs prompt length (+{d['new_tokens']} new tokens)")
        print(U.table(d["vs_context"]["rows"], [("prompt_len", "prompt", "d"), ("mode", "mode", ""),
                                                 ("tokens_per_s", "tokens/s", ",.1f"), ("prefill_s", "prefill s", ".3f"),
                                                 ("decode_s", "decode s", ".3f"), ("retrieval_s", "retrieval s", ".3f")]))
    if "bank" in res:
        b = res["bank"]
        print(f"\nbank gather ({b['codec']} codes of {b['preset']}, {b['bytes_per_memory']} B/memory), ms, median of "
              f"{b['repeats']}")
        rows = [{**r, "disk_mib": r["disk_bytes"] / 2**20} for r in b["rows"]]
        print(U.table(rows, [("size", "memories", ",d"), ("disk_mib", "disk MiB", ",.0f"),
                             ("write_s_total", "write s (cum.)", ".1f"),
                             ("gather5_cold_ms", "5 cold", ".2f"), ("gather5_warm_ms", "5 warm", ".2f"),
                             ("gather160_cold_ms", "160 cold", ".2f"), ("gather160_warm_ms", "160 warm", ".2f")]))
    if "index" in res:
        ix = res["index"]
        qb = ix["query_batch"]
        rows = []
        for r in ix["rows"]:
            s, e = r["scann"], r.get("exact", {})
            rows.append({"size": r["size"], "build": s["build_s"], "bpv": s["bytes_per_vector"],
                         "s1": s["search1_ms"], "sb": s[f"search{qb}_ms"], "qps": s["qps_batched"],
                         "recall": s["recall_at_5"], "leaves": (s["params"] or {}).get("num_leaves") if
                         (s["params"] or {}).get("tree") else 0,
                         "e1": e.get("search1_ms"), "eb": e.get(f"search{qb}_ms")})
        print(f"\nindex search, dim {ix['dim']}, k {ix['k']}, ms per call")
        print(U.table(rows, [("size", "vectors", ",d"), ("build", "scann build s", ".1f"),
                             ("bpv", "scann B/vector", ",.0f"), ("leaves", "tree leaves", "d"),
                             ("s1", "scann 1q", ".2f"), ("sb", f"scann {qb}q", ".2f"), ("qps", "scann q/s", ",.0f"),
                             ("recall", "recall@5", ".3f"), ("e1", "exact 1q", ".2f"), ("eb", f"exact {qb}q", ".2f")]))


if __name__ == "__main__":
    main()
