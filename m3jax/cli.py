"""The `m3jax` command: one subcommand per job.

    m3jax demo [--out DIR] [--quick]         memory in a pretrained model: new facts, updates, modes
    m3jax demo --from-scratch                the two-stage pipeline from scratch on the Wikipedia leads
    m3jax train --stage warmup --preset demo --out RUN1         stage 1, from scratch
    m3jax train --stage continual --init RUN1 --out RUN2        stage 2, with memory (RUN2/model)
    m3jax build-memory --model DIR --out KB  corpus + model -> memory bank + index
    m3jax kb add --kb KB --model DIR --corpus FILE.jsonl    add documents (no rebuild)
    m3jax kb delete --kb KB --doc-id ID [--doc-id ID ...]  delete documents
    m3jax kb info --kb KB                    counts, deleted, codec, bytes
    m3jax generate --model DIR [--kb KB] --prompt TEXT [--mode memory|rag|none]
    m3jax generate --model DIR --kb KB --prompts-file prompts.txt --out answers.jsonl
    m3jax eval --checkpoint DIR --bank KB    perplexity / QA in the three modes
    m3jax convert --from hf|gguf PATH --out DIR
    m3jax presets                            list model presets with their sizes

Errors in what the user gave (m3jax's own error classes, ValueError, OSError: a bad file, a bad
flag value, a missing path) end the command with one line, `m3jax CMD: error: ...`, and exit
status 1; `m3jax --debug CMD ...` (or `--debug` anywhere after CMD) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    if args.from_scratch:
        from m3jax.demo_scratch import ScratchConfig, run_from_scratch

        if args.model:
            raise SystemExit("m3jax demo: --model is the main job's; --from-scratch trains its own model")
        run_from_scratch(args.out or "demo_scratch_out", ScratchConfig.quick() if args.quick else ScratchConfig())
        return 0
    from m3jax.demo import DemoConfig, run

    model = args.model or DemoConfig.model
    run(args.out or "demo_out", DemoConfig.quick(model) if args.quick else DemoConfig(model=model))
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


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative (0 or more)")
    return v


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    v = _non_negative_int(text)
    if v == 0:
        raise argparse.ArgumentTypeError("0 is not allowed (1 or more)")
    return v


def _corpus_documents(path: str, missing_id: str) -> list[tuple[int, str, str | None]]:
    """(doc_id, text, title) of a JSONL corpus (`read_jsonl_corpus`: unique doc ids, bad lines
    refused with file and line); a line without doc_id gets one by `missing_id`."""
    from m3jax.memory.references import read_jsonl_corpus

    docs = [(d.doc_id, d.text, d.title) for d in read_jsonl_corpus(path, missing_id=missing_id)]
    if not docs:
        raise ValueError(f"corpus {path} has no documents")
    return docs


def _documents(args: argparse.Namespace) -> list[tuple[int, str, str | None]]:
    if args.corpus:  # a line without doc_id: its 0-based line index
        return _corpus_documents(args.corpus, "line")
    from m3jax.assets import wiki_leads

    arts = wiki_leads()[: args.limit] if args.limit else wiki_leads()
    return [(a.doc_id, a.text, a.title) for a in arts]


def _build_memory(args: argparse.Namespace) -> int:
    from m3jax.eval import load_model
    from m3jax.memory.build import build_knowledge_base

    docs = _documents(args)  # first: a bad corpus fails before the model loads
    config, params, tok = load_model(args.model)
    kb = build_knowledge_base(args.out, params, config, tok, docs, codec=args.codec, batch_size=args.batch_size)
    s = kb.info["bank"]
    print(f"knowledge base at {args.out}: {kb.info['references']} references, codec {s['codec']}, "
          f"{s['bytes_per_memory']:,} bytes per memory, {s['nbytes'] / 2**20:.1f} MiB in all, "
          f"index {kb.info['index_method']}")
    return 0


def _kb_add(args: argparse.Namespace) -> int:
    from m3jax.eval import load_model
    from m3jax.memory.build import open_knowledge_base

    docs = _corpus_documents(args.corpus, "hash")  # a line without doc_id: a hash of its text
    config, params, tok = load_model(args.model)
    kb = open_knowledge_base(args.kb, config, params)
    new = kb.add(docs, params, config, tok, batch_size=args.batch_size)
    refs = sum(r.count for r in new)
    print(f"added {len(new)} documents ({refs} references) to {args.kb}: now {kb.info['documents']} documents, "
          f"{kb.info['live_references']} live references" + (f"; doc ids {', '.join(str(r.doc_id) for r in new[:10])}"
                                                              f"{', ...' if len(new) > 10 else ''}" if new else ""))
    return 0


def _kb_delete(args: argparse.Namespace) -> int:
    from m3jax.memory.build import open_knowledge_base

    kb = open_knowledge_base(args.kb)
    n = kb.delete(args.doc_id)
    print(f"deleted {len(set(args.doc_id))} documents ({n} references) from {args.kb}: "
          f"{kb.info['documents']} documents, {kb.info['live_references']} live references left")
    return 0


def _kb_info(args: argparse.Namespace) -> int:
    from m3jax.memory.build import open_knowledge_base

    kb = open_knowledge_base(args.kb)
    s = kb.summary()
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"knowledge base {s['directory']} (model {s['model']}, embedder {s['embedder']})\n"
              f"  documents   {s['documents']:,} live, {s['deleted_documents']:,} deleted\n"
              f"  references  {s['references']:,} ({s['live_references']:,} live, "
              f"{s['deleted_references']:,} deleted)\n"
              f"  codec       {s['codec']}, {s['bytes_per_memory']:,} bytes per memory, bank "
              f"{s['bank_bytes'] / 2**20:.2f} MiB, on disk {s['disk_bytes'] / 2**20:.2f} MiB\n"
              f"  index       {s['index_method']}, {s['index_vectors']:,} vectors"
              + ("\n  an add is unfinished: rerun it with the same documents" if s["pending_add"] else ""))
    if args.documents:
        for r in kb.documents(include_deleted=True):
            print(f"{r.doc_id}\t{r.count}\t{'deleted' if r.deleted else 'live'}\t{r.title or ''}")
    return 0


def _add_kb_parser(sub, common: argparse.ArgumentParser) -> None:
    k = sub.add_parser("kb", help="update a knowledge base: add / delete documents, info", parents=[common])
    ks = k.add_subparsers(dest="kb_cmd", required=True)
    a = ks.add_parser("add", help="add documents (memories written by the model that built the bank)",
                      parents=[common])
    a.add_argument("--kb", required=True, help="knowledge base dir (`m3jax build-memory` output)")
    a.add_argument("--model", required=True, help="the m3jax checkpoint dir whose weights wrote the bank")
    a.add_argument("--corpus", required=True, help="JSONL: 'text', optional 'doc_id' (int) and 'title'")
    a.add_argument("--batch-size", type=_positive_int, default=64)
    a.set_defaults(fn=_kb_add)
    d = ks.add_parser("delete", help="delete documents: retrieval never returns their references again",
                      parents=[common])
    d.add_argument("--kb", required=True)
    d.add_argument("--doc-id", type=_non_negative_int, action="append", required=True, help="repeatable")
    d.set_defaults(fn=_kb_delete)
    i = ks.add_parser("info", help="counts (live, deleted), codec, bytes", parents=[common])
    i.add_argument("--kb", required=True)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--documents", action="store_true", help="also list doc_id, references, state, title")
    i.set_defaults(fn=_kb_info)


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

    prompt = _chat_prompt(args, args.prompt)
    sys.stdout.write(tok.apply_chat_template(prompt) if args.chat else args.prompt)
    res = gen.generate([prompt], mode=args.mode, stream=stream)
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


def _chat_prompt(args: argparse.Namespace, text: str):
    """With --chat: `text` as one user turn (after --system when given), which `Generator`
    renders with the model's own chat template; else the text itself."""
    if not args.chat:
        return text
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return system + [{"role": "user", "content": text}]


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

            gen.generate_many([[_chat_prompt(args, p) for p in b] for b in batches], mode=args.mode,
                              on_result=on_result)
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


