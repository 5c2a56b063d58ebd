"""Sentence embedders: a BERT-family encoder in JAX (default all-MiniLM-L6-v2) and user functions.

The retriever only needs an `Embedder`: a callable mapping texts to unit-norm float32 vectors
[n, dim] with a `.dim` attribute. Two implementations:

* `SentenceEmbedder`: a post-LN BERT written as pure functions over a params pytree, loaded from
  HF-format safetensors (`load_bert`), with mean pooling over valid tokens and L2 normalization
  (the sentence-transformers recipe of all-MiniLM-L6-v2).
* `FunctionEmbedder`: wraps any function texts -> vectors (e.g. another library's encoder),
  normalizing and checking shapes.

Shape letters: B batch, T tokens, D hidden, N heads, H head dim, F intermediate (FFN) width,
L layers, V vocab.

Measured on a 2-core CPU shared with other jobs (load ~7; MiniLM, float32, batch 64, compiled):
~13-24 texts/s on Wikipedia leads (mean 94 tokens, padded to 96/128), ~60-130 texts/s on
15-token sentences. Elementwise ops (erf GELU, LayerNorm) cost about a third of the matmul time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer
from tqdm.auto import tqdm

from m3jax.assets import minilm_dir
from m3jax.runtime import EIGEN_CPU_OPTIONS, eigen_on_cpu

Array = jax.Array
Params = dict[str, Any]
_NEG = -1e30


# ----------------------------------------------------------------------------- protocol
@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to unit-norm float32 vectors [n, dim]."""

    @property
    def dim(self) -> int: ...

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder, as in an HF `config.json`."""

    vocab_size: int = 30522
    hidden: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden", "num_layers", "num_heads", "intermediate",
                  "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"BertConfig.{f} must be a positive int, got {v!r}")
        if self.hidden % self.num_heads:
            raise ValueError(f"BertConfig.hidden ({self.hidden}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.hidden_act != "gelu":
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; only "
                             "'gelu' (exact erf GELU) is implemented")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "BertConfig":
        """From the dict of an HF BERT `config.json`."""
        model_type = cfg.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config.json has model_type {model_type!r}; only 'bert' is supported")
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate=int(cfg["intermediate_size"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


# ----------------------------------------------------------------------------- loading
_LAYER_TENSORS = {
    # ours: (HF name inside encoder.layer.{i}., transpose?)
    "q_w_DD": ("attention.self.query.weight", True),
    "q_b_D": ("attention.self.query.bias", False),
    "k_w_DD": ("attention.self.key.weight", True),
    "k_b_D": ("attention.self.key.bias", False),
    "v_w_DD": ("attention.self.value.weight", True),
    "v_b_D": ("attention.self.value.bias", False),
    "o_w_DD": ("attention.output.dense.weight", True),
    "o_b_D": ("attention.output.dense.bias", False),
    "ln1_g_D": ("attention.output.LayerNorm.weight", False),
    "ln1_b_D": ("attention.output.LayerNorm.bias", False),
    "ff_in_w_DF": ("intermediate.dense.weight", True),
    "ff_in_b_F": ("intermediate.dense.bias", False),
    "ff_out_w_FD": ("output.dense.weight", True),
    "ff_out_b_D": ("output.dense.bias", False),
    "ln2_g_D": ("output.LayerNorm.weight", False),
    "ln2_b_D": ("output.LayerNorm.bias", False),
}
_EMBED_TENSORS = {
    "word_VD": "embeddings.word_embeddings.weight",
    "pos_PD": "embeddings.position_embeddings.weight",
    "type_YD": "embeddings.token_type_embeddings.weight",
    "ln_g_D": "embeddings.LayerNorm.weight",
    "ln_b_D": "embeddings.LayerNorm.bias",
}
# Older BERT checkpoints name LayerNorm parameters gamma/beta.
_ALIASES = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}


def _require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}")
    return path


def _require_dir(model_dir: str) -> str:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    return model_dir


def load_bert(model_dir: str, dtype: Any = jnp.float32) -> tuple[BertConfig, Params]:
    """Load an HF-format BERT (`config.json` + `model.safetensors`) as (config, params pytree).

    Params: {"embed": {word_VD, pos_PD, type_YD, ln_g_D, ln_b_D},
             "layers": {name: array with a leading L axis}} (linear weights as (in, out)).
    A `bert.` name prefix (BertFor* checkpoints) is accepted. Missing tensors raise KeyError
    naming the tensor and the file.
    """
    _require_dir(model_dir)
    with open(_require_file(os.path.join(model_dir, "config.json")), encoding="utf-8") as f:
        cfg = BertConfig.from_hf(json.load(f))
    path = _require_file(os.path.join(model_dir, "model.safetensors"))

    with safe_open(path, framework="numpy") as st:
        names = set(st.keys())
        prefix = "bert." if not any(n.startswith("embeddings.") for n in names) and any(
            n.startswith("bert.embeddings.") for n in names) else ""

        def get(name: str) -> np.ndarray:
            for cand in (name, *(name.replace(a, b) for a, b in _ALIASES.items() if a in name)):
                if prefix + cand in names:
                    return st.get_tensor(prefix + cand)
            raise KeyError(f"tensor {prefix + name!r} is missing from {path}")

        embed = {k: get(v) for k, v in _EMBED_TENSORS.items()}
        layers: dict[str, list[np.ndarray]] = {k: [] for k in _LAYER_TENSORS}
        for i in range(cfg.num_layers):
            for k, (hf, transpose) in _LAYER_TENSORS.items():
                w = get(f"encoder.layer.{i}.{hf}")
                layers[k].append(w.T if transpose else w)

    expect = {"word_VD": (cfg.vocab_size, cfg.hidden),
              "pos_PD": (cfg.max_position_embeddings, cfg.hidden),
              "type_YD": (cfg.type_vocab_size, cfg.hidden)}
    for k, shape in expect.items():
        if embed[k].shape != shape:
            raise ValueError(f"{_EMBED_TENSORS[k]} has shape {embed[k].shape}, config.json says {shape}")
    stacked = {k: np.stack(v) for k, v in layers.items()}
    D, F = cfg.hidden, cfg.intermediate
    if stacked["q_w_DD"].shape[1:] != (D, D) or stacked["ff_in_w_DF"].shape[1:] != (D, F):
        raise ValueError(f"layer weight shapes in {path} do not match config.json (hidden {D}, "
                         f"intermediate {F})")
    params = {
        "embed": {k: jnp.asarray(v, dtype) for k, v in embed.items()},
        "layers": {k: jnp.asarray(v, dtype) for k, v in stacked.items()},
    }
    return cfg, params


# ----------------------------------------------------------------------------- forward
def _layer_norm(x_BTD: Array, g_D: Array, b_D: Array, eps: float) -> Array:
    x = x_BTD.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g_D + b_D


def bert_forward(params: Params, cfg: BertConfig, input_ids: Array, attention_mask: Array) -> Array:
    """Post-LN BERT encoder: input_ids [B, T] int, attention_mask [B, T] (1 = token, 0 = pad)
    -> last hidden states [B, T, D] float32. Token types are all 0. Jittable (cfg static)."""
    B, T = input_ids.shape
    if T > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    N, H = cfg.num_heads, cfg.head_dim
    e = params["embed"]
    x_BTD = (jnp.take(e["word_VD"], input_ids, axis=0) + e["pos_PD"][:T][None]
             + e["type_YD"][0][None, None])
    x_BTD = _layer_norm(x_BTD, e["ln_g_D"], e["ln_b_D"], cfg.layer_norm_eps)
    keep_B11S = (attention_mask > 0)[:, None, None, :]
    scale = H ** -0.5

    def layer(x_BTD: Array, p: Params) -> tuple[Array, None]:
        q_BTNH = (jnp.einsum("BTD,DE->BTE", x_BTD, p["q_w_DD"]) + p["q_b_D"]).reshape(B, T, N, H)
        k_BSNH = (jnp.einsum("BTD,DE->BTE", x_BTD, p["k_w_DD"]) + p["k_b_D"]).reshape(B, T, N, H)
        v_BSNH = (jnp.einsum("BTD,DE->BTE", x_BTD, p["v_w_DD"]) + p["v_b_D"]).reshape(B, T, N, H)
        s_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) * scale
        s_BNTS = jnp.where(keep_B11S, s_BNTS, _NEG)
        p_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
        ctx_BTD = jnp.einsum("BNTS,BSNH->BTNH", p_BNTS, v_BSNH).reshape(B, T, N * H)
        attn_BTD = jnp.einsum("BTE,ED->BTD", ctx_BTD, p["o_w_DD"]) + p["o_b_D"]
        x_BTD = _layer_norm(x_BTD + attn_BTD, p["ln1_g_D"], p["ln1_b_D"], cfg.layer_norm_eps)
        h_BTF = jax.nn.gelu(jnp.einsum("BTD,DF->BTF", x_BTD, p["ff_in_w_DF"]) + p["ff_in_b_F"],
                            approximate=False)
        ff_BTD = jnp.einsum("BTF,FD->BTD", h_BTF, p["ff_out_w_FD"]) + p["ff_out_b_D"]
        x_BTD = _layer_norm(x_BTD + ff_BTD, p["ln2_g_D"], p["ln2_b_D"], cfg.layer_norm_eps)
        return x_BTD, None

    x_BTD, _ = jax.lax.scan(layer, x_BTD, params["layers"])
    return x_BTD


def mean_pool_normalize(hidden_BTD: Array, attention_mask: Array) -> Array:
    """Mean of hidden states over valid tokens, then L2-normalized: [B, T, D] -> [B, D]."""
    m_BT1 = (attention_mask > 0).astype(jnp.float32)[..., None]
    summed_BD = jnp.sum(hidden_BTD * m_BT1, axis=1)
    mean_BD = summed_BD / jnp.maximum(jnp.sum(m_BT1, axis=1), 1e-9)
    norm_B1 = jnp.linalg.norm(mean_BD, axis=-1, keepdims=True)
    return mean_BD / jnp.maximum(norm_B1, 1e-12)


def _embed(params: Params, cfg: BertConfig, input_ids: Array, attention_mask: Array) -> Array:
    return mean_pool_normalize(bert_forward(params, cfg, input_ids, attention_mask), attention_mask)


_embed_jit = jax.jit(_embed, static_argnums=1)
_embed_eigen = jax.jit(_embed, static_argnums=1, compiler_options=EIGEN_CPU_OPTIONS)


def _embed_batch(params: Params, cfg: BertConfig, input_ids: Array, attention_mask: Array) -> Array:
    """The jitted forward + pooling (float32 on CPU compiled as `runtime.EIGEN_CPU_OPTIONS`: a
    batch of queries is a many-row product, faster there)."""
    fn = _embed_eigen if eigen_on_cpu(jax.tree.leaves(params)[0].dtype) else _embed_jit
    return fn(params, cfg, input_ids, attention_mask)


# ----------------------------------------------------------------------------- embedders
_MIN_SPLIT = 8  # texts of a shorter length bucket that get their own batch (fewer: padded with the longer)


def _bucket(n: int, cap: int, floor: int) -> int:
    """Smallest of floor * 2^k and 1.5 * floor * 2^k that is >= n, capped at `cap`."""
    b = floor
    while b < n:
        if b + b // 2 >= n:
            b = b + b // 2
            break
        b *= 2
    return min(max(b, 1), cap)


class SentenceEmbedder:
    """A sentence-transformers style encoder (mean pooling + L2 norm) run in JAX.

    `SentenceEmbedder()` loads all-MiniLM-L6-v2 from the installed asset. Texts longer than
    `max_len` tokens (special tokens included) are truncated. Texts are sorted by length and
    batched; each batch is padded to a bucketed length and batch size so the jitted forward
    compiles once per bucket, not once per batch, and a batch ends where a shorter length bucket
    begins (when at least `_MIN_SPLIT` texts fill it). Output is in input order.
    """

    def __init__(self, model_dir: str | None = None, *, max_len: int = 128, batch_size: int = 64,
                 show_progress: bool = False):
        if model_dir is None:
            model_dir = minilm_dir()
        _require_dir(model_dir)
        tok_path = _require_file(os.path.join(model_dir, "tokenizer.json"))
        self.cfg, self.params = load_bert(model_dir)
        if not 2 <= max_len <= self.cfg.max_position_embeddings:
            raise ValueError(f"max_len must be in [2, {self.cfg.max_position_embeddings}], got {max_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_dir = model_dir
        self.max_len = int(max_len)
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self.tokenizer = HFTokenizer.from_file(tok_path)
        # The shipped tokenizer.json pads/truncates to 128: replace with our own settings.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_len)
        self.pad_id = 0

    @property
    def dim(self) -> int:
        return self.cfg.hidden

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated to max_len."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def _batches(self, texts: Sequence[str]) -> tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """(n, [(row indices, token ids [B, T], mask [B, T])]): texts sorted by length, padded to
        bucketed shapes."""
        if isinstance(texts, str):
            raise TypeError("SentenceEmbedder expects a sequence of strings, got a single str")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if not texts:
            return 0, []
        ids = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(-lengths, kind="stable")
        buckets = np.array([_bucket(int(n), self.max_len, 16) for n in lengths[order]])
        batches, s = [], 0
        while s < len(texts):
            e = min(len(texts), s + self.batch_size)
            # a batch ends where a shorter length bucket begins when enough texts fill it (queries
            # of ~57 tokens would otherwise all pad to the bucket of the longest, 96)
            shorter = s + int(np.searchsorted(-buckets[s:e], -buckets[s], side="right"))
            if shorter < e and len(texts) - shorter >= _MIN_SPLIT:
                e = shorter
            idx, s = order[s:e], e
            T = int(buckets[s - len(idx)])
            B = _bucket(len(idx), self.batch_size, 1)
            tok = np.full((B, T), self.pad_id, np.int32)
            mask = np.zeros((B, T), np.int32)
            for row, j in enumerate(idx):
                tok[row, :lengths[j]] = ids[j]
                mask[row, :lengths[j]] = 1
            batches.append((idx, tok, mask))
        return len(texts), batches

    def _run(self, tok: np.ndarray, mask: np.ndarray) -> jax.Array:
        return _embed_batch(self.params, self.cfg, jnp.asarray(tok), jnp.asarray(mask))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts (n) -> unit-norm float32 vectors [n, dim], in input order."""
        n, batches = self._batches(texts)
        out = np.zeros((n, self.dim), np.float32)
        bar = None
        if self.show_progress and n > self.batch_size:
            bar = tqdm(total=n, desc="embed", unit="text")
        for idx, tok, mask in batches:
            out[idx] = np.asarray(self._run(tok, mask))[:len(idx)]
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def dispatch(self, texts: Sequence[str]) -> Callable[[], np.ndarray]:
        """Tokenize and enqueue the encoder on the device now; the returned function waits for
        the vectors ([n, dim], as `__call__`). The decoder enqueues a chunk's query here before
        it enqueues its next decoding step, so that on an accelerator the small encoder runs
        ahead of that step instead of queueing behind it. For short lists (queries): all
        batches are enqueued at once."""
        n, batches = self._batches(texts)
        pending = [(idx, self._run(tok, mask)) for idx, tok, mask in batches]

        def collect() -> np.ndarray:
            out = np.zeros((n, self.dim), np.float32)
            for idx, vecs in pending:
                out[idx] = np.asarray(vecs)[:len(idx)]
            return out

        return collect


