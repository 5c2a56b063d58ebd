"""The one attention function of m3jax: a joint softmax over [prefix sink | memory | context].

Queries attend, in a single softmax with scale 1/sqrt(head_dim), to
  * the constant reference-prefix sink (always visible, shared by the batch),
  * optionally explicit memory, grouped by query chunk: the T queries are C chunks of Q = T / C
    consecutive tokens and chunk c sees only memory block c (M tokens, with a validity mask),
  * the context keys, under a boolean [B, T, S] mask (causality / padding).
Chunk-local memory scores are one einsum over all chunks at once: no loop over chunks.

Implementations behind `attention(..., impl=...)`, all computing the same function:
  * "reference": everything in float32, the three score blocks concatenated and one softmax.
    The numerics tests compare the others against it.
  * "xla": the materialized [B, K, G, T, S] scores, contractions in the activation dtype with
    float32 accumulation (`preferred_element_type`), softmax statistics in float32, the parts
    combined by their maxima (no concatenated score tensor). Short queries (decoding) use it.
  * "chunked": flash-style: query blocks of `block_q` rows (one memory chunk each) scan over
    key blocks of `block_k` with an online softmax, so only [B, K, G, block_q, block_k] scores
    exist at a time; key blocks that the mask hides entirely are skipped at run time (causal
    prefill does about half the work). Long prompts on CPU (and anywhere no fused kernel fits).
"auto" takes "chunked" on the CPU backend when both T and S reach `CHUNKED_MIN`, else "xla"
(accelerators keep the dense path until their fused kernels are measured there).

Precision (gemma / nanodo): q, k, v and probabilities enter contractions in the dtype of q (bf16
when the model runs in bf16), every contraction accumulates in float32, and the softmax maxima,
sums and the output accumulator are float32. With float32 activations every path is float32.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Impl = Literal["auto", "reference", "xla", "chunked"]
IMPLS = ("auto", "reference", "xla", "chunked")
_NEG = -1e30
_F32 = jnp.float32
CHUNKED_MIN = 512  # auto: chunked when the queries and the keys both reach this length
BLOCK_Q = 128
BLOCK_K = 128


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
    v_BKHS: Array,
    mask_BTS: Array,
    *,
    prefix: PrefixKV | None = None,
    memory: MemoryBlocks | None = None,
    return_probs: bool = False,
    impl: Impl = "auto",
):
    """Grouped-query attention with optional prefix sink and chunked memory.

    Context keys [B, K, S, H] and values [B, K, H, S] are in the KV cache layout: kv-head-major,
    values transposed, so that both contractions are batched matmuls over (B, K) contracting
    the minor dimension of both operands. XLA's CPU matmuls run that form fastest (several
    times faster than the token-major layout when decoding one token; with bf16 operands and a
    float32 result it is the only form they take).

    Returns out_BTNH (in q's dtype), and with `return_probs` also the attention mass that each
    query puts on (prefix, memory, context) as three [B, N, T] arrays (not with "chunked").
    """
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if memory is not None and T % memory.k_BCMKH.shape[1]:
        raise ValueError(f"{T} queries cannot be split into {memory.k_BCMKH.shape[1]} memory chunks")
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        long = T >= CHUNKED_MIN and S >= CHUNKED_MIN and not return_probs
        impl = "chunked" if long and jax.default_backend() == "cpu" else "xla"
    if impl == "reference":
        return _reference(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs)
    if impl == "chunked":
        if return_probs:
            raise ValueError("return_probs needs the materialized scores: use impl='xla' or 'reference'")
        return _chunked(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory)
    return _materialized(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs)


# ------------------------------------------------------------------------------ reference
def _reference(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs):
    """Float32 throughout, one softmax over the concatenated [prefix | memory | context] scores."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    G = N // K
    q_BTKGH = (q_BTNH.astype(_F32) * H ** -0.5).reshape(B, T, K, G, H)

    parts, values = [], []
    if prefix is not None:
        s = jnp.einsum("BTKGH,PKH->BKGTP", q_BTKGH, prefix.k_PKH.astype(_F32))
        parts.append(s)
        values.append(("prefix", prefix.v_PKH))
    if memory is not None:
        C, M = memory.k_BCMKH.shape[1], memory.k_BCMKH.shape[2]
        q_BCQKGH = q_BTKGH.reshape(B, C, T // C, K, G, H)
        s = jnp.einsum("BCQKGH,BCMKH->BKGCQM", q_BCQKGH, memory.k_BCMKH.astype(_F32))
        m = memory.mask_BCM[:, None, None, :, None, :]
        s = jnp.where(m, s, _NEG).reshape(B, K, G, T, M)
        parts.append(s)
        values.append(("memory", memory.v_BCMKH))
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH.astype(_F32))
    parts.append(jnp.where(mask_BTS[:, None, None], s, _NEG))
    values.append(("context", v_BKHS))

    sizes = [p.shape[-1] for p in parts]
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)
    out_BKGTH = jnp.zeros((B, K, G, T, H), _F32)
    masses = {}
    start = 0
    for (name, v), size in zip(values, sizes):
        p = probs[..., start:start + size]
        start += size
        v = v.astype(_F32)
        if name == "prefix":
            out_BKGTH += jnp.einsum("BKGTP,PKH->BKGTH", p, v)
        elif name == "memory":
            C = v.shape[1]
            p_BKGCQM = p.reshape(B, K, G, C, T // C, size)
            out_BKGTH += jnp.einsum("BKGCQM,BCMKH->BKGCQH", p_BKGCQM, v).reshape(B, K, G, T, H)
        else:
            out_BKGTH += jnp.einsum("BKGTS,BKHS->BKGTH", p, v)
        if return_probs:
            masses[name] = p.sum(-1).reshape(B, N, T)
    out = jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(q_BTNH.dtype)
    if return_probs:
        z = jnp.zeros((B, N, T), _F32)
        return out, (masses.get("prefix", z), masses.get("memory", z), masses["context"])
    return out


# ------------------------------------------------------------------------------ the parts
def _dot(spec: str, a: Array, b: Array) -> Array:
    """einsum in the operands' dtype (b is cast to a's) with float32 accumulation and result."""
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=_F32)


