"""Model families against transformers' own outputs: Llama (default and llama3 RoPE, both config
generations), Mistral without sliding window, Qwen2 (q/k/v biases, tied, sharded), Qwen3 (q/k
norms). The checkpoints and reference logits were written by transformers 5 with
tests/fixtures/make_hf_fixtures.py (this suite does not need torch): import, export round trip,
GGUF of the same weights, memory writing and reading per family (against tests/np_reference.py),
and the chat template of the shipped SmolLM2 GGUF rendered in Jinja's sandbox.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from m3jax import cli, convert
from m3jax.model import ChunkMemory, forward
from test_convert import write_tiny_gguf

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))
# What each case must import as: (family switches, RoPE fields)
EXPECT = {
    "llama": dict(qkv_bias=False, qk_norm=False, rope_type="default", rope_theta=1e5, tie_embeddings=False),
    "llama3_tied_legacy": dict(qkv_bias=False, qk_norm=False, rope_type="llama3", rope_theta=1e4, rope_factor=8.0,
                               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=32,
                               tie_embeddings=True),
    "llama3_v5": dict(rope_type="llama3", rope_theta=5e5, rope_factor=8.0, tie_embeddings=False),
    "mistral": dict(qkv_bias=False, qk_norm=False, rope_type="default", rope_theta=1e4),
    "qwen2_tied_sharded": dict(qkv_bias=True, qk_norm=False, rope_theta=1e6, tie_embeddings=True),
    "qwen3": dict(qkv_bias=False, qk_norm=True, rope_theta=1e6, tie_embeddings=False),
}
fwd = jax.jit(forward, static_argnums=2)


def test_fixtures_present():
    assert CASES == sorted(EXPECT), CASES


def _load(case: str, **kw):
    return convert.load_hf(os.path.join(FIXTURES, case), **kw)


def _reference(case: str):
    return np.load(os.path.join(FIXTURES, case, "reference.npz"))


def _greedy(params, config, tokens: np.ndarray, n: int) -> np.ndarray:
    seq = np.asarray(tokens)
    for _ in range(n):
        nxt = np.asarray(fwd(params, jnp.asarray(seq, jnp.int32), config))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[:, tokens.shape[1]:]


# ============================================================================ import == transformers
@pytest.mark.parametrize("case", sorted(EXPECT))
def test_import_matches_transformers(case):
    config, params = _load(case, param_dtype="float32")
    for k, v in EXPECT[case].items():
        assert getattr(config, k) == v, (k, getattr(config, k), v)
    assert config.reference_prefix is None and config.dtype == "float32"
    r = _reference(case)
    got = np.asarray(fwd(params, jnp.asarray(r["tokens"], jnp.int32), config))
    diff = float(np.abs(got - r["logits"]).max())
    print(f"{case}: max |logit diff| vs transformers {diff:.2e}")
    assert diff < 1e-4, diff
    assert float(np.abs(r["logits"]).max()) > 1.0  # logits of a useful scale: the bound means something
    np.testing.assert_array_equal(_greedy(params, config, r["tokens"], r["greedy"].shape[1]), r["greedy"])


def _v5_form(cfg: dict) -> dict:
    """A transformers-4 config.json dict rewritten as transformers 5 keeps it."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    out["rope_parameters"] = dict(cfg.get("rope_scaling") or {"rope_type": "default"}, rope_theta=cfg["rope_theta"])
    out["dtype"] = cfg["torch_dtype"]
    return out


def test_both_config_generations_read_alike(tmp_path):
    src = os.path.join(FIXTURES, "llama3_tied_legacy")
    with open(os.path.join(src, "config.json")) as f:
        legacy = json.load(f)
    assert "rope_parameters" not in legacy and legacy["rope_scaling"]["rope_type"] == "llama3"
    shutil.copytree(src, tmp_path / "v5")
    with open(tmp_path / "v5" / "config.json", "w") as f:
        json.dump(_v5_form(legacy), f)
    a, _ = convert.load_hf(src)
    b, _ = convert.load_hf(str(tmp_path / "v5"))
    assert dataclasses.replace(a, name="x") == dataclasses.replace(b, name="x")
    # a theta other than 1e4 is read from either place (it used to fall back to 1e4 silently)
    with open(os.path.join(FIXTURES, "llama", "config.json")) as f:
        v5 = json.load(f)
    assert v5["rope_parameters"]["rope_theta"] == 1e5 and "rope_theta" not in v5
    assert convert.config_from_hf(v5).rope_theta == 1e5
    old = {k: v for k, v in v5.items() if k != "rope_parameters"}
    assert convert.config_from_hf(dict(old, rope_theta=1e5)).rope_theta == 1e5


