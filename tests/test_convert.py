"""Checkpoint import/export (m3jax.convert) and the GGUF tokenizer rebuild.

Tiny random HF Llama checkpoints are written here with safetensors.numpy and checked against an
independent NumPy Llama forward (HF conventions); the shipped SmolLM2 GGUF is checked end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from m3jax import cli, convert
from m3jax.config import preset
from m3jax.model import ChunkMemory, forward, init

# ============================================================================ tiny HF checkpoints
# Odd sizes, GQA with 2 query heads per kv head. "untied" gives head_dim explicitly with
# N * H != D; "tied" lets head_dim default to hidden / heads.
CASES = {
    "untied": dict(vocab_size=61, hidden_size=20, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                   intermediate_size=34, num_hidden_layers=3, tie_word_embeddings=False, rope_theta=500.0),
    "tied": dict(vocab_size=57, hidden_size=36, num_attention_heads=6, num_key_value_heads=3,
                 intermediate_size=22, num_hidden_layers=4, tie_word_embeddings=True, rope_theta=10000.0),
}


def hf_config(**kw) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": None, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
           "torch_dtype": "float32"}
    cfg.update(kw)
    return cfg


def random_tensors(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    D, V, F = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N

    def lin(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(D)).astype(dtype)

    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = lin(N * H, D)
        t[p + "self_attn.k_proj.weight"] = lin(K * H, D)
        t[p + "self_attn.v_proj.weight"] = lin(K * H, D)
        t[p + "self_attn.o_proj.weight"] = lin(D, N * H)
        t[p + "mlp.gate_proj.weight"] = lin(F, D)
        t[p + "mlp.up_proj.weight"] = lin(F, D)
        t[p + "mlp.down_proj.weight"] = lin(D, F)
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
    t["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = lin(V, D)
    return t


def write_hf(path, cfg: dict, tensors: dict, shards: int = 1) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return str(path)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


# ---------------------------------------------------------------------------- NumPy reference
def np_llama_logits(cfg: dict, W: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """HF LlamaForCausalLM forward in float64: rotate_half RoPE, repeat_kv GQA, RMSNorm, SiLU MLP."""
    W = {k: np.asarray(v, np.float64) for k, v in W.items()}
    D, N, K = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    B, T = tokens.shape

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    inv_freq = 1.0 / theta ** (np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv_freq[None]
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]  # [1, T, 1, H]

    def rotate_half(x):
        return np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)

    causal = np.tril(np.ones((T, T), bool))
    x = W["model.embed_tokens.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(B, T, N, H)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(B, T, K, H)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(B, T, K, H)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)  # repeat_kv
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", pr, v).reshape(B, T, N * H)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    x = rms(x, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T


# ============================================================================ HF import: numerics
@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_matches_numpy_llama(tmp_path, case):
    cfg = hf_config(**CASES[case])
    W = random_tensors(cfg, seed=1)
    config, params = convert.load_hf(write_hf(tmp_path / "hf", cfg, W))
    assert config.reference_prefix is None and not config.memory_enabled
    assert config.memory_layers == cfg["num_hidden_layers"] // 2
    assert config.tie_embeddings == cfg["tie_word_embeddings"]
    assert config.head_dim == (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    assert config.pad_id == 2  # pad_token_id null -> eos
    assert config.param_dtype == "float32" and config.dtype == "float32"
    tokens = np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, 13))
    want = np_llama_logits(cfg, W, tokens)
    got = np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), config))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_memory_split_does_not_change_plain_model(tmp_path):
    cfg = hf_config(**CASES["untied"])
    path = write_hf(tmp_path / "hf", cfg, random_tensors(cfg, seed=3))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg["vocab_size"], (1, 9)), jnp.int32)
    outs = []
    for lm in (0, 1, 3):
        config, params = convert.load_hf(path, memory_layers=lm)
        assert config.memory_layers == lm
        outs.append(np.asarray(forward(params, tokens, config)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-6, atol=1e-6)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    cfg = hf_config(**CASES["tied"])
    W = random_tensors(cfg, seed=5)
    c1, p1 = convert.load_hf(write_hf(tmp_path / "one", cfg, W))
    c3, p3 = convert.load_hf(write_hf(tmp_path / "three", cfg, W, shards=3))
    assert dataclasses.replace(c1, name="x") == dataclasses.replace(c3, name="x")
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_hf_options(tmp_path):
    cfg = hf_config(**CASES["untied"])
    path = write_hf(tmp_path / "hf", cfg, random_tensors(cfg))
    config, params = convert.load_hf(path, memory_layers=2, reference_prefix=[1, 5, 7], dtype="bfloat16",
                                     param_dtype="bfloat16", name="mine")
    assert (config.memory_layers, config.reference_prefix, config.dtype, config.param_dtype, config.name) == \
        (2, (1, 5, 7), "bfloat16", "bfloat16", "mine")
    assert params["embed"].dtype == jnp.bfloat16 and params["mem_blocks"]["wq"].shape == (2, 20, 4, 6)
    logits = forward(params, jnp.ones((1, 5), jnp.int32), config)  # prefix sink on: runs, finite
    assert logits.shape == (1, 5, 61) and bool(jnp.isfinite(logits).all())


# ============================================================================ round trip
def _read_all(path: str) -> dict[str, tuple[str, tuple, bytes]]:
    out = {}
    for fn in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, fn), framework="numpy") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (str(t.dtype), t.shape, t.tobytes())
    return out


@pytest.mark.parametrize("case,dtype,shards", [("untied", ml_dtypes.bfloat16, 1), ("tied", np.float32, 2),
                                               ("tied", np.float16, 1)])
def test_import_export_bit_exact(tmp_path, case, dtype, shards):
    cfg = hf_config(**CASES[case], torch_dtype=np.dtype(dtype).name)
    src = write_hf(tmp_path / "src", cfg, random_tensors(cfg, seed=7, dtype=dtype), shards=shards)
    config, params = convert.load_hf(src)
    assert config.param_dtype == np.dtype(dtype).name
    convert.save_hf(config, params, str(tmp_path / "out"))
    a, b = _read_all(src), _read_all(str(tmp_path / "out"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][:2] == b[k][:2], k
        assert a[k][2] == b[k][2], f"{k} bytes differ"
    with open(tmp_path / "out" / "config.json") as f:
        out_cfg = json.load(f)
    # written in the transformers-5 form: RoPE under rope_parameters, "dtype" for torch_dtype
    renamed = {"rope_theta", "rope_scaling", "torch_dtype", "pad_token_id"}
    for k, v in cfg.items():
        if k not in renamed:
            assert out_cfg[k] == v, k
    assert out_cfg["rope_parameters"] == {"rope_theta": cfg["rope_theta"], "rope_type": "default"}
    assert out_cfg["dtype"] == cfg["torch_dtype"] and "rope_theta" not in out_cfg
    assert out_cfg["pad_token_id"] == 2  # null in the source; exported as the eos id it resolved to
    if "head_dim" not in cfg:
        assert out_cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    # and back again: the same config (memory geometry is kept under "m3jax") and params
    config2, params2 = convert.load_hf(str(tmp_path / "out"))
    assert config2 == config
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_save_hf_records_memory_geometry(tmp_path):
    config = preset("tiny")
    params = init(config, jax.random.PRNGKey(0))
    convert.save_hf(config, params, str(tmp_path / "hf"))
    got, _ = convert.load_hf(str(tmp_path / "hf"))
    assert got == config
    got_plain, _ = convert.load_hf(str(tmp_path / "hf"), reference_prefix=None)
    assert got_plain.reference_prefix is None


# ============================================================================ errors
def _expect_error(tmp_path, cfg, tensors, *needles):
    path = write_hf(tmp_path / "bad", cfg, tensors)
    with pytest.raises(convert.ConvertError) as e:
        convert.load_hf(path)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_tensor_is_named(tmp_path):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    del W["model.layers.1.mlp.up_proj.weight"]
    del W["lm_head.weight"]
    _expect_error(tmp_path, cfg, W, "missing", "model.layers.1.mlp.up_proj.weight", "lm_head.weight")


def test_unexpected_tensor_is_named(tmp_path):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    W["model.layers.0.self_attn.q_proj.bias"] = np.zeros(24, np.float32)
    W["model.layers.3.input_layernorm.weight"] = np.ones(20, np.float32)  # a layer too many
    _expect_error(tmp_path, cfg, W, "unexpected", "model.layers.0.self_attn.q_proj.bias",
                  "model.layers.3.input_layernorm.weight")


def test_misshaped_tensor_is_named(tmp_path):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    W["model.layers.2.self_attn.k_proj.weight"] = np.zeros((20, 12), np.float32)  # transposed
    _expect_error(tmp_path, cfg, W, "model.layers.2.self_attn.k_proj.weight", "(20, 12)", "(12, 20)")


def test_non_float_tensor_is_named(tmp_path):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    W["model.norm.weight"] = np.ones(20, np.int32)
    _expect_error(tmp_path, cfg, W, "model.norm.weight", "int32")


def test_tied_with_different_head_is_rejected(tmp_path):
    cfg = hf_config(**CASES["tied"])
    W = random_tensors(cfg)
    W["lm_head.weight"] = W["model.embed_tokens.weight"] + 1
    _expect_error(tmp_path, cfg, W, "lm_head.weight", "tie_word_embeddings")
    # a tied checkpoint that stores an identical copy of the head, and old inv_freq buffers, load
    W["lm_head.weight"] = W["model.embed_tokens.weight"].copy()
    W["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(3, np.float32)
    config, _ = convert.load_hf(write_hf(tmp_path / "ok", cfg, W))
    assert config.tie_embeddings


@pytest.mark.parametrize("change,needle", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters rope_type='yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_attention_heads": 3}, "num_heads"),  # 3 heads with 2 kv heads
])
def test_unsupported_config_is_rejected(tmp_path, change, needle):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    cfg.update(change)
    _expect_error(tmp_path, cfg, W, needle)


def test_mistral_without_window_loads(tmp_path):
    cfg = hf_config(**CASES["untied"])
    W = random_tensors(cfg)
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    config, _ = convert.load_hf(write_hf(tmp_path / "m", cfg, W))
    assert config.num_layers == 3


# ============================================================================ GGUF
def _interleaved_rope(x, pos, theta):
    """llama.cpp's "normal" RoPE: rotate adjacent pairs (2i, 2i+1). x: [T, H]."""
    H = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, H, 2) / H)
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * c - b * s, a * s + b * c
    return out


