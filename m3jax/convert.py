"""Import and export of external checkpoints: Hugging Face Llama safetensors and GGUF (llama.cpp).

    load_hf(dir)      -> (ModelConfig, params)             config.json + *.safetensors (sharded or not)
                                                           of Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3
    save_hf(config, params, dir[, tokenizer])              the transformers-5 layout back, bit-exact round trip
    load_gguf(file)   -> (ModelConfig, params, Tokenizer)  llama / qwen2 / qwen3 GGUF, any quantization
    save_checkpoint_dir / load_checkpoint_dir              the m3jax checkpoint directory
    save_adapter / load_adapter / save_adapter_dir         a LoRA adapter over named base weights
    convert_checkpoint(source, path, out, target=)         `m3jax convert --from hf|gguf|m3jax PATH [--to hf] --out DIR`
    load_model(name_or_dir) -> (config, params, Tokenizer) the one loader (`m3jax.load_model`)

Families are switches of the one ModelConfig (`qkv_bias` for Qwen2, `qk_norm` for Qwen3,
`rope_type="llama3"` with its factors), read from either config generation: transformers 5's
`rope_parameters` or the older top-level `rope_theta` + `rope_scaling`.

Weight layouts. HF linear weights are (out, in); m3jax keeps (in, ...out) with the heads split out:
`wq [L, D, N, H]` is `q_proj.weight.T` reshaped, query head n = kv_head * G + g (HF repeat_kv).
Both use the "rotate_half" RoPE. GGUF stores q/k rows permuted for interleaved RoPE; `load_gguf`
undoes that, after which a GGUF tensor is laid out exactly like its HF counterpart.

Imported models have no Memory3 training: with `reference_prefix=None` (the default of `load_hf`)
the m3jax model is exactly the source Llama. A prefix turns the attention sink and the memory
position window on, which changes the outputs (positions shift by r + reference_len and every
layer attends to the prefix).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import uuid
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ModelConfig
from m3jax.model.transformer import check_params, stack_sizes
from m3jax.tokenizer import Tokenizer, gguf_field, open_gguf

Params = dict[str, Any]
AUTO = "auto"
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# model_type -> architecture of the families m3jax imports (one decoder, switches in ModelConfig)
_HF_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
_HF_MODEL_TYPES = tuple(_HF_FAMILIES)
_HF_ARCHITECTURES = tuple(_HF_FAMILIES.values())
_ROPE_TYPES = ("default", "llama3")
# Memory geometry that save_hf records under "m3jax" in config.json and load_hf reads back.
_M3_FIELDS = ("memory_layers", "tokens_per_memory", "memories_per_chunk", "chunk_size", "reference_len",
              "reference_prefix", "score", "group_reduce", "dtype", "name")
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old HF buffers


class ConvertError(ValueError):
    """A checkpoint cannot be converted; the message names the field or tensor at fault."""


# ============================================================================ HF tensor names
def _hf_layer_names(i: int, config: ModelConfig) -> dict[str, str]:
    """m3jax per-layer parameter name -> HF tensor name of layer i (biases and q/k norms when the
    config's family has them)."""
    p = f"model.layers.{i}."
    names = {"wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
             "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
             "w_gate": p + "mlp.gate_proj.weight", "w_up": p + "mlp.up_proj.weight",
             "w_down": p + "mlp.down_proj.weight", "attn_norm": p + "input_layernorm.weight",
             "mlp_norm": p + "post_attention_layernorm.weight"}
    if config.qkv_bias:
        names.update(bq=p + "self_attn.q_proj.bias", bk=p + "self_attn.k_proj.bias", bv=p + "self_attn.v_proj.bias")
    if config.qk_norm:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    return names


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF layout of `config`, with its (out, in) shape."""
    D, N, K, H, F, V = (config.hidden, config.num_heads, config.num_kv_heads, config.head_dim,
                        config.mlp_dim, config.vocab_size)
    per_layer = {"wq": (N * H, D), "wk": (K * H, D), "wv": (K * H, D), "wo": (D, N * H),
                 "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F), "attn_norm": (D,), "mlp_norm": (D,),
                 "bq": (N * H,), "bk": (K * H,), "bv": (K * H,), "q_norm": (H,), "k_norm": (H,)}
    out = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.num_layers):
        for k, name in _hf_layer_names(i, config).items():
            out[name] = per_layer[k]
    out["model.norm.weight"] = (D,)
    if not config.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def _hf_to_m3(key: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """One layer tensor from HF (out, in) to the m3jax per-layer layout (transposes only)."""
    D, N, K, H = c.hidden, c.num_heads, c.num_kv_heads, c.head_dim
    if key == "wq":
        return w.T.reshape(D, N, H)
    if key in ("wk", "wv"):
        return w.T.reshape(D, K, H)
    if key == "wo":
        return w.T.reshape(N, H, D)
    if key in ("w_gate", "w_up", "w_down"):
        return w.T
    if key in ("bq", "bk", "bv"):
        return w.reshape(-1, H)
    return w  # norms


def _m3_to_hf(key: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    D = c.hidden
    if key in ("wq", "wk", "wv"):
        return np.ascontiguousarray(w.reshape(D, -1).T)
    if key == "wo":
        return np.ascontiguousarray(w.reshape(-1, D).T)
    if key in ("w_gate", "w_up", "w_down"):
        return np.ascontiguousarray(w.T)
    if key in ("bq", "bk", "bv"):
        return np.ascontiguousarray(w.reshape(-1))
    return np.ascontiguousarray(w)


_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _check_tensors(tensors: dict[str, np.ndarray], config: ModelConfig, where: str) -> None:
    # Sizes from metadata are checked against what the files hold before anything is sized by
    # them: a config claiming 1e9 layers must not build a table of 1e9 layers' tensor names.
    layers = {m.group(1) for m in map(_HF_LAYER.match, tensors) if m}
    if config.num_layers > len(layers):
        raise ConvertError(f"{where}: the config says {config.num_layers} layers but the checkpoint holds "
                           f"tensors of {len(layers)} layers")
    want = hf_tensor_shapes(config)
    missing = [k for k in want if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in want)
    bad = [f"{k} has shape {tuple(tensors[k].shape)}, expected {want[k]}"
           for k in want if k in tensors and tuple(tensors[k].shape) != want[k]]
    not_float = [f"{k} has dtype {tensors[k].dtype}" for k in want
                 if k in tensors and np.dtype(tensors[k].dtype).name not in _FLOAT_DTYPES]
    if missing or unexpected or bad or not_float:
        msg = [f"{where}: the tensors do not match the {hf_family(config)} layout of config {config.name!r}:"]
        if missing:
            msg.append(f"missing tensors {_short(missing)};")
        if unexpected:
            msg.append(f"unexpected tensors {_short(unexpected)};")
        if bad:
            msg.append("; ".join(bad[:8]) + ";")
        if not_float:
            msg.append("non-float tensors: " + "; ".join(not_float[:8]))
        raise ConvertError(" ".join(msg))


def _short(names: Sequence[str], n: int = 12) -> str:
    names = list(names)
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def params_from_hf_tensors(tensors: dict[str, np.ndarray], config: ModelConfig, *,
                           where: str = "checkpoint") -> Params:
    """The m3jax params pytree (in `config.param_dtype`) from HF-named (out, in) tensors."""
    _check_tensors(tensors, config, where)
    dt = jnp.dtype(config.param_dtype)
    params: Params = {"embed": jnp.asarray(tensors["model.embed_tokens.weight"], dt)}
    start = 0
    for stack, L in stack_sizes(config).items():
        layers = [_hf_layer_names(i, config) for i in range(start, start + L)]
        params[stack] = {k: jnp.asarray(np.stack([_hf_to_m3(k, tensors[n[k]], config) for n in layers]), dt)
                         for k in layers[0]}
        start += L
    params["final_norm"] = jnp.asarray(tensors["model.norm.weight"], dt)
    if not config.tie_embeddings:
        params["lm_head"] = jnp.asarray(np.ascontiguousarray(tensors["lm_head.weight"].T), dt)
    check_params(params, config)
    return params


def hf_tensors_from_params(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named (out, in) NumPy tensors (dtype of the params) from the m3jax params pytree."""
    check_params(params, config)
    out = {"model.embed_tokens.weight": np.ascontiguousarray(np.asarray(params["embed"]))}
    start = 0
    for stack, L in stack_sizes(config).items():
        host = {k: np.asarray(v) for k, v in params[stack].items()}
        for j in range(L):
            for k, name in _hf_layer_names(start + j, config).items():
                out[name] = _m3_to_hf(k, host[k][j], config)
        start += L
    out["model.norm.weight"] = np.ascontiguousarray(np.asarray(params["final_norm"]))
    if not config.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out


# ============================================================================ typed fields
# Metadata read from a checkpoint (HF config.json, GGUF header) is checked for its type before use:
# a string, a float or a bool where an integer belongs is refused naming the file and the field.
def _int_field(v: Any, key: str, where: str, *, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConvertError(f"{where}: {key} must be an integer, got {v!r}")
    if int(v) < low:
        raise ConvertError(f"{where}: {key}={int(v)} must be >= {low}")
    return int(v)


def _float_field(v: Any, key: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not np.isfinite(float(v)) or float(v) <= 0:
        raise ConvertError(f"{where}: {key} must be a positive number, got {v!r}")
    return float(v)


def _bool_field(v: Any, key: str, where: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ConvertError(f"{where}: {key} must be true or false, got {v!r}")
    return bool(v)


def _opt(d: Any, key: str, where: str, kind: Callable[..., Any], default: Any, **kw: Any) -> Any:
    """d[key] checked by `kind` (_int_field, ...), or `default` when absent or null."""
    v = d.get(key)
    return default if v is None else kind(v, key, where, **kw)


def _ids_field(v: Any, key: str, where: str) -> tuple[int, ...]:
    """Special token ids: an int, a list of ints (transformers' eos_token_id of Llama 3 Instruct:
    [128001, 128008, 128009]) or null (none)."""
    items = v if isinstance(v, (list, tuple)) else [] if v is None else [v]
    return tuple(dict.fromkeys(_int_field(t, key, where, low=0) for t in items))


def _first_id(v: Any, key: str, where: str) -> int | None:
    """A special token id: an int, a list of ints (the first one counts) or null."""
    ids = _ids_field(v, key, where)
    return ids[0] if ids else None


# ============================================================================ HF config


def _resolve_memory(config_kw: dict[str, Any], num_layers: int, memory_layers: int | None,
                    reference_prefix: Any, stored: dict[str, Any]) -> None:
    if memory_layers is None:
        memory_layers = stored.get("memory_layers", num_layers // 2)
    config_kw["memory_layers"] = memory_layers
    if reference_prefix == AUTO:
        reference_prefix = stored.get("reference_prefix")
    config_kw["reference_prefix"] = None if reference_prefix is None else tuple(int(t) for t in reference_prefix)
    for k in ("tokens_per_memory", "memories_per_chunk", "chunk_size", "reference_len", "score", "group_reduce"):
        if k in stored:
            config_kw[k] = stored[k]


def rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig RoPE fields of a HF config of either generation: transformers 5 keeps
    `rope_parameters: {rope_theta, rope_type, ...}`, earlier ones a top-level `rope_theta` and
    `rope_scaling: {rope_type | type, ...}`. Types other than default and llama3 are refused."""
    rp = hf.get("rope_parameters")
    if rp is None:
        rp = hf.get("rope_scaling") or {}
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    if not isinstance(rp, dict):
        raise ConvertError(f"{where}: {key} must be an object, got {rp!r}")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConvertError(f"{where}: {key} holds per-layer-type RoPE parameters {sorted(rp)}, which are not "
                           "supported (one RoPE for every layer only)")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConvertError(f"{where}: {key} rope_type={kind!r} is not supported (m3jax runs {list(_ROPE_TYPES)} RoPE)")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConvertError(f"{where}: partial_rotary_factor={partial!r} is not supported (RoPE on the whole head)")
    theta = rp.get("rope_theta", hf.get("rope_theta"))
    label = f"{key}.rope_theta" if "rope_theta" in rp else "rope_theta"
    out: dict[str, Any] = {"rope_theta": 1e4 if theta is None else _float_field(theta, label, where),
                           "rope_type": kind}
    if kind == "llama3":
        def need(k: str, kind: Callable[..., Any]) -> Any:
            if rp.get(k) is None:
                raise ConvertError(f"{where}: {key}.{k} is missing (required by rope_type 'llama3')")
            return kind(rp[k], f"{key}.{k}", where)

        out.update(rope_factor=need("factor", _float_field), rope_low_freq_factor=need("low_freq_factor", _float_field),
                   rope_high_freq_factor=need("high_freq_factor", _float_field),
                   rope_original_max_len=need("original_max_position_embeddings", _int_field))
    return out


def hf_family(config: ModelConfig) -> str:
    """The HF model_type whose layout `config` has: qwen3 (q/k norms), qwen2 (q/k/v biases) or
    llama. A config with both switches has no HF family (ConvertError)."""
    if config.qk_norm and config.qkv_bias:
        raise ConvertError(f"config {config.name!r}: q/k norms with q/k/v biases match no HF family")
    return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"


def config_from_hf(hf: dict[str, Any], *, memory_layers: int | None = None, reference_prefix: Any = AUTO,
                   dtype: str | None = None, param_dtype: str = "float32", name: str | None = None,
                   max_len: int | None = None, default_name: str = "hf-llama",
                   where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a HF Llama `config.json` dict; raises ConvertError for what m3jax cannot run.

    reference_prefix: "auto" = the one that `save_hf` recorded under "m3jax" (None = plain Llama when
    there is none), None = plain Llama, or a sequence of ids. memory_layers: None = recorded or
    first half.
    """
    if not isinstance(hf, dict):
        raise ConvertError(f"{where}: a JSON {type(hf).__name__}, not a config object")

    def need(key: str, low: int = 1) -> int:
        if hf.get(key) is None:
            raise ConvertError(f"{where}: required field {key!r} is missing")
        return _int_field(hf[key], key, where, low=low)

    mt = hf.get("model_type")
    if mt not in _HF_MODEL_TYPES:
        raise ConvertError(f"{where}: model_type={mt!r} is not supported; m3jax imports {_HF_MODEL_TYPES}")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise ConvertError(f"{where}: architectures must be a list, got {archs!r}")
    bad_arch = [a for a in archs if a not in _HF_ARCHITECTURES]
    if bad_arch:
        raise ConvertError(f"{where}: architectures {bad_arch} are not supported; m3jax imports "
                           f"{_HF_ARCHITECTURES}")
    for key in ("mlp_bias",) + (("attention_bias",) if mt != "qwen2" else ()):
        # Llama's and Qwen3's attention_bias adds an o_proj bias too, which m3jax does not have
        if hf.get(key):
            raise ConvertError(f"{where}: {key}=true is not supported for model_type={mt!r} (bias-free "
                               "projections; only Qwen2's q/k/v biases are)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"{where}: hidden_act={act!r} is not supported (gated SiLU MLP only)")
    n_pos = _opt(hf, "max_position_embeddings", where, _int_field, 2048)
    sw = _opt(hf, "sliding_window", where, _int_field, None)
    if sw is not None and _opt(hf, "use_sliding_window", where, _bool_field, True) and sw < n_pos:
        raise ConvertError(f"{where}: sliding_window={sw} < max_position_embeddings={n_pos} is not "
                           "supported (full causal attention only)")
    layer_types = hf.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise ConvertError(f"{where}: layer_types={layer_types!r} is not supported (full causal attention "
                           "in every layer only)")
    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    kv = _opt(hf, "num_key_value_heads", where, _int_field, heads)
    head_dim = _opt(hf, "head_dim", where, _int_field, None)
    if head_dim is None:
        if hidden % heads:
            raise ConvertError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                               "and head_dim is not given")
        head_dim = hidden // heads
    vocab = need("vocab_size")
    ends = _ids_field(hf.get("eos_token_id"), "eos_token_id", where)  # the first ends documents
    eos = ends[0] if ends else None
    bos = _first_id(hf.get("bos_token_id"), "bos_token_id", where)
    pad = _first_id(hf.get("pad_token_id"), "pad_token_id", where)
    defaults = ModelConfig()
    stored = hf.get("m3jax") or {}
    if not isinstance(stored, dict):
        raise ConvertError(f"{where}: the 'm3jax' entry must be an object, got {stored!r}")
    kw: dict[str, Any] = dict(
        name=str(name or stored.get("name") or os.path.basename(str(hf.get("_name_or_path") or "").rstrip("/"))
                 or default_name),
        vocab_size=vocab, num_layers=need("num_hidden_layers"), num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, hidden=hidden, mlp_dim=need("intermediate_size"),
        **rope_from_hf(hf, where), qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        norm_eps=_opt(hf, "rms_norm_eps", where, _float_field, 1e-6),
        tie_embeddings=_opt(hf, "tie_word_embeddings", where, _bool_field, False), max_len=max_len or n_pos,
        bos_id=bos if bos is not None else defaults.bos_id,
        eos_id=eos if eos is not None else defaults.eos_id, stop_ids=ends[1:],
        pad_id=pad if pad is not None else (eos if eos is not None else defaults.pad_id),
        dtype=dtype or stored.get("dtype", "float32"), param_dtype=param_dtype)
    return _make_config(kw, memory_layers, reference_prefix, stored, where)


def _make_config(kw: dict[str, Any], memory_layers: int | None, reference_prefix: Any, stored: dict[str, Any],
                 where: str) -> ModelConfig:
    """ModelConfig(**kw) with the memory geometry resolved; bad values raise ConvertError."""
    try:
        _resolve_memory(kw, kw["num_layers"], memory_layers, reference_prefix, stored)
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where}: {e}") from None


def _nice(x: float) -> float:
    return float(f"{x:.6g}")


def llama3_rope_from_factors(config: ModelConfig) -> ModelConfig:
    """`config` with llama.cpp's per-frequency RoPE divisors (`rope_freq_factors`, from a GGUF's
    rope_freqs.weight) expressed as transformers' `rope_type="llama3"` parameters, checked by
    recomputation: the rotary frequencies of the result equal those of `config` (relative 1e-6).

    llama.cpp writes 1 for wavelengths below original_max_len / high_freq_factor, `factor` above
    original_max_len / low_freq_factor and 1 / ((1 - s) / factor + s) between, s = (original_max_len
    / wavelength - low) / (high - low). The factors fix `factor` and the two wavelength bounds, not
    original_max_len and the two frequency factors apart (scaling all three changes nothing), so
    low_freq_factor = 1 is taken, as in every Llama 3.x release: with two or more frequencies in
    the band that recovers their own parameters (Llama 3.1: 8, 1, 4, 8192). With fewer, bounds
    between the neighbouring wavelengths are chosen: other numbers, the same rotary. Raises
    ConvertError when no llama3 parameters give the factors."""
    from m3jax.model.layers import rope_inv_freq

    def fail(why: str) -> ConvertError:
        return ConvertError(f"config {config.name!r}: its per-frequency RoPE factors (a GGUF rope_freqs tensor) "
                            f"are not Llama 3.1 scaling ({why}), and transformers has no field for others")

    if config.rope_type != "default":
        raise fail(f"they apply on top of rope_type {config.rope_type!r}")
    H = config.head_dim
    f = np.asarray(config.rope_freq_factors, np.float64)
    wl = 2 * np.pi * config.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H)
    F = float(f.max())
    one, top = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, F, rtol=1e-6)
    if one.all():
        return dataclasses.replace(config, rope_freq_factors=None)
    if not top.any() or F < 1 or (one & top).any():
        raise fail("no plateau at the largest factor")
    mid = ~one & ~top
    s = (1 / f[mid] - 1 / F) / (1 - 1 / F)  # 1: kept, 0: slowed by F
    if mid.sum() >= 2:
        # low_freq_factor 1: s = (old / wl - 1) / (high - 1), so old / wl - (high - 1) s = 1
        fit = np.linalg.lstsq(np.stack([1 / wl[mid], -s], 1), np.ones(int(mid.sum())), rcond=None)[0]
        old = int(round(fit[0]))
        high = 1 + float(np.mean((old / wl[mid] - 1) / s))
    else:
        low_b = float(wl[~top].max()) if (~top).any() else 0.0
        # old (= old / low) lies at or above every non-plateau wavelength, below the plateau's
        up_b = float(wl[top].min())
        old = int(np.clip(round(np.sqrt(max(low_b, 1.0) * up_b)), np.floor(low_b) + 1, np.ceil(up_b) - 1))
        if mid.any():
            high = 1 + (old / wl[mid][0] - 1) / s[0]
        else:  # old / high lies above every kept wavelength and below old
            t_low = float(wl[one].max()) if one.any() else old / 2
            high = old / np.sqrt(t_low * old)
    want = rope_inv_freq(config)
    for factor, hi in ((_nice(F), _nice(float(high))), (F, float(high))):  # the shortest numbers that fit
        try:
            out = dataclasses.replace(config, rope_type="llama3", rope_factor=factor, rope_low_freq_factor=1.0,
                                      rope_high_freq_factor=hi, rope_original_max_len=old, rope_freq_factors=None)
        except ValueError:
            continue
        if np.allclose(rope_inv_freq(out), want, rtol=1e-6, atol=0):
            return out
    raise fail("no llama3 parameters recompute them")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The transformers-5 config.json dict of `config` (Llama, Qwen2 or Qwen3 by `hf_family`;
    RoPE under "rope_parameters"; memory geometry kept under "m3jax")."""
    c = config if config.rope_freq_factors is None else llama3_rope_from_factors(config)
    family = hf_family(c)
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": c.rope_type}
    if c.rope_type == "llama3":
        rope.update(factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=c.rope_original_max_len)
    out = {
        "architectures": [_HF_FAMILIES[family]], "model_type": family,
        "hidden_size": c.hidden, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.max_len, "rms_norm_eps": c.norm_eps,
        "rope_parameters": rope, "attention_dropout": 0.0, "initializer_range": 0.02, "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id,
        "eos_token_id": list(c.end_ids) if c.stop_ids else c.eos_id,
        "pad_token_id": c.pad_id, "dtype": c.param_dtype, "use_cache": True,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * c.num_layers)
        if family == "qwen3":
            out["attention_bias"] = False
    out["m3jax"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((f, getattr(c, f)) for f in _M3_FIELDS)}
    return out


# ============================================================================ HF files
def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        idx = _read_json(index)
        weight_map = (idx.get("weight_map") if isinstance(idx, dict) else None) or {}
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{index}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        outside = [fn for fn in files if os.path.basename(fn) != fn or fn in ("", ".", "..")]
        if outside:
            raise ConvertError(f"{index} names files outside {path}: {outside[:3]}")
        missing = [fn for fn in files if not os.path.exists(os.path.join(path, fn))]
        if missing:
            raise ConvertError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(path, fn) for fn in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConvertError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    return files


def read_safetensors(files: Iterable[str]) -> dict[str, np.ndarray]:
    """All tensors of the given safetensors files as NumPy arrays (bf16 as ml_dtypes.bfloat16)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for fn in files:
        try:
            with safe_open(fn, framework="numpy") as f:
                for k in f.keys():
                    if k in out:
                        raise ConvertError(f"tensor {k!r} appears in more than one file (again in {fn})")
                    out[k] = f.get_tensor(k)
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types on damaged files
            raise ConvertError(f"{fn}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    return out


def _read_json(path: str) -> Any:
    """The JSON value of a checkpoint file; unreadable ones raise ConvertError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _with_generation_eos(hf: Any, path: str) -> Any:
    """config.json's dict with the end-of-sequence ids of generation_config.json added after its
    own (transformers' `generate` stops on those; Llama 3 Instruct lists <|eot_id|> there)."""
    gen_path = os.path.join(path, "generation_config.json")
    if not isinstance(hf, dict) or not os.path.isfile(gen_path):
        return hf
    gen = _read_json(gen_path)
    if not isinstance(gen, dict):
        raise ConvertError(f"{gen_path}: a JSON {type(gen).__name__}, not an object")
    more = _ids_field(gen.get("eos_token_id"), "eos_token_id", gen_path)
    vocab = hf.get("vocab_size")
    bad = [t for t in more if isinstance(vocab, int) and t >= vocab]
    if bad:
        raise ConvertError(f"{gen_path}: eos_token_id {bad} outside the vocab of {vocab}")
    own = _ids_field(hf.get("eos_token_id"), "eos_token_id", os.path.join(path, "config.json"))
    ids = list(dict.fromkeys(own + more))
    return dict(hf, eos_token_id=ids) if len(ids) > len(own) else hf


def load_hf(path: str, *, memory_layers: int | None = None, reference_prefix: Any = AUTO,
            dtype: str | None = None, param_dtype: str | None = None, name: str | None = None,
            max_len: int | None = None) -> tuple[ModelConfig, Params]:
    """Import a HF Llama checkpoint directory (config.json + *.safetensors, sharded or not).

    memory_layers: layers 0..memory_layers-1 become the memory stack (default: first half).
    reference_prefix: None = plain Llama (the model computes exactly what the source does), a
    sequence of ids (BOS + "Reference:"), or "auto" (default): what `save_hf` recorded, else None.
    dtype: activations (default float32). param_dtype: default the checkpoint's own float dtype when
    all its tensors share one (bf16 stays bf16: the round trip is bit-exact), else float32.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConvertError(f"{path}: no config.json (expected a HF model directory)")
    hf = _with_generation_eos(_read_json(cfg_path), path)
    files = _safetensors_files(path)
    tensors = read_safetensors(files)
    for k in [k for k in tensors if _IGNORED_HF.fullmatch(k)]:
        del tensors[k]
    if param_dtype is None:
        kinds = {np.dtype(t.dtype).name for t in tensors.values()}
        param_dtype = kinds.pop() if len(kinds) == 1 and kinds <= set(_FLOAT_DTYPES) else "float32"
    config = config_from_hf(hf, memory_layers=memory_layers, reference_prefix=reference_prefix, dtype=dtype,
                            param_dtype=param_dtype, name=name,
                            default_name=os.path.basename(os.path.normpath(path)) or "hf-llama",
                            max_len=max_len, where=cfg_path)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        emb = tensors.get("model.embed_tokens.weight")
        head = tensors["lm_head.weight"]
        if emb is None or emb.shape != head.shape or not np.array_equal(emb, head):
            raise ConvertError(f"{path}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but "
                               "config.json says tie_word_embeddings=true")
        del tensors["lm_head.weight"]  # a tied checkpoint that stores its head twice
    return config, params_from_hf_tensors(tensors, config, where=path)


def save_hf(config: ModelConfig, params: Params, path: str, tokenizer: Tokenizer | None = None) -> None:
    """Export in the transformers layout that transformers 5 loads (`AutoModelForCausalLM`):
    config.json (`config_to_hf`: Llama, Qwen2 or Qwen3) + model.safetensors (tensors in the
    params' dtype; `load_hf` reads them back bit-exact) and, with a tokenizer, tokenizer.json +
    tokenizer_config.json (special tokens, chat template)."""
    from safetensors.numpy import save_file

    tensors = hf_tensors_from_params(params, config)
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, where=path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config), f, indent=2)
    if tokenizer is not None:
        tokenizer.tk.save(os.path.join(path, "tokenizer.json"))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.token_text(config.bos_id),
              "eos_token": tokenizer.token_text(config.eos_id), "pad_token": tokenizer.token_text(config.pad_id),
              "add_bos_token": tokenizer.add_bos, "model_max_length": config.max_len}
        if tokenizer.chat_template:
            tc["chat_template"] = tokenizer.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2)


def _hf_chat_template(path: str) -> str | None:
    """The chat template of a HF directory: chat_template.jinja (as transformers 5 saves it), else
    tokenizer_config.json's `chat_template` (a string, or named templates: the "default" one)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tc = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(tc):
        return None
    t = _read_json(tc)
    t = t.get("chat_template") if isinstance(t, dict) else None
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def load_hf_tokenizer(path: str, config: ModelConfig) -> Tokenizer | None:
    """The `tokenizer.json` of a HF directory (special ids from the config, chat template from
    chat_template.jinja or tokenizer_config.json), or None if absent."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    from tokenizers import Tokenizer as HFTokenizer

    template = _hf_chat_template(path)
    try:
        hf_tok = HFTokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own type on bad files
        raise ConvertError(f"{file}: not a readable tokenizer.json ({' '.join(str(e).split())[:200]})") from None
    tok = Tokenizer(hf_tok, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id,
                    chat_template=template, stop_ids=config.stop_ids)
    check_tokenizer(tok, config, where=file)
    return tok


# ============================================================================ GGUF
def unpermute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved-RoPE order -> HF rotate_half order).
    w: (n_heads * head_dim, d_model)."""
    out_dim, d = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out_dim, d)


def permute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The permutation llama.cpp applies (inverse of `unpermute_gguf_qk`)."""
    out_dim, d = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, d).swapaxes(1, 2).reshape(out_dim, d)


_GGUF_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_BLK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# general.architecture -> the ModelConfig switches of that family. llama.cpp writes Mistral and
# Llama 1-3 (SmolLM included) as "llama", with q/k rows permuted for its interleaved RoPE; Qwen2
# and Qwen3 keep the HF row order (NEOX RoPE).
_GGUF_ARCHS = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_BLK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def gguf_architecture(reader: Any, where: str) -> str:
    """general.architecture of a GGUF, checked to be one m3jax imports (before anything else is
    read: another architecture keeps its sizes under other keys)."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ConvertError(f"{where}: general.architecture={arch!r} is not supported (m3jax imports "
                           f"{sorted(_GGUF_ARCHS)})")
    return arch


_REQUIRED = object()


def _gguf_int(reader: Any, key: str, where: str, default: Any = _REQUIRED, low: int = 1) -> Any:
    """An integer metadata value, or `default` when absent (required when none is given)."""
    v = gguf_field(reader, key)
    if v is None:
        if default is _REQUIRED:
            raise ConvertError(f"{where}: metadata {key!r} is missing")
        return default
    return _int_field(v, key, where, low=low)


def _gguf_rope_freqs(reader: Any, *, where: str) -> tuple[float, ...] | None:
    """The per-frequency RoPE divisors of tensor rope_freqs.weight (llama.cpp's form of Llama 3.1+
    scaling: frequency i is divided by factor i), or None when the file has none."""
    from gguf.quants import dequantize

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    try:
        f = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
    except Exception as e:  # noqa: BLE001 - damaged data fails in many ways
        raise ConvertError(f"{where}: tensor 'rope_freqs.weight' is damaged ({type(e).__name__})") from None
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ConvertError(f"{where}: tensor 'rope_freqs.weight' must hold positive finite factors")
    return tuple(float(x) for x in f)


def config_from_gguf(reader: Any, *, memory_layers: int | None = None, reference_prefix: Any = None,
                     dtype: str = "float32", param_dtype: str = "float32", name: str | None = None,
                     max_len: int | None = None, tied: bool = True, bos_id: int | None = None,
                     where: str = "gguf") -> ModelConfig:
    """The ModelConfig of a llama / qwen2 / qwen3 GGUF from its metadata alone (no tensor read).
    bos_id: the document start (default tokenizer.ggml.bos_token_id)."""
    arch = gguf_architecture(reader, where)

    def need(key: str) -> int:
        return _gguf_int(reader, f"{arch}.{key}", where)

    scaling = gguf_field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConvertError(f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported (plain RoPE only)")
    freq_factors = _gguf_rope_freqs(reader, where=where)
    if _gguf_int(reader, f"{arch}.expert_count", where, default=0, low=0):
        raise ConvertError(f"{where}: mixture-of-experts ({arch}.expert_count) is not supported")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv = _gguf_int(reader, f"{arch}.attention.head_count_kv", where, default=heads)
    head_dim = _gguf_int(reader, f"{arch}.attention.key_length", where, default=max(1, hidden // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        v = _gguf_int(reader, f"{arch}.{key}", where, default=head_dim)
        if v != head_dim:
            raise ConvertError(f"{where}: {arch}.{key}={v} differs from the head dim {head_dim} (partial RoPE "
                               "or unequal key/value dims are not supported)")
    sw = _gguf_int(reader, f"{arch}.attention.sliding_window", where, default=0, low=0)
    n_ctx = _gguf_int(reader, f"{arch}.context_length", where, default=2048)
    if sw and sw < n_ctx:
        raise ConvertError(f"{where}: {arch}.attention.sliding_window={sw} < context_length={n_ctx} is not "
                           "supported (full causal attention only)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else 0
    vocab = _gguf_int(reader, f"{arch}.vocab_size", where, default=n_tokens, low=0)
    if vocab <= 0:
        raise ConvertError(f"{where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocab size")
    eos = _gguf_int(reader, "tokenizer.ggml.eos_token_id", where, default=None, low=0)
    bos = bos_id if bos_id is not None else _gguf_int(reader, "tokenizer.ggml.bos_token_id", where, default=None, low=0)
    pad = _gguf_int(reader, "tokenizer.ggml.padding_token_id", where, default=eos, low=0)
    stops = [_gguf_int(reader, f"tokenizer.ggml.{k}_token_id", where, default=None, low=0) for k in ("eot", "eom")]
    stops = tuple(dict.fromkeys(t for t in stops if t is not None and t != eos))  # end of turn / message
    defaults = ModelConfig()
    if name is None:
        base, size = gguf_field(reader, "general.basename"), gguf_field(reader, "general.size_label")
        name = (f"{base}-{size}".lower() if base and size else gguf_field(reader, "general.name")) or f"gguf-{arch}"
    eps = gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise ConvertError(f"{where}: metadata '{arch}.attention.layer_norm_rms_epsilon' is missing")
    eps = _float_field(eps, f"{arch}.attention.layer_norm_rms_epsilon", where)
    freq = gguf_field(reader, f"{arch}.rope.freq_base")
    kw: dict[str, Any] = dict(
        name=str(name), vocab_size=vocab, num_layers=need("block_count"), num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, hidden=hidden, mlp_dim=need("feed_forward_length"),
        rope_theta=1e4 if freq is None else _float_field(freq, f"{arch}.rope.freq_base", where),
        # GGUF stores eps as float32 (1e-5 reads back 9.9999997e-06): keep its shortest decimal form.
        norm_eps=float(np.format_float_positional(np.float32(eps), unique=True)),
        tie_embeddings=tied, max_len=max_len or n_ctx,
        bos_id=bos if bos is not None else defaults.bos_id,
        eos_id=eos if eos is not None else defaults.eos_id, stop_ids=stops,
        pad_id=pad if pad is not None else defaults.pad_id, dtype=dtype, param_dtype=param_dtype,
        rope_freq_factors=freq_factors, **_GGUF_ARCHS[arch])
    return _make_config(kw, memory_layers, reference_prefix, {}, where)


def read_gguf_tensors(reader: Any, *, where: str = "gguf") -> dict[str, np.ndarray]:
    """Every tensor of a llama / qwen2 / qwen3 GGUF, dequantized to float32 (out, in), renamed to
    the HF layout, with llama's q/k permutation undone. Unknown tensors raise ConvertError."""
    from gguf.quants import dequantize

    arch = gguf_architecture(reader, where)
    heads = _gguf_int(reader, f"{arch}.attention.head_count", where)
    kv = _gguf_int(reader, f"{arch}.attention.head_count_kv", where, default=heads)
    unknown = [t.name for t in reader.tensors
               if _gguf_to_hf_name(t.name) is None and t.name != "rope_freqs.weight"]  # that one is config
    if unknown:  # before any tensor is dequantized
        raise ConvertError(f"{where}: unsupported GGUF tensors {_short(unknown)} (not a plain {arch})")
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:  # rope_freqs.weight: read into the config by config_from_gguf
            continue
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = tuple(int(s) for s in reversed(list(t.shape)))  # ggml [in, out] -> (out, in)
            w = w.reshape(shape)
            if arch == "llama" and t.name.endswith("attn_q.weight"):
                w = unpermute_gguf_qk(w, heads)
            elif arch == "llama" and t.name.endswith("attn_k.weight"):
                w = unpermute_gguf_qk(w, kv)
        except Exception as e:  # noqa: BLE001 - dequantize / reshape of damaged data fail in many ways
            raise ConvertError(f"{where}: tensor {t.name!r} is damaged or does not fit the header "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        out[hf_name] = w
    return out


def with_document_start(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with `bos_id` set to the model's document start (`Tokenizer.document_start_id`):
    the BOS of a base model, the pretraining separator of a chat model whose BOS is a turn marker."""
    start = tokenizer.document_start_id()
    if start == tokenizer.bos_id:
        return tokenizer
    return Tokenizer(tokenizer.tk, bos_id=start, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     chat_template=tokenizer.chat_template, add_bos=tokenizer.add_bos, stop_ids=tokenizer.stop_ids)


def load_gguf(path: str, *, memory_layers: int | None = None, reference_prefix: Any = AUTO,
              dtype: str = "float32", param_dtype: str = "float32", name: str | None = None,
              max_len: int | None = None) -> tuple[ModelConfig, Params, Tokenizer]:
    """Import a llama / qwen2 / qwen3 GGUF (any quantization the `gguf` package dequantizes) with
    its tokenizer.

    The document start (config and tokenizer `bos_id`) is `Tokenizer.document_start_id`: the
    GGUF's BOS, except for a chat model whose BOS is a chat-turn marker (SmolLM2-Instruct's
    `<|im_start|>`, id 1), which starts documents with its pretraining separator `<|endoftext|>`
    (id 0; Wikipedia perplexity 14.5 against 16.8 with id 1).
    reference_prefix: "auto" (default) = that start + the tokens of "Reference:" ((0, 23682, 42)
    for SmolLM2), None = plain model (exactly the source), or a sequence of ids.
    memory_layers: default first half. max_len: default {arch}.context_length.
    """
    reader = open_gguf(path)
    gguf_architecture(reader, path)  # first: another architecture's keys are not ours
    tok = with_document_start(Tokenizer.from_gguf(reader))
    if reference_prefix == AUTO:
        reference_prefix = tok.reference_prefix()
    # the config (checked) before any tensor is read; tensors are then checked against it
    config = config_from_gguf(reader, memory_layers=memory_layers, reference_prefix=reference_prefix,
                              dtype=dtype, param_dtype=param_dtype, name=name, max_len=max_len,
                              tied=not any(t.name == "output.weight" for t in reader.tensors),
                              bos_id=tok.bos_id, where=path)
    check_tokenizer(tok, config, where=path)
    tensors = read_gguf_tensors(reader, where=path)
    return config, params_from_hf_tensors(tensors, config, where=path), tok


def check_tokenizer(tokenizer: Tokenizer, config: ModelConfig, *, where: str) -> None:
    """A tokenizer belongs to the model: no token id past the model's vocabulary (a tokenizer
    left from another model would feed it ids it has no embedding for)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ConvertError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                           f"{config.name!r} only {config.vocab_size} embeddings: they are not of one model")
    bad = [(k, getattr(tokenizer, k)) for k in ("bos_id", "eos_id", "pad_id")
           if not 0 <= getattr(tokenizer, k) < config.vocab_size]
    bad += [("stop_ids", t) for t in tokenizer.stop_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise ConvertError(f"{where}: tokenizer special ids {bad} are outside the model's vocabulary of "
                           f"{config.vocab_size}")


# ============================================================================ m3jax checkpoint dir
_PARAMS_FILE, _CONFIG_FILE, _TOKENIZER_DIR = "params.safetensors", "config.json", "tokenizer"


def flatten_params(params: Params) -> dict[str, np.ndarray]:
    """{"embed": ..., "mem_blocks/wq": ...}: the pytree flattened to `stack/param` names."""
    out: dict[str, np.ndarray] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}/{k2}"] = np.ascontiguousarray(np.asarray(v2))
        else:
            out[k] = np.ascontiguousarray(np.asarray(v))
    return out


def unflatten_params(flat: dict[str, np.ndarray]) -> Params:
    params: Params = {}
    for k, v in flat.items():
        parts = k.split("/")
        if len(parts) > 2:
            raise ConvertError(f"parameter name {k!r} is nested deeper than stack/param")
        if len(parts) == 2:
            params.setdefault(parts[0], {})[parts[1]] = jnp.asarray(v)
        else:
            params[k] = jnp.asarray(v)
    return params


def _write_model_dir(directory: str, write: Callable[[str], None]) -> None:
    """Write a model directory atomically: `write(tmp)` fills a new directory beside it, which
    then replaces `directory` by two renames (the old one is removed after). A kill leaves the
    old model or the new one, never new params with an old tokenizer; between the two renames,
    the old model waits complete in DIR.old-*. Files of the old directory that are not model
    files (a README, provenance notes) are copied over. A non-empty directory holding no model is
    refused (nothing in it is touched)."""
    directory = os.path.abspath(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ConvertError(f"{directory} exists and is not a directory")
    existing = os.listdir(directory) if os.path.isdir(directory) else []
    if existing and not set(existing) & set(_MODEL_ENTRIES):
        raise ConvertError(f"{directory} is not empty and holds no m3jax model: write the model to a new or "
                           f"empty directory (nothing in it was changed)")
    for stale in glob.glob(glob.escape(directory) + ".tmp-*") + glob.glob(glob.escape(directory) + ".old-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save of this directory
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = f"{directory}.tmp-{tag}", f"{directory}.old-{tag}"
    try:
        os.makedirs(tmp)
        write(tmp)
        for name in existing:
            src, dst = os.path.join(directory, name), os.path.join(tmp, name)
            if name not in _MODEL_ENTRIES and not os.path.lexists(dst):
                (shutil.copytree if os.path.isdir(src) and not os.path.islink(src) else shutil.copy2)(src, dst)
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint_dir(directory: str, config: ModelConfig, params: Params,
                        tokenizer: Tokenizer | None = None) -> None:
    """Write an m3jax checkpoint: params.safetensors (`stack/param` names), config.json
    (ModelConfig.to_dict()) and, when given, the tokenizer under tokenizer/. Atomic
    (`_write_model_dir`): an overwritten model directory is never half old, half new."""
    from safetensors.numpy import save_file

    check_params(params, config)
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, where=directory)

    def write(tmp: str) -> None:
        save_file(flatten_params(params), os.path.join(tmp, _PARAMS_FILE), metadata={"format": "m3jax"})
        with open(os.path.join(tmp, _CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=1)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, _TOKENIZER_DIR))

    _write_model_dir(directory, write)


def is_checkpoint_dir(directory: str) -> bool:
    """Whether `directory` holds an m3jax checkpoint: config.json with params.safetensors, or with
    an adapter over base weights (adapter.safetensors + base.json)."""
    has = lambda f: os.path.isfile(os.path.join(directory, f))  # noqa: E731
    return has(_CONFIG_FILE) and (has(_PARAMS_FILE) or (has(_ADAPTER_FILE) and has(_BASE_FILE)))


def load_checkpoint_dir(directory: str, *, with_params: bool = True
                        ) -> tuple[ModelConfig, Params | None, Tokenizer | None]:
    """The model-directory format reader behind `load_model` (which is what to call: it also takes
    shipped names and training runs, and requires a tokenizer): (config, params, tokenizer or
    None) of a directory written by `save_checkpoint_dir` / `save_adapter_dir`; params None with
    `with_params=False` (the config and tokenizer only)."""
    cfg_path = os.path.join(directory, _CONFIG_FILE)
    if not os.path.exists(cfg_path):
        left = glob.glob(glob.escape(os.path.abspath(directory)) + ".old-*")
        hint = f"; a save was interrupted: the previous model is in {left[0]}" if left else ""
        raise ConvertError(f"{directory}: no {_CONFIG_FILE} (not an m3jax checkpoint directory){hint}")
    d = _read_json(cfg_path)
    try:
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        config = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: not a model config ({e})") from None
    params = None
    if with_params and not os.path.isfile(os.path.join(directory, _PARAMS_FILE)) and \
            os.path.isfile(os.path.join(directory, _ADAPTER_FILE)):
        params = _adapted_params(directory, config)
    elif with_params:
        params_path = os.path.join(directory, _PARAMS_FILE)
        params = unflatten_params(read_safetensors([params_path]))
        try:
            check_params(params, config)
        except ValueError as e:
            raise ConvertError(f"{params_path}: {e}") from None
    tok_dir = os.path.join(directory, _TOKENIZER_DIR)
    if os.path.isdir(tok_dir):
        tokenizer = Tokenizer.load(tok_dir)
    else:  # an adapter dir may take its base's tokenizer, with the config's special ids
        tokenizer = _base_tokenizer(directory, config)
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, where=directory)
    return config, params, tokenizer


def _base_tokenizer(directory: str, config: ModelConfig) -> Tokenizer | None:
    path = os.path.join(directory, _BASE_FILE)
    if not os.path.isfile(path):
        return None
    base = _read_json(path)
    if not isinstance(base, dict):
        raise ConvertError(f"{path}: a JSON {type(base).__name__}, not an object")
    if "gguf" in base:
        btok = Tokenizer.from_gguf(_gguf_path(base["gguf"], directory))
    elif "model" in base:
        btok = load_checkpoint_dir(os.path.join(directory, base["model"]), with_params=False)[2]
        if btok is None:
            return None
    else:
        return None
    return Tokenizer(btok.tk, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id,
                     chat_template=btok.chat_template, add_bos=btok.add_bos, stop_ids=config.stop_ids)


# ============================================================================ models by name
SHIPPED_MODELS = {"smollm2-135m-memory": "SmolLM2-135M-Instruct taught to read explicit memory (a LoRA "
                                         "adapter over the shipped GGUF; experiments/README.md)"}


def model_dir(name_or_dir: str) -> str:
    """The model directory of `name_or_dir`: a model directory itself (`is_checkpoint_dir`), a
    training run holding one in `model/` (`m3jax train --out`), or the name of a model shipped with
    m3jax (`SHIPPED_MODELS`, under m3jax/models/). Raises ConvertError, naming what is missing."""
    path = str(name_or_dir)
    if path in SHIPPED_MODELS and not os.path.exists(path):
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such directory, nor a shipped model ({', '.join(sorted(SHIPPED_MODELS))})")
    if is_checkpoint_dir(path):
        return path
    sub = os.path.join(path, "model")
    if is_checkpoint_dir(sub):
        return sub
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConvertError(f"{path} is a training run without a finished model ({sub} is missing): run its "
                           "`m3jax train` command again to finish it")
    left = glob.glob(glob.escape(os.path.abspath(path)) + ".old-*")
    hint = f"; a save was interrupted: the previous model is in {left[0]}" if left else ""
    raise ConvertError(f"{path} is not a model directory (config.json with params.safetensors or an adapter, "
                       f"as written by `m3jax convert --out` or `m3jax train`){hint}")


def load_model(name_or_dir: str) -> tuple[ModelConfig, Params, Tokenizer]:
    """The one model loader (`m3jax.load_model`): (config, params, tokenizer) of a model directory
    (`m3jax convert` / `m3jax train` output, full params or an adapter over its base), of a
    training run (its `model/`) or of a shipped model by name ("smollm2-135m-memory").
    Raises ConvertError (a ValueError) with a one-line message naming the file at fault."""
    directory = model_dir(name_or_dir)
    config, params, tok = load_checkpoint_dir(directory)
    if tok is None:
        raise ConvertError(f"{directory}: the model has no tokenizer (no tokenizer/ directory)")
    return config, params, tok


# ============================================================================ LoRA adapters
_ADAPTER_FILE, _BASE_FILE = "adapter.safetensors", "base.json"
_MODEL_ENTRIES = (_PARAMS_FILE, _CONFIG_FILE, _TOKENIZER_DIR, _ADAPTER_FILE, _BASE_FILE)
ADAPTER_FORMAT = "m3jax-lora"


def save_adapter(path: str, adapter: Params, train_cfg: Any, *, base_fingerprint: str | None = None,
                 dtype: str | None = None) -> None:
    """Write a LoRA adapter (`m3jax.model.lora`) to one safetensors file: tensors `stack/name/a|b`,
    metadata rank, alpha, targets and the fingerprint of the base weights it was trained on.
    `dtype` (e.g. "bfloat16") stores the factors narrower; they are merged in float32."""
    from safetensors.numpy import save_file

    flat = {}
    for stack, names in adapter.items():
        for name, ab in names.items():
            for k in ("a", "b"):
                x = jnp.asarray(ab[k])
                flat[f"{stack}/{name}/{k}"] = np.asarray(x.astype(dtype) if dtype else x)
    from m3jax.model.lora import rank_of

    meta = {"format": ADAPTER_FORMAT, "rank": str(rank_of(adapter)), "alpha": repr(float(train_cfg.lora_scale_alpha)),
            "targets": json.dumps(list(train_cfg.lora_targets)), "base_fingerprint": base_fingerprint or ""}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata=meta)
    os.replace(tmp, path)


def load_adapter(path: str) -> tuple[Params, dict[str, Any]]:
    """(adapter pytree in float32, metadata: rank, alpha, targets, base_fingerprint) of a file
    written by `save_adapter`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys())
            tensors = {k: np.asarray(f.get_tensor(k), np.float32) for k in names}
    except Exception as e:  # safetensors raises several types on damaged files
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ConvertError(f"{path}: not an m3jax LoRA adapter (format {meta.get('format')!r})")
    adapter: Params = {}
    for k, v in tensors.items():
        parts = k.split("/")
        if len(parts) != 3 or parts[2] not in ("a", "b"):
            raise ConvertError(f"{path}: unexpected tensor {k!r} in a LoRA adapter")
        adapter.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = jnp.asarray(v)
    try:
        info = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "targets": json.loads(meta["targets"]),
                "base_fingerprint": meta.get("base_fingerprint") or None}
    except (KeyError, ValueError) as e:
        raise ConvertError(f"{path}: bad adapter metadata ({e})") from None
    return adapter, info


def apply_adapter(params: Params, config: ModelConfig, adapter: Params, info: dict[str, Any], *,
                  where: str = "adapter") -> Params:
    """The base `params` merged with a loaded adapter, after checking that they are the weights
    the adapter was trained on (their fingerprint) and that its factors fit the config."""
    from m3jax.memory.bank import params_fingerprint
    from m3jax.model import lora

    want = info.get("base_fingerprint")
    if want:
        got = params_fingerprint(params)
        if got != want:
            raise ConvertError(f"{where}: trained on base weights {want}, but the base given is {got}: "
                               "an adapter only applies to the weights it was trained on")
    expect = lora.shapes(config, info["rank"], info["targets"])
    got_shapes = jax.tree.map(lambda x: tuple(x.shape), adapter)
    if got_shapes != expect:
        raise ConvertError(f"{where}: adapter factors do not fit model {config.name!r}")
    return lora.merge(params, adapter, info["alpha"])


def save_adapter_dir(directory: str, config: ModelConfig, adapter_path: str, base: dict[str, Any],
                     tokenizer: Tokenizer | None = None) -> None:
    """A model directory that holds an adapter instead of params: config.json, adapter.safetensors
    (copied from `adapter_path`), base.json (`base`: where the base weights are, see
    `load_base_params`) and the tokenizer. `load_checkpoint_dir` merges it with its base.
    Atomic, as `save_checkpoint_dir`."""
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, where=directory)

    def write(tmp: str) -> None:  # the adapter may be the one already in `directory`: copied first
        shutil.copyfile(adapter_path, os.path.join(tmp, _ADAPTER_FILE))
        with open(os.path.join(tmp, _CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=1)
        with open(os.path.join(tmp, _BASE_FILE), "w", encoding="utf-8") as f:
            json.dump(base, f, indent=1)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, _TOKENIZER_DIR))

    _write_model_dir(directory, write)


def load_base_params(base: dict[str, Any], config: ModelConfig, *, where: str) -> Params:
    """Base weights named by a base.json record: {"gguf": path} (a GGUF file; "asset:NAME" is a
    shipped asset, see `m3jax.assets.asset_path`) or {"model": dir} (an m3jax model directory;
    relative paths are relative to the directory of base.json)."""
    if "gguf" in base:
        path = _gguf_path(base["gguf"], where)
        reader = open_gguf(path)
        tensors = read_gguf_tensors(reader, where=path)
        params = params_from_hf_tensors(tensors, config, where=path)
    elif "model" in base:
        saved, params, _ = load_checkpoint_dir(os.path.join(where, base["model"]))
        if saved.memory_layers != config.memory_layers:
            from m3jax.model import restack

            params = restack(params, config.memory_layers)
    else:
        raise ConvertError(f"{where}/{_BASE_FILE}: names no base weights (expected a 'gguf' or 'model' field)")
    check_params(params, config)
    return params


def _gguf_path(path: str, where: str) -> str:
    from m3jax.assets import asset_path

    return asset_path(path[len("asset:"):]) if path.startswith("asset:") else os.path.join(where, path)


def _adapted_params(directory: str, config: ModelConfig) -> Params:
    base_path = os.path.join(directory, _BASE_FILE)
    if not os.path.isfile(base_path):
        raise ConvertError(f"{directory}: an adapter without {_BASE_FILE} (which base weights it applies to)")
    base = _read_json(base_path)
    if not isinstance(base, dict):
        raise ConvertError(f"{base_path}: a JSON {type(base).__name__}, not an object")
    adapter, info = load_adapter(os.path.join(directory, _ADAPTER_FILE))
    params = load_base_params(base, config, where=directory)
    return apply_adapter(params, config, adapter, info, where=os.path.join(directory, _ADAPTER_FILE))


# ============================================================================ `m3jax convert`
def parse_reference_prefix(text: str | None) -> Any:
    """A `--reference-prefix` value: None (not given), AUTO, "none" -> (), or token ids."""
    if text is None:
        return None
    if text.lower() == AUTO:
        return AUTO
    if text.lower() in ("none", "off", "plain"):
        return ()
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ConvertError(f"--reference-prefix must be 'auto', 'none' or comma-separated ids, got {text!r}") from None


def convert_checkpoint(source: str, path: str, out: str, *, target: str = "m3jax", memory_layers: int | None = None,
                       reference_prefix: Any = None, dtype: str | None = None, param_dtype: str | None = None,
                       name: str | None = None, max_len: int | None = None) -> str:
    """What `m3jax convert` runs: import a checkpoint (`source` "hf": a transformers directory of a
    supported family, "gguf": a llama / qwen2 / qwen3 .gguf file, "m3jax": an m3jax model directory
    or shipped name) and write it to `out` as an m3jax model directory (`target` "m3jax") or in the
    transformers layout (`target` "hf": config.json + safetensors + tokenizer files that
    transformers 5 loads). reference_prefix: None (the source's default: AUTO for gguf, none for
    hf), AUTO (document start + "Reference:"), () (none: the plain model) or token ids. Returns a
    one-line summary of what was written."""
    if target not in ("m3jax", "hf"):
        raise ConvertError(f"unknown conversion target {target!r} (m3jax or hf)")
    prefix = reference_prefix
    if source == "m3jax":
        if target != "hf":
            raise ConvertError("--from m3jax converts to the transformers layout: add --to hf")
        config, params, tok = load_checkpoint_dir(model_dir(path))
        if param_dtype:
            params = jax.tree.map(lambda x: x.astype(param_dtype), params)
            config = dataclasses.replace(config, param_dtype=param_dtype)
    elif source == "gguf":
        config, params, tok = load_gguf(path, memory_layers=memory_layers,
                                        reference_prefix=AUTO if prefix is None else (prefix or None),
                                        dtype=dtype or "float32", param_dtype=param_dtype or "float32",
                                        name=name, max_len=max_len)
    elif source == "hf":
        config, params = load_hf(path, memory_layers=memory_layers, reference_prefix=AUTO,
                                 dtype=dtype, param_dtype=param_dtype, name=name, max_len=max_len)
        tok = load_hf_tokenizer(path, config)
        if tok is not None:  # a chat model whose BOS is a turn marker starts documents with its separator
            tok = with_document_start(tok)
            config = dataclasses.replace(config, bos_id=tok.bos_id)
        if prefix is not None:
            if prefix == AUTO:
                if tok is None:
                    raise ConvertError(f"--reference-prefix auto needs a tokenizer.json in {path}")
                prefix = tok.reference_prefix()
            config = dataclasses.replace(config, reference_prefix=prefix or None)
    else:
        raise ConvertError(f"unknown checkpoint source {source!r} (hf, gguf or m3jax)")
    if target == "hf":
        save_hf(config, params, out, tok)
    else:
        save_checkpoint_dir(out, config, params, tok)
    n = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    what = hf_family(config) if target == "hf" else f"{config.num_layers} layers ({config.memory_layers} memory)"
    return (f"wrote {out} ({target}): {config.name}, {what}, {n / 1e6:.1f}M params ({config.param_dtype}), "
            f"reference_prefix={config.reference_prefix}, tokenizer={'yes' if tok is not None else 'no'}")

