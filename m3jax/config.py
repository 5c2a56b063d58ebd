"""Frozen dataclass configs and named presets.

`ModelConfig` holds the decoder shape *and* the geometry of explicit memories (one concept: the
model that writes and reads memories). Override fields with `dataclasses.replace` or, from the CLI,
with `key=value` strings through `apply_overrides`.

Memory layers are the first `memory_layers` layers (the paper uses the first half: layers 0..21 of
44). Only they write memories (encoding) and read them (inference).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Score = Literal["softmax", "exp", "value_norm"]
GroupReduce = Literal["sum", "max"]
RopeType = Literal["default", "llama3"]
# Layer rematerialization in the backward pass (jax.checkpoint on the layer scan), by what it saves:
# "none" (no remat), "full" (only each layer's input: everything recomputed once), "dots" (the
# outputs of the projection and MLP matmuls: only the attention core and elementwise ops are
# recomputed), "attention" ("dots" plus the attention outputs and a fused kernel's softmax
# statistics: with splash attention nothing but elementwise ops is recomputed).
# Old configs' true / false read as "full" / "none".
Remat = Literal["none", "full", "dots", "attention"]
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder with Memory3 explicit-memory attention.

    Families differ by small switches, not classes: `qkv_bias` (Qwen2/2.5: biases on the q, k, v
    projections), `qk_norm` (Qwen3: an RMSNorm over head_dim on every query and key head before
    RoPE) and `rope_type` with its parameters (`"llama3"`: Llama 3.1+ frequency scaling by
    `rope_factor` between `rope_low_freq_factor` and `rope_high_freq_factor` wavelengths of
    `rope_original_max_len`). Their defaults are the plain Llama.

    Shape letters (one table for all of m3jax: docs/ARCHITECTURE.md): D `hidden`, N `num_heads`,
    K `num_kv_heads`, G = N // K, H `head_dim`, F `mlp_dim`, V `vocab_size`, L layers, E
    `tokens_per_memory`, Q `chunk_size`, R `reference_len`.
    """

    name: str = "custom"
    vocab_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 64
    mlp_dim: int = 128
    rope_theta: float = 1e4
    # RoPE frequency scaling: "default" (none) or "llama3" (Llama 3.1+; the four fields below)
    rope_type: RopeType = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Per-frequency divisors of the H/2 rotary frequencies, as llama.cpp stores Llama 3.1+ scaling
    # (GGUF tensor rope_freqs.weight); None = none. Applied after `rope_type`.
    rope_freq_factors: tuple[float, ...] | None = None
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2/2.5)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_len: int = 2048  # longest context (excluding the reference prefix and memory window)
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    # More ids that end a generated sequence besides eos_id (Llama 3 Instruct's <|eot_id|> and
    # <|eom_id|>: transformers' list-valued eos_token_id, GGUF's eot / eom ids); `end_ids` has all.
    stop_ids: tuple[int, ...] = ()
    # --- explicit memory geometry ---
    memory_layers: int = 2  # layers 0..memory_layers-1 write and read memories
    tokens_per_memory: int = 8  # sparse tokens kept per (memory layer, kv head)
    memories_per_chunk: int = 5  # memories retrieved by each context chunk at inference
    chunk_size: int = 64  # context tokens per retrieval chunk
    reference_len: int = 128  # max tokens of one reference (also the memory position window)
    # BOS followed by the tokens of "Reference:". None turns the prefix sink and the memory
    # window off: the model is then a plain Llama with context positions from 0.
    reference_prefix: tuple[int, ...] | None = (1, 2, 3)
    # token sparsification score: the paper's "softmax" (default) or "exp", or "value_norm" (an
    # m3jax option: the longest value vectors; see m3jax.memory.encode)
    score: Score = "softmax"
    group_reduce: GroupReduce = "sum"  # how query heads sharing a kv head are combined
    # --- numerics ---
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: Remat = "none"  # layer rematerialization policy (see `Remat`; true / false = "full" / "none")

    def __post_init__(self) -> None:
        for f in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden",
                  "mlp_dim", "max_len", "tokens_per_memory", "memories_per_chunk", "chunk_size",
                  "reference_len"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   f"ModelConfig.{f} must be a positive int, got {v!r}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
               f"({self.num_kv_heads}) for grouped-query attention")
        _check(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        _check(isinstance(self.memory_layers, int) and 0 <= self.memory_layers <= self.num_layers,
               f"ModelConfig.memory_layers must be in [0, num_layers={self.num_layers}], "
               f"got {self.memory_layers!r}")
        _check(self.tokens_per_memory <= self.reference_len,
               f"ModelConfig.tokens_per_memory ({self.tokens_per_memory}) cannot exceed "
               f"reference_len ({self.reference_len})")
        _check(self.score in typing.get_args(Score),
               f"ModelConfig.score must be one of {typing.get_args(Score)}, got {self.score!r}")
        _check(self.group_reduce in typing.get_args(GroupReduce),
               f"ModelConfig.group_reduce must be one of {typing.get_args(GroupReduce)}, "
               f"got {self.group_reduce!r}")
        _check(self.rope_theta > 0, f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        _check(self.rope_type in typing.get_args(RopeType),
               f"ModelConfig.rope_type must be one of {typing.get_args(RopeType)}, got {self.rope_type!r}")
        if self.rope_type == "llama3":
            _check(self.rope_factor >= 1, f"ModelConfig.rope_factor must be >= 1, got {self.rope_factor}")
            _check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                   "ModelConfig.rope_low_freq_factor must be > 0 and < rope_high_freq_factor, got "
                   f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
            _check(isinstance(self.rope_original_max_len, int) and self.rope_original_max_len > 0,
                   f"ModelConfig.rope_original_max_len must be a positive int, got {self.rope_original_max_len!r}")
        if self.rope_freq_factors is not None:
            if not isinstance(self.rope_freq_factors, tuple):  # lists from JSON
                object.__setattr__(self, "rope_freq_factors", tuple(float(x) for x in self.rope_freq_factors))
            f = self.rope_freq_factors
            _check(len(f) == self.head_dim // 2 and all(isinstance(x, (int, float)) and x > 0 for x in f),
                   f"ModelConfig.rope_freq_factors must be {self.head_dim // 2} positive numbers (head_dim / 2), "
                   f"got {len(f)}")
        for f in ("qkv_bias", "qk_norm"):
            _check(isinstance(getattr(self, f), bool), f"ModelConfig.{f} must be true or false, got "
                                                       f"{getattr(self, f)!r}")
        _check(self.norm_eps > 0, f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.remat in (True, False, None, "true", "false"):  # configs written before the policies
            object.__setattr__(self, "remat", "full" if self.remat in (True, "true") else "none")
        _check(self.remat in typing.get_args(Remat),
               f"ModelConfig.remat must be one of {typing.get_args(Remat)} (or true / false), got {self.remat!r}")
        for f in ("dtype", "param_dtype"):
            _check(getattr(self, f) in _DTYPES,
                   f"ModelConfig.{f} must be one of {_DTYPES}, got {getattr(self, f)!r}")
        for f in ("bos_id", "eos_id", "pad_id"):
            v = getattr(self, f)
            _check(isinstance(v, int) and 0 <= v < self.vocab_size,
                   f"ModelConfig.{f}={v!r} is not a token id of a vocab of {self.vocab_size}")
        if not isinstance(self.stop_ids, tuple):  # lists from JSON
            _check(isinstance(self.stop_ids, (list, tuple)), f"ModelConfig.stop_ids must be a list of token ids, "
                                                               f"got {self.stop_ids!r}")
            object.__setattr__(self, "stop_ids", tuple(self.stop_ids))
        _check(all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in self.stop_ids),
               f"ModelConfig.stop_ids {self.stop_ids} holds ids outside the vocab of {self.vocab_size}")
        if self.reference_prefix is not None:
            # Lists from JSON/CLI become tuples so the config stays hashable (a jit static arg).
            if not isinstance(self.reference_prefix, tuple):
                object.__setattr__(self, "reference_prefix", tuple(self.reference_prefix))
            p = self.reference_prefix
            _check(len(p) >= 1, "ModelConfig.reference_prefix must hold at least the BOS id (or be None)")
            _check(all(isinstance(t, int) and 0 <= t < self.vocab_size for t in p),
                   f"ModelConfig.reference_prefix {p} holds ids outside the vocab of {self.vocab_size}")

    # ------------------------------------------------------------------ derived geometry
    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every id that ends a generated sequence: eos_id, then stop_ids."""
        return (self.eos_id, *(t for t in self.stop_ids if t != self.eos_id))

    @property
    def memory_enabled(self) -> bool:
        return self.reference_prefix is not None and self.memory_layers > 0

    @property
    def prefix_len(self) -> int:
        """r: length of the reference prefix sink (0 when it is off)."""
        return 0 if self.reference_prefix is None else len(self.reference_prefix)

    @property
    def context_offset(self) -> int:
        """Position of the first context token (its BOS): r + reference_len, or 0 without memory."""
        return 0 if self.reference_prefix is None else self.prefix_len + self.reference_len

    @property
    def memory_block_len(self) -> int:
        """Memory tokens retrieved by one chunk at inference (memories_per_chunk * tokens_per_memory)."""
        return self.memories_per_chunk * self.tokens_per_memory

    # ------------------------------------------------------------------ counts
    def num_params(self, embedding: bool = False) -> int:
        """Parameter count; non-embedding only unless `embedding=True` (then embed + lm head too)."""
        d, h = self.hidden, self.head_dim
        attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2
        if self.qkv_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * h
        if self.qk_norm:
            attn += 2 * h
        mlp = 3 * d * self.mlp_dim
        per_layer = attn + mlp + 2 * d
        n = self.num_layers * per_layer + d  # + final norm
        if embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    @property
    def memory_vectors(self) -> int:
        """Head_dim vectors one stored memory holds: (memory_layers, 2, kv_heads, tokens_per_memory)
        (bytes per vector depend on the codec: `m3jax.memory.codec.memory_bytes`)."""
        return self.memory_layers * 2 * self.num_kv_heads * self.tokens_per_memory

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("reference_prefix", "rope_freq_factors", "stop_ids"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)


# ModelConfig fields that change how a model runs, not the values its weights compute: a training
# checkpoint or a memory bank written under one value serves the others.
RUNTIME_FIELDS = ("name", "dtype", "param_dtype", "max_len", "remat")


# ---------------------------------------------------------------------- presets
_PRESETS: dict[str, ModelConfig] = {
    # Small enough for unit tests; chunk/reference geometry shrunk so tests cross boundaries.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
        hidden=64, mlp_dim=128, max_len=256, memory_layers=2, tokens_per_memory=4,
        memories_per_chunk=2, chunk_size=16, reference_len=32, reference_prefix=(1, 5, 6)),
    # ~3M parameters: trains on a 2-core CPU in minutes; the memory geometry is the paper's.
    # `reference_prefix` is replaced by the ids of "Reference:" in the demo's trained tokenizer.
    "demo": ModelConfig(
        name="demo", vocab_size=4096, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=32,
        hidden=192, mlp_dim=512, max_len=1024, memory_layers=2, tokens_per_memory=8,
        memories_per_chunk=5, chunk_size=64, reference_len=128, reference_prefix=(1, 2, 3)),
    # SmolLM2-135M(-Instruct) shapes; documents start with <|endoftext|> (id 0, its pretraining
    # separator; the Instruct GGUF's BOS id 1 is the chat-turn token <|im_start|>); prefix = that
    # start + tokens of "Reference:".
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, hidden=576, mlp_dim=1536, rope_theta=1e5, norm_eps=1e-5,
        tie_embeddings=True, max_len=2048, bos_id=0, eos_id=2, pad_id=2, memory_layers=15,
        reference_prefix=(0, 23682, 42)),
    # The paper's 2.4B model (Yang et al. 2024, Table 1 and section 3). Its tokenizer is not
    # public: the prefix ids below have the length of "BOS Reference:" in a typical BPE (3 ids)
    # and are otherwise arbitrary; replace them with your tokenizer's ids.
    "memory3-2b": ModelConfig(
        name="memory3-2b", vocab_size=60416, num_layers=44, num_heads=40, num_kv_heads=8,
        head_dim=80, hidden=3200, mlp_dim=3200, rope_theta=1e4, tie_embeddings=False,
        max_len=2048, memory_layers=22, reference_prefix=(1, 2, 3), dtype="bfloat16",
        param_dtype="bfloat16"),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named ModelConfig (`tiny`, `demo`, `smollm2-135m`, `memory3-2b`), optionally overridden."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {preset_names()}")
    cfg = _PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _parse_value(text: str, annotation: Any) -> Any:
    import json

    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(v, list):
        return tuple(v)
    if isinstance(v, int) and "float" in str(annotation) and "int" not in str(annotation):
        return float(v)
    return v


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `key=value` strings (CLI style) to any frozen dataclass config."""
    if not overrides:
        return cfg
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        if k not in types:
            raise ConfigError(f"{type(cfg).__name__} has no field {k!r}; fields: {sorted(types)}")
        changes[k] = _parse_value(v, types[k])
    return dataclasses.replace(cfg, **changes)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over axes ("data", "fsdp", "tensor"); one -1 fills the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(isinstance(s, int) and (s == -1 or s >= 1) for s in sizes),
               f"MeshConfig sizes must be positive ints or -1, got {sizes}")
        _check(sum(s == -1 for s in sizes) <= 1, f"MeshConfig: at most one size may be -1, got {sizes}")


@dataclass(frozen=True)
class DecodeConfig:
    """Sampling and buffer settings for generation."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    max_cache_len: int | None = None  # context tokens the KV cache holds (prompt + generated); None: max_len
    prompt_bucket: int = 64  # prompt lengths are padded up to a multiple of this
    # Batches in flight in `Generator.generate_many`: while one decodes a chunk on the device, the
    # retrievals of the others run on the host (1 = one batch after another).
    pipeline: int = 2
    # Size the KV cache per round (prompt + tokens so far + the round's, up to a multiple of
    # chunk_size), growing it between rounds: a decoding step attends over every cache slot, so
    # early rounds run faster. One compiled round per cache size; False: one size for the call.
    grow_cache: bool = True

    def __post_init__(self) -> None:
        _check(self.pipeline >= 1, f"DecodeConfig.pipeline must be >= 1, got {self.pipeline}")
        _check(self.max_new_tokens >= 0, f"DecodeConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"DecodeConfig.temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"DecodeConfig.top_k must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, f"DecodeConfig.top_p must be in (0, 1], got {self.top_p}")
        _check((self.max_cache_len is None or self.max_cache_len > 0) and self.prompt_bucket > 0,
               "DecodeConfig.max_cache_len and prompt_bucket must be positive")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings for one training stage."""

    stage: Literal["warmup", "continual"] = "warmup"
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # warmup-stable-decay: last fraction of steps decays
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    memory_grad: bool = True  # gradients through the memory write path (continual stage)
    memory_lookback: int = 4  # chunk c sees the memories of chunks c-lookback..c in training
    # Microbatches per step: the batch is split in `grad_accum` parts whose gradients are summed
    # in a scan before one update (same update as the whole batch, a fraction of the activations).
    grad_accum: int = 1
    # Low-rank adaptation: with lora_rank > 0 only LoRA factors of the `lora_targets` weights are
    # trained (base weights frozen; see m3jax.model.lora); 0 trains every parameter. A target is a
    # parameter name (every stack) or "mem_blocks/<name>" / "blocks/<name>".
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the factors' scale is lora_alpha / lora_rank; 0 means 2 * lora_rank
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        _check(self.stage in ("warmup", "continual"), f"TrainConfig.stage must be warmup|continual, got {self.stage!r}")
        for f in ("seq_len", "batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, f) > 0, f"TrainConfig.{f} must be > 0, got {getattr(self, f)}")
        _check(self.lr > 0, f"TrainConfig.lr must be > 0, got {self.lr}")
        _check(0 <= self.warmup_steps <= self.steps, "TrainConfig.warmup_steps must be in [0, steps]")
        _check(0 <= self.decay_fraction <= 1, "TrainConfig.decay_fraction must be in [0, 1]")
        _check(self.memory_lookback >= 0, "TrainConfig.memory_lookback must be >= 0")
        _check(self.lora_rank >= 0, f"TrainConfig.lora_rank must be >= 0, got {self.lora_rank}")
        _check(self.lora_alpha >= 0, f"TrainConfig.lora_alpha must be >= 0, got {self.lora_alpha}")
        if not isinstance(self.lora_targets, tuple):  # lists from JSON / the CLI
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
               f"TrainConfig.grad_accum ({self.grad_accum}) must be >= 1 and divide batch_size ({self.batch_size})")

    @property
    def lora_scale_alpha(self) -> float:
        """The LoRA alpha in use (lora_alpha, or 2 * lora_rank when it is 0)."""
        return self.lora_alpha or 2.0 * self.lora_rank