def _rotate_half_rope(x, pos, theta):
    H = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, H, 2) / H)
    c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    return x * c + np.concatenate([-x[:, H // 2:], x[:, :H // 2]], -1) * s


def test_gguf_qk_permutation_matches_rope_conventions():
    rng = np.random.default_rng(0)
    heads, H, D, T = 3, 8, 10, 7
    wq, wk = rng.standard_normal((heads * H, D)), rng.standard_normal((heads * H, D))
    np.testing.assert_array_equal(convert.unpermute_gguf_qk(convert.permute_gguf_qk(wq, heads), heads), wq)
    x, pos = rng.standard_normal((T, D)), np.arange(T, dtype=np.float64) * 3
    # attention scores: GGUF weights with interleaved RoPE == HF weights with rotate_half RoPE
    gq, gk = convert.permute_gguf_qk(wq, heads), convert.permute_gguf_qk(wk, heads)
    for n in range(heads):
        sl = slice(n * H, (n + 1) * H)
        s_gguf = _interleaved_rope(x @ gq[sl].T, pos, 1e4) @ _interleaved_rope(x @ gk[sl].T, pos, 1e4).T
        s_hf = _rotate_half_rope(x @ wq[sl].T, pos, 1e4) @ _rotate_half_rope(x @ wk[sl].T, pos, 1e4).T
        np.testing.assert_allclose(s_gguf, s_hf, rtol=1e-10, atol=1e-10)


def tiny_gguf_vocab():
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens = specials + alphabet + ["Ġt", "he", "Ġthe", "in", "<user_tok>"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials) - 1) + [4]
    return tokens, types, merges


def write_tiny_gguf(path: str, cfg: dict, W: dict[str, np.ndarray], arch: str = "llama",
                    chat_template: str = "{{ 'chatml' }}", eot_token_id: int | None = None,
                    tokenizer_kv=None) -> None:
    """A GGUF as llama.cpp writes one with the `gguf` package: `arch` metadata keys, tiny vocab
    (or what `tokenizer_kv(writer)` writes instead); llama q/k rows permuted for interleaved RoPE
    (qwen2/qwen3 keep HF order), Qwen2 biases, Qwen3 q/k norms."""
    import gguf

    tokens, types, merges = tiny_gguf_vocab()
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or cfg["hidden_size"] // N
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_rope_dimension_count(H)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if tokenizer_kv is not None:
        tokenizer_kv(w)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    if eot_token_id is not None:
        w.add_eot_token_id(eot_token_id)
    w.add_chat_template(chat_template)
    names = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    w.add_tensor("token_embd.weight", np.asarray(W["model.embed_tokens.weight"], np.float32))
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, g in names.items():
            t = W.get(f"model.layers.{i}.{hf_name}")
            if t is None:
                continue
            t = np.asarray(t, np.float32)
            if arch == "llama" and g == "attn_q.weight":
                t = convert.permute_gguf_qk(t, N)
            elif arch == "llama" and g == "attn_k.weight":
                t = convert.permute_gguf_qk(t, K)
            w.add_tensor(f"blk.{i}.{g}", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", np.asarray(W["model.norm.weight"], np.float32))
    if "lm_head.weight" in W:
        w.add_tensor("output.weight", np.asarray(W["lm_head.weight"], np.float32))
    if "rope_freqs.weight" in W:  # llama.cpp's per-frequency RoPE factors (Llama 3.1+)
        w.add_tensor("rope_freqs.weight", np.asarray(W["rope_freqs.weight"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_equals_hf_import(tmp_path, case):
    tokens, _, _ = tiny_gguf_vocab()
    cfg = hf_config(**dict(CASES[case], vocab_size=len(tokens) + 2))
    W = random_tensors(cfg, seed=11)
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, W)
    c_hf, p_hf = convert.load_hf(write_hf(tmp_path / "hf", cfg, W))
    c_g, p_g, tok = convert.load_gguf(str(tmp_path / "m.gguf"), reference_prefix=None)
    assert dataclasses.replace(c_g, name="x") == dataclasses.replace(c_hf, name="x")
    for a, b in zip(jax.tree_util.tree_leaves(p_hf), jax.tree_util.tree_leaves(p_g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the rebuilt tokenizer: specials (type 3) and user-defined (type 4) tokens are single ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.encode("<|im_start|>the<|im_end|><user_tok>") == [1, tokens.index("t"), tokens.index("he"), 2,
                                                                  tokens.index("<user_tok>")]
    assert tok.encode(" the in") == [tokens.index("Ġthe"), tokens.index("Ġ"), tokens.index("in")]
    assert tok.decode(tok.encode("<|im_start|>x the"), skip_special=True) == "x the"
    # default reference prefix: BOS + the tokens of "Reference:"
    c_m, _, _ = convert.load_gguf(str(tmp_path / "m.gguf"))
    assert c_m.reference_prefix == tok.reference_prefix() and c_m.memory_enabled


def test_checkpoint_dir_round_trip_and_cli(tmp_path):
    tokens, _, _ = tiny_gguf_vocab()
    cfg = hf_config(**dict(CASES["untied"], vocab_size=len(tokens)))
    W = random_tensors(cfg, seed=12)
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, W)
    assert cli.main(["convert", "--from", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ck"),
                                 "--memory-layers", "2"]) == 0
    config, params, tok = convert.load_checkpoint_dir(str(tmp_path / "ck"))
    c0, p0, t0 = convert.load_gguf(str(tmp_path / "m.gguf"), memory_layers=2)
    assert config == c0
    assert sorted(convert.flatten_params(params)) == sorted(convert.flatten_params(p0))
    for k, v in convert.flatten_params(p0).items():
        np.testing.assert_array_equal(convert.flatten_params(params)[k], v)
    assert "mem_blocks/wq" in convert.flatten_params(params)
    assert tok.encode("<|im_start|> the") == t0.encode("<|im_start|> the")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template) == (1, 2, 2, "{{ 'chatml' }}")
    # hf source: plain by default, no tokenizer.json -> no tokenizer dir
    src = write_hf(tmp_path / "hf", cfg, W)
    assert cli.main(["convert", "--from", "hf", src, "--out", str(tmp_path / "ck2"), "--param-dtype",
                                 "bfloat16"]) == 0
    config2, params2, tok2 = convert.load_checkpoint_dir(str(tmp_path / "ck2"))
    assert tok2 is None and config2.reference_prefix is None and config2.param_dtype == "bfloat16"
    assert params2["embed"].dtype == jnp.bfloat16
    assert cli.main(["convert", "--from", "hf", src, "--out", str(tmp_path / "ck3"),
                                 "--reference-prefix", "1,5,6"]) == 0
    assert convert.load_checkpoint_dir(str(tmp_path / "ck3"))[0].reference_prefix == (1, 5, 6)


def test_chat_template_chatml():
    from m3jax.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer, models

    template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    tk = Tokenizer(HFTokenizer(models.BPE()), bos_id=0, eos_id=0, pad_id=0, chat_template=template)
    msgs = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"}]
    sys_ = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    body = ("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
            "<|im_start|>user\nCapital of France?<|im_end|>\n")
    assert tk.apply_chat_template(msgs) == sys_ + body + "<|im_start|>assistant\n"
    assert tk.apply_chat_template(msgs, add_generation_prompt=False) == sys_ + body
    own = [{"role": "system", "content": "Be brief."}] + msgs[:1]
    assert tk.apply_chat_template(own) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!"
                                           "<|im_end|>\n<|im_start|>assistant\n")
    plain = Tokenizer(HFTokenizer(models.BPE()), bos_id=0, eos_id=0, pad_id=0)
    assert plain.apply_chat_template(msgs[:1]) == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role"):
        tk.apply_chat_template([{"content": "x"}])


# ============================================================================ SmolLM2 (shipped GGUF)
@pytest.fixture(scope="module")
def smollm2():
    from m3jax.assets import smollm2_gguf

    return convert.load_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_plain_fwd(smollm2):
    config, params, tok = smollm2
    plain = dataclasses.replace(config, reference_prefix=None)
    return plain, params, tok, jax.jit(forward, static_argnums=2)


def test_smollm2_config_and_tokenizer(smollm2):
    config, params, tok = smollm2
    want = preset("smollm2-135m")
    assert dataclasses.replace(config, max_len=want.max_len) == want  # the file says 8192 positions
    # the document start is <|endoftext|> (id 0), not the GGUF's BOS <|im_start|> (a chat-turn token)
    assert config.reference_prefix == tok.reference_prefix() == (0, 23682, 42)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 2, 2, 49152)
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198] and tok.encode("<|endoftext|>") == [0]
    assert "<|im_start|>" in tok.chat_template
    text = "Memory3 stores 1,234 references — café!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert params["mem_blocks"]["wq"].shape == (15, 576, 9, 64) and "lm_head" not in params


def test_smollm2_greedy_paris(smollm2_plain_fwd):
    config, params, tok, fwd = smollm2_plain_fwd
    ids = [tok.bos_id] + tok.encode("The capital of France is")
    new = []
    for _ in range(2):
        logits = fwd(params, jnp.asarray([ids + new], jnp.int32), config)
        new.append(int(jnp.argmax(logits[0, -1])))
    assert tok.decode(new).startswith(" Paris"), tok.decode(new)


def test_smollm2_memory_config_runs(smollm2):
    config, params, tok = smollm2
    assert config.memory_enabled and config.context_offset == 3 + 128
    tokens = jnp.asarray([[tok.bos_id] + tok.encode("The capital of France is Paris. The capital of Italy is")],
                         jnp.int32)
    logits = forward(params, tokens, config)
    assert logits.shape == (1, tokens.shape[1], 49152) and bool(jnp.isfinite(logits).all())
    empty = ChunkMemory.empty(config, 1, 1)  # all-masked memory reads nothing
    np.testing.assert_allclose(np.asarray(forward(params, tokens, config, memory=empty)), np.asarray(logits),
                               rtol=1e-4, atol=1e-4)


def wiki_perplexity(config, params, tok, fwd, n: int, start_id: int, max_tokens: int = 256,
                    batch: int = 8) -> float:
    """Perplexity of the first n Wikipedia leads (`start_id` prepended, truncated), batched by length."""
    from m3jax.assets import wiki_leads

    seqs = sorted(([start_id] + s)[:max_tokens] for s in tok.encode_batch([a.text for a in wiki_leads()[:n]]))
    seqs.sort(key=len)

    @jax.jit
    def nll(params, tokens, mask):
        lp = jax.nn.log_softmax(fwd(params, tokens, config)[:, :-1], -1)
        tl = jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
        return -(tl * mask[:, 1:]).sum(), mask[:, 1:].sum()

    total, count = 0.0, 0.0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        L = -(-max(map(len, chunk)) // 64) * 64  # few distinct shapes: few compilations
        tokens = np.full((batch, L), tok.pad_id, np.int32)
        mask = np.zeros((batch, L), np.float32)
        for j, s in enumerate(chunk):
            tokens[j, :len(s)], mask[j, :len(s)] = s, 1
        a, b = nll(params, jnp.asarray(tokens), jnp.asarray(mask))
        total, count = total + float(a), count + float(b)
    return float(np.exp(total / count))


@pytest.mark.slow  # ~2-4 min on 2 CPU cores
def test_smollm2_wiki_perplexity(smollm2_plain_fwd):
    # Documents start with <|endoftext|> (id 0), SmolLM2's pretraining document separator: 14.54.
    # With the GGUF's BOS <|im_start|> (id 1, a chat-turn token of the Instruct model) the same
    # measurement gives 16.75.
    config, params, tok, fwd = smollm2_plain_fwd
    assert tok.encode("<|endoftext|>") == [0]
    ppl = wiki_perplexity(config, params, tok, fwd, n=200, start_id=0)
    print(f"SmolLM2 perplexity on 200 Wikipedia leads: {ppl:.3f}")
    assert abs(ppl - 14) < 1.4, ppl
