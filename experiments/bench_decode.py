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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _bench_utils (and the repo root, via it)


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

    from _bench_utils import decode_config_for, decode_setup, device_name, log, run_generate, write_json

    setup = decode_setup(args.preset, references=args.references, codec=args.codec,
                         tokenizer_extra=args.batch * 4, dtype=args.dtype, work=args.work)
    cfg, kb = setup.cfg, setup.kb
    prompts = setup.prompts(args.batch, args.prompt_len)
    gen = setup.generator(decode_config_for(cfg, args.prompt_len, args.new_tokens))
    retriever = gen.retriever  # no cache hits: every read hits the bank
    setup_s = setup.setup_s
    log(f"setup {setup_s:.1f}s")

    results = {mode: run_generate(gen, prompts, mode, args.repeats) for mode in ("none", "memory", "rag")}
    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    out = {
        "device": device_name(),
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
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
