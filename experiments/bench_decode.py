"""Decoding throughput with memory vs without vs RAG (the paper's Table 21 setting, scaled).

Batch 32, 128 prompt tokens, 128 generated tokens, 5 memories per 64-token chunk, 3 retrievals
with distinct memories (2 prompt chunks + 1 swap after 64 generated tokens; the LRU cache is
off so nothing is a cache hit), memories read from a TensorStore bank. The same model (random
weights: throughput does not depend on them) runs the three modes in one process; tokens/s
counts generated tokens over the whole call (retrieval, prefill and decoding).

    python experiments/bench_decode.py --preset demo --out bench_decode_demo.json
    python experiments/bench_decode.py --preset smollm2-135m --out bench_decode_smollm2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--references", type=int, default=2000, help="knowledge base size (Wikipedia leads)")
    ap.add_argument("--codec", default="bf16", choices=["bf16", "int8", "pq", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="activation dtype override (e.g. bfloat16 on GPU)")
    ap.add_argument("--work", default=None, help="cache dir for the bank / index (default: a temp dir)")
    ap.add_argument("--out", default="bench_decode.json")
    args = ap.parse_args(argv)

    import jax

    from m3jax import model as M
    from m3jax.assets import wiki_leads
    from m3jax.config import DecodeConfig, preset
    from m3jax.decode import Generator
    from m3jax.memory.build import build_knowledge_base, open_knowledge_base
    from m3jax.tokenizer import train_bpe

    t_setup = time.perf_counter()
    arts = wiki_leads()
    base = preset(args.preset)
    tok = train_bpe((a.text for a in arts[: args.references + args.batch * 4]), min(base.vocab_size, 8192))
    over = dict(reference_prefix=tok.reference_prefix(), bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    if args.dtype:
        over.update(dtype=args.dtype)
    cfg = dataclasses.replace(base, **over)
    params = M.init(cfg, jax.random.PRNGKey(0))
    work = args.work or tempfile.mkdtemp(prefix="m3jax_bench_")
    kb_dir = os.path.join(work, f"kb_{cfg.name}_{args.codec}")
    docs = [(a.doc_id, a.text) for a in arts[: args.references]]
    build_knowledge_base(kb_dir, params, cfg, tok, docs, codec=args.codec, show_progress=True,
                         log=lambda m: print(m, file=sys.stderr))
    kb = open_knowledge_base(kb_dir, cfg, params)
    retriever = kb.retriever(tokenizer=tok, cache_size=0)  # no cache hits: every read hits the bank
    prompts = []
    for a in arts[args.references: args.references + 4 * args.batch]:
        ids = tok.encode(a.text, bos=True)
        if len(ids) >= args.prompt_len:
            prompts.append(ids[: args.prompt_len])
        if len(prompts) == args.batch:
            break
    while len(prompts) < args.batch:
        prompts.append(prompts[len(prompts) % max(1, len(prompts))])
    rag_len = args.prompt_len + cfg.memories_per_chunk * cfg.reference_len
    dc = DecodeConfig(max_new_tokens=args.new_tokens, max_cache_len=min(cfg.max_len, rag_len + args.new_tokens),
                      prompt_bucket=cfg.chunk_size)
    gen = Generator(params, cfg, tok, retriever, dc)
    setup_s = time.perf_counter() - t_setup

    results = {}
    for mode in ("none", "memory", "rag"):
        t0 = time.perf_counter()
        gen.generate(prompts, mode=mode, ignore_eos=True)  # compile + warm up
        compile_s = time.perf_counter() - t0
        runs = [gen.generate(prompts, mode=mode, ignore_eos=True).stats for _ in range(args.repeats)]
        tps = [s.tokens_per_s for s in runs]
        med = runs[int(np.argsort(tps)[len(tps) // 2])]
        results[mode] = {"tokens_per_s": statistics.median(tps), "runs_tokens_per_s": tps,
                         "first_call_s": compile_s, "prefill_s": med.prefill_s, "decode_s": med.decode_s,
                         "retrieval_s": med.retrieval_s, "retrievals": med.retrievals,
                         "memory_swaps": med.memory_swaps, "prompt_tokens": med.prompt_tokens,
                         "new_tokens": med.new_tokens, "total_s": med.total_s}
    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    out = {
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "preset": cfg.name, "dtype": cfg.dtype, "codec": args.codec, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "memories_per_chunk": cfg.memories_per_chunk, "references": len(kb.bank),
        "bytes_per_memory": kb.bank.bytes_per_memory,
        "tokens_per_s": tps, "ratio_memory_none": tps["memory"] / tps["none"],
        "ratio_memory_rag": tps["memory"] / tps["rag"], "modes": results,
        "retriever": retriever.stats.as_dict(), "setup_s": setup_s,
        "paper": {"memory": 733, "none": 1131, "ratio_memory_none": 733 / 1131,
                  "note": "Memory3-2.4B on an A800, batch 32 (Table 21)"},
    }
    print(f"\ndecode throughput: {out['preset']} on {out['device']}, batch {args.batch}, "
          f"{args.prompt_len} prompt + {args.new_tokens} new tokens, codec {args.codec}")
    print(f"{'mode':<8} {'tokens/s':>10} {'prefill s':>10} {'decode s':>9} {'retrieval s':>12} {'retrievals':>10}")
    for m, r in results.items():
        print(f"{m:<8} {r['tokens_per_s']:>10.1f} {r['prefill_s']:>10.2f} {r['decode_s']:>9.2f} "
              f"{r['retrieval_s']:>12.3f} {r['retrievals']:>10}")
    print(f"memory/none = {out['ratio_memory_none']:.3f} (target >= 0.90; paper 0.648)   "
          f"memory/rag = {out['ratio_memory_rag']:.2f} (target >= 2.0)")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
