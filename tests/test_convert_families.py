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
import time

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
    "llama3_v5": dict(rope_type="llama3", rope_theta=5e5, rope_factor=8.0, tie_embeddings=False, eos_id=2,
                      stop_ids=(61, 62)),  # eos_token_id [2, 61, 62], as Llama 3.1 Instruct's
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
    assert check["cases"]["llama3_v5"]["eos_token_id"] == [2, 61, 62]  # transformers' generate stops on all three


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
    monkeypatch.setattr(test_convert, "tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, W, arch=_GGUF_ARCH[case])
    c_g, p_g, tok = convert.load_gguf(str(tmp_path / "m.gguf"), reference_prefix=None)
    c_h, p_h = _load(case, param_dtype="float32")
    same = ("name", "bos_id", "eos_id", "pad_id", "stop_ids", "max_len")
    if llama3:  # the same rotary, in llama.cpp's form: factors instead of the four llama3 fields
        assert c_g.rope_type == "default" and c_g.rope_freq_factors is not None
        same += ("rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_len", "rope_freq_factors")
        from m3jax.model.layers import rope_inv_freq

        np.testing.assert_allclose(rope_inv_freq(c_g), rope_inv_freq(c_h), rtol=1e-6)
        # exported with llama3 parameters recovered from the factors (head_dim 8: other numbers than
        # the source's, the same rotary): the export computes transformers' reference logits
        convert.save_hf(c_g, p_g, str(tmp_path / "hf"))
        c_x, p_x = convert.load_hf(str(tmp_path / "hf"))
        assert c_x.rope_type == "llama3" and c_x.rope_freq_factors is None and c_x.rope_theta == c_h.rope_theta
        np.testing.assert_allclose(rope_inv_freq(c_x), rope_inv_freq(c_h), rtol=1e-6)
        r = _reference(case)
        got = np.asarray(fwd(p_x, jnp.asarray(r["tokens"], jnp.int32), c_x))
        assert float(np.abs(got - r["logits"]).max()) < 1e-4
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
        np.testing.assert_array_equal(np.asarray(mem.mask_IE[n]), m)
        np.testing.assert_allclose(np.asarray(mem.kv_ILZKEH[n])[..., m, :], kv[..., m, :], atol=2e-4)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (1, 2 * config.chunk_size)), jnp.int32)
    cm = arrange_memory(mem, 1, 2, jnp.float32)  # chunk 0 reads memories 0-1, chunk 1 memories 2-3
    got = np.asarray(forward(params, tokens, config, memory=cm))
    none = np.asarray(forward(params, tokens, config))
    assert np.isfinite(got).all() and np.abs(got - none).max() > 1e-2
    want = ref.forward(params, config, np.asarray(tokens), memory={
        "k": np.asarray(cm.k_LBCMKH, np.float64), "v": np.asarray(cm.v_LBCMKH, np.float64),
        "mask": np.asarray(cm.mask_BCM), "lookback": cm.lookback})
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
    monkeypatch.setattr(test_convert, "tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
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
        mp.setattr(test_convert, "tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
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


# ============================================================================ end-of-sequence ids
def _stop_after(tokens: list[int]) -> tuple[int, int]:
    """(k, t): the first generated position k >= 2 whose token t is new to the sequence."""
    for k in range(2, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k, tokens[k]
    raise AssertionError(f"no usable stop token in {tokens}")


def test_end_of_sequence_ids_stop_generate_and_serve(tmp_path):
    """transformers' list-valued eos_token_id (config.json, generation_config.json) becomes eos_id
    plus stop_ids; the Generator and the serving engine end a sequence at any of them."""
    from m3jax.config import DecodeConfig
    from m3jax.decode import Generator
    from m3jax.serve.engine import Engine, Request, ServeConfig

    config, params = _load("llama3_v5")
    assert (config.eos_id, config.stop_ids, config.end_ids) == (2, (61, 62), (2, 61, 62))
    # generation_config.json's ids are added after config.json's (Llama 3 Instruct lists <|eot_id|> there)
    shutil.copytree(os.path.join(FIXTURES, "llama"), tmp_path / "g")
    with open(tmp_path / "g" / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [9, 2, 11]}, f)
    assert convert.load_hf(str(tmp_path / "g"))[0].end_ids == (2, 9, 11)
    with open(tmp_path / "g" / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 640]}, f)
    with pytest.raises(convert.ConvertError, match=r"generation_config.json: eos_token_id \[640\] outside the vocab"):
        convert.load_hf(str(tmp_path / "g"))
    # through a model directory and an export
    convert.save_checkpoint_dir(str(tmp_path / "m"), config, params)
    assert convert.load_checkpoint_dir(str(tmp_path / "m"))[0].stop_ids == (61, 62)
    assert convert.config_to_hf(config)["eos_token_id"] == [2, 61, 62]

    prompt = [config.bos_id] + [int(t) for t in _reference("llama3_v5")["tokens"][0]]
    dc = DecodeConfig(max_new_tokens=8, max_cache_len=64, prompt_bucket=64)
    free = Generator(params, config, None, None, dc).generate([prompt], mode="none", ignore_eos=True).tokens[0]
    # its own end ids: the first one generated ends it
    first_end = next((i for i, x in enumerate(free) if x in config.end_ids), len(free) - 1)
    assert Generator(params, config, None, None, dc).generate([prompt], mode="none").tokens[0] == free[: first_end + 1]
    # a stop id after eos_id (eos_id moved to an id never generated here): ends it at that id
    k, t = _stop_after(free)
    unused = min(set(range(config.vocab_size)) - set(free))
    stopping = dataclasses.replace(config, eos_id=unused, stop_ids=(t,))
    assert Generator(params, stopping, None, None, dc).generate([prompt], mode="none").tokens[0] == free[: k + 1]

    events: list = []
    engine = Engine(params, stopping, None, None, ServeConfig(slots=1, groups=1, cache_len=64, min_cache_len=64))
    engine.start()
    try:
        req = engine.submit(Request(prompt, mode="none", max_tokens=8, temperature=0.0,
                                    on_event=lambda kind, payload: events.append((kind, payload))))
        for _ in range(6000):
            if any(kind != "chunk" for kind, _ in events):
                break
            time.sleep(0.01)
    finally:
        engine.stop()
    served = [t for kind, p in events if kind == "chunk" for t in p["tokens"]]
    assert served == free[: k + 1] and events[-1] == ("done", {"finish_reason": "stop"}), (events, req.id)