@pytest.mark.parametrize("rope,needle", [
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type='yarn'"),
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}, "rope_type='dynamic'"),
    ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0}, "original_max_position_embeddings"),
])
def test_other_rope_types_are_refused_naming_the_file(tmp_path, rope, needle):
    shutil.copytree(os.path.join(FIXTURES, "llama"), tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = rope
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(convert.ConvertError) as e:
        convert.load_hf(str(tmp_path / "m"))
    msg = str(e.value)
    assert needle in msg and str(tmp_path / "m" / "config.json") in msg and "\n" not in msg


# ============================================================================ export
def _hf_tensors(path: str) -> dict[str, np.ndarray]:
    return convert.read_safetensors(convert._safetensors_files(path))


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_export_round_trip_exact(tmp_path, case):
    src = os.path.join(FIXTURES, case)
    config, params = convert.load_hf(src)  # the checkpoint's own dtype: bf16 / f16 stay as stored
    convert.save_hf(config, params, str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        out = json.load(f)
    with open(os.path.join(src, "config.json")) as f:
        want_type = json.load(f)["model_type"]
    assert out["model_type"] == {"mistral": "llama"}.get(want_type, want_type)  # Mistral = Llama layout
    assert out["rope_parameters"]["rope_type"] == config.rope_type and "rope_theta" not in out
    a, b = _hf_tensors(src), _hf_tensors(str(tmp_path / "out"))
    a.pop("lm_head.weight", None) if config.tie_embeddings else None
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    config2, params2 = convert.load_hf(str(tmp_path / "out"))
    assert config2 == config
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_transformers_loaded_every_export():
    """tests/fixtures/make_hf_fixtures.py --m3jax-python exported each case with `save_hf` and
    loaded the export with transformers 5 (AutoModelForCausalLM): recorded per case."""
    with open(os.path.join(FIXTURES, "export_check.json")) as f:
        check = json.load(f)
    assert check["transformers"].startswith("5.")
    assert sorted(check["cases"]) == sorted(EXPECT)
    classes = {"qwen2_tied_sharded": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    for case, res in check["cases"].items():
        assert res["loaded"] and res["max_abs_logit_diff"] < 1e-4, (case, res)
        assert res["class"] == classes.get(case, "LlamaForCausalLM"), (case, res)


# ============================================================================ GGUF
def _vocab(n: int):
    """n GGUF tokens: three specials, single characters and one merge ("a b" -> "ab")."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += [str(d) for d in range(10)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars[: n - 4] + ["ab"]
    return tokens, [3, 3, 3] + [1] * (n - 3), ["a b"]


_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2_tied_sharded": "qwen2", "qwen3": "qwen3",
              "llama3_v5": "llama"}


def _llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The factors llama.cpp's converter writes as rope_freqs.weight for Llama 3.1+ scaling: 1 for
    short wavelengths, `factor` for long ones, 1 / ((1 - s) / factor + s) between."""
    old, lo, hi, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                           rope["high_freq_factor"], rope["factor"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - s) / factor + s))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("case", sorted(_GGUF_ARCH))
def test_gguf_imports_like_safetensors(tmp_path, case, monkeypatch):
    import test_convert

    src = os.path.join(FIXTURES, case)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    W = _hf_tensors(src)
    llama3 = cfg["rope_parameters"]["rope_type"] == "llama3"
    if llama3:  # llama.cpp keeps Llama 3.1+ scaling as per-frequency factors in a tensor
        W["rope_freqs.weight"] = _llama_cpp_rope_freqs(cfg["rope_parameters"], cfg["head_dim"])
    monkeypatch.setattr(test_convert, "_tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, W, arch=_GGUF_ARCH[case])
    c_g, p_g, tok = convert.load_gguf(str(tmp_path / "m.gguf"), reference_prefix=None)
    c_h, p_h = _load(case, param_dtype="float32")
    same = ("name", "bos_id", "eos_id", "pad_id", "max_len")
    if llama3:  # the same rotary, in llama.cpp's form: factors instead of the four llama3 fields
        assert c_g.rope_type == "default" and c_g.rope_freq_factors is not None
        same += ("rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_len", "rope_freq_factors")
        from m3jax.model.layers import rope_inv_freq

        np.testing.assert_allclose(rope_inv_freq(c_g), rope_inv_freq(c_h), rtol=1e-6)
        with pytest.raises(convert.ConvertError, match="per-frequency RoPE factors"):
            convert.save_hf(c_g, p_g, str(tmp_path / "hf"))
    assert dataclasses.replace(c_g, **{k: getattr(c_h, k) for k in same}) == c_h
    for a, b in zip(jax.tree_util.tree_leaves(p_h), jax.tree_util.tree_leaves(p_g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = _reference(case)
    got = np.asarray(fwd(p_g, jnp.asarray(r["tokens"], jnp.int32), c_g))
    assert float(np.abs(got - r["logits"]).max()) < 1e-4


def test_gguf_of_another_architecture_is_refused_before_tensors(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(convert.ConvertError) as e:
        convert.load_gguf(str(tmp_path / "g.gguf"))
    msg = str(e.value)
    assert "general.architecture='gemma2' is not supported" in msg and "g.gguf" in msg and "\n" not in msg


# ============================================================================ memory per family
@pytest.mark.parametrize("case", sorted(EXPECT))
def test_memory_write_and_read_per_family(case):
    """Memories written with the family's projections and rotary, read back in a forward: against
    the NumPy Memory3 (tests/np_reference.py, which applies biases, q/k norm and llama3 RoPE)."""
    from m3jax.decode import arrange_memory
    from m3jax.memory.encode import encode

    config, params = _load(case, param_dtype="float32", memory_layers=1, reference_prefix=(1, 5, 6))
    config = dataclasses.replace(config, tokens_per_memory=3, reference_len=10, chunk_size=8,
                                 memories_per_chunk=2)
    rng = np.random.default_rng(0)
    refs = rng.integers(3, config.vocab_size, (4, config.reference_len)).astype(np.int32)
    mask = np.arange(config.reference_len)[None] < np.array([[10], [7], [10], [5]])
    mem = encode(params, config, jnp.asarray(refs), jnp.asarray(mask))
    for n in range(4):
        L = int(mask[n].sum())
        kv, m, _ = ref.encode_reference(params, config, list(refs[n, :L]), score=config.score,
                                        group_reduce=config.group_reduce)
        np.testing.assert_array_equal(np.asarray(mem.mask_NT[n]), m)
        np.testing.assert_allclose(np.asarray(mem.kv_NLZKTH[n])[..., m, :], kv[..., m, :], atol=2e-4)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (1, 2 * config.chunk_size)), jnp.int32)
    cm = arrange_memory(mem, 1, 2, jnp.float32)  # chunk 0 reads memories 0-1, chunk 1 memories 2-3
    got = np.asarray(forward(params, tokens, config, memory=cm))
    none = np.asarray(forward(params, tokens, config))
    assert np.isfinite(got).all() and np.abs(got - none).max() > 1e-2
    want = ref.forward(params, config, np.asarray(tokens), memory={
        "k": np.asarray(cm.k_LBCSKH, np.float64), "v": np.asarray(cm.v_LBCSKH, np.float64),
        "mask": np.asarray(cm.mask_BCS), "lookback": cm.lookback})
    assert np.abs(got - want).max() < 2e-4, np.abs(got - want).max()


# ============================================================================ chat template
def test_smollm2_chat_template_in_the_sandbox():
    """The shipped SmolLM2 GGUF's own template, rendered by Jinja, against a hand-written rendering."""
    from m3jax.assets import smollm2_gguf
    from m3jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    msgs = [{"role": "user", "content": "Who wrote Hamlet?"}]
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs) == want
    assert tok.apply_chat_template(msgs, system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = tok.encode_chat(msgs)  # the template writes no bos_token: nothing dropped
    assert ids[0] == tok.encode("<|im_start|>")[0] == 1 and tok.decode(ids, skip_special=False) == want
    # a template that writes {{ bos_token }} (Llama 3 style): Generator adds the BOS, encode_chat drops it
    from m3jax.tokenizer import Tokenizer as Tk

    llama3 = Tk(tok.tk, bos_id=0, eos_id=2, pad_id=2, chat_template="{{ bos_token }}" + tok.chat_template)
    assert llama3.apply_chat_template(msgs) == "<|endoftext|>" + want
    assert llama3.encode_chat(msgs) == ids


def test_chat_template_cannot_run_code():
    from tokenizers import Tokenizer as HFTokenizer, models

    from m3jax.tokenizer import ChatTemplateError, Tokenizer

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tk = Tokenizer(HFTokenizer(models.BPE()), bos_id=0, eos_id=0, pad_id=0, chat_template=evil)
    with pytest.raises(ChatTemplateError, match="unsafe|SecurityError"):
        tk.apply_chat_template([{"role": "user", "content": "x"}])
    refuse = "{{ raise_exception('only user and assistant roles') }}"
    tk = Tokenizer(HFTokenizer(models.BPE()), bos_id=0, eos_id=0, pad_id=0, chat_template=refuse)
    with pytest.raises(ChatTemplateError, match="only user and assistant roles"):
        tk.apply_chat_template([{"role": "user", "content": "x"}])


# ============================================================================ CLI
def test_cli_export_to_hf(tmp_path, monkeypatch):
    """`m3jax convert --from hf ... --out ck`, then `--from m3jax ck --to hf`: the same tensors and
    config as the source; `--from gguf ... --to hf` also writes the tokenizer and chat template."""
    import test_convert

    src = os.path.join(FIXTURES, "qwen3")
    assert cli.main(["convert", "--from", "hf", src, "--out", str(tmp_path / "ck"), "--memory-layers", "1"]) == 0
    assert cli.main(["convert", "--from", "m3jax", str(tmp_path / "ck"), "--to", "hf",
                                 "--out", str(tmp_path / "hf")]) == 0
    c0, _ = convert.load_hf(src, memory_layers=1)
    c1, _ = convert.load_hf(str(tmp_path / "hf"))
    assert c1 == c0 and c1.qk_norm
    a, b = _hf_tensors(src), _hf_tensors(str(tmp_path / "hf"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    with pytest.raises(SystemExit, match="--to hf"):
        cli.main(["convert", "--from", "m3jax", str(tmp_path / "ck"), "--out", str(tmp_path / "x")])
    # GGUF -> transformers layout with the tokenizer: the chat template travels along
    with open(os.path.join(src, "config.json")) as f:
        cfg = dict(json.load(f), rope_theta=1e6)
    monkeypatch.setattr(test_convert, "_tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, _hf_tensors(src), arch="qwen3", chat_template=template)
    assert cli.main(["convert", "--from", "gguf", str(tmp_path / "m.gguf"), "--to", "hf",
                                 "--out", str(tmp_path / "hf2")]) == 0
    c2, _ = convert.load_hf(str(tmp_path / "hf2"))
    tok = convert.load_hf_tokenizer(str(tmp_path / "hf2"), c2)
    assert tok.chat_template == template and c2.bos_id == 0  # BOS <|im_start|> is a turn marker: <|endoftext|>
    assert c2.reference_prefix == (0, *tok.encode("Reference:"))


def test_generator_reads_conversations():
    """A conversation prompt is the chat template's rendering, with the model's BOS first."""
    import tempfile

    import test_convert
    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator
    from m3jax.tokenizer import load_gguf_tokenizer

    config, params = _load("qwen3", param_dtype="float32")
    with open(os.path.join(FIXTURES, "qwen3", "config.json")) as f:
        cfg = dict(json.load(f), rope_theta=1e6)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ m['content'] }}<|im_end|>{% endfor %}"
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_convert, "_tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
        write_tiny_gguf(os.path.join(tmp, "m.gguf"), cfg, _hf_tensors(os.path.join(FIXTURES, "qwen3")),
                        arch="qwen3", chat_template=template)
        tok = load_gguf_tokenizer(os.path.join(tmp, "m.gguf"))
    gen = Generator(params, config, tok, None, DecodeConfig(max_new_tokens=4, max_cache_len=64, prompt_bucket=64))
    conv = [{"role": "user", "content": "abc"}]
    ids = tok.encode_chat(conv)
    assert tok.decode(ids, skip_special=False) == "<|im_start|>userabc<|im_end|>"
    a = gen.generate([conv], mode="none", ignore_eos=True)
    b = gen.generate([[config.bos_id] + ids], mode="none", ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 4
    assert gen.generate(conv, mode="none", ignore_eos=True).tokens == a.tokens  # one conversation, unbatched


def test_gguf_pre_tokenizers():
    """tokenizer.ggml.pre picks the text split of the model's own tokenizer.json: numbers by 3
    (Llama 3) or digit by digit (Qwen2, SmolLM); newlines kept together except by SmolLM's."""
    from m3jax.tokenizer import gguf_pre_tokenizer

    def split(pre):
        return [t for t, _ in gguf_pre_tokenizer(pre, "m.gguf").pre_tokenize_str("I've 12345 apples\n\nok")]

    assert split("llama-bpe") == ["I", "'ve", "Ġ", "123", "45", "Ġapples", "ĊĊ", "ok"]
    assert split("qwen2") == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġapples", "ĊĊ", "ok"]
    assert split("smollm") == split(None) == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġapples", "Ċ", "Ċ", "ok"]
    with pytest.raises(ValueError, match="m.gguf: tokenizer.ggml.pre='deepseek-llm' is not supported"):
        gguf_pre_tokenizer("deepseek-llm", "m.gguf")


@pytest.mark.slow  # builds a knowledge base and compiles memory and rag decoding (minutes on a shared CPU)
def test_conversations_in_memory_and_rag_modes(tmp_path):
    """An instruct-style prompt (a conversation, rendered by the chat template) runs in every
    mode and equals its rendered ids given directly."""
    from test_kb_updates import EMB, _text, tiny_model

    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator
    from m3jax.memory.build import build_knowledge_base

    rng = np.random.default_rng(0)
    docs = [(i, _text(rng, int(rng.integers(20, 40))), f"T{i}") for i in range(6)]
    tok, cfg, params = tiny_model(docs, 0)
    kb = build_knowledge_base(str(tmp_path / "kb"), params, cfg, tok, docs, embedder=EMB, codec="bf16",
                              batch_size=8, show_progress=False, log=lambda *a: None)
    gen = Generator(params, cfg, tok, kb.retriever(EMB, tokenizer=tok),
                    DecodeConfig(max_new_tokens=6, max_cache_len=256, prompt_bucket=cfg.chunk_size))
    conv = [{"role": "user", "content": docs[2][1][:60] + " What is it?"}]
    ids = [cfg.bos_id] + tok.encode_chat(conv)
    assert tok.decode(ids[1:]).startswith("<|im_start|>user\n")  # ChatML when a tokenizer has no template
    for mode in ("memory", "rag", "none"):
        a = gen.generate([conv], mode=mode, ignore_eos=True)
        b = gen.generate([ids], mode=mode, ignore_eos=True)
        assert a.tokens == b.tokens and len(a.tokens[0]) == 6, mode
        if mode != "none":
            assert len(a.retrieved[0]) >= 1 and (np.asarray(a.retrieved[0][0]) >= 0).any(), mode


def test_configs_written_before_the_family_fields_still_match():
    """A model dir, bank manifest or training checkpoint written before the family fields existed
    reads them as their defaults (the plain Llama) and still matches; a Qwen config does not."""
    from m3jax.config import ModelConfig, preset
    from m3jax.train.checkpoint import config_diff as _config_diff

    cfg = preset("tiny")
    new = ("rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
           "rope_freq_factors", "qkv_bias", "qk_norm")
    old = {k: v for k, v in cfg.to_dict().items() if k not in new}
    assert ModelConfig.from_dict(old) == cfg
    assert _config_diff(old, cfg) == []
    assert [d.split(":")[0] for d in _config_diff(old, dataclasses.replace(cfg, qkv_bias=True))] == ["qkv_bias"]
