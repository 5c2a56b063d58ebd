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
  * "splash" (TPU): jax's Pallas splash attention kernel over the keys [prefix | memory blocks |
    context] with a static block-sparse mask (prefix: every query; memory: chunk c sees only
    block c; context: causal), the validity of memory slots and context keys as segment ids.
    Needs `causal=True`. Runs in Pallas interpret mode off TPU (the numerics tests).
  * "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` over the same
    concatenated keys, any mask given as its boolean `mask` argument (cuDNN's fused flash
    attention takes it as a bias). `CUDNN_IMPLEMENTATION` = "xla" runs the same code path
    through jax's XLA implementation (what the CPU tests do).
"auto" picks by the platform compiled for (`target_platform`: `jax.default_backend()`, or what
`compile_for` names, e.g. an ahead-of-time compile for TPU on a CPU machine):
  tpu  "splash" for causal (cache-free: training, forward, memory writing) calls with at least
       `FUSED_MIN` queries, else "xla";
  gpu  "cudnn" for bf16 / fp16 calls with at least `FUSED_MIN` queries and head_dim <= 128 (a
       multiple of 8), else "xla";
  cpu  "chunked" when both T and S reach `CHUNKED_MIN`, else "xla".

`causal=True` promises that `mask_BTS` is the causal mask (query i sees key j iff j <= i + S - T)
and-ed with a per-key validity (then `mask_BTS[:, -1]`); the cache-free paths of the model pass
it. The attention output is named `ATTENTION_NAME` (`jax.ad_checkpoint.checkpoint_name`), as are
splash's softmax statistics, for the "attention" remat policy.

Precision (gemma / nanodo): q, k, v and probabilities enter contractions in the dtype of q (bf16
when the model runs in bf16), every contraction accumulates in float32, and the softmax maxima,
sums and the output accumulator are float32. With float32 activations every path is float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Impl = Literal["auto", "reference", "xla", "chunked", "splash", "cudnn"]
IMPLS = ("auto", "reference", "xla", "chunked", "splash", "cudnn")
_NEG = -1e30
_F32 = jnp.float32
CHUNKED_MIN = 512  # auto on CPU: chunked when the queries and the keys both reach this length
FUSED_MIN = 64  # auto on TPU / GPU: the fused kernel from one chunk of queries on (decoding: xla)
BLOCK_Q = 128
BLOCK_K = 128
SPLASH_BLOCK = 128  # splash's query and key tiles (queries and keys are padded to a multiple)
ATTENTION_NAME = "attention"  # checkpoint_name of the attention output (remat policy "attention")
CUDNN_IMPLEMENTATION = "cudnn"  # jax.nn.dot_product_attention's implementation for impl="cudnn"
_TARGET: list[tuple[str, bool]] = []  # (platform, fused) named by `compile_for`, innermost last


@contextlib.contextmanager
def compile_for(platform: str, fused: bool = True) -> Iterator[None]:
    """Trace attention for `platform` ("tpu", "gpu", "cpu") whatever the local backend: "auto"
    picks that platform's kernel (or, with `fused=False`, the XLA path on TPU / GPU) and splash
    runs compiled rather than interpreted. For ahead-of-time compiles for another platform
    (`experiments/aot_compile.py`)."""
    _TARGET.append((platform, fused))
    try:
        yield
    finally:
        _TARGET.pop()