def test_gguf_end_of_turn_id(tmp_path, monkeypatch):
    """A GGUF's tokenizer.ggml.eot_token_id stops generation too: in the config, the tokenizer, the
    model directory and the transformers export."""
    import test_convert

    src = os.path.join(FIXTURES, "llama")
    with open(os.path.join(src, "config.json")) as f:
        cfg = dict(json.load(f), rope_theta=1e5)
    monkeypatch.setattr(test_convert, "tiny_gguf_vocab", lambda: _vocab(cfg["vocab_size"]))
    write_tiny_gguf(str(tmp_path / "m.gguf"), cfg, _hf_tensors(src), eot_token_id=0)  # eos 2 <|im_end|>, eot 0
    config, params, tok = convert.load_gguf(str(tmp_path / "m.gguf"))
    assert config.end_ids == (2, 0) and tok.stop_ids == (0,) and tok.eos_id == 2
    convert.save_checkpoint_dir(str(tmp_path / "ck"), config, params, tok)
    c2, _, t2 = convert.load_checkpoint_dir(str(tmp_path / "ck"))
    assert c2.end_ids == (2, 0) and t2.stop_ids == (0,)
    convert.save_hf(config, params, str(tmp_path / "hf"), tok)
    assert convert.load_hf(str(tmp_path / "hf"))[0].end_ids == (2, 0)


# ============================================================================ GGUF tokenizers
TOKENIZER_FIXTURES = os.path.join(os.path.dirname(FIXTURES), "tokenizers")


def _tokenizer_reference() -> dict:
    with open(os.path.join(TOKENIZER_FIXTURES, "reference.json"), encoding="utf-8") as f:
        return json.load(f)


