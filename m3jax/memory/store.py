"""TensorStore under the memory bank: the shared context, kvstore specs, keyed reads and
conditional writes, and the zarr3 array specs the bank's arrays are stored with.

A bank lives under one kvstore location: a local path, a kvstore URL (`"memory://name/"`,
`"gs://bucket/path/"`, `"file:///abs/path/"`) or a kvstore JSON spec (`kvstore_spec`). Arrays are
zarr3 with a crc32c on every chunk; the memory codes are `sharding_indexed` with one memory per
inner chunk (`array_spec`). Missing chunks are never read as fill values
(`fill_missing_data_reads: false`), so a lost shard raises `BankCorruptError` (`ts_error`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from m3jax.memory.errors import BankCorruptError, BankError

_DEFAULT_CONTEXT: ts.Context | None = None
# TensorStore status codes that mean the stored data is missing or damaged
_CORRUPT_CODES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INVALID_ARGUMENT")


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


def sub_spec(base: dict[str, Any], sub: str) -> dict[str, Any]:
    """The kvstore spec of `sub` (a relative path) under `base`."""
    spec = dict(base)
    spec["path"] = base.get("path", "") + sub
    return spec


def describe(base: dict[str, Any]) -> str:
    """A kvstore spec for messages: its URL, or its JSON when it has no URL form."""
    try:
        return ts.KvStore.Spec(base).url
    except Exception:  # noqa: BLE001 - any spec without a URL form
        return json.dumps(base)


def ts_error(where: str, e: Exception) -> BankError:
    """A TensorStore failure as a bank error: BankCorruptError when the data is missing or fails
    its checksum, BankError otherwise."""
    msg = str(e)
    if msg.startswith(_CORRUPT_CODES) or "checksum" in msg.lower() or "crc32c" in msg.lower():
        return BankCorruptError(f"{where}: the store is damaged or truncated: {msg}")
    return BankError(f"{where}: {msg}")


def open_kvstore(spec: dict[str, Any], context: ts.Context) -> ts.KvStore:
    try:
        return ts.KvStore.open(spec, context=context).result()
    except ValueError as e:
        raise BankError(f"cannot open kvstore {describe(spec)}: {e}") from None


def read_key(kv: ts.KvStore, key: str, base: dict[str, Any]) -> bytes | None:
    """The value of `key` (None when absent)."""
    value, _ = read_key_gen(kv, key, base)
    return value


def read_key_gen(kv: ts.KvStore, key: str, base: dict[str, Any]) -> tuple[bytes | None, bytes]:
    """(value or None, storage generation)."""
    try:
        r = kv.read(key).result()
    except ValueError as e:
        raise ts_error(f"reading {key} of {describe(base)}", e) from None
    return (bytes(r.value) if r.state == "value" else None), bytes(r.stamp.generation)


def write_key(kv: ts.KvStore, key: str, data: bytes | None, base: dict[str, Any],
              if_equal: bytes | None = None) -> bytes:
    """Write (None: delete; conditionally on the stored generation when if_equal); returns the
    new generation."""
    try:
        g = kv.write(key, data, if_equal=if_equal).result()
    except ValueError as e:
        raise BankError(f"writing {key} of {describe(base)}: {e}") from None
    if if_equal is not None and not g.generation:
        raise BankError(f"{key} of {describe(base)} was changed by someone else since this bank "
                        f"read it: another writer is appending to it (one writer at a time)")
    return bytes(g.generation)


def array_spec(kv: dict[str, Any], shape: Sequence[int], dtype: np.dtype, rows: int,
               sharded: bool) -> dict[str, Any]:
    """zarr3 spec of a new array: chunks of `rows` memories; sharded -> one memory per inner chunk."""
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
            "metadata": {"shape": list(shape),
                         "data_type": np.dtype(dtype).name,  # zarr v3 names numpy / ml_dtypes types as numpy does
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                         "codecs": codecs},
            "store_data_equal_to_fill_value": True, "fill_missing_data_reads": False}


def open_spec(base: dict[str, Any], name: str) -> dict[str, Any]:
    """zarr3 spec opening the existing array `name` under `base`."""
    return {"driver": "zarr3", "kvstore": sub_spec(base, name + "/"),
            "store_data_equal_to_fill_value": True, "fill_missing_data_reads": False}
