"""The `m3jax` command: one subcommand per job, the same flag for the same thing everywhere.

    m3jax demo [--out DIR] [--quick]         memory in a pretrained model: new facts, updates, modes
    m3jax demo --from-scratch                the two-stage pipeline from scratch on the Wikipedia leads
    m3jax train --stage warmup --preset demo --out RUN1          stage 1, from scratch
    m3jax train --stage continual --model RUN1 --out RUN2        stage 2, with memory (RUN2/model)
    m3jax convert --from hf|gguf PATH --out DIR                   import a checkpoint
    m3jax build-memory --model M --out KB    corpus + model -> knowledge base (memory bank + index)
    m3jax kb add --kb KB --model M --corpus FILE.jsonl      add documents (no rebuild)
    m3jax kb delete --kb KB --doc-id ID [--doc-id ID ...]  delete documents
    m3jax kb info --kb KB                    counts, deleted, codec, bytes
    m3jax generate --model M [--kb KB] --prompt TEXT [--mode memory|rag|none]
    m3jax generate --model M --kb KB --prompts-file prompts.txt --out answers.jsonl
    m3jax serve --model M --kb KB [--host 127.0.0.1 --port 8000]   OpenAI-compatible server
    m3jax eval --model M [--kb KB] [--mc FILE.jsonl]       perplexity / QA / multiple choice, 3 modes
    m3jax presets                            list model presets with their sizes

The same flag names the same thing in every subcommand: `--model` a model (a model directory, a
training run, or a shipped model's name: `m3jax.load_model`), `--kb` a knowledge base directory,
`--out` what the command writes, `--corpus` a JSONL corpus. Former spellings (`--checkpoint`,
`--bank`, `--init`) still work, with a note on stderr.

Every subcommand also takes `--compile-cache DIR` / `--no-compile-cache` (JAX's persistent
compilation cache, on by default: `m3jax.runtime`) and `--debug`.

Errors in what the user gave (m3jax's own error classes, ValueError, OSError: a bad file, a bad
flag value, a missing path) end the command with one line, `m3jax CMD: error: ...`, and exit
status 1; `m3jax --debug CMD ...` (or `--debug` anywhere after CMD) shows the traceback instead.

Adding a subcommand: write `_add_NAME_parser(sub, common)`, which adds its parser with
`parents=[common]` and `set_defaults(fn=_NAME)`, and `_NAME(args) -> int`; list the adder in
`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable


# ============================================================================ shared flags
class _FormerName(argparse.Action):
    """A former spelling of a flag (hidden from --help): stores into the current flag's dest and
    says on stderr which flag to use instead."""

    def __init__(self, option_strings, dest, current: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.current = current

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is a former name of {self.current}; use {self.current}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _flag(p: argparse.ArgumentParser, flag: str, *former: str, dest: str | None = None, required: bool = False,
          **kwargs: Any) -> None:
    """Add `flag` (with `former` spellings as hidden aliases). `required` is checked after parsing
    (argparse's own check would not see a value given under a former name)."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, dest=dest, default=None, **kwargs)
    for old in former:
        p.add_argument(old, dest=dest, action=_FormerName, current=flag, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS, **{k: v for k, v in kwargs.items() if k in ("type", "choices")})
    if required:
        p.set_defaults(_required=tuple(p.get_default("_required") or ()) + ((dest, flag),))


def _model_flag(p: argparse.ArgumentParser, *former: str, required: bool = True, dest: str = "model",
                help: str = "the model: a model directory (`m3jax convert` / `m3jax train` output), a training "
                             "run, or a shipped model's name (smollm2-135m-memory)") -> None:
    _flag(p, "--model", "--checkpoint", *former, dest=dest, required=required, metavar="MODEL", help=help)


def _kb_flag(p: argparse.ArgumentParser, *, required: bool = False,
             help: str = "knowledge base directory (`m3jax build-memory` output)") -> None:
    _flag(p, "--kb", "--bank", required=required, metavar="KB", help=help)


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


def _common_parser() -> argparse.ArgumentParser:
    """Flags every subcommand takes (`parents=[common]`)."""
    common = argparse.ArgumentParser(add_help=False)
    # also accepted before the subcommand; SUPPRESS: a subparser's default must not reset it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c = common.add_argument_group("compilation cache")
    c.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache (default: $M3JAX_COMPILE_CACHE, else "
                        "~/.cache/m3jax/jax-compile): a second run loads what the first compiled")
    c.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")
    return common


def _load(model: str):
    """(config, params, tokenizer) of `--model` (`m3jax.load_model`)."""
    from m3jax import convert

    return convert.load_model(model)


# ============================================================================ demo, presets
def _add_demo_parser(sub, common) -> None:
    d = sub.add_parser("demo", help="explicit memory at work in the shipped model (or --from-scratch)",
                       parents=[common])
    d.add_argument("--out", default=None, help="output directory (default demo_out, or demo_scratch_out)")
    d.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    _model_flag(d, required=False, help="the memory-capable model (default: the shipped smollm2-135m-memory); "
                                        "a model directory or a shipped name")
    d.add_argument("--from-scratch", action="store_true",
                   help="the two-stage pipeline instead: train a small model from scratch, then with memory")
    d.set_defaults(fn=_demo)


def _demo(args: argparse.Namespace) -> int:
    from m3jax.runtime import CompileMeter

    with CompileMeter() as meter:
        if args.from_scratch:
            from m3jax.demo_scratch import ScratchConfig, run_from_scratch

            if args.model:
                args._parser.error("--model is the main job's; --from-scratch trains its own model")
            run_from_scratch(args.out or "demo_scratch_out", ScratchConfig.quick() if args.quick else ScratchConfig())
        else:
            from m3jax.demo import DemoConfig, run

            model = args.model or DemoConfig.model
            run(args.out or "demo_out", DemoConfig.quick(model) if args.quick else DemoConfig(model=model))
    print(f"[demo] {meter.describe()} in all (the stage times include it; decode tokens/s do not)")
    return 0


def _add_presets_parser(sub, common) -> None:
    sub.add_parser("presets", help="list model presets", parents=[common]).set_defaults(fn=_presets)


def _presets(args: argparse.Namespace) -> int:
    from m3jax.config import preset, preset_names

    print(f"{'preset':<14} {'layers':>6} {'hidden':>6} {'heads':>9} {'params':>10} {'non-emb':>10} {'bf16 memory':>12}")
    for name in preset_names():
        c = preset(name)
        print(f"{name:<14} {c.num_layers:>6} {c.hidden:>6} {c.num_heads:>4}/{c.num_kv_heads:<4} "
              f"{c.num_params(embedding=True) / 1e6:>9.1f}M {c.num_params() / 1e6:>9.1f}M "
              f"{2 * c.head_dim * c.memory_vectors:>11,}B")  # bf16: 2 bytes an element
    return 0


# ============================================================================ knowledge bases
# Seconds per shipped lead to write its memories and embed it, measured for the demo's knowledge
# base (320 leads in 91 s with the 135M model on the 2-core development CPU): the rough estimate
# `build-memory` gives before a long build; its progress bars then show the real time left.
_CPU_SECONDS_PER_LEAD_135M = 0.28


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


def _add_build_memory_parser(sub, common) -> None:
    b = sub.add_parser("build-memory", help="corpus + model -> knowledge base (memory bank + index)",
                       parents=[common])
    _model_flag(b, help="the model whose weights write the memories (a model directory, a training run or a "
                        "shipped model's name)")
    b.add_argument("--out", required=True, help="knowledge base directory to write (resumable)")
    b.add_argument("--corpus", help="JSONL: 'text', optional 'doc_id' (int; default the line index) and "
                                    "'title' (default: the shipped Wikipedia leads)")
    b.add_argument("--limit", type=_non_negative_int, default=0,
                   help="use only the first N shipped leads (default: all 10,033; that takes a while on a CPU)")
    b.add_argument("--codec", default="int8", choices=["bf16", "f32", "int8", "pq"])
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.set_defaults(fn=_build_memory)


def _build_memory(args: argparse.Namespace) -> int:
    from m3jax.memory.build import build_knowledge_base

    docs = _documents(args)  # first: a bad corpus fails before the model loads
    config, params, tok = _load(args.model)
    if not args.corpus and not args.limit:
        est = len(docs) * _CPU_SECONDS_PER_LEAD_135M * max(1.0, config.num_params(embedding=True) / 135e6)
        print(f"build-memory: all {len(docs):,} shipped Wikipedia leads (no --limit): roughly {est / 60:.0f} min "
              f"on a 2-core CPU at the demo's measured rate, much less on an accelerator; the progress bars "
              f"show the time left (--limit N builds from the first N leads)", file=sys.stderr)
    else:
        print(f"build-memory: {len(docs):,} documents", file=sys.stderr)
    kb = build_knowledge_base(args.out, params, config, tok, docs, codec=args.codec, batch_size=args.batch_size)
    s = kb.info["bank"]
    print(f"knowledge base at {args.out}: {kb.info['references']} references, codec {s['codec']}, "
          f"{s['bytes_per_memory']:,} bytes per memory, {s['nbytes'] / 2**20:.1f} MiB in all, "
          f"index {kb.info['index_method']}")
    return 0


def _add_kb_parser(sub, common) -> None:
    k = sub.add_parser("kb", help="update a knowledge base: add / delete documents, info", parents=[common])
    ks = k.add_subparsers(dest="kb_cmd", required=True)
    a = ks.add_parser("add", help="add documents (memories written by the model that built the bank)",
                      parents=[common])
    _kb_flag(a, required=True)
    _model_flag(a, help="the model whose weights wrote the knowledge base")
    a.add_argument("--corpus", required=True, help="JSONL: 'text', optional 'doc_id' (int) and 'title'")
    a.add_argument("--batch-size", type=_positive_int, default=64)
    a.set_defaults(fn=_kb_add, _parser=a)
    d = ks.add_parser("delete", help="delete documents: retrieval never returns their references again",
                      parents=[common])
    _kb_flag(d, required=True)
    d.add_argument("--doc-id", type=_non_negative_int, action="append", required=True, help="repeatable")
    d.set_defaults(fn=_kb_delete, _parser=d)
    i = ks.add_parser("info", help="counts (live, deleted), codec, bytes", parents=[common])
    _kb_flag(i, required=True)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--documents", action="store_true", help="also list doc_id, references, state, title")
    i.set_defaults(fn=_kb_info, _parser=i)


def _kb_add(args: argparse.Namespace) -> int:
    from m3jax.memory.build import open_knowledge_base

    docs = _corpus_documents(args.corpus, "hash")  # a line without doc_id: a hash of its text
    config, params, tok = _load(args.model)
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


# ============================================================================ generate
def _add_generate_parser(sub, common) -> None:
    g = sub.add_parser("generate", help="generate text (streams); lists the references each answer read",
                       parents=[common])
    _model_flag(g)
    _kb_flag(g, help="knowledge base directory (for the memory and rag modes)")
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


def _generate(args: argparse.Namespace) -> int:
    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator
    from m3jax.memory.build import open_knowledge_base
    from m3jax.runtime import CompileMeter

    if not args.kb and args.mode != "none":
        args._parser.error(f"--mode {args.mode} needs --kb (a knowledge base from `m3jax build-memory`)")
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else None
    config, params, tok = _load(args.model)
    kb = open_knowledge_base(args.kb, config, params) if args.kb else None
    retriever = kb.retriever(tokenizer=tok) if kb is not None else None
    dc = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, max_cache_len=min(config.max_len, args.max_cache_len),
                      prompt_bucket=config.chunk_size)
    with Generator(params, config, tok, retriever, dc) as gen:  # closes its retrieval thread
        if prompts is not None:
            return _generate_file(gen, kb, prompts, args)

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
        with CompileMeter() as meter:
            res = gen.generate([prompt], mode=args.mode, stream=stream)
        s = res.stats
        print(f"\n[{args.mode}: {s.new_tokens} tokens in {s.total_s:.2f} s ({meter.describe()}), "
              f"{_rate(s.new_tokens, s.total_s, meter.seconds)}, {s.memory_swaps} memory swaps, "
              f"retrieval {1000 * s.retrieval_s:.0f} ms]", file=sys.stderr)
        if kb is not None and args.mode != "none":
            refs = _references(kb, tok, res.retrieved[0])
            print(f"[references read ({len(refs)}):]", file=sys.stderr)
            for r in refs:
                title = r["title"] or f"doc {r['doc_id']}"
                print(f"  #{r['id']} {title}: {r['snippet']}", file=sys.stderr)
        return 0