def test_gguf_sentencepiece_matches_sentencepiece():
    """A SentencePiece BPE GGUF (tokenizer.ggml.model "llama", as Llama 1/2, Mistral and TinyLlama
    files have) tokenizes exactly as the sentencepiece library: spaces, newlines, digits, accents,
    other scripts and characters outside the vocabulary (byte fallback); decoding gives its text."""
    from m3jax.tokenizer import load_gguf_tokenizer

    expect = _tokenizer_reference()["files"]["spm.gguf"]
    tok = load_gguf_tokenizer(os.path.join(TOKENIZER_FIXTURES, "spm.gguf"))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    same_ids = same_text = 0
    for c in expect["cases"]:
        ids = tok.encode(c["text"])
        assert ids == c["ids"], (c["text"], tok.tk.encode(c["text"], add_special_tokens=False).tokens, c.get("pieces"))
        assert tok.decode(ids) == c["decoded"], c["text"]
        same_ids += 1
        same_text += tok.decode(ids) == c["text"]
    n_bytes = sum(1 for c in expect["cases"] for i in c["ids"] if tok.token_text(i).startswith("<0x"))
    print(f"spm.gguf: {same_ids}/{len(expect['cases'])} texts tokenized as {expect['reference']}, "
          f"{sum(len(c['ids']) for c in expect['cases'])} ids ({n_bytes} byte fallbacks), "
          f"{same_text} decode back to their text")
    assert n_bytes > 20  # byte fallback exercised
    assert tok.encode("<s>Hi")[0] == tok.bos_id  # control pieces are special tokens, as in llama.cpp


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_byte_level_pre_tokenizers_match_transformers(pre):
    """The text split (and the rest: Qwen2's NFC, Llama 3's whole-piece rule) of the byte-level
    GGUF tokenizers equal transformers' own tokenizers of those families on the same vocab:
    contractions in any case, digit runs, letters of other scripts, newlines and spaces."""
    from m3jax.tokenizer import _GGUF_PRE_SPLIT, load_gguf_tokenizer

    expect = _tokenizer_reference()["files"][f"{pre}.gguf"]
    info = expect["tokenizer"]
    assert _GGUF_PRE_SPLIT[pre] == info["pattern"]
    tok = load_gguf_tokenizer(os.path.join(TOKENIZER_FIXTURES, f"{pre}.gguf"))
    assert (type(tok.tk.normalizer).__name__ if tok.tk.normalizer is not None else None) == info["normalizer"]
    assert tok.tk.model.ignore_merges == info["ignore_merges"]
    pieces = 0
    for c in expect["cases"]:
        if "pretokens" in c:
            text = tok.tk.normalizer.normalize_str(c["text"]) if tok.tk.normalizer is not None else c["text"]
            assert [p for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str(text)] == c["pretokens"], c["text"]
            pieces += len(c["pretokens"])
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        assert tok.decode(c["ids"]) == c["decoded"]
    print(f"{pre}.gguf: {len(expect['cases'])} texts tokenized as {expect['reference']} "
          f"({pieces} pre-tokens of the tricky texts equal)")
    unreachable = tok.encode(" unreachable")
    assert (len(unreachable) == 1) == info["ignore_merges"]  # a vocab piece no merge makes