def _train(args: argparse.Namespace) -> int:
    import logging

    from m3jax.train import run as R

    R.init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any JAX computation
    import jax

    from m3jax.assets import AssetError
    from m3jax.config import ConfigError

    if jax.process_count() > 1:  # say which host a log line comes from
        logging.basicConfig(format=f"[host {jax.process_index()}/{jax.process_count()}] %(asctime)s %(name)s: "
                                   "%(message)s")
    try:
        spec = R.TrainRun(stage=args.stage, out=args.out, preset=args.preset, init=args.init,
                          tokenizer=args.tokenizer, corpus=args.corpus, limit=args.limit, data_dir=args.data_dir,
                          tfds_name=args.tfds_name, steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len, lr=args.lr, model_set=tuple(args.model_set),
                          train_set=tuple(args.train_set), mesh=R.parse_mesh(args.mesh), devices=args.devices,
                          seed=args.seed, progress=not args.no_progress, pairs=args.pairs, bank=args.bank,
                          recipe=args.recipe, mix=tuple(args.mix))
        summary = R.run(spec)
    except (R.TrainError, ConfigError, AssetError) as e:
        raise SystemExit(f"m3jax train: error: {e}")
    if jax.process_index() == 0:
        print(json.dumps(summary))
    R.barrier("m3jax train: done")
    return 0


