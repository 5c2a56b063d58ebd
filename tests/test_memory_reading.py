"""Teaching a pretrained model to read memory, and the main job around it: invented facts, the
reading recipe, LoRA training through `m3jax train` (and its resume onto the base), adapters that
refuse other base weights, `m3jax demo --quick` end to end, resumed, and its goals, on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from m3jax import cli, config as C, model as M
from m3jax.facts import answer_in, make_facts


# ------------------------------------------------------------------------------ facts
def test_facts_splits_share_no_name_and_probes_are_answered_by_their_document():
    train, ev = make_facts(600, split="train"), make_facts(60, split="eval")
    assert make_facts(5, split="eval") == ev[:5]  # deterministic
    assert len({f.doc_id for f in ev}) == 60
    answers = {p.answer for f in ev for p in f.probes}
    titles = {f.title.removeprefix("The ") for f in ev}
    joined = "\n".join(f.text for f in train)
    assert not [a for a in answers if a in joined] and not [t for t in titles if t in joined]
    for f in ev:
        assert f.probes and len(f.probes) == len(f.new_wording_probes)
        for p in f.probes + f.new_wording_probes:
            assert p.answer in f.text and p.answer not in p.prompt
        assert {p.prompt for p in f.probes}.isdisjoint({p.prompt for p in f.new_wording_probes})
    assert answer_in("Selva Kurnath", " the founder was selva kurnath.") and not answer_in("Selva", " Selv")


def _bag_of_words(dim: int = 64):
    """A cheap deterministic embedder: hashed word counts."""
    import zlib

    from m3jax.memory.embed import FunctionEmbedder

    def fn(texts):
        out = np.zeros((len(texts), dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % dim] += 1.0
        return out + 1e-3
    return FunctionEmbedder(fn, dim)


# ------------------------------------------------------------------------------ a tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny Memory3 model directory with a byte-level BPE trained on Wikipedia leads."""
    from m3jax.assets import wiki_leads
    from m3jax.convert import save_checkpoint_dir
    from m3jax.tokenizer import train_bpe

    d = str(tmp_path_factory.mktemp("tiny") / "model")
    tok = train_bpe([a.text for a in wiki_leads()[:300]] + [f.text for f in make_facts(200)], vocab_size=600)
    cfg = C.preset("tiny", vocab_size=tok.vocab_size, reference_prefix=tok.reference_prefix(), bos_id=tok.bos_id,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, memories_per_chunk=3, chunk_size=32, max_len=512)
    save_checkpoint_dir(d, cfg, jax.device_get(M.init(cfg, jax.random.key(0))), tok)
    return d


def test_reading_rows_layout(tiny_model):
    from m3jax.convert import load_model
    from m3jax.memory.embed import FunctionEmbedder
    from m3jax.train.recipe import ReadingMix, reading_rows

    cfg, _, tok = load_model(tiny_model)
    docs = [{"doc_id": i, "title": f"Title {i}", "description": f"thing number {i}",
             "text": f"Document {i} talks about item {i} and its history in detail."} for i in range(40)]
    mix = ReadingMix(facts=48, qa=16, text=16, chunks=4)
    rows = reading_rows(docs, tok, cfg, mix, batch_size=2, embeddings_path=os.path.join(os.path.dirname(tiny_model),
                        "emb.npy"), embedder=_bag_of_words(), show_progress=False)
    t, m, ids = rows.rows["tokens"], rows.rows["loss_mask"], rows.rows["ref_ids"]
    T = cfg.chunk_size
    assert t.shape[1] == 4 * T and ids.shape == (len(t), 4) and (ids >= 0).all()
    assert t.shape[0] % 2 == 0
    for r in range(len(t)):
        for c in range(4):
            chunk = t[r, c * T:(c + 1) * T]
            assert chunk[0] == cfg.bos_id  # every example starts its own chunk
            assert m[r, c * T:(c + 1) * T].any()  # and has targets
    # a batch block (2 rows) never mixes fact references with corpus ones
    for b in range(0, len(t), 2):
        assert (ids[b:b + 2] < 48).all() or (ids[b:b + 2] >= 48).all()
    assert (ids < 48).any() and (ids >= 48).any()
    # a probe's answer is in its own reference, never in another chunk's text of the row
    facts = make_facts(48, split="train", seed=mix.seed)
    refs = {i: f for i, f in enumerate(facts)}
    for r in range(len(t)):
        for c in range(4):
            if ids[r, c] < 48:
                f = refs[int(ids[r, c])]
                others = [tok.decode(t[r, k * T:(k + 1) * T]) for k in range(4) if k != c]
                assert not any(p.answer in o for p in f.probes for o in others)


