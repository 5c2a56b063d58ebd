"""The model that ships with m3jax (`m3jax/models/smollm2-135m-memory`): a LoRA adapter over the
shipped SmolLM2 GGUF. It loads by name, merges exactly W + (alpha / r) a @ b (re-derived here in
NumPy from the files), refuses any other base, and reads memory: invented facts it was never
trained on are answered from their memories and not without them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from m3jax import convert
from m3jax.assets import asset_path

NAME = "smollm2-135m-memory"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> str:
    try:
        return asset_path(GGUF)
    except (FileNotFoundError, ValueError) as e:  # the asset package is installed by the Makefile
        pytest.skip(f"shipped GGUF not installed: {e}")


@pytest.fixture(scope="module")
def shipped():
    _gguf()
    return convert.load_model(NAME)


def test_shipped_model_files_and_base_fingerprint():
    d = convert.model_dir(NAME)
    assert sorted(f for f in os.listdir(d) if not f.startswith(".")) == \
        ["TRAINING.json", "adapter.safetensors", "base.json", "config.json"]
    base = json.load(open(os.path.join(d, "base.json")))
    assert base["gguf"] == "asset:" + GGUF
    import hashlib

    h = hashlib.sha256()
    with open(_gguf(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == base["gguf_sha256"]
    assert os.path.getsize(os.path.join(d, "adapter.safetensors")) < 25 << 20


def test_shipped_model_merge_matches_numpy(shipped):
    """The merged weights equal the GGUF's plus (alpha / r) a @ b, read here with safetensors and
    ml_dtypes directly (not through m3jax's adapter reader)."""
    from safetensors import safe_open

    config, params, tok = shipped
    d = convert.model_dir(NAME)
    base_cfg, base = convert.load_gguf(_gguf(), memory_layers=config.memory_layers,
                                       reference_prefix=config.reference_prefix)[:2]
    with safe_open(os.path.join(d, "adapter.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        checked = 0
        for key in f.keys():
            stack, name, part = key.split("/")
            if part != "a" or name not in ("wq", "wo", "w_down"):
                continue
            a = np.asarray(f.get_tensor(key), np.float64)
            b = np.asarray(f.get_tensor(f"{stack}/{name}/b"), np.float64)
            if a.shape[0] == 0:  # a stack without layers (every layer is a memory layer)
                continue
            w0 = np.asarray(base[stack][name], np.float64)
            layer = a.shape[0] // 2
            delta = (alpha / rank) * (a[layer] @ b[layer])
            want = w0[layer] + delta.reshape(w0[layer].shape)
            got = np.asarray(params[stack][name][layer], np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert np.abs(delta).max() > 1e-4  # the adapter is not a no-op
            checked += 1
    assert checked >= 3
    assert config.memory_layers == config.num_layers == 30 and config.score == "value_norm"
    assert tok.vocab_size == config.vocab_size


def test_shipped_adapter_refuses_another_base(tmp_path, shipped):
    """The adapter only applies to the weights it was trained on: the same GGUF with one weight
    changed is refused, naming the fingerprints."""
    config = shipped[0]
    d = convert.model_dir(NAME)
    adapter, info = convert.load_adapter(os.path.join(d, "adapter.safetensors"))
    base = convert.load_base_params({"gguf": "asset:" + GGUF}, config, where=d)
    base["final_norm"] = base["final_norm"] * 1.001
    with pytest.raises(convert.ConvertError, match="trained on base weights"):
        convert.apply_adapter(base, config, adapter, info, where=d)
    # a copy of the model pointing at another base model directory is refused on load
    other = tmp_path / "other"
    shutil.copytree(d, other)
    json.dump({"model": str(tmp_path / "nothing")}, open(other / "base.json", "w"))
    with pytest.raises((convert.ConvertError, FileNotFoundError)):
        convert.load_model(str(other))


@pytest.mark.slow
def test_shipped_model_reads_memory(tmp_path, shipped):
    """Held-out invented facts (never in training) in a knowledge base: answered with memory,
    not without it (the full measurement is experiments/eval_new_facts.py)."""
    from m3jax.eval import score_facts
    from m3jax.facts import make_facts
    from m3jax.memory.build import build_knowledge_base, default_embedder

    config, params, tok = shipped
    facts = make_facts(8, split="eval", seed=5, start_id=1 << 40)
    docs = [(f.doc_id, f.text, f.title) for f in facts]
    embedder = default_embedder()
    kb = build_knowledge_base(str(tmp_path / "kb"), params, config, tok, docs, codec="int8", embedder=embedder,
                              show_progress=False, log=lambda s: None)
    retriever = kb.retriever(embedder, tokenizer=tok)
    probes = [p for f in facts for p in f.probes]
    res = {mode: score_facts(params, config, probes, mode=mode, retriever=retriever, tokenizer=tok,
                             max_new_tokens=12, progress=False) for mode in ("memory", "none")}
    assert res["none"]["accuracy"] == 0.0
    assert res["memory"]["accuracy"] >= 0.25, res
