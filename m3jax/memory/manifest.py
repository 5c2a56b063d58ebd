"""The manifest of a memory bank: what a bank holds and for which model, and the layout of its
arrays.

    manifest.json     format + version, model config, codec (name, head_dim, options), the sha256
                      of codec.npz, the weights fingerprint, shard size, committed `count`
    codec.npz         codec arrays (pq codebooks), absent for bf16 / f32 / int8
    codes/            zarr3 [capacity, *code_shape] code dtype: one memory per inner chunk, memory
                      id = dim 0, `sharding_indexed` shards of `shard_size` memories
    mask/             zarr3 [capacity, E] bool: valid token slots of each memory
    refs/tokens/      zarr3 [capacity, R] int32: the reference token ids, padded with pad_id
    refs/info/        zarr3 [capacity, 4] int64: (length, doc_id, char_start, char_end)

What a manifest says is checked (`parse_manifest`) before anything is sized from it. A bank serves
any model config whose `MEMORY_FIELDS` agree with the one that wrote it (`compare_configs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any

import numpy as np
import tensorstore as ts

from m3jax.config import RUNTIME_FIELDS, ModelConfig
from m3jax.memory.codec import Codec, CodecError
from m3jax.memory.errors import BankConfigError, BankCorruptError, BankError
from m3jax.memory.references import INFO_FIELDS
from m3jax.memory.store import read_key, write_key

FORMAT = "m3jax.memory_bank"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
CODEC_KEY = "codec.npz"

# ModelConfig fields that matter only when memories are read (how many, per how many tokens, when to
# stop) or how the model runs (RUNTIME_FIELDS): a bank written under one value serves the others.
READ_FIELDS = RUNTIME_FIELDS + ("chunk_size", "memories_per_chunk", "eos_id", "tie_embeddings")
# ModelConfig fields that change what a memory holds (shapes, or the values the memory layers
# compute): every other field. A bank written before a field existed reads back with the field's
# default (the plain Llama).
MEMORY_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in READ_FIELDS)
SHAPE_FIELDS = ("memory_layers", "num_kv_heads", "tokens_per_memory", "head_dim", "reference_len")


def default_shard_size(memory_bytes: int, target_bytes: int = 64 << 20) -> int:
    """Memories per shard: the largest power of two with shards <= ~64 MiB, in [16, 65536]
    (memory3-2b: 128 bf16 memories = 55 MiB, 1024 pq memories = 38 MiB)."""
    n = max(1, target_bytes // max(1, memory_bytes))
    return int(min(65536, max(16, 1 << (n.bit_length() - 1))))


def array_layout(config: ModelConfig, codec: Codec, shard: int) -> dict[str, tuple[list[int], np.dtype, bool]]:
    """The arrays of a bank: name -> (initial shape [shard, ...], dtype, sharded: one memory per
    inner chunk)."""
    E, R = config.tokens_per_memory, config.reference_len
    return {"codes": ([shard] + list(codec.code_shape(config)), codec.code_dtype, True),
            "mask": ([shard, E], np.dtype(bool), False),
            "refs/tokens": ([shard, R], np.dtype(np.int32), False),
            "refs/info": ([shard, len(INFO_FIELDS)], np.dtype(np.int64), False)}


def dump(manifest: dict[str, Any]) -> bytes:
    """The stored bytes of a manifest."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A stored manifest, checked: format and version, the keys and their types, `count` and
    `shard_size` integers."""
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BankCorruptError(f"{where}: {MANIFEST_KEY} is not valid JSON ({e}); it was truncated "
                               f"or overwritten") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BankCorruptError(f"{where}: {MANIFEST_KEY} is not an m3jax memory bank manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise BankError(f"{where}: bank format version {m.get('format_version')!r}; this m3jax reads "
                        f"version {FORMAT_VERSION}")
    need = ("config", "codec", "fingerprint", "count", "shard_size", "code_shape")
    missing = [k for k in need if k not in m]
    if missing:
        raise BankCorruptError(f"{where}: {MANIFEST_KEY} lacks {missing}")
    for key, low in (("count", 0), ("shard_size", 1)):
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BankCorruptError(f"{where}: {MANIFEST_KEY} has a bad {key} {v!r} (an integer >= {low})")
    kinds = {"config": dict, "codec": dict, "fingerprint": str, "code_shape": list}
    bad = [f"{k} is a {type(m[k]).__name__}" for k, t in kinds.items() if not isinstance(m[k], t)]
    if bad:
        raise BankCorruptError(f"{where}: {MANIFEST_KEY} is malformed: {', '.join(bad)}")
    return m


def compare_configs(stored: ModelConfig, given: ModelConfig, where: str) -> None:
    """Raise BankConfigError when `given` would compute other memories than `stored` (a
    MEMORY_FIELDS value differs)."""
    diffs = [(f, getattr(stored, f), getattr(given, f)) for f in MEMORY_FIELDS
             if getattr(stored, f) != getattr(given, f)]
    if diffs:
        shape = [d for d in diffs if d[0] in SHAPE_FIELDS]
        what = "memories of another shape" if shape else "memories of another model config"
        lines = ", ".join(f"{f}: bank {a!r} vs given {b!r}" for f, a, b in diffs)
        raise BankConfigError(f"{where} holds {what} (written for model {stored.name!r}): {lines}")


def codec_entry(kv: ts.KvStore, codec: Codec, base: dict[str, Any]) -> dict[str, Any]:
    """The manifest's codec entry; the codec's arrays (pq codebooks) are written to CODEC_KEY with
    their sha256 in the entry."""
    state = codec.state()
    entry: dict[str, Any] = {"name": state["name"], "head_dim": state["head_dim"], "options": state["options"]}
    if state["arrays"]:
        buf = io.BytesIO()
        np.savez(buf, **state["arrays"])
        data = buf.getvalue()
        write_key(kv, CODEC_KEY, data, base)
        entry.update(arrays_key=CODEC_KEY, arrays_sha256=hashlib.sha256(data).hexdigest(), arrays_bytes=len(data))
    return entry


def load_codec(kv: ts.KvStore, manifest: dict[str, Any], base: dict[str, Any], where: str) -> Codec:
    """The codec a manifest names, its arrays read and checked against their sha256."""
    entry = manifest["codec"]
    state = {"name": entry.get("name"), "head_dim": entry.get("head_dim"),
             "options": entry.get("options", {}), "arrays": {}}
    if entry.get("arrays_key"):
        data = read_key(kv, entry["arrays_key"], base)
        if data is None:
            raise BankCorruptError(f"{where}: codec arrays {entry['arrays_key']} are missing")
        if hashlib.sha256(data).hexdigest() != entry.get("arrays_sha256"):
            raise BankCorruptError(f"{where}: codec arrays {entry['arrays_key']} fail their sha256 "
                                   f"check (damaged or replaced)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                state["arrays"] = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - any unreadable npz
            raise BankCorruptError(f"{where}: codec arrays unreadable: {e}") from None
    try:
        return Codec.from_state(state)
    except (CodecError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise BankCorruptError(f"{where}: bad codec entry in the manifest: {e}") from None
