"""Decoding throughput with memory vs without vs RAG (the paper's Table 21 setting, scaled).

Batch 32, 128 prompt tokens, 128 generated tokens, 5 memories per 64-token chunk, 3 retrievals
with distinct memories (2 prompt chunks + 1 swap after 64 generated tokens; the LRU cache is
off so nothing is a cache hit), memories read from a TensorStore bank. The same model (random
weights: throughput does not depend on them) runs the modes in one process, interleaved.

A serving run has more than one batch: `--batches 2` batches of 32 go through
`Generator.generate_many` with `--pipeline 2` of them in flight, so that one batch's per-chunk
retrieval runs while the other decodes (every mode runs the same call). tokens/s counts all
generated tokens over the wall time of the whole call (retrieval, prefill and decoding). The
`memory_serial` and `none_serial` rows are the memory and none runs with one batch at a time (`pipeline=1`): there each
swap waits for its retrieval.

    python experiments/bench_decode.py --preset demo --out bench_decode_demo.json
    python experiments/bench_decode.py --preset smollm2-135m --repeats 1 --out bench_decode_smollm2.json

The side-by-side baseline: when transformers is installed (the `bench` extra: torch CPU +
transformers) in this interpreter or in the one given by `--hf-python` (or $M3JAX_HF_PYTHON),
`hf_generate_baseline.py` runs transformers' `generate` (greedy, same geometry, same vocab, same
dtype, random weights, `--hf-threads` torch threads) on the same prompt batches in a subprocess
after the m3jax cases, and the table shows every mode's ratio to it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _bench_utils (and the repo root, via it)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2, help="batches of --batch prompts (distinct prompts)")
    ap.add_argument("--pipeline", type=int, default=2, help="batches in flight in generate_many")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--references", type=int, default=2000, help="knowledge base size (Wikipedia leads)")
    ap.add_argument("--codec", default="bf16", choices=["bf16", "int8", "pq", "f32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-serial", action="store_true", help="skip the memory_serial and none_serial (pipeline=1) cases")
    ap.add_argument("--dtype", default=None, help="activation dtype override (e.g. bfloat16 on GPU)")
    ap.add_argument("--work", default=None, help="cache dir for the bank / index (default: "
                                                 "$TMPDIR/m3jax_bench_cache, keyed by every input)")
    ap.add_argument("--hf-python", default=None,
                    help="interpreter with torch + transformers for the baseline (default: this one if it has "
                         "them, else $M3JAX_HF_PYTHON); 'none' skips the baseline")
    ap.add_argument("--hf-threads", type=int, default=2, help="torch threads of the transformers baseline")
    ap.add_argument("--out", default="bench_decode.json")
    args = ap.parse_args(argv)
    if args.batches < 1 or args.pipeline < 1 or args.batch < 1:
        ap.error("--batch, --batches and --pipeline must be >= 1")

    from _bench_utils import (decode_config_for, decode_setup, default_work_dir, device_info, device_name, log,
                              run_generate_interleaved, table, write_json)

    setup = decode_setup(args.preset, references=args.references, codec=args.codec,
                         tokenizer_extra=args.batch * 4, dtype=args.dtype, work=args.work or default_work_dir())
    cfg, kb = setup.cfg, setup.kb
    prompts = setup.prompts(args.batch * args.batches, args.prompt_len)
    batches = [prompts[i * args.batch:(i + 1) * args.batch] for i in range(args.batches)]
    gen = setup.generator(decode_config_for(cfg, args.prompt_len, args.new_tokens))
    retriever = gen.retriever  # no cache hits: every read hits the bank
    log(f"setup {setup.setup_s:.1f}s")

    cases = {m: (gen, m, args.pipeline) for m in ("none", "memory", "rag")}
    if not args.no_serial:
        cases["memory_serial"] = (gen, "memory", 1)
        cases["none_serial"] = (gen, "none", 1)
    results = run_generate_interleaved(cases, batches, args.repeats)
    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    hf = transformers_baseline(args, cfg, batches)
    out = {
        "device": device_name(), "device_info": device_info(),
        "preset": cfg.name, "dtype": cfg.dtype, "codec": args.codec, "batch": args.batch,
        "batches": args.batches, "pipeline": args.pipeline,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "memories_per_chunk": cfg.memories_per_chunk, "references": len(kb.bank),
        "bytes_per_memory": kb.bank.bytes_per_memory,
        "tokens_per_s": tps, "ratio_memory_none": tps["memory"] / tps["none"],
        "ratio_memory_rag": tps["memory"] / tps["rag"], "modes": results,
        "retriever": retriever.stats.as_dict(), "setup_s": setup.setup_s,
        "paper": {"memory": 733, "none": 1131, "ratio_memory_none": 733 / 1131,
                  "note": "Memory3-2.4B on an A800, batch 32 (Table 21)"},
    }
    if "memory_serial" in tps:
        out["ratio_memory_serial_none"] = tps["memory_serial"] / tps["none"]
        out["ratio_memory_none_serial"] = tps["memory_serial"] / tps["none_serial"]
    out["transformers"] = hf
    if hf.get("tokens_per_s"):
        out["ratio_to_transformers"] = {m: v / hf["tokens_per_s"] for m, v in tps.items()}
        for r in results.values():
            r["vs_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"]
    print(f"\ndecode throughput: {out['preset']} on {out['device']}, {args.batches} batch(es) of {args.batch}, "
          f"pipeline {args.pipeline}, {args.prompt_len} prompt + {args.new_tokens} new tokens, codec {args.codec}")
    rows = [dict(mode=m, **r) for m, r in results.items()]
    if hf.get("tokens_per_s"):
        rows.append(dict(mode=f"transformers ({hf['dtype']}, {hf['threads']} threads)", vs_transformers=1.0,
                         tokens_per_s=hf["tokens_per_s"]))
    print(table(rows, [("mode", "mode", ""), ("tokens_per_s", "tokens/s", ".1f"),
                       ("vs_transformers", "x transformers", ".2f"), ("prefill_s", "prefill s", ".2f"),
                       ("decode_s", "decode s", ".2f"), ("retrieval_s", "retrieval waited s", ".3f"),
                       ("retrieval_hidden_s", "retrieval hidden s", ".3f"), ("retrievals", "retrievals", "d"),
                       ("memory_swaps", "swaps", "d"), ("total_s", "wall s", ".2f")]))
    print(f"memory/none = {out['ratio_memory_none']:.3f} (goal >= 0.95; paper 0.648)   "
          f"memory/rag = {out['ratio_memory_rag']:.2f} (goal >= 3.0)"
          + (f"   memory_serial/none = {out['ratio_memory_serial_none']:.3f}, memory_serial/none_serial = "
             f"{out['ratio_memory_none_serial']:.3f}" if "memory_serial" in tps else ""))
    if hf.get("tokens_per_s"):
        print(f"none / transformers = {out['ratio_to_transformers']['none']:.2f} (goal >= 1.5)")
    else:
        print(f"transformers baseline not run: {hf.get('skipped')}")
    write_json(args.out, out)
    return 0


def _hf_interpreter(choice: str | None) -> str | None:
    if choice and choice.lower() == "none":
        return None
    if choice:
        return choice
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
        return sys.executable
    return os.environ.get("M3JAX_HF_PYTHON") or None


def transformers_baseline(args, cfg, batches) -> dict:
    """Run hf_generate_baseline.py on the same geometry and prompt batches; its JSON, or
    {"skipped": why}."""
    from _bench_utils import log

    python = _hf_interpreter(args.hf_python)
    if python is None:
        return {"skipped": "no interpreter with torch + transformers (install the `bench` extra or pass --hf-python)"}
    model = {k: getattr(cfg, k) for k in ("vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads",
                                          "head_dim", "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings")}
    spec = {"model": model, "dtype": cfg.dtype, "batches": batches, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": args.hf_threads}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_generate_baseline.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    log(f"transformers baseline with {python} ({args.hf_threads} threads)")
    try:
        proc = subprocess.run([python, script, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"skipped": f"{python} {script} failed (rc {proc.returncode}): {tail[0]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["python"] = python
    return res


if __name__ == "__main__":
    sys.exit(main())