class FunctionEmbedder:
    """Wrap `fn(texts) -> array [n, dim]` as an `Embedder`: rows are L2-normalized to float32."""

    def __init__(self, fn: Callable[[Sequence[str]], Any], dim: int):
        if not callable(fn):
            raise TypeError(f"FunctionEmbedder needs a callable, got {type(fn).__name__}")
        if not (isinstance(dim, int) and dim > 0):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.fn = fn
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("FunctionEmbedder expects a sequence of strings, got a single str")
        texts = list(texts)
        out = np.asarray(self.fn(texts))
        if out.ndim != 2 or out.shape != (len(texts), self._dim):
            raise ValueError(f"embedding function returned shape {out.shape}, expected "
                             f"({len(texts)}, {self._dim}) for {len(texts)} texts")
        if not np.issubdtype(out.dtype, np.number) or np.issubdtype(out.dtype, np.complexfloating):
            raise ValueError(f"embedding function returned dtype {out.dtype}, expected real numbers")
        out = out.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError("embedding function returned non-finite values")
        norm = np.linalg.norm(out, axis=-1)
        if np.any(norm == 0):
            bad = int(np.flatnonzero(norm == 0)[0])
            raise ValueError(f"embedding function returned a zero vector (text {bad}): it cannot be "
                             "normalized")
        return _normalize_rows(out)
