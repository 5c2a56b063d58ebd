"""The one attention function of m3jax: a joint softmax over [prefix sink | memory | context].

Queries attend, in a single softmax with scale 1/sqrt(head_dim), to
  * the constant reference-prefix sink (always visible, shared by the batch),
  * optionally explicit memory, grouped by query chunk: the T queries are C chunks of Q = T / C
    consecutive tokens and chunk c sees only memory block c (M tokens, with a validity mask),
  * the context keys, under a boolean [B, T, S] mask (causality / padding).
Chunk-local memory scores are one einsum over all chunks at once: no loop over chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e30


class PrefixKV(NamedTuple):
    k_PKH: Array
    v_PKH: Array


class MemoryBlocks(NamedTuple):
    """Memory visible to query chunks: block c is read by the c-th group of Q queries."""

    k_BCMKH: Array
    v_BCMKH: Array
    mask_BCM: Array


def attention(
    q_BTNH: Array,
    k_BKSH: Array,
    v_BKSH: Array,
    mask_BTS: Array,
    *,
    prefix: PrefixKV | None = None,
    memory: MemoryBlocks | None = None,
    return_probs: bool = False,
):
    """Grouped-query attention with optional prefix sink and chunked memory.

    Context keys and values are kv-head-major, [B, K, S, H] (the KV cache layout): with it the
    score and value contractions are plain batched matmuls over (B, K), which XLA runs an order
    of magnitude faster on CPU than the token-major layout when decoding one token.

    Returns out_BTNH (in q's dtype), and with `return_probs` also the attention mass that each
    query puts on (prefix, memory, context) as three [B, N, T] arrays.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    G = N // K
    scale = H ** -0.5
    q_BTKGH = (q_BTNH.astype(jnp.float32) * scale).reshape(B, T, K, G, H)

    parts, values = [], []
    if prefix is not None:
        s = jnp.einsum("BTKGH,PKH->BKGTP", q_BTKGH, prefix.k_PKH.astype(jnp.float32))
        parts.append(s)
        values.append(("prefix", prefix.v_PKH))
    if memory is not None:
        C, M = memory.k_BCMKH.shape[1], memory.k_BCMKH.shape[2]
        if T % C:
            raise ValueError(f"{T} queries cannot be split into {C} memory chunks")
        Q = T // C
        q_BCQKGH = q_BTKGH.reshape(B, C, Q, K, G, H)
        s = jnp.einsum("BCQKGH,BCMKH->BKGCQM", q_BCQKGH, memory.k_BCMKH.astype(jnp.float32))
        m = memory.mask_BCM[:, None, None, :, None, :]
        s = jnp.where(m, s, _NEG).reshape(B, K, G, T, M)
        parts.append(s)
        values.append(("memory", memory.v_BCMKH))
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH.astype(jnp.float32))
    parts.append(jnp.where(mask_BTS[:, None, None], s, _NEG))
    values.append(("context", v_BKSH))

    sizes = [p.shape[-1] for p in parts]
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)
    out_BKGTH = jnp.zeros((B, K, G, T, H), jnp.float32)
    masses = {}
    start = 0
    for (name, v), size in zip(values, sizes):
        p = probs[..., start:start + size]
        start += size
        v = v.astype(jnp.float32)
        if name == "prefix":
            out_BKGTH += jnp.einsum("BKGTP,PKH->BKGTH", p, v)
        elif name == "memory":
            C = v.shape[1]
            p_BKGCQM = p.reshape(B, K, G, C, T // C, size)
            out_BKGTH += jnp.einsum("BKGCQM,BCMKH->BKGCQH", p_BKGCQM, v).reshape(B, K, G, T, H)
        else:
            out_BKGTH += jnp.einsum("BKGTS,BKSH->BKGTH", p, v)
        if return_probs:
            masses[name] = p.sum(-1).reshape(B, N, T)
    out = jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(q_BTNH.dtype)
    if return_probs:
        z = jnp.zeros((B, N, T), jnp.float32)
        return out, (masses.get("prefix", z), masses.get("memory", z), masses["context"])
    return out