def target_platform() -> str:
    """The platform attention is traced for: `compile_for`'s, else `jax.default_backend()`."""
    p = _TARGET[-1][0] if _TARGET else jax.default_backend()
    return "gpu" if p in ("cuda", "rocm") else p


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
    causal: bool = False,
):
    """Grouped-query attention with optional prefix sink and chunked memory.

    Context keys [B, K, S, H] and values [B, K, H, S] are in the KV cache layout: kv-head-major,
    values transposed, so that both contractions are batched matmuls over (B, K) contracting
    the minor dimension of both operands. XLA's CPU matmuls run that form fastest (several
    times faster than the token-major layout when decoding one token; with bf16 operands and a
    float32 result it is the only form they take).

    Returns out_BTNH (in q's dtype), and with `return_probs` also the attention mass that each
    query puts on (prefix, memory, context) as three [B, N, T] arrays (only "reference" and
    "xla" materialize them). `causal`: the mask is causal & key-valid (module docstring).
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
        impl = _auto_impl(q_BTNH, S, return_probs, causal)
    if impl == "reference":
        return _reference(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs)
    if return_probs and impl != "xla":
        raise ValueError(f"return_probs needs the materialized scores: use impl='xla' or 'reference', not {impl!r}")
    if impl == "chunked":
        out = _chunked(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory)
    elif impl == "splash":
        if not causal:
            raise ValueError("impl='splash' takes a static block-sparse mask: it needs causal=True "
                             "(a causal & key-valid mask), got causal=False")
        out = _splash(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory)
    elif impl == "cudnn":
        out = _cudnn(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, causal)
    else:
        out = _materialized(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, return_probs)
    if return_probs:
        return checkpoint_name(out[0], ATTENTION_NAME), out[1]
    return checkpoint_name(out, ATTENTION_NAME)


def _auto_impl(q_BTNH: Array, S: int, return_probs: bool, causal: bool) -> str:
    """The implementation "auto" stands for (module docstring)."""
    T, H = q_BTNH.shape[1], q_BTNH.shape[3]
    if return_probs:
        return "xla"
    platform = target_platform()
    if platform in ("tpu", "gpu") and _TARGET and not _TARGET[-1][1]:
        return "xla"
    if platform == "tpu":
        return "splash" if causal and T >= FUSED_MIN else "xla"
    if platform == "gpu":
        half = q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and T >= FUSED_MIN and H <= 128 and H % 8 == 0 else "xla"
    return "chunked" if T >= CHUNKED_MIN and S >= CHUNKED_MIN else "xla"


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
        # A few sink keys (P of them): products summed in place of a matmul, whose batched form
        # makes XLA transpose all the queries to [K, H, B*T*G] first (on CPU, the costliest
        # part of the prefix's share of a prefill).
        k_KPH = jnp.swapaxes(prefix.k_PKH, 0, 1).astype(_F32)
        s = (q_BCQKGH.astype(_F32)[..., None, :] * k_KPH[:, None]).sum(-1)  # [B, C, Q, K, G, P]
        parts.append(("prefix", s, lambda w, v=jnp.swapaxes(prefix.v_PKH, 0, 1).astype(_F32):
                      (w[..., None] * v[:, None]).sum(-2)))
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


# ------------------------------------------------------------------------------ fused kernels
def _joint_keys(k_BKSH: Array, v_BKHS: Array, prefix: PrefixKV | None, memory: MemoryBlocks | None,
                dtype) -> tuple[Array, Array]:
    """Keys and values [B, K, P + C*M + S, H] of [prefix | memory blocks 0..C-1 | context], in
    `dtype` (the prefix broadcast over the batch, the memory blocks laid end to end)."""
    B, K, _, H = k_BKSH.shape
    ks, vs = [], []
    if prefix is not None:
        P = prefix.k_PKH.shape[0]
        ks.append(jnp.broadcast_to(jnp.transpose(prefix.k_PKH, (1, 0, 2))[None], (B, K, P, H)))
        vs.append(jnp.broadcast_to(jnp.transpose(prefix.v_PKH, (1, 0, 2))[None], (B, K, P, H)))
    if memory is not None:
        C, M = memory.k_BCMKH.shape[1:3]
        ks.append(jnp.transpose(memory.k_BCMKH, (0, 3, 1, 2, 4)).reshape(B, K, C * M, H))
        vs.append(jnp.transpose(memory.v_BCMKH, (0, 3, 1, 2, 4)).reshape(B, K, C * M, H))
    ks.append(k_BKSH)
    vs.append(jnp.swapaxes(v_BKHS, 2, 3))
    return (jnp.concatenate([k.astype(dtype) for k in ks], axis=2),
            jnp.concatenate([v.astype(dtype) for v in vs], axis=2))


def _side_mask(T: int, P: int, C: int, M: int) -> np.ndarray:
    """Static [T, P + C*M] visibility of the prefix (every query) and of the memory blocks (query
    chunk c, of T / C queries, sees block c only): the block-sparse part of the joint mask."""
    chunk = np.arange(T)[:, None] // max(T // max(C, 1), 1) == np.arange(C * M)[None, :] // max(M, 1)
    return np.concatenate([np.ones((T, P), bool), chunk], axis=1)


def _side_sizes(prefix: PrefixKV | None, memory: MemoryBlocks | None) -> tuple[int, int, int]:
    """(P, C, M): prefix tokens, memory chunks and tokens per memory block (0 when absent)."""
    P = 0 if prefix is None else prefix.k_PKH.shape[0]
    C, M = (0, 0) if memory is None else memory.k_BCMKH.shape[1:3]
    return P, C, M


def _side_valid(B: int, prefix: PrefixKV | None, memory: MemoryBlocks | None) -> Array:
    """[B, P + C*M] validity of the prefix (always) and of each memory slot (`mask_BCM`)."""
    parts = []
    if prefix is not None:
        parts.append(jnp.ones((B, prefix.k_PKH.shape[0]), bool))
    if memory is not None:
        parts.append(memory.mask_BCM.reshape(B, -1).astype(bool))
    return jnp.concatenate(parts, axis=1) if parts else jnp.zeros((B, 0), bool)


def _cudnn(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory, causal):
    """`jax.nn.dot_product_attention` over the joint keys with the joint boolean mask [B, 1, T, S']:
    [prefix (all) | memory (chunk c: block c, valid slots) | mask_BTS]. cuDNN needs bf16 / fp16."""
    B, T, N, H = q_BTNH.shape
    dt = q_BTNH.dtype
    k_BKJH, v_BKJH = _joint_keys(k_BKSH, v_BKHS, prefix, memory, dt)
    side = jnp.asarray(_side_mask(T, *_side_sizes(prefix, memory)))[None] & _side_valid(B, prefix, memory)[:, None, :]
    mask_BTJ = jnp.concatenate([side, mask_BTS.astype(bool)], axis=2)
    out = jax.nn.dot_product_attention(
        q_BTNH, jnp.swapaxes(k_BKJH, 1, 2), jnp.swapaxes(v_BKJH, 1, 2), mask=mask_BTJ[:, None],
        scale=H ** -0.5, implementation=CUDNN_IMPLEMENTATION)
    return out.astype(dt)


@functools.lru_cache(maxsize=64)
def _splash_mask(T: int, S: int, P: int, C: int, M: int, G: int):
    """(static mask of G heads [G, Tp, Jp], Tp, Jp) over the joint keys [prefix (P) | memory
    blocks (C x M) | context (S)], padded to whole `SPLASH_BLOCK` tiles: `_side_mask` then the
    causal context. Padded keys are invisible; padded query rows (dropped) see the context.
    Cached: splash's own mask processing is cached by the mask it is given."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as SM

    J = P + C * M + S
    Tp, Jp = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK, -(-J // SPLASH_BLOCK) * SPLASH_BLOCK
    mask = np.zeros((Tp, Jp), bool)
    mask[:T, :P + C * M] = _side_mask(T, P, C, M)
    mask[T:, :P] = True
    mask[:, P + C * M:J] = np.arange(S)[None, :] <= np.arange(Tp)[:, None] + (S - T)
    return SM.MultiHeadMask([SM.NumpyMask(mask)] * G), Tp, Jp


def _splash(q_BTNH, k_BKSH, v_BKHS, mask_BTS, prefix, memory):
    """Pallas splash attention over the joint keys [prefix | memory blocks | context].

    The static mask (numpy, built at trace time) is the block-sparse structure: the prefix for
    every query, memory block c for query chunk c, the causal context; the dynamic validity of
    memory slots and context keys (`mask_BTS[:, -1]` under `causal`) enters as segment ids
    (queries 0, valid keys 0, invalid keys 1). Queries and keys are padded to whole
    `SPLASH_BLOCK` tiles (padded keys are invisible, padded query rows dropped). One MQA kernel
    per kv head and sequence (vmapped); under a mesh it runs per shard (`shard_map` over batch
    and kv heads), since the partitioner cannot split a Pallas kernel.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as SK

    from m3jax.sharding import current_mesh, logical_to_spec

    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    dt = q_BTNH.dtype
    k_BKJH, v_BKJH = _joint_keys(k_BKSH, v_BKHS, prefix, memory, dt)
    J = k_BKJH.shape[2]
    P, C, M = _side_sizes(prefix, memory)
    mask, Tp, Jp = _splash_mask(T, S, P, C, M, G)
    kernel = SK.make_splash_mqa_single_device(mask, residual_checkpoint_name=ATTENTION_NAME,
                                              interpret=target_platform() != "tpu")
    valid_BJ = jnp.concatenate([_side_valid(B, prefix, memory), mask_BTS[:, -1, :].astype(bool),
                                jnp.zeros((B, Jp - J), bool)], axis=1)
    q_BKGTH = jnp.transpose((q_BTNH * jnp.asarray(H ** -0.5, dt)).reshape(B, T, K, G, H), (0, 2, 3, 1, 4))
    q_BKGTH = jnp.pad(q_BKGTH, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    pad_j = ((0, 0), (0, 0), (0, Jp - J), (0, 0))
    k_BKJH, v_BKJH = jnp.pad(k_BKJH, pad_j), jnp.pad(v_BKJH, pad_j)

    def per_shard(kernel, q, k, v, valid):
        seg_q = jnp.zeros((q.shape[0], Tp), jnp.int32)
        seg_kv = jnp.where(valid, 0, 1).astype(jnp.int32)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
        return jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, SK.SegmentIds(seg_q, seg_kv))

    mesh = current_mesh()
    if mesh is not None:  # the kernel's mask tables replicated, q / k / v split over batch and kv heads
        PS = jax.sharding.PartitionSpec
        spec = lambda axes, x: logical_to_spec(axes, x.shape, mesh, label="splash")
        q_spec = spec(("batch", "kv_heads", None, None, None), q_BKGTH)
        kv_spec = spec(("batch", "kv_heads", None, None), k_BKJH)
        kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, PS(None, None)))
        per_shard = jax.shard_map(per_shard, mesh=mesh, out_specs=q_spec, check_vma=False,
                                  in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, PS(q_spec[0])))
    out_BKGTH = per_shard(kernel, q_BKGTH, k_BKJH, v_BKJH, valid_BJ)
    return jnp.transpose(out_BKGTH[:, :, :, :T], (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(dt)
