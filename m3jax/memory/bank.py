"""The memory bank: coded explicit memories and their reference metadata on TensorStore (zarr3).

A bank lives under one TensorStore kvstore location: a local path, a kvstore URL
(`"memory://name/"`, `"gs://bucket/path/"`, `"file:///abs/path/"`) or a kvstore JSON spec. Layout:

    manifest.json     format + version, model config, codec (name, head_dim, options), the sha256
                      of codec.npz, the weights fingerprint, shard size, committed `count`
    codec.npz         codec arrays (pq codebooks), absent for bf16 / f32 / int8
    codes/            zarr3 [capacity, *code_shape] code dtype: one memory per inner chunk, memory
                      id = dim 0, `sharding_indexed` shards of `shard_size` memories, crc32c on
                      every inner chunk and on the shard index (corrupt chunks fail loudly)
    mask/             zarr3 [capacity, T] bool: valid token slots of each memory
    refs/tokens/      zarr3 [capacity, R] int32: the reference token ids, padded with pad_id
    refs/info/        zarr3 [capacity, 4] int64: (length, doc_id, char_start, char_end)

Only `count` memories are committed: an append writes its data in one `ts.Transaction`, and only
once that transaction committed does it rewrite the manifest with the new count, so a crash never
commits a partial batch and the next writer simply overwrites anything past `count`. Arrays grow
with `resize` in whole shards. Missing chunks are never read as fill values
(`fill_missing_data_reads: false`): a lost or truncated shard raises `BankCorruptError`.

One writer at a time, enforced in the kvstore itself (so across processes and hosts). Every write
(`create`, each append) holds the writer lease `writer.lock`, taken with a conditional write
(TensorStore `if_equal` on the key's storage generation: only one taker wins) and deleted
conditionally when the write ends. Under the lease a writer first checks that the manifest is
still the one it read (another writer may have committed since), and only then writes rows past
`count` and commits the manifest, again conditionally. So a losing writer fails with
`BankLockedError` (lease held) or a BankError naming the other writer (manifest changed) before it
has written anything, and no committed row is ever written twice. A lease left by a killed writer
is taken over when its process is gone (same host: pid and start time) or, from another host,
when it is older than `LOCK_TTL_S` (`break_lease` removes one at once, when you know its writer
died). `create` never deletes a committed bank (one with a
manifest). Any number of readers.

What a manifest says is checked against what the store holds before anything is sized from it:
`count` (an int, not a bool) must be covered by the arrays and by the shards actually listed.
Non-finite memories (NaN / inf) are refused on append. All banks of a process share one
`ts.Context` (`default_context()`: a cache pool, so shard indexes and recent memories are cached,
and one in-memory kvstore, so `memory://` banks can be reopened within the process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from m3jax.config import ModelConfig
from m3jax.memory.codec import Codec, CodecError, PQCodec, make_codec, memory_bytes
from m3jax.model.memory import MemoryKV

Array = jax.Array

FORMAT = "m3jax.memory_bank"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
CODEC_KEY = "codec.npz"
LOCK_KEY = "writer.lock"
LOCK_FORMAT = "m3jax.bank_writer_lease"
LOCK_TTL_S = 15 * 60  # a lease of another host older than this is taken over (its writer died)
INFO_FIELDS = ("length", "doc_id", "char_start", "char_end")

# ModelConfig fields that change what a memory holds (shapes, or the values the memory layers
# compute). The other fields (name, max_len, chunk_size, memories_per_chunk, eos_id, dtype,
# param_dtype, tie_embeddings) only matter when reading, so a bank serves any of their values.
# A bank written before a field existed reads back with the field's default (the plain Llama).
MEMORY_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden",
                 "mlp_dim", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor", "rope_original_max_len", "rope_freq_factors", "qkv_bias", "qk_norm", "norm_eps",
                 "bos_id", "pad_id", "memory_layers", "tokens_per_memory", "reference_len",
                 "reference_prefix", "score", "group_reduce")
SHAPE_FIELDS = ("memory_layers", "num_kv_heads", "tokens_per_memory", "head_dim", "reference_len")


# ---------------------------------------------------------------------- errors
class BankError(Exception):
    """Base class of memory bank errors."""


class BankNotFoundError(BankError, FileNotFoundError):
    """No bank (no manifest and no data) at the path."""


class BankExistsError(BankError, FileExistsError):
    """A bank already exists where `create(..., exist_ok=False)` was asked to make one."""


class BankConfigError(BankError):
    """The bank was written for another model config or with another codec."""


class BankFingerprintError(BankConfigError):
    """The bank was written by other weights (the params fingerprint differs)."""


class BankCorruptError(BankError):
    """The store is truncated or damaged: bad manifest, missing shards, checksum mismatch."""


class BankReadOnlyError(BankError, PermissionError):
    """A write on a bank opened with mode="r"."""


class BankIndexError(BankError, IndexError):
    """A memory id outside [0, len(bank))."""


class BankLockedError(BankError):
    """Another writer holds the bank's writer lease (one writer at a time)."""