def _side_scores(q_BCQKGH: Array, prefix: PrefixKV | None, memory: MemoryBlocks | None):
    """Scores [B, C, Q, K, G, n] of the prefix sink and of each chunk's memory block, with the
    functions mapping their (unnormalized) weights to value sums [B, C, Q, K, G, H] (float32)."""
    parts = []
    if prefix is not None:
        s = _dot("BCQKGH,PKH->BCQKGP", q_BCQKGH, prefix.k_PKH)
        parts.append(("prefix", s, lambda w, v=prefix.v_PKH: _dot("BCQKGP,PKH->BCQKGH", w.astype(v.dtype), v)))
    if memory is not None:
        s = _dot("BCQKGH,BCMKH->BCQKGM", q_BCQKGH, memory.k_BCMKH)
        s = jnp.where(memory.mask_BCM[:, :, None, None, None, :], s, _NEG)
        parts.append(("memory", s,
                      lambda w, v=memory.v_BCMKH: _dot("BCQKGM,BCMKH->BCQKGH", w.astype(v.dtype), v)))
    return parts


def _materialized(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs):
    """All scores at once, combined by the parts' maxima (no concatenation), in q's dtype."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    G = N // K
    C = 1 if memory is None else memory.k_BCMKH.shape[1]
    dt = q_BTNH.dtype
    q_BTKGH = (q_BTNH * jnp.asarray(H ** -0.5, dt)).reshape(B, T, K, G, H)
    side = _side_scores(q_BTKGH.reshape(B, C, T // C, K, G, H), prefix, memory)
    s_BTKGS = _dot("BTKGH,BKSH->BTKGS", q_BTKGH, k_BKSH)
    s_BTKGS = jnp.where(mask_BTS[:, :, None, None, :], s_BTKGS, _NEG)
    m = s_BTKGS.max(-1)
    for _, s, _ in side:
        m = jnp.maximum(m, s.max(-1).reshape(B, T, K, G))
    e_ctx = jnp.exp(s_BTKGS - m[..., None])
    total = e_ctx.sum(-1)
    acc = _dot("BTKGS,BKHS->BTKGH", e_ctx.astype(v_BKHS.dtype), v_BKHS)
    sums = {"context": total}
    for name, s, value_fn in side:
        e = jnp.exp(s - m.reshape(B, C, T // C, K, G)[..., None])
        sums[name] = e.sum(-1).reshape(B, T, K, G)
        total = total + sums[name]
        acc = acc + value_fn(e).reshape(B, T, K, G, H)
    out = (acc / total[..., None]).reshape(B, T, N, H).astype(dt)
    if not return_probs:
        return out
    mass = lambda name: (jnp.transpose(sums[name] / total, (0, 2, 3, 1)).reshape(B, N, T) if name in sums
                         else jnp.zeros((B, N, T), _F32))
    return out, (mass("prefix"), mass("memory"), mass("context"))


# ------------------------------------------------------------------------------ chunked
def _chunked(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, block_q: int = BLOCK_Q,
             block_k: int = BLOCK_K):
    """Flash-style attention: for each query block, an online softmax over key blocks.

    Query blocks are `block_q` rows, or one memory chunk when memory is given (so a block reads
    exactly one memory block). The prefix and memory scores of a block seed its running max,
    sum and accumulator; then a scan over context key blocks folds each block in, skipping
    (at run time, `lax.cond`) the blocks its mask hides entirely. The block step is
    rematerialized under differentiation, so the backward pass keeps only the running
    statistics, never the scores.
    """
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    dt = q_BTNH.dtype
    if memory is not None:
        C = memory.k_BCMKH.shape[1]
        Q = T // C
    else:
        Q = min(block_q, T)
        C = -(-T // Q)
    Tp, Sp = C * Q, -(-S // block_k) * block_k
    q = q_BTNH * jnp.asarray(H ** -0.5, dt)
    mask = mask_BTS
    if Tp != T:  # pad the queries to whole blocks (padded rows see nothing and are dropped)
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, Tp - T), (0, 0)))
    if Sp != S:  # pad the keys to whole blocks (padded keys are masked)
        k_BKSH = jnp.pad(k_BKSH, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
        v_BKHS = jnp.pad(v_BKHS, ((0, 0), (0, 0), (0, 0), (0, Sp - S)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, Sp - S)))
    nk = Sp // block_k
    q_CBQKGH = jnp.moveaxis(q.reshape(B, C, Q, K, G, H), 1, 0)
    mask_CBQS = jnp.moveaxis(mask.reshape(B, C, Q, Sp), 1, 0)
    k_JBKSH = jnp.moveaxis(k_BKSH.reshape(B, K, nk, block_k, H), 2, 0)
    v_JBKHS = jnp.moveaxis(v_BKHS.reshape(B, K, H, nk, block_k), 3, 0)
    mask_CJBQS = jnp.moveaxis(mask_CBQS.reshape(C, B, Q, nk, block_k), 3, 1)
    mem_C = None
    if memory is not None:
        mem_C = MemoryBlocks(jnp.moveaxis(memory.k_BCMKH, 1, 0)[:, :, None],
                             jnp.moveaxis(memory.v_BCMKH, 1, 0)[:, :, None],
                             jnp.moveaxis(memory.mask_BCM, 1, 0)[:, :, None])

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def fold(carry, blk):
        """Fold one key block into (max, sum, acc) of one query block."""
        m, l, acc, q_BQKGH = carry
        k_blk, v_blk, mask_BQS = blk
        s = _dot("BQKGH,BKSH->BQKGS", q_BQKGH, k_blk)
        s = jnp.where(mask_BQS[:, :, None, None, :], s, _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        e = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + e.sum(-1)
        acc = acc * corr[..., None] + _dot("BQKGS,BKHS->BQKGH", e.astype(v_blk.dtype), v_blk)
        return m_new, l, acc, q_BQKGH

    def step(carry, blk):
        needed = jnp.any(blk[2])
        return jax.lax.cond(needed, fold, lambda c, _: c, carry, blk), None

    def query_block(xs):
        q_BQKGH, mask_JBQS, mem = xs
        m = jnp.full((B, Q, K, G), _NEG, _F32)
        l = jnp.zeros((B, Q, K, G), _F32)
        acc = jnp.zeros((B, Q, K, G, H), _F32)
        side = _side_scores(q_BQKGH[:, None], prefix, None if mem is None else MemoryBlocks(*mem))
        if side:
            m = functools.reduce(jnp.maximum, [s.max(-1)[:, 0] for _, s, _ in side])
            for _, s, value_fn in side:
                e = jnp.exp(s - m[:, None, ..., None])
                l = l + e.sum(-1)[:, 0]
                acc = acc + value_fn(e)[:, 0]
        (m, l, acc, _), _ = jax.lax.scan(step, (m, l, acc, q_BQKGH), (k_JBKSH, v_JBKHS, mask_JBQS))
        return acc / jnp.where(l > 0, l, 1.0)[..., None]  # l == 0 only for a block that sees nothing

    out_CBQKGH = jax.lax.map(query_block, (q_CBQKGH, mask_CJBQS, mem_C))
    out = jnp.moveaxis(out_CBQKGH, 0, 1).reshape(B, Tp, N, H)[:, :T]
    return out.astype(dt)
