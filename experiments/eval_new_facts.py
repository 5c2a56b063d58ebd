"""Does explicit memory make a model know what it otherwise cannot? The goals of the explicit-memory
work, measured on held-out invented facts (never in any training text) and held-out Wikipedia leads:

    new facts:   memory accuracy >= 0.7 x RAG accuracy   and   >= none + 0.4
    decoding:    memory tokens/s >= 2 x RAG on the same batch
    perplexity:  held-out perplexity with memory >= 5% below none

    python experiments/eval_new_facts.py --out eval_out                     # the shipped model
    python experiments/eval_new_facts.py --model runs/read/model --facts 60 --out eval_60

It runs the demo's measurements (`m3jax.demo.run`: knowledge base of Wikipedia leads written by
the model, invented-fact documents added after training, memory / RAG / none), so a run resumes
and its directory holds the demo's report too; then prints the goals table (`m3jax.demo.goals`)
and writes `OUT/goals.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def base_rag(out: str, cfg) -> dict[str, float]:
    """RAG accuracy on the demo's new-fact probes (same knowledge base, same retrieval) with the
    base weights an adapter model was trained over: what RAG gives without the adapter."""
    from m3jax import load_model
    from m3jax.convert import load_base_params, model_dir
    from m3jax.demo import FACT_BATCH, FACT_DOC_IDS
    from m3jax.eval import make_generator, score_facts
    from m3jax.facts import make_facts
    from m3jax.memory.build import default_embedder, open_knowledge_base

    config, params, tok = load_model(cfg.model)
    where = model_dir(cfg.model)
    with open(os.path.join(where, "base.json"), encoding="utf-8") as f:
        base = load_base_params(json.load(f), config, where=where)
    facts = make_facts(cfg.n_facts, split="eval", seed=cfg.seed, start_id=FACT_DOC_IDS)
    retriever = open_knowledge_base(os.path.join(out, "kb"), config, params).retriever(default_embedder(),
                                                                                       tokenizer=tok)
    sets = {"new_facts": [p for f in facts for p in f.probes],
            "new_facts_new_wording": [p for f in facts[:cfg.n_new_wording] for p in f.new_wording_probes]}
    longest = 1 + max(len(tok.encode(p.prompt)) for ps in sets.values() for p in ps)
    gen = make_generator(base, config, tok, retriever, longest, cfg.max_new_tokens, rag=True)
    return {name: score_facts(base, config, ps, mode="rag", retriever=retriever, tokenizer=tok, generator=gen,
                              max_new_tokens=cfg.max_new_tokens, batch_size=FACT_BATCH, progress=False)["accuracy"]
            for name, ps in sets.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from m3jax.demo import DemoConfig, goals, goals_table, run

    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help="shipped model name or model directory")
    p.add_argument("--out", default="eval_new_facts_out")
    p.add_argument("--facts", type=int, default=d.n_facts, help="invented-fact documents (2 probes each)")
    p.add_argument("--new-wording", type=int, default=d.n_new_wording,
                   help="of the fact documents, how many are also asked in wordings never trained on")
    p.add_argument("--leads", type=int, default=d.n_leads, help="Wikipedia leads in the knowledge base")
    p.add_argument("--qa", type=int, default=d.n_eval_qa, help="held-out description -> title items")
    p.add_argument("--ppl", type=int, default=d.n_eval_ppl, help="held-out leads scored for perplexity")
    p.add_argument("--bench-batch", type=int, default=d.bench_batch)
    p.add_argument("--bench-new", type=int, default=d.bench_new, help="new tokens per prompt in the decode benchmark")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    p.add_argument("--base-rag", action="store_true",
                   help="also score RAG on the new facts with the adapter's base weights (an adapter model)")
    a = p.parse_args(argv)
    cfg = DemoConfig.quick(a.model) if a.quick else DemoConfig(
        model=a.model, n_facts=a.facts, n_new_wording=a.new_wording, n_leads=a.leads, n_eval_qa=a.qa, n_eval_ppl=a.ppl, bench_batch=a.bench_batch,
        bench_new=a.bench_new)
    m = run(a.out, cfg)
    rows = goals(m)
    print(goals_table(m, rows))
    res = {"model": a.model, "probes": m["new_facts_probes"], "device": m["device"], "goals": rows,
           "new_facts_accuracy": m["new_facts_accuracy"],
           "new_facts_accuracy_new_wording": m["new_facts_accuracy_new_wording"],
           "qa_exact_match": m["qa_exact_match"], "ppl": m["ppl"], "decode_tokens_per_s": m["decode_tokens_per_s"],
           "bytes_per_document": m["bytes_per_document"]}
    if a.base_rag:
        res["new_facts_accuracy_rag_base"] = base_rag(a.out, cfg)
        print(f"RAG with the base weights: {res['new_facts_accuracy_rag_base']}")
    with open(os.path.join(a.out, "goals.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