# ---------------------------------------------------------------------- metadata
@dataclasses.dataclass
class ReferenceMeta:
    """Metadata of N memories (NumPy).

    tokens [N, R] int32 (reference token ids, padded with pad_id), lengths [N] int32,
    doc_id [N] int64, char_start [N] int64, char_end [N] int64 (character span in the document).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_id: np.ndarray
    char_start: np.ndarray
    char_end: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def take(self, idx: Any) -> "ReferenceMeta":
        return ReferenceMeta(*(np.asarray(getattr(self, f.name))[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(items: "Sequence[ReferenceMeta]") -> "ReferenceMeta":
        return ReferenceMeta(*(np.concatenate([getattr(m, f.name) for m in items])
                               for f in dataclasses.fields(ReferenceMeta)))

    def info(self) -> np.ndarray:
        """[N, 4] int64: (length, doc_id, char_start, char_end), the stored layout."""
        return np.stack([self.lengths, self.doc_id, self.char_start, self.char_end], 1).astype(np.int64)

    @classmethod
    def from_info(cls, tokens: np.ndarray, info: np.ndarray) -> "ReferenceMeta":
        return cls(tokens, info[:, 0].astype(np.int32), info[:, 1], info[:, 2], info[:, 3])

    @classmethod
    def coerce(cls, meta: "ReferenceMeta | dict[str, Any]", n: int, reference_len: int,
               pad_id: int = 0) -> "ReferenceMeta":
        """Validate (and convert a dict with the field names) for n memories of R tokens; shorter
        token rows are padded with `pad_id`."""
        if isinstance(meta, dict):
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
            if missing:
                raise BankError(f"metadata dict lacks {missing}; it needs tokens [N, R], lengths, "
                                f"doc_id, char_start, char_end [N]")
            meta = cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})
        tokens = np.asarray(meta.tokens)
        if tokens.ndim != 2 or tokens.shape[0] != n or tokens.shape[1] > reference_len:
            raise BankError(f"metadata tokens of shape {tokens.shape}: expected [{n}, <= {reference_len}]")
        if tokens.shape[1] < reference_len:
            tokens = np.pad(tokens, ((0, 0), (0, reference_len - tokens.shape[1])), constant_values=pad_id)
        out = [tokens.astype(np.int32)]
        for f, dt in (("lengths", np.int32), ("doc_id", np.int64), ("char_start", np.int64),
                      ("char_end", np.int64)):
            a = np.asarray(getattr(meta, f))
            if a.shape != (n,):
                raise BankError(f"metadata {f} of shape {a.shape}: expected ({n},)")
            if not np.issubdtype(a.dtype, np.integer):
                raise BankError(f"metadata {f} must hold integers, got dtype {a.dtype}")
            out.append(a.astype(dt))
        m = cls(*out)
        if np.any(m.lengths < 0) or np.any(m.lengths > reference_len):
            raise BankError(f"metadata lengths must be in [0, {reference_len}], got {m.lengths}")
        return m

    @classmethod
    def from_records(cls, records: Sequence[Any], reference_len: int, pad_id: int) -> "ReferenceMeta":
        """From reference records (dicts or objects with tokens|token_ids, doc_id, char_start,
        char_end); tokens are padded with pad_id to reference_len."""
        n = len(records)
        tokens = np.full((n, reference_len), pad_id, np.int32)
        lengths = np.zeros(n, np.int32)
        info = np.zeros((n, 3), np.int64)
        for i, r in enumerate(records):
            t = _field(r, "tokens", "token_ids")
            if len(t) > reference_len:
                raise BankError(f"reference {i} has {len(t)} tokens, more than reference_len={reference_len}")
            if len(t) == 0:
                raise BankError(f"reference {i} has no tokens")
            tokens[i, : len(t)] = t
            lengths[i] = len(t)
            info[i] = (_field(r, "doc_id"), _field(r, "char_start"), _field(r, "char_end"))
        return cls(tokens, lengths, info[:, 0], info[:, 1], info[:, 2])


def _field(rec: Any, *names: str) -> Any:
    for n in names:
        if isinstance(rec, dict):
            if n in rec:
                return rec[n]
        elif hasattr(rec, n):
            return getattr(rec, n)
    raise BankError(f"reference record {type(rec).__name__} has no field {' or '.join(names)}")


# ---------------------------------------------------------------------- fingerprint
def _leaf_digest(x: Any, max_elements: int) -> bytes:
    """Bytes that identify one leaf: its values if small, else a strided sample of them plus two
    position-weighted uint32 checksums of every element's bits (integer sums: exact and the same
    however the array is sharded or reduced)."""
    a = x if isinstance(x, jax.Array) else np.asarray(x)
    size = int(np.prod(a.shape)) if a.ndim else 1
    if size <= max_elements:
        return np.ascontiguousarray(np.asarray(a)).tobytes()
    stride = math.ceil(size / max_elements)
    sample = np.ascontiguousarray(np.asarray(a.reshape(-1)[::stride])).tobytes()
    bits = _as_uint32_bits(a)
    return sample + np.asarray(_checksums(bits), np.uint32).tobytes()


def _as_uint32_bits(a: Any) -> Any:
    isz = np.dtype(a.dtype).itemsize
    xp = jnp if isinstance(a, jax.Array) else np
    flat = a.reshape(-1)
    if isz == 8:
        if isinstance(a, jax.Array):  # 64-bit jax arrays exist only with x64 on
            flat = jax.lax.bitcast_convert_type(flat, jnp.uint32).reshape(-1)
        else:
            flat = np.ascontiguousarray(flat).view(np.uint32)
        return flat
    ut = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}[isz]
    if isinstance(a, jax.Array):
        return jax.lax.bitcast_convert_type(flat, ut).astype(jnp.uint32)
    return np.ascontiguousarray(flat).view(ut).astype(np.uint32)


@jax.jit
def _checksums_jax(bits: Array) -> Array:
    pos = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * pos, dtype=jnp.uint32)])


def _checksums(bits: Any) -> Any:
    if isinstance(bits, jax.Array):
        return _checksums_jax(bits)
    with np.errstate(over="ignore"):
        pos = np.arange(bits.shape[0], dtype=np.uint32) * np.uint32(2654435761) + np.uint32(1)
        return np.array([np.sum(bits, dtype=np.uint32), np.sum(bits * pos, dtype=np.uint32)], np.uint32)


def params_fingerprint(params: Any, *, max_leaf_elements: int = 1 << 20) -> str:
    """A stable hash of a params pytree: "sha256:<64 hex>".

    Hashes, per leaf in tree order: its key path (so dict/FrozenDict containers with the same
    keys agree), shape, dtype and values. Leaves above `max_leaf_elements` elements contribute a
    strided sample of at most that many values plus two position-weighted uint32 checksums of the
    bits of *every* element (computed on device for jax arrays), so any weight update changes the
    fingerprint while hashing a 2.4B model reads ~one sample per leaf to the host. Leaves must be
    fully addressable (single host).
    """
    h = hashlib.sha256(b"m3jax.params_fingerprint.v1\0")
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        a = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        head = f"{jax.tree_util.keystr(path)}|{tuple(a.shape)}|{np.dtype(a.dtype).name}\0"
        h.update(head.encode())
        h.update(_leaf_digest(a, max_leaf_elements))
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------- tensorstore helpers
_DEFAULT_CONTEXT: ts.Context | None = None


def default_context() -> ts.Context:
    """The process-wide TensorStore context shared by all banks (256 MiB cache pool)."""
    global _DEFAULT_CONTEXT
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})
    return _DEFAULT_CONTEXT


def kvstore_spec(path: "str | dict[str, Any]") -> dict[str, Any]:
    """A kvstore JSON spec for a local path, a kvstore URL or a spec; its path ends with "/"."""
    if isinstance(path, dict):
        spec = dict(path)
    elif isinstance(path, ts.KvStore.Spec):
        spec = path.to_json()
    else:
        path = str(path)
        if "://" in path:
            spec = ts.KvStore.Spec(path).to_json()
        else:
            spec = {"driver": "file", "path": os.path.abspath(path)}
    p = spec.get("path", "")
    if p and not p.endswith("/"):
        spec["path"] = p + "/"
    return spec


def _sub(base: dict[str, Any], sub: str) -> dict[str, Any]:
    spec = dict(base)
    spec["path"] = base.get("path", "") + sub
    return spec


def _describe(base: dict[str, Any]) -> str:
    try:
        return ts.KvStore.Spec(base).url
    except Exception:  # noqa: BLE001 - any spec without a URL form
        return json.dumps(base)


_CORRUPT_CODES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INVALID_ARGUMENT")


def _ts_error(where: str, e: Exception) -> BankError:
    msg = str(e)
    if msg.startswith(_CORRUPT_CODES) or "checksum" in msg.lower() or "crc32c" in msg.lower():
        return BankCorruptError(f"{where}: the store is damaged or truncated: {msg}")
    return BankError(f"{where}: {msg}")


def _zarr_dtype(dt: np.dtype) -> str:
    return np.dtype(dt).name  # zarr v3 names the numpy / ml_dtypes types as numpy does


def _array_spec(kv: dict[str, Any], shape: Sequence[int], dtype: np.dtype, rows: int,
                sharded: bool) -> dict[str, Any]:
    """zarr3 spec: chunks of `rows` memories; sharded -> one memory per inner chunk."""
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    chunk = [rows] + list(shape[1:])
    if sharded:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1] + list(shape[1:]), "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
    else:
        codecs = inner
    return {"driver": "zarr3", "kvstore": kv,
            "metadata": {"shape": list(shape), "data_type": _zarr_dtype(dtype),
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                         "codecs": codecs},
            "store_data_equal_to_fill_value": True, "fill_missing_data_reads": False}


def default_shard_size(memory_bytes: int, target_bytes: int = 64 << 20) -> int:
    """Memories per shard: the largest power of two with shards <= ~64 MiB, in [16, 65536]
    (memory3-2b: 128 bf16 memories = 55 MiB, 1024 pq memories = 38 MiB)."""
    n = max(1, target_bytes // max(1, memory_bytes))
    return int(min(65536, max(16, 1 << (n.bit_length() - 1))))


# ---------------------------------------------------------------------- the writer lease
def _host_id() -> str:
    """This machine: host name and kernel boot id (pids are only comparable within one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _process_start(pid: int) -> str | None:
    """Start time of process `pid` (clock ticks since boot, /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass  # exists (owned by another user)
    now = _process_start(pid)
    return start is None or now is None or now == start


class _WriterLease:
    """`with _WriterLease(kv, base):` holds the bank's writer lease (see the module docstring)."""

    def __init__(self, kv: ts.KvStore, base: dict[str, Any]) -> None:
        self._kv, self._base, self._gen = kv, base, b""

    def __enter__(self) -> "_WriterLease":
        pid = os.getpid()
        me = {"format": LOCK_FORMAT, "host": _host_id(), "pid": pid, "start": _process_start(pid),
              "token": uuid.uuid4().hex, "since": time.time()}
        for _ in range(3):  # another taker may win a race for a stale lease: look again
            raw, gen = _read_key_gen(self._kv, LOCK_KEY, self._base)
            if raw is not None:
                holder = _parse_lease(raw)
                if holder is not None and not _lease_stale(holder):
                    raise BankLockedError(
                        f"memory bank at {_describe(self._base)} is being written by process "
                        f"{holder['pid']} on {holder['host'].split('/')[0]} (since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}): "
                        f"one writer at a time")
            try:
                g = self._kv.write(LOCK_KEY, json.dumps(me).encode(), if_equal=gen).result()
            except ValueError as e:
                raise BankError(f"writing {LOCK_KEY} of {_describe(self._base)}: {e}") from None
            if g.generation:
                self._gen = bytes(g.generation)
                return self
        raise BankLockedError(f"memory bank at {_describe(self._base)}: another writer took the writer "
                              f"lease first: one writer at a time")

    def __exit__(self, *exc: Any) -> None:
        try:  # only our own lease: a taken-over one is left to its new holder
            self._kv.write(LOCK_KEY, None, if_equal=self._gen).result()
        except ValueError:
            pass


def _parse_lease(raw: bytes) -> dict[str, Any] | None:
    """The lease record, or None when it is not one (then it is taken over)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    ok = (isinstance(rec, dict) and rec.get("format") == LOCK_FORMAT and isinstance(rec.get("host"), str)
          and isinstance(rec.get("pid"), int) and isinstance(rec.get("since"), (int, float))
          and isinstance(rec.get("start"), (str, type(None))))
    return rec if ok else None


def _lease_stale(rec: dict[str, Any]) -> bool:
    """Whether the writer that took lease `rec` is gone: on this machine its process is not
    running (pid and start time); from another machine, the lease is older than LOCK_TTL_S."""
    if rec["host"] == _host_id():
        return not _process_alive(rec["pid"], rec["start"])
    return time.time() - float(rec["since"]) > LOCK_TTL_S


def break_lease(path: "str | dict[str, Any]", context: ts.Context | None = None) -> bool:
    """Remove a bank's writer lease whatever holds it (after a writer on another host died, to
    resume before LOCK_TTL_S passes). Only when no writer is running. Returns whether one was there."""
    base = kvstore_spec(path)
    kv = _open_kvstore(base, context or default_context())
    raw = _read_key(kv, LOCK_KEY, base)
    if raw is not None:
        _write_key(kv, LOCK_KEY, None, base)
    return raw is not None


def _check_finite(kv: Any, where: str) -> None:
    """Refuse memories that hold NaN or inf (computed on device for jax arrays)."""
    if isinstance(kv, jax.Array):
        ok = bool(jnp.all(jnp.isfinite(kv)))
    else:
        ok = bool(np.all(np.isfinite(np.asarray(kv, np.float32))))
    if not ok:
        raise BankError(f"{where}: the memories hold NaN or inf values (out-of-range token ids or a "
                        f"diverged model?): a bank stores finite memories only")


# ---------------------------------------------------------------------- the bank
class PendingGather:
    """Reads in flight (from `MemoryBank.gather_codes_async`); `result()` -> (codes, mask)."""

    def __init__(self, bank: "MemoryBank", futures: list[Any], inverse: np.ndarray | None, ids: np.ndarray):
        self._bank, self._futures, self._inv, self._ids = bank, futures, inverse, ids

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            codes, mask = (f.result() for f in self._futures)
        except ValueError as e:
            raise _ts_error(f"bank {self._bank.url}: reading memories {self._ids[:8].tolist()}"
                            f"{'...' if len(self._ids) > 8 else ''}", e) from None
        if self._inv is not None:
            codes, mask = codes[self._inv], mask[self._inv]
        return codes, mask


class MemoryBank:
    """Coded memories + reference metadata on TensorStore; see the module docstring.

    Use `MemoryBank.create` / `MemoryBank.open` (or `build_bank`), not the constructor.
    """

    def __init__(self, *, base: dict[str, Any], context: ts.Context, manifest: dict[str, Any],
                 config: ModelConfig, codec: Codec, arrays: dict[str, ts.TensorStore],
                 kv: ts.KvStore, writable: bool, generation: bytes) -> None:
        self._base, self._context, self._manifest = base, context, manifest
        self._generation = generation  # of the manifest we last read or wrote
        self._config, self._codec, self._arrays, self._kv = config, codec, arrays, kv
        self._writable = writable
        self._count = int(manifest["count"])
        self._capacity = min(int(a.shape[0]) for a in arrays.values())

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def shard_size(self) -> int:
        return int(self._manifest["shard_size"])

    @property
    def url(self) -> str:
        return _describe(self._base)

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"MemoryBank({self.url!r}, {self._count} memories, codec={self._codec!r}, "
                f"model={self._config.name!r})")

    @property
    def bytes_per_memory(self) -> int:
        """Stored code bytes of one memory (what the paper counts)."""
        return self._codec.memory_bytes(self._config)

    @property
    def metadata_bytes_per_memory(self) -> int:
        c = self._config
        return c.tokens_per_memory + 4 * c.reference_len + 8 * len(INFO_FIELDS)

    @property
    def codec_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self._codec.state()["arrays"].values())

    @property
    def nbytes(self) -> int:
        """Logical bytes of the committed bank: codes + masks + metadata + codec arrays."""
        return self._count * (self.bytes_per_memory + self.metadata_bytes_per_memory) + self.codec_bytes

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "count": self._count, "model": self._config.name,
                "codec": self._codec.name, "codec_options": self._codec.options(),
                "bytes_per_vector": self._codec.bytes_per_vector,
                "bytes_per_memory": self.bytes_per_memory,
                "metadata_bytes_per_memory": self.metadata_bytes_per_memory,
                "code_bytes": self._count * self.bytes_per_memory, "codec_bytes": self.codec_bytes,
                "nbytes": self.nbytes, "shard_size": self.shard_size, "fingerprint": self.fingerprint}

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: "str | dict[str, Any]", config: ModelConfig, codec: "str | Codec" = "bf16",
               fingerprint: str = "", *, shard_size: int | None = None, exist_ok: bool = False,
               context: ts.Context | None = None) -> "MemoryBank":
        """Create an empty bank (opened for appending).

        `codec`: a name ("bf16", "int8", "f32"; "pq" needs a fitted PQCodec) or a Codec.
        `shard_size`: memories per shard (default `default_shard_size`, ~64 MiB shards).
        exist_ok: if a bank is already there, open it for appending instead, after checking that
        its config, fingerprint and codec format match (else BankConfigError /
        BankFingerprintError); without it an existing bank raises BankExistsError.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BankError("MemoryBank.create needs a non-empty fingerprint string "
                            "(params_fingerprint(params) of the weights that write the memories)")
        codec = make_codec(codec, config.head_dim)
        if not config.memory_enabled:
            raise BankConfigError(f"model {config.name!r} has memory disabled (memory_layers=0 or "
                                  f"reference_prefix=None): it writes no memories")
        context = context or default_context()
        base = kvstore_spec(path)
        kv = _open_kvstore(base, context)
        if _read_key(kv, MANIFEST_KEY, base) is None:
            with _WriterLease(kv, base):
                # under the lease: nobody else creates or appends; look again, then never delete a
                # committed bank (one with a manifest)
                raw, gen = _read_key_gen(kv, MANIFEST_KEY, base)
                if raw is None:
                    return cls._create_new(base, kv, gen, config, codec, fingerprint, shard_size, context)
        if not exist_ok:
            raise BankExistsError(f"a memory bank already exists at {_describe(base)}; open it "
                                  f"with MemoryBank.open, or pass exist_ok=True to append to it")
        bank = cls.open(path, config, fingerprint, mode="a", context=context)
        bank._check_codec_compatible(codec)
        return bank

    @classmethod
    def _create_new(cls, base: dict[str, Any], kv: ts.KvStore, absent: bytes, config: ModelConfig,
                    codec: Codec, fingerprint: str, shard_size: int | None, context: ts.Context
                    ) -> "MemoryBank":
        """The arrays and manifest of a new bank (the caller holds the writer lease and saw no
        manifest, whose generation `absent` the manifest write is conditioned on)."""
        if not codec.fitted:
            raise CodecError(f"{codec!r} is not fitted; fit it on sample memories first "
                             f"(build_bank does this for codec='pq')")
        mem_bytes = codec.memory_bytes(config)
        if mem_bytes != memory_bytes(config, codec.name, **codec.options()):
            raise CodecError(f"{codec!r}: code bytes {mem_bytes} disagree with bytes_per_vector")
        shard = int(shard_size or default_shard_size(mem_bytes))
        if shard < 1:
            raise BankError(f"shard_size must be >= 1, got {shard_size}")
        state = codec.state()
        codec_entry: dict[str, Any] = {"name": state["name"], "head_dim": state["head_dim"],
                                       "options": state["options"]}
        if state["arrays"]:
            buf = io.BytesIO()
            np.savez(buf, **state["arrays"])
            data = buf.getvalue()
            _write_key(kv, CODEC_KEY, data, base)
            codec_entry.update(arrays_key=CODEC_KEY, arrays_sha256=hashlib.sha256(data).hexdigest(),
                               arrays_bytes=len(data))
        arrays = {}
        for name, (shape, dtype, sharded) in _array_layout(config, codec, shard).items():
            spec = _array_spec(_sub(base, name + "/"), shape, dtype, shard, sharded)
            try:
                arrays[name] = ts.open(spec, create=True, delete_existing=True, context=context).result()
            except ValueError as e:
                raise BankError(f"creating array {name!r} of bank {_describe(base)}: {e}") from None
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
            "codec": codec_entry, "fingerprint": fingerprint, "count": 0, "shard_size": shard,
            "code_shape": list(codec.code_shape(config)), "code_dtype": codec.code_dtype.name,
            "bytes_per_memory": mem_bytes, "arrays": sorted(arrays), "created": now, "updated": now,
        }
        # last: its presence marks a bank; conditional: never over another bank's manifest
        gen = _write_key(kv, MANIFEST_KEY, _dump(manifest), base, if_equal=absent)
        return cls(base=base, context=context, manifest=manifest, config=config, codec=codec,
                   arrays=arrays, kv=kv, writable=True, generation=gen)

    @classmethod
    def open(cls, path: "str | dict[str, Any]", config: ModelConfig | None = None,
             fingerprint: str | None = None, *, mode: str = "r", check: str = "shards",
             context: ts.Context | None = None) -> "MemoryBank":
        """Open a bank; mode "r" (read-only, default) or "a" (append).

        Raises BankNotFoundError (nothing there), BankConfigError (written for another model config:
        a MEMORY_FIELDS value differs), BankFingerprintError (written by other weights),
        BankCorruptError (manifest missing / unparseable, codec arrays damaged, arrays shorter than
        the committed count, missing shards). check: "shards" (default: list the stored shards and
        require every committed one), "full" (also read and checksum every committed chunk, see
        `verify`) or "none".
        """
        if mode not in ("r", "a"):
            raise BankError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        if check not in ("none", "shards", "full"):
            raise BankError(f"check must be 'none', 'shards' or 'full', got {check!r}")
        context = context or default_context()
        base = kvstore_spec(path)
        where = f"memory bank at {_describe(base)}"
        kv = _open_kvstore(base, context)
        raw, gen = _read_key_gen(kv, MANIFEST_KEY, base)
        if raw is None:
            try:
                keys = kv.list().result()
            except ValueError:
                keys = []
            if keys:
                raise BankCorruptError(f"{where}: {MANIFEST_KEY} is missing but the store holds "
                                       f"{len(keys)} keys (e.g. {keys[0].decode(errors='replace')!r}): "
                                       f"its creation was interrupted or the manifest was deleted")
            raise BankNotFoundError(f"no memory bank at {_describe(base)} (no {MANIFEST_KEY})")
        manifest = _parse_manifest(raw, where)
        try:
            stored = ModelConfig.from_dict(manifest["config"])
        except Exception as e:  # noqa: BLE001 - any bad config in the manifest
            raise BankCorruptError(f"{where}: the manifest's model config is invalid: {e}") from None
        if config is not None:
            _compare_configs(stored, config, where)
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise BankFingerprintError(
                f"{where}: this bank was written by other weights (fingerprint "
                f"{manifest['fingerprint']!r}), not by the weights given ({fingerprint!r}); its "
                f"memories would be wrong for this model: rebuild the bank with build_bank")
        cfg = config if config is not None else stored
        codec = _load_codec(kv, manifest, base, where)
        try:
            want_shape = list(codec.code_shape(cfg))
        except CodecError as e:
            raise BankCorruptError(f"{where}: the manifest's codec does not fit the model: {e}") from None
        if manifest.get("code_shape") != want_shape:
            raise BankCorruptError(f"{where}: manifest code_shape {manifest.get('code_shape')} does not "
                                   f"match codec {codec!r} for the model ({want_shape})")
        arrays = {}
        shard = int(manifest["shard_size"])
        count = int(manifest["count"])
        for name, (shape, dtype, _) in _array_layout(cfg, codec, shard).items():
            spec = _open_spec(base, name)
            try:
                a = ts.open(spec, open=True, read=True, write=mode == "a", context=context).result()
            except ValueError as e:
                raise _ts_error(f"{where}: opening array {name!r}", e) from None
            if tuple(a.shape[1:]) != tuple(shape[1:]) or a.dtype.numpy_dtype != np.dtype(dtype):
                raise BankCorruptError(f"{where}: array {name!r} is {a.dtype.name}{list(a.shape)}, "
                                       f"expected {np.dtype(dtype).name}[N, {', '.join(map(str, shape[1:]))}]")
            if a.shape[0] < count:
                raise BankCorruptError(f"{where}: array {name!r} holds {a.shape[0]} rows, fewer than the "
                                       f"{count} committed memories: the store is truncated")
            if a.chunk_layout.write_chunk.shape[0] != shard:
                raise BankCorruptError(f"{where}: array {name!r} is stored in shards of "
                                       f"{a.chunk_layout.write_chunk.shape[0]} memories, the manifest says {shard}")
            arrays[name] = a
        bank = cls(base=base, context=context, manifest=manifest, config=cfg, codec=codec,
                   arrays=arrays, kv=kv, writable=mode == "a", generation=gen)
        if check in ("shards", "full"):
            bank._check_shards()
        if check == "full":
            bank.verify()
        return bank

    def _check_codec_compatible(self, codec: Codec) -> None:
        mine = self._codec
        if codec.name != mine.name or codec.options() != mine.options():
            raise BankConfigError(f"bank at {self.url} stores codec {mine!r}, not {codec!r}")

    def _check_shards(self) -> None:
        """Every committed shard / chunk of every array exists in the store."""
        need = math.ceil(self._count / self.shard_size)
        if need == 0:
            return
        for name in self._arrays:
            kv = _open_kvstore(_sub(self._base, name + "/c/"), self._context)
            try:
                keys = kv.list().result()
            except ValueError as e:
                raise _ts_error(f"bank {self.url}: listing {name!r}", e) from None
            have = set()
            for k in keys:
                try:
                    i = int(k.split(b"/")[0])
                except ValueError:
                    continue
                if 0 <= i < need:
                    have.add(i)
            if len(have) < need:  # sized by the listing, never by the manifest's count
                first = next(i for i in range(need) if i not in have)
                s = self.shard_size
                raise BankCorruptError(
                    f"bank {self.url}: array {name!r} lacks {need - len(have)} of its {need} committed "
                    f"shards (e.g. shard {first}: memories {first * s}..{(first + 1) * s - 1}); "
                    f"the store is truncated or damaged")

    def verify(self, batch: int | None = None) -> dict[str, Any]:
        """Read every committed memory and its metadata (checksums verified); raises
        BankCorruptError naming the first damaged range. Returns {"count", "seconds"}."""
        t0 = time.perf_counter()
        step = int(batch or self.shard_size)
        for a in range(0, self._count, step):
            b = min(self._count, a + step)
            for name, arr in self._arrays.items():
                try:
                    arr[a:b].read().result()
                except ValueError as e:
                    raise _ts_error(f"bank {self.url}: array {name!r} memories {a}..{b - 1}", e) from None
        return {"count": self._count, "seconds": time.perf_counter() - t0}

    def refresh(self) -> int:
        """Re-read the manifest (another process may have appended); returns the new count."""
        raw, gen = _read_key_gen(self._kv, MANIFEST_KEY, self._base)
        if raw is None:
            raise BankCorruptError(f"bank {self.url}: {MANIFEST_KEY} disappeared")
        m = _parse_manifest(raw, f"bank {self.url}")
        if m["fingerprint"] != self.fingerprint or m["codec"] != self._manifest["codec"]:
            raise BankCorruptError(f"bank {self.url} was replaced by another bank while open")
        if int(m["count"]) > self._capacity:
            for name, a in list(self._arrays.items()):
                self._arrays[name] = ts.open(_open_spec(self._base, name), open=True, read=True,
                                             write=self._writable, context=self._context).result()
            self._capacity = min(int(a.shape[0]) for a in self._arrays.values())
        self._manifest, self._count, self._generation = m, int(m["count"]), gen
        return self._count

    # ------------------------------------------------------------------ writing
    def append(self, memories: MemoryKV, metadata: "ReferenceMeta | dict[str, Any]") -> np.ndarray:
        """Encode and append N memories (kv [N, Lm, 2, K, T, H], mask [N, T]) with their metadata.
        Returns their ids [N] int64 (consecutive). Commits before returning."""
        memories.check(self._config)
        _check_finite(memories.kv_NLZKTH, f"bank {self.url}")
        codes = self._codec.encode(memories.kv_NLZKTH)
        return self.append_codes(codes, np.asarray(memories.mask_NT), metadata)

    def append_codes(self, codes: np.ndarray, mask_NT: np.ndarray,
                     metadata: "ReferenceMeta | dict[str, Any]") -> np.ndarray:
        """Append already coded memories: codes [N, *code_shape], mask [N, T] bool, metadata."""
        if not self._writable:
            raise BankReadOnlyError(f"bank {self.url} was opened read-only; open it with mode='a'")
        codes = np.asarray(codes)
        n = codes.shape[0] if codes.ndim else 0
        want = tuple(self._manifest["code_shape"])
        if codes.ndim == 0 or tuple(codes.shape[1:]) != want or codes.dtype != self._codec.code_dtype:
            raise BankError(f"codes {codes.dtype}{list(codes.shape)}: expected "
                            f"{self._codec.code_dtype.name}[N, {', '.join(map(str, want))}]")
        mask = np.asarray(mask_NT, bool)
        if mask.shape != (n, self._config.tokens_per_memory):
            raise BankError(f"mask of shape {mask.shape}, expected ({n}, {self._config.tokens_per_memory})")
        meta = ReferenceMeta.coerce(metadata, n, self._config.reference_len, self._config.pad_id)
        start, end = self._count, self._count + n
        if n == 0:
            return np.zeros(0, np.int64)
        if not self._codec.codes_finite(codes):
            raise BankError(f"bank {self.url}: the codes decode to NaN or inf values: a bank stores "
                            f"finite memories only")
        with _WriterLease(self._kv, self._base):
            _, gen = _read_key_gen(self._kv, MANIFEST_KEY, self._base)
            if gen != self._generation:  # checked under the lease, before writing past our count
                raise BankError(f"bank {self.url}: {MANIFEST_KEY} was changed by someone else since "
                                f"this bank read it: another writer appended to it (one writer at a "
                                f"time; refresh() to continue after it)")
            self._ensure_capacity(end)
            data = {"codes": codes, "mask": mask, "refs/tokens": meta.tokens, "refs/info": meta.info()}
            txn = ts.Transaction()
            try:
                futs = [self._arrays[k].with_transaction(txn)[start:end].write(v) for k, v in data.items()]
                for f in futs:
                    f.copy.result()
                txn.commit_sync()
            except ValueError as e:
                if not txn.commit_started:
                    txn.abort()
                raise BankError(f"bank {self.url}: writing memories {start}..{end - 1} failed: {e}") from None
            self._commit(end)
        return np.arange(start, end, dtype=np.int64)

    def _ensure_capacity(self, end: int) -> None:
        if end <= self._capacity:
            return
        s = self.shard_size
        new = -(-end // s) * s
        for name, a in list(self._arrays.items()):
            try:
                self._arrays[name] = a.resize(exclusive_max=[new] + [None] * (a.rank - 1),
                                              expand_only=True).result()
            except ValueError as e:
                raise BankError(f"bank {self.url}: growing array {name!r} to {new} rows: {e}") from None
        self._capacity = new

    def _commit(self, count: int) -> None:
        m = dict(self._manifest)
        m["count"] = int(count)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._generation = _write_key(self._kv, MANIFEST_KEY, _dump(m), self._base,
                                      if_equal=self._generation)
        self._manifest, self._count = m, int(count)

    # ------------------------------------------------------------------ reading
    def _check_ids(self, ids: Any) -> np.ndarray:
        a = np.asarray(ids)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise BankIndexError(f"memory ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        bad = (a < 0) | (a >= self._count)
        if np.any(bad):
            raise BankIndexError(f"memory ids {a[bad][:8].tolist()} are outside [0, {self._count}) "
                                 f"of bank {self.url}")
        return a

    def gather_codes_async(self, ids: Any) -> PendingGather:
        """Start reading the codes and masks of `ids` (any order, repeats allowed); returns a
        PendingGather whose result() is (codes [n, *code_shape], mask [n, T]). The reads of one
        call are coalesced in one `ts.Batch` (sorted, deduplicated ids)."""
        ids = self._check_ids(ids)
        if ids.size == 0:
            futs = [_Done(np.zeros((0,) + tuple(self._manifest["code_shape"]), self._codec.code_dtype)),
                    _Done(np.zeros((0, self._config.tokens_per_memory), bool))]
            return PendingGather(self, futs, None, ids)
        uniq, inv = np.unique(ids, return_inverse=True)
        same = len(uniq) == len(ids) and bool(np.all(uniq == ids))
        try:
            with ts.Batch() as batch:
                futs = [self._arrays["codes"][uniq].read(batch=batch),
                        self._arrays["mask"][uniq].read(batch=batch)]
        except ValueError as e:
            raise _ts_error(f"bank {self.url}: reading memories", e) from None
        return PendingGather(self, futs, None if same else inv, ids)

    def gather_codes(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(codes [n, *code_shape] NumPy, mask [n, T] bool) of the memories `ids`, in order."""
        return self.gather_codes_async(ids).result()

    def decode(self, codes: Any, mask_NT: Any, dtype: Any = None) -> MemoryKV:
        """Codes from gather_codes -> MemoryKV on device (kv in `dtype`, default config.dtype)."""
        kv = self._codec.decode(codes, jnp.dtype(dtype or self._config.dtype))
        return MemoryKV(kv, jnp.asarray(mask_NT))

    def gather(self, ids: Any, dtype: Any = None) -> MemoryKV:
        """Memories `ids` (any order, repeats allowed) decoded on device: MemoryKV with
        kv [n, Lm, 2, K, T, H] in `dtype` (default config.dtype) and mask [n, T]."""
        codes, mask = self.gather_codes(ids)
        return self.decode(codes, mask, dtype)

    def metadata(self, ids: Any) -> ReferenceMeta:
        """ReferenceMeta of the memories `ids` (any order, repeats allowed)."""
        ids = self._check_ids(ids)
        uniq, inv = np.unique(ids, return_inverse=True)
        try:
            with ts.Batch() as batch:
                ft = self._arrays["refs/tokens"][uniq].read(batch=batch)
                fi = self._arrays["refs/info"][uniq].read(batch=batch)
            tokens, info = ft.result(), fi.result()
        except ValueError as e:
            raise _ts_error(f"bank {self.url}: reading metadata", e) from None
        return ReferenceMeta.from_info(tokens[inv], info[inv])


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _array_layout(config: ModelConfig, codec: Codec, shard: int) -> dict[str, tuple[list[int], np.dtype, bool]]:
    """name -> (initial shape, dtype, sharded)."""
    T, R = config.tokens_per_memory, config.reference_len
    return {"codes": ([shard] + list(codec.code_shape(config)), codec.code_dtype, True),
            "mask": ([shard, T], np.dtype(bool), False),
            "refs/tokens": ([shard, R], np.dtype(np.int32), False),
            "refs/info": ([shard, len(INFO_FIELDS)], np.dtype(np.int64), False)}


def _open_spec(base: dict[str, Any], name: str) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": _sub(base, name + "/"),
            "store_data_equal_to_fill_value": True, "fill_missing_data_reads": False}


def _open_kvstore(spec: dict[str, Any], context: ts.Context) -> ts.KvStore:
    try:
        return ts.KvStore.open(spec, context=context).result()
    except ValueError as e:
        raise BankError(f"cannot open kvstore {_describe(spec)}: {e}") from None


def _read_key(kv: ts.KvStore, key: str, base: dict[str, Any]) -> bytes | None:
    value, _ = _read_key_gen(kv, key, base)
    return value


def _read_key_gen(kv: ts.KvStore, key: str, base: dict[str, Any]) -> tuple[bytes | None, bytes]:
    """(value or None, storage generation)."""
    try:
        r = kv.read(key).result()
    except ValueError as e:
        raise _ts_error(f"reading {key} of {_describe(base)}", e) from None
    return (bytes(r.value) if r.state == "value" else None), bytes(r.stamp.generation)


def _write_key(kv: ts.KvStore, key: str, data: bytes | None, base: dict[str, Any],
               if_equal: bytes | None = None) -> bytes:
    """Write (None: delete; conditionally on the stored generation when if_equal); returns the
    new generation."""
    try:
        g = kv.write(key, data, if_equal=if_equal).result()
    except ValueError as e:
        raise BankError(f"writing {key} of {_describe(base)}: {e}") from None
    if if_equal is not None and not g.generation:
        raise BankError(f"{key} of {_describe(base)} was changed by someone else since this bank "
                        f"read it: another writer is appending to it (one writer at a time)")
    return bytes(g.generation)


def _dump(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
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


def _compare_configs(stored: ModelConfig, given: ModelConfig, where: str) -> None:
    diffs = [(f, getattr(stored, f), getattr(given, f)) for f in MEMORY_FIELDS
             if getattr(stored, f) != getattr(given, f)]
    if diffs:
        shape = [d for d in diffs if d[0] in SHAPE_FIELDS]
        what = "memories of another shape" if shape else "memories of another model config"
        lines = ", ".join(f"{f}: bank {a!r} vs given {b!r}" for f, a, b in diffs)
        raise BankConfigError(f"{where} holds {what} (written for model {stored.name!r}): {lines}")


def _load_codec(kv: ts.KvStore, manifest: dict[str, Any], base: dict[str, Any], where: str) -> Codec:
    entry = manifest["codec"]
    state = {"name": entry.get("name"), "head_dim": entry.get("head_dim"),
             "options": entry.get("options", {}), "arrays": {}}
    if entry.get("arrays_key"):
        data = _read_key(kv, entry["arrays_key"], base)
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


# ---------------------------------------------------------------------- building
EncodeFn = Callable[[np.ndarray, np.ndarray], MemoryKV]


def _reference_batch(refs: Sequence[Any], config: ModelConfig, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray, ReferenceMeta]:
    """tokens [batch_size, R] int32, mask [batch_size, R] bool (short batches repeat their last
    reference so a jitted encoder always sees one shape) and the metadata of the real rows."""
    meta = ReferenceMeta.from_records(refs, config.reference_len, config.pad_id)
    n = len(meta)
    tokens = meta.tokens
    mask = np.arange(config.reference_len)[None, :] < meta.lengths[:, None]
    if n < batch_size:
        pad = np.full(batch_size - n, n - 1)
        tokens = np.concatenate([tokens, tokens[pad]])
        mask = np.concatenate([mask, mask[pad]])
    return tokens, mask, meta


def _encode_batch(encode_fn: EncodeFn, refs: Sequence[Any], config: ModelConfig, batch_size: int
                  ) -> tuple[Any, np.ndarray, ReferenceMeta]:
    """(kv [n, Lm, 2, K, T, H] as encode_fn returned it (left on device), mask [n, T], meta)."""
    tokens, mask, meta = _reference_batch(refs, config, batch_size)
    mem = encode_fn(tokens, mask)
    if not isinstance(mem, MemoryKV):
        raise BankError(f"encode_fn must return a MemoryKV, got {type(mem).__name__}")
    mem.check(config)
    n = len(meta)
    if mem.num != tokens.shape[0]:
        raise BankError(f"encode_fn returned {mem.num} memories for {tokens.shape[0]} references")
    _check_finite(mem.kv_NLZKTH[:n], f"encode_fn, for the references of doc ids "
                                     f"{int(meta.doc_id[0])}..{int(meta.doc_id[-1])}")
    return mem.kv_NLZKTH[:n], np.asarray(mem.mask_NT[:n], bool), meta


def build_bank(path: "str | dict[str, Any]", config: ModelConfig, fingerprint: str,
               references: Sequence[Any], encode_fn: EncodeFn, *, codec: "str | Codec" = "bf16",
               batch_size: int = 64, pq_sample: int = 1024, shard_size: int | None = None,
               show_progress: bool = True, context: ts.Context | None = None,
               first_id: int = 0) -> MemoryBank:
    """Encode `references` into a bank at `path`, resuming a partial build there.

    references: records (dicts or objects) with `tokens` (or `token_ids`: list[int], 1..R ids),
    `doc_id`, `char_start`, `char_end` (ints). encode_fn(tokens [b, R] int32, mask [b, R] bool)
    -> MemoryKV of b memories; it always gets b = batch_size rows (a short last batch repeats its
    last reference) and row i of the output must depend only on row i of the input.

    pq: the codebooks are fitted on the first `pq_sample` memories (encoded once, then written)
    and persisted with the bank before its first append. Writes are shard aligned: encoded
    memories are buffered until a shard is full (or the input ends), then appended and committed
    in one transaction, so a killed build loses at most one shard of encoding work. Reopening the
    same path resumes at the committed count; a bank made with another config, fingerprint or
    codec is refused (BankConfigError / BankFingerprintError), and so are references whose
    record at the last committed id differs from the stored metadata.

    first_id: append to an existing bank: `references[i]` becomes memory `first_id + i` (the bank
    must hold at least `first_id` memories; memories past `first_id` are taken as a resumed part
    of this append). 0 builds a new bank (or resumes one).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise BankError(f"batch_size must be >= 1, got {batch_size}")
    if first_id < 0:
        raise BankError(f"first_id must be >= 0, got {first_id}")
    n_total = len(references)
    context = context or default_context()
    requested = make_codec(codec, config.head_dim)
    base = kvstore_spec(path)
    kv = _open_kvstore(base, context)
    bank: MemoryBank | None = None
    pending: list[tuple[np.ndarray, np.ndarray, ReferenceMeta]] = []  # encoded, not yet written
    if _read_key(kv, MANIFEST_KEY, base) is not None:
        bank = MemoryBank.open(path, config, fingerprint, mode="a", context=context)
        bank._check_codec_compatible(requested)
        _check_resume(bank, references, first_id)
    elif first_id:
        raise BankNotFoundError(f"no memory bank at {_describe(base)} to append memories "
                                f"{first_id}.. to (no {MANIFEST_KEY})")
    start = len(bank) - first_id if bank is not None else 0
    bar = tqdm(total=n_total, initial=start, disable=not show_progress, unit="mem",
               desc=f"memory bank ({requested.name})", dynamic_ncols=True)
    try:
        pos = start
        if bank is None:
            fitted = requested
            if not requested.fitted:  # pq: fit on the first pq_sample memories, keep them
                n_fit = min(max(1, pq_sample), n_total)
                if n_fit == 0:
                    raise BankError("cannot fit a pq codec on zero references")
                raw: list[tuple[np.ndarray, np.ndarray, ReferenceMeta]] = []
                bar.set_postfix_str("encoding the pq training sample")
                while pos < n_fit:
                    refs = references[pos: min(n_total, pos + batch_size)]
                    kv_b, mask_b, meta_b = _encode_batch(encode_fn, refs, config, batch_size)
                    raw.append((np.asarray(kv_b), mask_b, meta_b))  # host copy, encoder dtype
                    pos += len(refs)
                    bar.update(len(refs))
                kv_all = np.concatenate([r[0] for r in raw])
                mask_all = np.concatenate([r[1] for r in raw])
                bar.set_postfix_str(f"fitting pq codebooks on {len(kv_all)} memories")
                fitted = requested.fit(MemoryKV(kv_all[:n_fit], mask_all[:n_fit]))
                pending = [(fitted.encode(k), m, meta) for k, m, meta in raw]
                del kv_all, mask_all, raw
            bank = MemoryBank.create(path, config, fitted, fingerprint, shard_size=shard_size,
                                     context=context)
        bar.set_postfix_str("")
        pending = _flush(bank, pending, force=pos >= n_total)
        while pos < n_total:
            refs = references[pos: min(n_total, pos + batch_size)]
            kv_b, mask_b, meta_b = _encode_batch(encode_fn, refs, config, batch_size)
            pending.append((bank.codec.encode(kv_b), mask_b, meta_b))
            pos += len(refs)
            pending = _flush(bank, pending, force=pos >= n_total)
            bar.update(len(refs))
            bar.set_postfix(committed=len(bank))
    finally:
        bar.close()
    return bank


def _flush(bank: MemoryBank, pending: list[tuple[np.ndarray, np.ndarray, ReferenceMeta]],
           force: bool) -> list[tuple[np.ndarray, np.ndarray, ReferenceMeta]]:
    """Append the buffered memories up to the last full shard boundary (all of them if force)."""
    n = sum(len(p[2]) for p in pending)
    if n == 0:
        return []
    count, s = len(bank), bank.shard_size
    boundary = (count + n) // s * s
    take = n if force else max(0, boundary - count)
    if take == 0:
        return pending
    codes = np.concatenate([p[0] for p in pending])
    mask = np.concatenate([p[1] for p in pending])
    meta = ReferenceMeta.concat([p[2] for p in pending])
    bank.append_codes(codes[:take], mask[:take], meta.take(slice(0, take)))
    if take == n:
        return []
    return [(codes[take:], mask[take:], meta.take(slice(take, n)))]


def _check_resume(bank: MemoryBank, references: Sequence[Any], first_id: int = 0) -> None:
    """The memories stored from `first_id` on are a prefix of `references` (checked on the last)."""
    n = len(bank) - first_id
    if n < 0:
        raise BankError(f"bank {bank.url} holds {len(bank)} memories, fewer than first_id={first_id}: "
                        f"it is not the bank these references are appended to")
    if n == 0:
        return
    if n > len(references):
        raise BankError(f"bank {bank.url} already holds {n} memories from id {first_id} on, more than the "
                        f"{len(references)} references given: these are not the references it was built from")
    # the last stored reference and up to 15 spread over the rest (cheap: metadata only)
    sample = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, 15)).astype(np.int64), [n - 1]]))
    want = ReferenceMeta.from_records([references[i] for i in sample.tolist()], bank.config.reference_len,
                                      bank.config.pad_id)
    got = bank.metadata(first_id + sample)
    differ = np.zeros(len(sample), bool)
    for f in dataclasses.fields(ReferenceMeta):
        a, b = getattr(want, f.name), getattr(got, f.name)
        differ |= (a != b).reshape(len(sample), -1).any(axis=1)
    if differ.any():
        i = int(sample[np.flatnonzero(differ)[-1]])
        raise BankError(f"bank {bank.url}: the stored reference of memory {first_id + i} differs from "
                        f"references[{i}]; resuming needs the same references in the same order")