def _rate(tokens: int, seconds: float, compile_s: float) -> str:
    """'41.0 tokens/s without compilation' (the compile time measured in the same window)."""
    return f"{tokens / max(seconds - compile_s, 1e-9):.1f} tokens/s without compilation"


def _references(kb, tok, retrieved) -> list[dict[str, Any]]:
    """id, doc_id, title and a text snippet of every reference a sequence read (its chunks' ids)."""
    import numpy as np

    ids = [np.asarray(x).reshape(-1) for x in retrieved]
    return kb.describe(np.concatenate(ids) if ids else np.zeros(0, np.int64), tok)


def _add_serve_parser(sub, common) -> None:
    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with explicit memory (needs the serve extra)",
                       parents=[common])
    _model_flag(v)
    _kb_flag(v, help="knowledge base directory (for the memory and rag modes; live add/delete write to it)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=_positive_int, default=8000)
    v.add_argument("--slots", type=_positive_int, default=16, help="rows per decode round")
    v.add_argument("--groups", type=_positive_int, default=2, help="groups of slots taking turns on the device")
    v.add_argument("--max-cache-len", type=_positive_int, default=1024, help="context per request (tokens)")
    v.add_argument("--queue-size", type=_positive_int, default=256, help="waiting requests before 429")
    v.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is ended")
    v.add_argument("--drain", type=float, default=30.0, help="seconds running requests get at shutdown")
    v.set_defaults(fn=_serve)


def _serve(args: argparse.Namespace) -> int:
    from m3jax.serve import ServeConfig, run

    sc = ServeConfig(slots=args.slots, groups=args.groups, cache_len=args.max_cache_len,
                     min_cache_len=min(256, args.max_cache_len), queue_size=args.queue_size,
                     request_timeout_s=args.request_timeout)
    run(args.model, args.kb, host=args.host, port=args.port, serve_config=sc, drain_s=args.drain)
    return 0


def _read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL (a "prompt" or "text" field)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
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
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' or 'text' field ({e})") \
                        from None
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts")
    return prompts


def _chat_prompt(args: argparse.Namespace, text: str):
    """With --chat: `text` as one user turn (after --system when given), which `Generator`
    renders with the model's own chat template; else the text itself."""
    if not args.chat:
        return text
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return system + [{"role": "user", "content": text}]


def _generate_file(gen, kb, prompts: list[str], args: argparse.Namespace) -> int:
    """Batched generation of a prompts file with `generate_many` (two batches in flight), one JSON
    line per prompt to --out (or stdout), in prompt order, written as batches finish: the text,
    its tokens, the reference ids each chunk read and, per reference, its title and a snippet."""
    import time

    from tqdm.auto import tqdm

    from m3jax.runtime import CompileMeter

    bs = max(1, args.batch_size)
    batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    t0 = time.perf_counter()
    totals = {"new": 0, "waited": 0.0, "hidden": 0.0}
    ready: dict[int, object] = {}
    written = [0]
    try:
        with tqdm(total=len(prompts), desc=f"generate ({args.mode})", unit="prompt", file=sys.stderr) as bar, \
                CompileMeter() as meter:
            def on_result(i, res):  # batches can finish out of order: write in prompt order
                ready[i] = res
                while written[0] in ready:
                    j = written[0]
                    r = ready.pop(j)
                    for b, prompt in enumerate(batches[j]):
                        rec = {"prompt": prompt, "text": r.texts[b], "tokens": r.tokens[b],
                               "retrieved": [[int(x) for x in ids if x >= 0] for ids in r.retrieved[b]]}
                        if kb is not None and args.mode != "none":
                            rec["references"] = _references(kb, gen.tokenizer, r.retrieved[b])
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
    print(f"[{args.mode}: {len(prompts)} prompts, {totals['new']} tokens in {wall:.2f} s ({meter.describe()}), "
          f"{_rate(totals['new'], wall, meter.seconds)}; retrieval waited {totals['waited']:.2f} s, "
          f"hidden {totals['hidden']:.2f} s]"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


# ============================================================================ eval
EVAL_TASKS = ("ppl", "qa", "fanoutqa", "mc")


def _add_eval_parser(sub, common) -> None:
    e = sub.add_parser("eval", help="evaluate with explicit memory, RAG and without memory", parents=[common],
                       description="Perplexity and knowledge QA on the held-out leads, FanOutQA, and "
                                   "multiple-choice files, in the memory / rag / none modes; prints the "
                                   "metrics as JSON. With --mc only the multiple-choice files are scored "
                                   "(unless --tasks says otherwise).")
    _model_flag(e)
    _kb_flag(e, help="knowledge base directory (needed by the memory and rag modes)")
    e.add_argument("--modes", default="memory,rag,none", help="comma-separated subset of memory,rag,none")
    e.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(EVAL_TASKS)} (default: mc with --mc, else "
                        "ppl,qa,fanoutqa)")
    e.add_argument("--mc", action="append", default=[], metavar="JSONL",
                   help="a multiple-choice JSONL file: context, choices, label (repeatable)")
    e.add_argument("--n-ppl", type=int, default=100, help="held-out texts for perplexity (-1: all)")
    e.add_argument("--n-qa", type=int, default=100, help="held-out knowledge-QA items (-1: all)")
    e.add_argument("--n-fanoutqa", type=int, default=-1, help="FanOutQA items (-1: all)")
    e.add_argument("--no-fanoutqa", action="store_true", help=argparse.SUPPRESS)  # former: --tasks ppl,qa
    e.add_argument("--heldout-fraction", type=float, default=None,
                   help="held-out fraction the model was trained with (default: the data default)")
    e.add_argument("--batch-size", type=_positive_int, default=8)
    e.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="truncate perplexity texts to this many tokens")
    e.add_argument("--max-new-tokens", type=_non_negative_int, default=16,
                   help="generated tokens per answer (0: no exact match)")
    e.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE",
                   help="DecodeConfig override for answer generation (repeatable)")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=_eval)