def test_lora_train_resume_and_adapter_dir(tiny_model, tmp_path):
    """`m3jax train --recipe reading` with LoRA: a light model dir (adapter + base), identical params
    after a resume, and an adapter that refuses weights it was not trained on."""
    from m3jax.convert import ConvertError, load_model

    out = str(tmp_path / "run")
    common = ["train", "--stage", "continual", "--model", tiny_model, "--out", out, "--recipe", "reading",
              "--mix", "facts=60", "--mix", "qa=16", "--mix", "text=16", "--mix", "chunks=4", "--limit", "80",
              "--batch-size", "2", "--lr", "1e-2", "--devices", "1", "--train-set", "lora_rank=4",
              "--train-set", "checkpoint_every=2", "--train-set", "log_every=1", "--no-progress"]
    assert cli.main(common + ["--steps", "2"]) == 0
    first = load_model(os.path.join(out, "model"))[1]
    assert cli.main(common + ["--steps", "4"]) == 0  # resumes at step 2 onto the same base
    for f in ("adapter.safetensors", "base.json", "config.json", "tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(out, "model", f)), f
    assert not os.path.exists(os.path.join(out, "model", "params.safetensors"))
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    assert steps == [1, 2, 3, 4]
    cfg, params, tok = load_model(os.path.join(out, "model"))
    _, base, _ = load_model(tiny_model)
    changed = [k for k in ("wq", "wo", "w_down") if not np.allclose(params["mem_blocks"][k], base["mem_blocks"][k])]
    assert changed == ["wq", "wo", "w_down"]  # the adapter moved the adapted weights ...
    np.testing.assert_array_equal(params["embed"], base["embed"])  # ... and nothing else
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(params)))
    # another base: refused
    other = str(tmp_path / "other")
    from m3jax.convert import save_checkpoint_dir

    save_checkpoint_dir(other, cfg, jax.device_get(M.init(cfg, jax.random.key(9))), tok)
    with open(os.path.join(out, "model", "base.json"), "w") as f:
        json.dump({"model": other}, f)
    with pytest.raises(ConvertError, match="only applies to the weights it was trained on"):
        load_model(os.path.join(out, "model"))


def test_demo_quick_end_to_end_resume_and_goals(tiny_model, tmp_path, capsys):
    from m3jax.demo import DemoConfig, goals, goals_table, run

    out = str(tmp_path / "demo")
    m = run(out, DemoConfig.quick(tiny_model))
    for f in ("report.md", "metrics.json", "modes.png", "storage.png", "model/config.json", "kb/kb.json",
              "facts_eval.json", "update.json"):
        assert os.path.exists(os.path.join(out, f)), f
    for key in ("wall_s", "ppl", "qa_exact_match", "decode_tokens_per_s", "new_facts_accuracy"):
        assert key in m
    for key in ("ppl", "qa_exact_match", "decode_tokens_per_s", "new_facts_accuracy"):
        assert set(m[key]) == {"memory", "rag", "none"}, key
    assert all(0 <= v <= 1 for v in m["new_facts_accuracy"].values())
    assert m["new_facts_probes"] == 12 and m["bytes_per_document"]["memory"] > 0
    up = m["knowledge_update"]
    assert up["accuracy_deleted"] == 0 or up["accuracy_deleted"] <= up["accuracy_before"]
    # the exported model is usable by --model
    from m3jax.convert import load_model

    load_model(os.path.join(out, "model"))
    report = open(os.path.join(out, "report.md")).read()
    assert "| memory |" in report and "Knowledge update" in report and "(read:" in report
    # the same run again resumes: nothing is recomputed; the goals (experiments/eval_new_facts.py) of it
    capsys.readouterr()
    again = run(out, DemoConfig.quick(tiny_model))
    printed = capsys.readouterr().out
    assert "[facts]" in printed and "skipped" in printed
    assert again["new_facts_accuracy"] == m["new_facts_accuracy"] and again["ppl"] == m["ppl"]
    rows = goals(again)
    assert [g["goal"] for g in rows][0].startswith("new facts") and len(rows) == 4
    assert rows[0]["target"] == pytest.approx(0.7 * again["new_facts_accuracy"]["rag"])
    assert "| goal |" in goals_table(again, rows)