def test_gguf_llama2_style_model_imports_with_its_sentencepiece_tokenizer(tmp_path):
    """A llama GGUF with a SentencePiece vocab (Llama 2 / Mistral / TinyLlama files) imports with its
    tokenizer: document start <s>, the reference prefix "<s> Reference:", a Llama 2 chat template."""
    import gguf

    from m3jax.tokenizer import gguf_field, open_gguf

    src = os.path.join(FIXTURES, "llama")
    with open(os.path.join(src, "config.json")) as f:
        cfg = dict(json.load(f), rope_theta=1e5)
    spm = open_gguf(os.path.join(TOKENIZER_FIXTURES, "spm.gguf"))
    tokens = gguf_field(spm, "tokenizer.ggml.tokens")
    cfg["vocab_size"] = len(tokens)
    W = _hf_tensors(src)
    rng = np.random.default_rng(0)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        W[k] = rng.normal(size=(len(tokens), cfg["hidden_size"])).astype(np.float32)
    llama2 = ("{% for m in messages %}{% if m['role'] == 'user' %}"
              "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
              "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")

    def spm_kv(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(gguf_field(spm, "tokenizer.ggml.scores"))
        w.add_token_types(gguf_field(spm, "tokenizer.ggml.token_type"))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    write_tiny_gguf(str(tmp_path / "l2.gguf"), cfg, W, tokenizer_kv=spm_kv, chat_template=llama2)
    assert cli.main(["convert", "--from", "gguf", str(tmp_path / "l2.gguf"), "--out", str(tmp_path / "ck")]) == 0
    config, params, tok = convert.load_model(str(tmp_path / "ck"))
    first = _tokenizer_reference()["files"]["spm.gguf"]["cases"][0]
    assert tok.encode(first["text"]) == first["ids"] and config.vocab_size == len(tokens)
    assert config.bos_id == 1 and config.reference_prefix == (1, *tok.encode("Reference:"))
    assert tok.token_text(tok.encode("Reference:")[0]).startswith("\u2581")  # the dummy space prefix
    ids = tok.encode_chat([{"role": "user", "content": "Who wrote Hamlet?"}])
    assert ids == tok.encode("[INST] Who wrote Hamlet? [/INST]")  # <s> is the model's BOS, added by Generator
    assert tok.decode(ids) == "[INST] Who wrote Hamlet? [/INST]"


# ============================================================================ Llama 3.1 RoPE from GGUF factors
def test_llama31_rope_parameters_recovered_from_gguf_factors():
    """llama.cpp's rope_freqs of a real Llama 3.1 geometry (head_dim 128, theta 5e5, factor 8,
    low 1, high 4, original 8192) give back exactly those parameters; factors that are not
    llama3 scaling keep the export refused with a one-line message."""
    from m3jax.config import ModelConfig
    from m3jax.model.layers import rope_inv_freq

    rope = {"rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    base = ModelConfig(name="l31", vocab_size=64, num_heads=2, num_kv_heads=1, head_dim=128, hidden=64,
                       rope_theta=5e5, reference_prefix=None)
    factors = tuple(float(x) for x in _llama_cpp_rope_freqs(rope, 128))
    got = convert.llama3_rope_from_factors(dataclasses.replace(base, rope_freq_factors=factors))
    assert (got.rope_type, got.rope_factor, got.rope_low_freq_factor, got.rope_high_freq_factor,
            got.rope_original_max_len, got.rope_freq_factors) == ("llama3", 8.0, 1.0, 4.0, 8192, None)
    # Llama 3.2's factor 32 too, and a band holding a single frequency (head_dim 16)
    for rope2, H in ((dict(rope, factor=32.0), 128), (dict(rope, original_max_position_embeddings=64), 16)):
        c = dataclasses.replace(base, head_dim=H, rope_freq_factors=tuple(map(float, _llama_cpp_rope_freqs(rope2, H))))
        out = convert.llama3_rope_from_factors(c)
        np.testing.assert_allclose(rope_inv_freq(out), rope_inv_freq(c), rtol=1e-6)
    bad = dataclasses.replace(base, rope_freq_factors=tuple(1.0 + (i % 3) for i in range(64)))
    with pytest.raises(convert.ConvertError) as e:
        convert.config_to_hf(bad)
    assert "are not Llama 3.1 scaling" in str(e.value) and "'l31'" in str(e.value) and "\n" not in str(e.value)


# ============================================================================ RAG inside a chat
class _FixedReferences:
    """A MemorySource for RAG that returns the same references for every query, and records them."""

    def __init__(self, k: int, refs: list[list[int]]):
        self.k, self.refs, self.queries = k, refs, []

    def search(self, queries):
        self.queries.extend(list(q) for q in queries)
        return np.tile(np.arange(self.k), (len(queries), 1))

    def reference_tokens(self, ids):
        return [[self.refs[int(i)] for i in row if i >= 0] for row in np.asarray(ids)]

    def retrieve(self, queries):  # memory mode is not asked of it
        raise AssertionError("RAG only")


def test_rag_references_go_inside_the_conversation():
    """In `rag` mode a conversation gets its references in the last user turn, before the question
    (after the system turn), and retrieves with that question; a text prompt still gets them
    prepended. The serving engine builds the same prompt (`rag_query` / `rag_prompt`)."""
    from test_kb_updates import _text, tiny_model

    from m3jax.config import DecodeConfig
    from m3jax.decode import ChatPrompt, Generator, rag_prompt, rag_query

    rng = np.random.default_rng(0)
    docs = [(i, _text(rng, 12), f"T{i}") for i in range(4)]
    tok, cfg, params = tiny_model(docs, 0)
    refs = [tok.encode(docs[0][1]), tok.encode(docs[1][1])][: cfg.memories_per_chunk]
    source = _FixedReferences(cfg.memories_per_chunk, refs)
    gen = Generator(params, cfg, tok, source, DecodeConfig(max_new_tokens=4, max_cache_len=256,
                                                           prompt_bucket=cfg.chunk_size))
    question = docs[2][1][:40] + " ?"
    conv = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    want = [cfg.bos_id] + tok.encode_chat(conv, references=[tok.decode(r) for r in refs])
    text = tok.decode(want[1:])
    body = "".join(f"Reference: {tok.decode(r).strip()}\n\n" for r in refs) + question
    assert text == f"<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n" \
                   "<|im_start|>assistant\n", text
    a = gen.generate([conv], mode="rag", ignore_eos=True)
    assert source.queries == [tok.encode(question)[: cfg.chunk_size]]  # the question, not the system turn
    b = gen.generate([want], mode="none", ignore_eos=True)
    assert a.tokens == b.tokens and a.stats.prompt_tokens == len(want) == b.stats.prompt_tokens
    assert [list(x) for x in a.retrieved[0]] == [list(range(cfg.memories_per_chunk))]
    # the engine's helpers give the same; a text prompt keeps references prepended after BOS
    chat = ChatPrompt([cfg.bos_id] + tok.encode_chat(conv), conv)
    assert rag_query(chat, tok, cfg.chunk_size) == source.queries[0] and rag_prompt(chat, refs, tok, cfg.bos_id) == want
    plain = [cfg.bos_id] + tok.encode(question)
    assert rag_prompt(plain, refs, tok, cfg.bos_id) == [cfg.bos_id] + refs[0] + refs[1] + plain[1:]
    with pytest.raises(ValueError, match="needs a user turn"):
        gen.generate([[{"role": "system", "content": "x"}]], mode="rag")