def _csv_subset(text: str, allowed: tuple[str, ...], flag: str, parser) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not items or any(t not in allowed for t in items):
        parser.error(f"{flag} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items


def _eval(args: argparse.Namespace) -> int:
    from m3jax.config import DecodeConfig, apply_overrides
    from m3jax.decode import MODES
    from m3jax.runtime import CompileMeter

    p = args._parser
    modes = _csv_subset(args.modes, MODES, "--modes", p)
    tasks = _csv_subset(args.tasks, EVAL_TASKS, "--tasks", p) if args.tasks else \
        (("mc",) if args.mc else ("ppl", "qa") + (() if args.no_fanoutqa else ("fanoutqa",)))
    if "mc" in tasks and not args.mc:
        p.error("--tasks mc needs --mc FILE (a multiple-choice JSONL file)")
    if args.kb is None and any(m != "none" for m in modes):
        p.error("the memory and rag modes need --kb (a knowledge-base directory); or pass --modes none")
    try:
        dc = apply_overrides(DecodeConfig(), args.decode)  # validates the overrides
    except (TypeError, ValueError) as e:
        p.error(f"--decode: {e}")
    gen_kw = {o.split("=", 1)[0]: getattr(dc, o.split("=", 1)[0]) for o in args.decode}
    from m3jax import eval as ev

    mc_paths = list(args.mc) if "mc" in tasks else []
    for path in mc_paths:  # a bad file fails before the model loads
        ev.load_mc_jsonl(path)
    config, params, tokenizer = _load(args.model)
    retriever = ev.load_retriever(args.kb, config, params, tokenizer) if args.kb is not None else None
    n = lambda v, task: 0 if task not in tasks else (None if v is None or v < 0 else v)  # noqa: E731
    held = ev.heldout_split(fraction=args.heldout_fraction) if {"ppl", "qa"} & set(tasks) else []
    with CompileMeter() as meter:
        settings = ev.EvalConfig(modes=tuple(modes), n_ppl=n(args.n_ppl, "ppl"), n_qa=n(args.n_qa, "qa"),
                                 fanoutqa="fanoutqa" in tasks, n_fanoutqa=n(args.n_fanoutqa, "fanoutqa"),
                                 mc_paths=tuple(mc_paths), batch_size=args.batch_size, max_tokens=args.max_tokens,
                                 max_new_tokens=args.max_new_tokens, decode_kwargs=gen_kw)
        metrics = ev.evaluate(params, config, tokenizer, settings, retriever=retriever, heldout_articles=held,
                              progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    metrics["seconds"]["compile"] = round(meter.seconds, 2)
    metrics["tasks"] = list(tasks)
    text = json.dumps(metrics, indent=1)
    print(text)
    print(f"[eval: {', '.join(tasks)} in {', '.join(modes)}; {meter.describe()} of "
          f"{sum(metrics['seconds'].get(m, 0.0) for m in modes):.1f} s]", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


# ============================================================================ convert
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # convert._FLOAT_DTYPES (not imported: it loads jax)


def _add_convert_parser(sub, common) -> None:
    c = sub.add_parser("convert", help="import a HF (Llama, Mistral, Qwen2, Qwen3) or GGUF checkpoint as an m3jax "
                                       "model, or export an m3jax model to the transformers layout", parents=[common])
    c.add_argument("--from", dest="source", choices=("hf", "gguf", "m3jax"), required=True,
                   help="hf: a directory with config.json + *.safetensors; gguf: a llama/qwen2/qwen3 .gguf file; "
                        "m3jax: an m3jax model directory or shipped model name (with --to hf)")
    c.add_argument("path", help="the checkpoint to convert")
    c.add_argument("--to", dest="target", choices=("m3jax", "hf"), default="m3jax",
                   help="m3jax (default): an m3jax model directory; hf: config.json + model.safetensors + tokenizer "
                        "files that transformers 5 loads")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--memory-layers", type=_non_negative_int, default=None,
                   help="memory layers (default: first half)")
    c.add_argument("--reference-prefix", default=None,
                   help="'auto' (the document start + 'Reference:'; default for gguf), 'none' (plain "
                        "Llama; default for hf) or comma-separated token ids")
    c.add_argument("--dtype", default=None, choices=_FLOAT_DTYPES, help="activation dtype (default float32)")
    c.add_argument("--param-dtype", default=None, choices=_FLOAT_DTYPES,
                   help="parameter dtype (default: hf = the checkpoint's, gguf = float32)")
    c.add_argument("--name", default=None, help="config name")
    c.add_argument("--max-len", type=_positive_int, default=None, help="max context length (default from the source)")
    c.set_defaults(fn=_convert)


def _convert(args: argparse.Namespace) -> int:
    from m3jax.convert import convert_checkpoint, parse_reference_prefix

    print(convert_checkpoint(args.source, args.path, args.out, target=args.target, memory_layers=args.memory_layers,
                             reference_prefix=parse_reference_prefix(args.reference_prefix), dtype=args.dtype,
                             param_dtype=args.param_dtype, name=args.name, max_len=args.max_len))
    return 0


# ============================================================================ train
def _add_train_parser(sub, common) -> None:
    t = sub.add_parser("train", help="train a model: --stage warmup (no memory) or continual (with memory)",
                       parents=[common],
                       description="Train one stage; the same command resumes after a kill and runs unchanged "
                                   "on every host of a pod. Writes OUT/checkpoints, metrics.jsonl, loss.png "
                                   "and OUT/model (for --model of generate / eval / build-memory).")
    t.add_argument("--stage", required=True, choices=["warmup", "continual"])
    t.add_argument("--out", required=True, help="run directory (shared by all hosts)")
    m = t.add_argument_group("model (one of --preset / --model)")
    m.add_argument("--preset", help="from scratch: a model preset (`m3jax presets`)")
    _model_flag(m, "--init", dest="init", required=False,
                help="start from this model: a model directory (`m3jax convert --out`), a previous "
                     "`m3jax train` run, or a shipped model's name")
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
    d.add_argument("--bank", help="continual, expert: the memory bank (a knowledge base's bank/ directory) whose "
                                  "memories --pairs ids index")
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


def _train(args: argparse.Namespace) -> int:
    import logging

    from m3jax.train import run as R

    R.init_distributed(args.coordinator, args.num_processes, args.process_id)  # before any JAX computation
    import jax

    if jax.process_count() > 1:  # say which host a log line comes from
        logging.basicConfig(format=f"[host {jax.process_index()}/{jax.process_count()}] %(asctime)s %(name)s: "
                                   "%(message)s")
    spec = R.TrainRun(stage=args.stage, out=args.out, preset=args.preset, init=args.init,
                      tokenizer=args.tokenizer, corpus=args.corpus, limit=args.limit, data_dir=args.data_dir,
                      tfds_name=args.tfds_name, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, model_set=tuple(args.model_set),
                      train_set=tuple(args.train_set), mesh=R.parse_mesh(args.mesh), devices=args.devices,
                      seed=args.seed, progress=not args.no_progress, pairs=args.pairs, bank=args.bank,
                      recipe=args.recipe, mix=tuple(args.mix))
    summary = R.run(spec)
    if jax.process_index() == 0:
        print(json.dumps(summary))
    R.barrier("m3jax train: done")
    return 0


# ============================================================================ the parser
SUBCOMMANDS: tuple[Callable[[Any, argparse.ArgumentParser], None], ...] = (
    _add_demo_parser, _add_presets_parser, _add_train_parser, _add_convert_parser, _add_build_memory_parser,
    _add_kb_parser, _add_generate_parser, _add_serve_parser, _add_eval_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3jax", description="Memory3 (language modeling with explicit memory) in JAX")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = _common_parser()
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub, common)
    for name, sp in sub.choices.items():  # each subcommand's parser, for its own usage errors
        if sp.get_default("_parser") is None:
            sp.set_defaults(_parser=sp)
    return p


def _is_user_error(e: BaseException) -> bool:
    """Errors in what the user gave: m3jax's own error classes, ValueError, OSError."""
    if isinstance(e, (ValueError, OSError)):
        return True
    return any(c.__module__.split(".")[0] == "m3jax" for c in type(e).__mro__)


def _setup(args: argparse.Namespace) -> None:
    """Process-wide set-up before a subcommand runs: quiet third-party logs, the compilation cache."""
    from m3jax import runtime

    runtime.quiet_logs()
    if not args.no_compile_cache:
        runtime.enable_compile_cache(args.compile_cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for dest, flag in getattr(args, "_required", ()):
        if getattr(args, dest, None) is None:
            args._parser.error(f"the following arguments are required: {flag}")
    debug = bool(getattr(args, "debug", False))
    try:
        _setup(args)
        return int(args.fn(args) or 0)
    except Exception as e:  # noqa: BLE001 - sorted below: user errors get one line
        if debug or not _is_user_error(e):
            raise
        cmd = " ".join(c for c in (args.cmd, getattr(args, "kb_cmd", None)) if c)
        msg = " ".join(str(e).split()) or type(e).__name__
        raise SystemExit(f"m3jax {cmd}: error: {msg}  (--debug shows the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
