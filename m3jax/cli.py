"""The `m3jax` command: one subcommand per job.

    m3jax demo [--out DIR] [--quick]         the whole pipeline on the shipped Wikipedia leads
    m3jax build-memory --model DIR --out KB  corpus + model -> memory bank + index
    m3jax generate --model DIR [--kb KB] --prompt TEXT [--mode memory|rag|none]
    m3jax generate --model DIR --kb KB --prompts-file prompts.txt --out answers.jsonl
    m3jax eval --checkpoint DIR --bank KB    perplexity / QA in the three modes
    m3jax convert --from hf|gguf PATH --out DIR
    m3jax presets                            list model presets with their sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from m3jax.demo import DemoConfig, run

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    run(args.out, cfg)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from m3jax.config import preset, preset_names

    print(f"{'preset':<14} {'layers':>6} {'hidden':>6} {'heads':>9} {'params':>10} {'non-emb':>10} {'bf16 memory':>12}")
    for name in preset_names():
        c = preset(name)
        print(f"{name:<14} {c.num_layers:>6} {c.hidden:>6} {c.num_heads:>4}/{c.num_kv_heads:<4} "
              f"{c.num_params(embedding=True) / 1e6:>9.1f}M {c.num_params() / 1e6:>9.1f}M "
              f"{c.memory_bytes('bf16'):>11,}B")
    return 0


def _documents(args: argparse.Namespace) -> list[tuple[int, str]]:
    if args.corpus:
        docs = []
        with open(args.corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    r = json.loads(line)
                    if "text" not in r:
                        raise SystemExit(f"{args.corpus}:{i + 1}: no 'text' field")
                    docs.append((int(r.get("doc_id", i)), r["text"]))
        return docs
    from m3jax.assets import wiki_leads

    arts = wiki_leads()[: args.limit] if args.limit else wiki_leads()
    return [(a.doc_id, a.text) for a in arts]


def _build_memory(args: argparse.Namespace) -> int:
    from m3jax.eval import load_model
    from m3jax.memory.build import build_knowledge_base

    config, params, tok = load_model(args.model)
    kb = build_knowledge_base(args.out, params, config, tok, _documents(args), codec=args.codec,
                              batch_size=args.batch_size)
    s = kb.info["bank"]
    print(f"knowledge base at {args.out}: {kb.info['references']} references, codec {s['codec']}, "
          f"{s['bytes_per_memory']:,} bytes per memory, {s['nbytes'] / 2**20:.1f} MiB in all, "
          f"index {kb.info['index_method']}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator
    from m3jax.eval import load_model
    from m3jax.memory.build import open_knowledge_base

    config, params, tok = load_model(args.model)
    retriever = None
    if args.kb:
        retriever = open_knowledge_base(args.kb, config, params).retriever(tokenizer=tok)
    elif args.mode != "none":
        raise SystemExit(f"--mode {args.mode} needs --kb (a knowledge base from `m3jax build-memory`)")
    dc = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, max_cache_len=min(config.max_len, args.max_cache_len),
                      prompt_bucket=config.chunk_size)
    gen = Generator(params, config, tok, retriever, dc)
    if args.prompts_file:
        return _generate_file(gen, args)

    done: list[int] = []
    shown = [""]

    def stream(new):  # decode everything so far: a character may span two chunks
        done.extend(new[0])
        text = tok.decode(done)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    sys.stdout.write(args.prompt)
    res = gen.generate([args.prompt], mode=args.mode, stream=stream)
    s = res.stats
    print(f"\n[{args.mode}: {s.new_tokens} tokens in {s.total_s:.2f} s, {s.tokens_per_s:.1f} tokens/s, "
          f"{s.memory_swaps} memory swaps, retrieval {1000 * s.retrieval_s:.0f} ms]", file=sys.stderr)
    return 0


def _read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL (a "prompt" or "text" field)."""
    if not os.path.exists(path):
        raise SystemExit(f"--prompts-file {path}: no such file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                    prompts.append(str(rec["prompt"] if "prompt" in rec else rec["text"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise SystemExit(f"{path}:{n}: expected a JSON object with a 'prompt' or 'text' field ({e})")
            else:
                prompts.append(line)
    if not prompts:
        raise SystemExit(f"--prompts-file {path} has no prompts")
    return prompts


def _generate_file(gen, args: argparse.Namespace) -> int:
    """Batched generation of a prompts file with `generate_many` (two batches in flight), one JSON
    line per prompt to --out (or stdout), in prompt order, written as batches finish."""
    import time

    from tqdm.auto import tqdm

    prompts = _read_prompts(args.prompts_file)
    bs = max(1, args.batch_size)
    batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    t0 = time.perf_counter()
    totals = {"new": 0, "waited": 0.0, "hidden": 0.0}
    ready: dict[int, object] = {}
    written = [0]
    try:
        with tqdm(total=len(prompts), desc=f"generate ({args.mode})", unit="prompt", file=sys.stderr) as bar:
            def on_result(i, res):  # batches can finish out of order: write in prompt order
                ready[i] = res
                while written[0] in ready:
                    j = written[0]
                    r = ready.pop(j)
                    for b, prompt in enumerate(batches[j]):
                        rec = {"prompt": prompt, "text": r.texts[b], "tokens": r.tokens[b],
                               "retrieved": [[int(x) for x in ids if x >= 0] for ids in r.retrieved[b]]}
                        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    totals["new"] += r.stats.new_tokens
                    totals["waited"] += r.stats.retrieval_s
                    totals["hidden"] += r.stats.retrieval_hidden_s
                    bar.update(len(batches[j]))
                    written[0] += 1

            gen.generate_many(batches, mode=args.mode, on_result=on_result)
    finally:
        if out is not sys.stdout:
            out.close()
    wall = time.perf_counter() - t0
    print(f"[{args.mode}: {len(prompts)} prompts, {totals['new']} tokens in {wall:.2f} s, "
          f"{totals['new'] / max(wall, 1e-9):.1f} tokens/s; retrieval waited {totals['waited']:.2f} s, "
          f"hidden {totals['hidden']:.2f} s]"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from m3jax.eval import eval_main

    return eval_main(args.rest)


def _convert(args: argparse.Namespace) -> int:
    from m3jax.convert import convert_main

    return convert_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description="Memory3 in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the whole pipeline on the shipped data")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    d.set_defaults(fn=_demo)
    sub.add_parser("presets", help="list model presets").set_defaults(fn=_presets)
    b = sub.add_parser("build-memory", help="corpus + model -> memory bank + index")
    b.add_argument("--model", required=True, help="m3jax checkpoint dir (config.json, params, tokenizer/)")
    b.add_argument("--out", required=True)
    b.add_argument("--corpus", help="JSONL with a 'text' field (default: the shipped Wikipedia leads)")
    b.add_argument("--limit", type=int, default=0, help="use only the first N shipped leads")
    b.add_argument("--codec", default="int8", choices=["bf16", "f32", "int8", "pq"])
    b.add_argument("--batch-size", type=int, default=64)
    b.set_defaults(fn=_build_memory)
    g = sub.add_parser("generate", help="generate text (streams)")
    g.add_argument("--model", required=True)
    g.add_argument("--kb", help="knowledge base dir (for memory and rag modes)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt, streamed to stdout")
    src.add_argument("--prompts-file", help="many prompts: a text file (one per line) or JSONL ('prompt' field); "
                                            "generated in batches, one JSON line per prompt")
    g.add_argument("--batch-size", type=int, default=32, help="prompts per batch with --prompts-file")
    g.add_argument("--out", help="JSONL output with --prompts-file (default: stdout)")
    g.add_argument("--mode", default="memory", choices=["memory", "rag", "none"])
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-cache-len", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_generate)
    for name, fn, helptext in (("eval", _eval, "evaluate (see `m3jax eval --help`)"),
                               ("convert", _convert, "import HF / GGUF checkpoints (see `m3jax convert --help`)")):
        e = sub.add_parser(name, help=helptext, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `eval` and `convert` hand their arguments to their own parsers; argparse's REMAINDER does
    # not take a leading option such as `--help`, so unknown arguments go to them as well.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra + list(args.rest)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
