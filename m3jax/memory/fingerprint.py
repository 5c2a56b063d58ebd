"""The weights fingerprint: which params wrote a memory bank (`MemoryBank.fingerprint`).

A bank refuses to be read or extended with other weights than the ones that wrote it: its manifest
records `params_fingerprint(params)`, compared whenever the bank is opened with params.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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

