"""Any Transformer can become a Memory3 model with a light continual training (the paper's claim):
SmolLM2-135M-Instruct, imported from the shipped GGUF, made to read explicit memory.

    python experiments/convert_smollm2.py --out smollm2_m3           # ~10 min of CPU time
    python experiments/convert_smollm2.py --out big --docs 2000 --eval-docs 128 --steps 500 \\
        --batch 32 --seq-len 1024 --lr 1e-4 --qa 128                  # an accelerator

Stages (each reuses the project's modules; timings printed and recorded):

1. **import**: `convert.load_gguf` (dequantized to float32), memory layers = the first half
   (15 of 30). SmolLM2's document separator is `<|endoftext|>` (id 0), not the GGUF's bos (id 1,
   `<|im_start|>`, a chat-turn token of the Instruct model: 16.75 vs 14.54 perplexity on the first
   200 Wikipedia leads, `tests/test_convert.py`). So id 0 is the document start (`bos_id`) and the
   first id of the reference prefix: `(0,) + encode("Reference:")` = (0, 23682, 42). Training
   documents are framed `<|endoftext|> text <|endoftext|>` (SmolLM2's base-model convention);
   `eos_id` stays 2 (`<|im_end|>`), which ends a chat turn in generation.
2. **data**: `--docs` Wikipedia leads (with descriptions, in a fixed pseudo-random order), of which
   `--eval-docs` held out by the data module's rule (`m3jax.train.data.is_heldout` on the title;
   the first held-out ones of the order are taken, so that the evaluation set has a useful size
   whatever `--docs`). The corpus (all articles, plus "Description: ... / Title: ..." items of the
   training articles) is prepared as the TFDS `array_record` dataset; training reads its `train`
   split, which holds no held-out article (checked).
3. **pairs**: references (<= 128 tokens) of all articles, all-MiniLM-L6-v2 embeddings, a vector
   index, and one reference per 64-token training chunk (leakage filter 0.9), `train.pairs`.
4. **before**: perplexity (and `--qa` knowledge QA) on the held-out leads in the three modes
   (`eval.evaluate`: memory / rag / none, leakage filter 2/3), with a knowledge base built with the
   imported weights; plus the plain Llama (no prefix, no memory window) as the sanity check (~14).
   Whole leads are scored (they are short: ~100 tokens). The held-out articles are in the
   knowledge base, and the filter compares each retrieved reference with the *scored* text, so
   truncating the texts would let the reference that holds a truncated lead through (overlap =
   LCS / |reference| < 2/3) and RAG would copy it (perplexity ~2).
5. **continual**: `train.loop.train(stage="continual", init_params=imported params)`: each chunk
   reads the memories of chunks c-4..c, encoded by the model in the same step.
6. **after**: a knowledge base written by the trained weights, the same evaluation.

Everything lands in `--out`: `results.json` (settings, data counts, both evaluations, training
summary, stage seconds), `table.md`, the knowledge bases (`kb_before/`, `kb_after/`), the training
run (`continual/`: Orbax checkpoint, metrics.jsonl, loss.png) and, with `--save-model`, the
trained m3jax checkpoint (`model/`, for `m3jax generate --model ... --kb .../kb_after`). A re-run
with the same settings resumes (training from its checkpoint, banks from their committed shards);
other settings need another `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

MODES = ("none", "memory", "rag")
DOC_START_ID = 0  # SmolLM2's <|endoftext|>: document separator of its pretraining data
_SALT = b"m3jax-convert-smollm2:"


@dataclass(frozen=True)
class Settings:
    """Sizes of one run. The defaults take ~10 minutes of CPU time (user + sys) on a 2-core x86
    machine: 19.5 min of wall time there while 3 other jobs shared the cores. A continual step of
    4 x 256 tokens costs ~1.5 TFLOP (the 49k-vocab head and the 16 references encoded in-step
    included): 55-59 s a step measured on those shared cores."""

    docs: int = 160  # Wikipedia leads: the knowledge base (training split + held-out split)
    eval_docs: int = 16  # of which held out (never trained on): perplexity / QA texts
    qa: int = 0  # held-out knowledge-QA items ("Description: ... / Title:"), 0 = none
    steps: int = 8
    batch: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    memory_grad: bool = True
    memory_layers: int | None = None  # None: the first half (15 of 30)
    heldout_fraction: float = 0.05  # the data module's default
    codec: str = "int8"
    eval_batch: int = 8
    max_len: int = 2048
    devices: int | None = None  # training mesh over the first N devices (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eval_docs < self.docs:
            raise ValueError(f"--eval-docs must be in [1, --docs), got {self.eval_docs} of {self.docs}")
        for f in ("steps", "batch", "seq_len", "eval_batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")

    def fingerprint(self) -> str:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("devices", "eval_batch")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _log(msg: str) -> None:
    print(msg, flush=True)


class _Timer:
    def __init__(self, log: Callable[[str], None]):
        self.seconds: dict[str, float] = {}
        self.log = log

    def run(self, name: str, title: str, fn: Callable[[], Any]) -> Any:
        self.log(f"[{name}] {title} ...")
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.log(f"[{name}] done in {self.seconds[name]:.0f} s")
        return out


# ============================================================================ pieces
def load_smollm2(memory_layers: int | None = None, max_len: int = 2048):
    """(Memory3 config, params, tokenizer, data tokenizer) of the shipped SmolLM2-135M GGUF.

    The config has `bos_id` 0 and the reference prefix `(0,) + encode("Reference:")`; `tokenizer`
    puts id 0 before texts (`encode(..., bos=True)`); `data_tokenizer` also closes each training
    document with id 0 (its `eos_id`)."""
    from m3jax import convert
    from m3jax.assets import smollm2_gguf
    from m3jax.tokenizer import REFERENCE_TEXT, Tokenizer

    cfg, params, gtok = convert.load_gguf(smollm2_gguf(), memory_layers=memory_layers, reference_prefix=None)
    if gtok.encode("<|endoftext|>") != [DOC_START_ID]:
        raise ValueError("this GGUF's tokenizer does not map <|endoftext|> to id 0")
    tok = Tokenizer(gtok.tk, bos_id=DOC_START_ID, eos_id=gtok.eos_id, pad_id=gtok.pad_id,
                    chat_template=gtok.chat_template, add_bos=gtok.add_bos)
    data_tok = Tokenizer(gtok.tk, bos_id=DOC_START_ID, eos_id=DOC_START_ID, pad_id=gtok.pad_id)
    prefix = (DOC_START_ID, *tok.encode(REFERENCE_TEXT))
    cfg = dataclasses.replace(cfg, bos_id=DOC_START_ID, reference_prefix=prefix, max_len=max_len)
    return cfg, params, tok, data_tok


def select_articles(n_docs: int, n_heldout: int, fraction: float) -> tuple[list[Any], list[Any]]:
    """(all selected articles, the held-out ones), in doc_id order: `n_heldout` articles that the
    data module holds out and `n_docs - n_heldout` it trains on (`m3jax.eval.select_leads`)."""
    from m3jax.eval import select_leads

    return select_leads(n_docs, n_heldout, fraction, salt=_SALT)


def write_corpus(path: str, articles: Sequence[Any], heldout: Sequence[Any]) -> None:
    """JSONL corpus: every article, plus the QA-format item of every training article."""
    from m3jax.eval import qa_text

    held_ids = {a.doc_id for a in heldout}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for a in articles:
            f.write(json.dumps({"doc_id": a.doc_id, "title": a.title, "text": a.text,
                                "description": a.description, "topic": a.topic}) + "\n")
        for a in articles:
            if a.doc_id not in held_ids:
                f.write(json.dumps({"doc_id": 1_000_000 + a.doc_id, "title": "QA: " + a.title,
                                    "text": qa_text(a), "description": "", "topic": "qa"}) + "\n")
    os.replace(path + ".tmp", path)


def _json_clean(x: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def format_table(res: dict[str, Any]) -> str:
    """The markdown table of a results dict: perplexity (and QA) per mode, before and after."""
    b, a = res["before"], res["after"]
    qa = bool(b.get("qa_exact_match"))
    head = "| mode | ppl before | ppl after | change |"
    sep = "|---|---|---|---|"
    if qa:
        head += " QA EM before | QA EM after | QA log-prob before | QA log-prob after |"
        sep += "---|---|---|---|"
    lines = [head, sep]
    for m in MODES:
        pb, pa = b["ppl"].get(m, float("nan")), a["ppl"].get(m, float("nan"))
        row = f"| {m} | {pb:.3f} | {pa:.3f} | {100 * (pa / pb - 1):+.1f}% |"
        if qa:
            row += (f" {b['qa_exact_match'].get(m, float('nan')):.3f} | {a['qa_exact_match'].get(m, float('nan')):.3f}"
                    f" | {b['qa_logprob'].get(m, float('nan')):.3f} | {a['qa_logprob'].get(m, float('nan')):.3f} |")
        lines.append(row)
    s = res["sanity"]
    lines += ["", f"Plain Llama (no reference prefix, no memory window), the same held-out texts: "
                  f"perplexity {s['plain_llama_ppl']:.3f}."]
    return "\n".join(lines)


# ============================================================================ the run
def run(out: str, st: Settings = Settings(), *, save_model: bool = False, progress: bool = True,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run (or resume) the conversion experiment into `out`; returns the results (also written to
    `out/results.json` and `out/table.md`)."""
    import grain
    import jax

    from m3jax import convert
    from m3jax import sharding as S
    from m3jax.config import MeshConfig, TrainConfig
    from m3jax.eval import EvalConfig, evaluate, perplexity
    from m3jax.memory.build import build_knowledge_base, default_embedder
    from m3jax.train import data as D
    from m3jax.train.loop import train
    from m3jax.train.pairs import pair_corpus, reference_lookup

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    stamp = os.path.join(out, "settings.json")
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("fingerprint") != st.fingerprint():
            raise ValueError(f"{out!r} holds a run with other settings ({old.get('settings')}); use another "
                             "--out or delete it")
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": st.fingerprint(), "settings": dataclasses.asdict(st)}, f, indent=1)
    timer = _Timer(log)
    res: dict[str, Any] = {"settings": dataclasses.asdict(st), "device": str(jax.devices()[0].device_kind)}

    # ------------------------------------------------------------ 1. import
    cfg, params, tok, data_tok = timer.run("import", "SmolLM2-135M GGUF -> m3jax (float32)",
                                           lambda: load_smollm2(st.memory_layers, st.max_len))
    res["model"] = {"name": cfg.name, "params": cfg.num_params(embedding=True), "layers": cfg.num_layers,
                    "memory_layers": cfg.memory_layers, "reference_prefix": list(cfg.reference_prefix),
                    "bos_id": cfg.bos_id, "eos_id": cfg.eos_id, "pad_id": cfg.pad_id}
    log(f"  {cfg.name}: {cfg.num_params(embedding=True) / 1e6:.1f}M params, memory layers "
        f"0..{cfg.memory_layers - 1} of {cfg.num_layers}, reference prefix {cfg.reference_prefix}")

    # ------------------------------------------------------------ 2. data
    articles, heldout = select_articles(st.docs, st.eval_docs, st.heldout_fraction)
    held_ids = {a.doc_id for a in heldout}
    corpus = os.path.join(out, "data", "corpus.jsonl")
    dcfg = D.DataConfig(data_dir=os.path.join(out, "data", "tfds"), corpus=corpus,
                        heldout_fraction=st.heldout_fraction, seq_len=st.seq_len, batch_size=st.batch,
                        seed=st.seed)

    def stage_data():
        if not os.path.exists(corpus):
            write_corpus(corpus, articles, heldout)
        D.prepare(dcfg)
        stream = D.token_stream(dcfg, data_tok, "train")
        leaked = held_ids & set(np.unique(stream.doc_ids).tolist())
        if leaked:
            raise AssertionError(f"held-out articles {sorted(leaked)} are in the training split")
        return stream

    stream = timer.run("data", f"{st.docs} Wikipedia leads ({st.eval_docs} held out) -> TFDS array_record",
                       stage_data)
    rows = D.pack_rows(stream, st.seq_len, data_tok.pad_id)
    res["data"] = {"articles": len(articles), "heldout_articles": len(heldout),
                   "train_documents": int(stream.num_docs), "train_tokens": int(len(stream.tokens)),
                   "train_rows": int(rows["tokens"].shape[0]),
                   "epochs": round(st.steps * st.batch / rows["tokens"].shape[0], 3)}
    log(f"  training split: {stream.num_docs} documents, {len(stream.tokens)} tokens, "
        f"{rows['tokens'].shape[0]} rows of {st.seq_len}; {st.steps} steps of {st.batch} rows = "
        f"{res['data']['epochs']:.2f} epochs")

    # ------------------------------------------------------------ 3. references + pairs
    docs = [(a.doc_id, a.text) for a in articles]
    embedder = default_embedder()
    emb_path = os.path.join(out, "pairs", "embeddings.npy")

    def stage_pairs():
        p = pair_corpus(docs, rows, tok, reference_len=cfg.reference_len, chunk_size=cfg.chunk_size,
                        pairs_path=os.path.join(out, "pairs", "pairs.npy"), embeddings_path=emb_path,
                        embedder=embedder, show_progress=progress)
        ids = p.ids
        real = np.array([rows["loss_mask"][r, c * cfg.chunk_size:(c + 1) * cfg.chunk_size].any()
                         for r in range(ids.shape[0]) for c in range(ids.shape[1])]).reshape(ids.shape)
        return p, {"references": len(p.references), "chunks": int(real.sum()),
                   "chunks_with_reference": round(float((ids >= 0)[real].mean()), 4),
                   "filtered_by_overlap": p.filtered}

    paired, info = timer.run(
        "pairs", "references, MiniLM embeddings, index, one reference per training chunk (filter 0.9)", stage_pairs)
    res["data"].update(info)
    log(f"  {info['references']} references; {info['chunks_with_reference']:.1%} of {info['chunks']} training "
        f"chunks paired ({info['filtered_by_overlap']} candidates dropped by the leakage filter)")

    def knowledge_base(name: str, p) -> Any:
        kb_dir = os.path.join(out, name)
        os.makedirs(kb_dir, exist_ok=True)
        if not os.path.exists(os.path.join(kb_dir, "embeddings.npy")):  # same texts, same vectors
            shutil.copy(emb_path, os.path.join(kb_dir, "embeddings.npy"))
        if not os.path.exists(os.path.join(kb_dir, "index", "index.json")):
            paired.index.save(os.path.join(kb_dir, "index"))
        kb = build_knowledge_base(kb_dir, p, cfg, tok, docs, embedder=embedder, codec=st.codec, batch_size=16,
                                  show_progress=progress, log=log)
        return kb.retriever(embedder, tokenizer=tok)

    def evaluation(p, retriever) -> dict[str, Any]:
        settings = EvalConfig(modes=MODES, n_ppl=st.eval_docs, n_qa=st.qa, fanoutqa=False, batch_size=st.eval_batch,
                              max_new_tokens=16 if st.qa else 0)
        r = evaluate(p, cfg, tok, settings, retriever=retriever, heldout_articles=heldout, progress=progress,
                     log=log)
        r["retrieval"] = {k: v for k, v in retriever.stats.as_dict().items() if isinstance(v, int)}
        return r

    # ------------------------------------------------------------ 4. before
    def stage_sanity():
        plain = dataclasses.replace(cfg, reference_prefix=None)
        eval_texts = [a.text for a in heldout]
        p = perplexity(params, plain, eval_texts, mode="none", tokenizer=tok, batch_size=st.eval_batch,
                       progress=progress)
        log(f"  plain Llama perplexity {p['ppl']:.3f} over {p['tokens']} tokens of {p['texts']} held-out leads")
        return {"plain_llama_ppl": p["ppl"], "tokens": p["tokens"], "texts": p["texts"]}

    res["sanity"] = timer.run("sanity", "plain Llama perplexity on the held-out leads (no prefix, no memory)",
                              stage_sanity)
    ret0 = timer.run("kb_before", "knowledge base written by the imported weights",
                     lambda: knowledge_base("kb_before", params))
    res["before"] = timer.run("eval_before", "evaluate before continual training (none / memory / rag)",
                              lambda: evaluation(params, ret0))
    del ret0

    # ------------------------------------------------------------ 5. continual training
    tc = TrainConfig(stage="continual", seq_len=st.seq_len, batch_size=st.batch, steps=st.steps, lr=st.lr,
                     warmup_steps=max(1, st.steps // 10), memory_grad=st.memory_grad, seed=st.seed,
                     log_every=1, checkpoint_every=st.steps, keep_checkpoints=1)
    devices = jax.devices()[: st.devices] if st.devices else jax.devices()
    mesh = S.make_mesh(MeshConfig(), devices=devices)
    train_dir = os.path.join(out, "continual")

    def stage_train():
        rows2 = dict(rows)
        rows2["ref_ids"] = paired.ids

        def batches():
            ds = D.rows_dataset(rows2, batch_size=st.batch, seed=st.seed + 1)
            return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

        return train(cfg, tc, batches, train_dir, init_params=params, mesh=mesh, progress=progress,
                     reference_fn=reference_lookup(paired.reference_tokens, cfg.reference_len, tok.pad_id))

    trained = timer.run("continual", f"continual training with memory: {st.steps} steps of {st.batch} x "
                        f"{st.seq_len} tokens, lr {st.lr}, memory_grad={st.memory_grad}", stage_train)
    trained = jax.device_get(trained)
    recs = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl")) if line.strip()]
    losses = [r["loss"] for r in recs]
    rates = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    res["train"] = {"steps": len(recs), "tokens": len(recs) * st.batch * st.seq_len,
                    "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                    "losses": losses, "tokens_per_s": float(np.median(rates)) if rates else None,
                    "compile_s": recs[0].get("compile_s") if recs else None, "mesh": dict(mesh.shape)}
    if losses:
        log(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            + (f", {res['train']['tokens_per_s']:.0f} tokens/s" if rates else ""))
    if save_model:
        timer.run("save", "m3jax checkpoint of the trained model",
                  lambda: convert.save_checkpoint_dir(os.path.join(out, "model"), cfg, trained, tok))

    # ------------------------------------------------------------ 6. after
    ret1 = timer.run("kb_after", "knowledge base written by the trained weights",
                     lambda: knowledge_base("kb_after", trained))
    res["after"] = timer.run("eval_after", "evaluate after continual training (none / memory / rag)",
                             lambda: evaluation(trained, ret1))

    res["seconds"] = dict(timer.seconds, total=round(time.perf_counter() - t_start, 1))
    res["table"] = {m: {"ppl_before": res["before"]["ppl"].get(m), "ppl_after": res["after"]["ppl"].get(m),
                        **({"qa_em_before": res["before"]["qa_exact_match"].get(m),
                            "qa_em_after": res["after"]["qa_exact_match"].get(m)} if st.qa else {})}
                    for m in MODES}
    table = format_table(res)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_clean(res), f, indent=1)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    log("")
    log(f"SmolLM2-135M -> Memory3: perplexity of {len(heldout)} held-out leads "
        f"({res['sanity']['tokens']} tokens) before / after {st.steps} continual steps")
    log(table)
    log(f"total {res['seconds']['total']:.0f} s; results in {os.path.join(out, 'results.json')}")
    return res


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="convert_smollm2_out", help="output directory")
    p.add_argument("--docs", type=int, default=d.docs, help="Wikipedia leads in the knowledge base")
    p.add_argument("--eval-docs", type=int, default=d.eval_docs, help="of which held out and evaluated")
    p.add_argument("--qa", type=int, default=d.qa, help="held-out knowledge-QA items (0: no QA)")
    p.add_argument("--steps", type=int, default=d.steps, help="continual training steps")
    p.add_argument("--batch", type=int, default=d.batch, help="rows per step (global batch)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warmup-stable-decay)")
    p.add_argument("--memory-grad", action=argparse.BooleanOptionalAction, default=d.memory_grad,
                   help="gradients through the memory write path")
    p.add_argument("--memory-layers", type=int, default=None, help="memory layers (default: first half, 15)")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="the data module's held-out fraction")
    p.add_argument("--codec", default=d.codec, choices=("bf16", "int8", "pq"), help="memory bank codec")
    p.add_argument("--eval-batch", type=int, default=d.eval_batch, help="sequences per evaluation forward")
    p.add_argument("--max-len", type=int, default=d.max_len, help="longest context")
    p.add_argument("--devices", type=int, default=None, help="train on the first N devices (default: all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-model", action="store_true", help="also write the trained m3jax checkpoint (540 MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    st = Settings(docs=a.docs, eval_docs=a.eval_docs, qa=a.qa, steps=a.steps,
                  batch=a.batch, seq_len=a.seq_len, lr=a.lr, memory_grad=a.memory_grad,
                  memory_layers=a.memory_layers, heldout_fraction=a.heldout_fraction, codec=a.codec,
                  eval_batch=a.eval_batch, max_len=a.max_len, devices=a.devices, seed=a.seed)
    return run(a.out, st, save_model=a.save_model, progress=not a.no_progress)


if __name__ == "__main__":
    main()