def _add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser("train", help="train a model: --stage warmup (no memory) or continual (with memory)",
                       parents=[common],
                       description="Train one stage; the same command resumes after a kill and runs unchanged "
                                   "on every host of a pod. Writes OUT/checkpoints, metrics.jsonl, loss.png "
                                   "and OUT/model (for --model of generate / eval / build-memory).")
    t.add_argument("--stage", required=True, choices=["warmup", "continual"])
    t.add_argument("--out", required=True, help="run directory (shared by all hosts)")
    m = t.add_argument_group("model (one of --preset / --init)")
    m.add_argument("--preset", help="from scratch: a model preset (`m3jax presets`)")
    m.add_argument("--init", "--model", dest="init",
                   help="a model dir (m3jax convert --out) or a previous `m3jax train` --out")
    m.add_argument("--tokenizer", help="with --preset: a tokenizer dir (default: a BPE trained on the corpus, "
                                       "vocab = the preset's vocab_size)")
    m.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override (repeatable)")
    d = t.add_argument_group("data")
    d.add_argument("--corpus", help="JSONL, one document per line: text [, title, doc_id] (default: the shipped "
                                    "Wikipedia leads)")
    d.add_argument("--limit", type=_non_negative_int, default=0, help="use only the first N shipped leads")
    d.add_argument("--data-dir", help="TFDS data dir: path, file:// or gs:// (default OUT/data)")
    d.add_argument("--tfds-name", help="an already prepared array_record TFDS dataset in --data-dir")
    d.add_argument("--pairs", help="continual, expert: reference ids [rows, chunks] (.npy) instead of pairing")
    d.add_argument("--bank", help="continual, expert: the memory bank whose memories --pairs ids index")
    d.add_argument("--recipe", default="paper", choices=["paper", "reading"],
                   help="continual data: paper (a retrieved reference per chunk of the corpus) or reading "
                        "(teach a pretrained model to read memory: invented facts, description -> title, "
                        "text with neighbours; see m3jax.train.recipe)")
    d.add_argument("--mix", action="append", default=[], metavar="KEY=VALUE",
                   help="with --recipe reading: ReadingMix override (facts, qa, text, memories, seed)")
    o = t.add_argument_group("training")
    o.add_argument("--steps", type=_positive_int, default=100)
    o.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step over all hosts")
    o.add_argument("--seq-len", type=_positive_int, default=256)
    o.add_argument("--lr", type=float, default=None, help="peak LR (default 3e-3 warmup, 1e-3 continual)")
    o.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override (repeatable; any field, e.g. grad_accum=4, checkpoint_every=50)")
    o.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
    o.add_argument("--devices", type=_positive_int, default=None,
                   help="train on the first N devices (one process only)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    h = t.add_argument_group("distributed (default: detected from the environment)")
    h.add_argument("--coordinator", help="host:port of process 0's coordinator")
    h.add_argument("--num-processes", type=int)
    h.add_argument("--process-id", type=int)
    t.set_defaults(fn=_train)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description="Memory3 in JAX")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # the same flag after the subcommand; SUPPRESS: a subparser's default must not reset it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the whole pipeline on the shipped data", parents=[common])
    d.add_argument("--out", default=None, help="output directory (default demo_out, or demo_scratch_out)")
    d.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    d.add_argument("--model", default=None, help="the memory-capable model (default: the shipped "
                                                 "smollm2-135m-memory); a model directory or a shipped name")
    d.add_argument("--from-scratch", action="store_true",
                   help="the two-stage pipeline instead: train a small model from scratch, then with memory")
    d.set_defaults(fn=_demo)
    sub.add_parser("presets", help="list model presets", parents=[common]).set_defaults(fn=_presets)
    b = sub.add_parser("build-memory", help="corpus + model -> memory bank + index", parents=[common])
    b.add_argument("--model", required=True, help="m3jax checkpoint dir (config.json, params, tokenizer/)")
    b.add_argument("--out", required=True)
    b.add_argument("--corpus", help="JSONL: 'text', optional 'doc_id' (int; default the line index) and "
                                    "'title' (default: the shipped Wikipedia leads)")
    b.add_argument("--limit", type=_non_negative_int, default=0, help="use only the first N shipped leads")
    b.add_argument("--codec", default="int8", choices=["bf16", "f32", "int8", "pq"])
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.set_defaults(fn=_build_memory)
    _add_kb_parser(sub, common)
    g = sub.add_parser("generate", help="generate text (streams)", parents=[common])
    g.add_argument("--model", required=True)
    g.add_argument("--kb", help="knowledge base dir (for memory and rag modes)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt, streamed to stdout")
    src.add_argument("--prompts-file", help="many prompts: a text file (one per line) or JSONL ('prompt' field); "
                                            "generated in batches, one JSON line per prompt")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per batch with --prompts-file")
    g.add_argument("--out", help="JSONL output with --prompts-file (default: stdout)")
    g.add_argument("--mode", default="memory", choices=["memory", "rag", "none"])
    g.add_argument("--chat", action="store_true",
                   help="ask --prompt as a user turn through the model's chat template (instruct models)")
    g.add_argument("--system", default=None, help="with --chat: the system message (default: the template's own)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--max-cache-len", type=_positive_int, default=1024)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=_non_negative_int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_generate)
    _add_train_parser(sub, common)
    for name, fn, helptext in (("eval", _eval, "evaluate (see `m3jax eval --help`)"),
                               ("convert", _convert, "import HF / GGUF checkpoints (see `m3jax convert --help`)")):
        e = sub.add_parser(name, help=helptext, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(fn=fn)
    return p


def _is_user_error(e: BaseException) -> bool:
    """Errors in what the user gave: m3jax's own error classes, ValueError, OSError."""
    if isinstance(e, (ValueError, OSError)):
        return True
    return any(c.__module__.split(".")[0] == "m3jax" for c in type(e).__mro__)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `eval` and `convert` hand their arguments to their own parsers; argparse's REMAINDER does
    # not take a leading option such as `--help`, so unknown arguments go to them as well.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = extra + list(args.rest)
    debug = bool(getattr(args, "debug", False))
    if hasattr(args, "rest") and "--debug" in args.rest:  # eval / convert: ours, not theirs
        args.rest = [a for a in args.rest if a != "--debug"]
        debug = True
    try:
        return int(args.fn(args) or 0)
    except Exception as e:  # noqa: BLE001 - sorted below: user errors get one line
        if debug or not _is_user_error(e):
            raise
        cmd = " ".join(c for c in (args.cmd, getattr(args, "kb_cmd", None)) if c)
        msg = " ".join(str(e).split()) or type(e).__name__
        raise SystemExit(f"m3jax {cmd}: error: {msg}  (--debug shows the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
