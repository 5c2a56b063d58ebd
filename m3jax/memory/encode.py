"""Writing memories: encode references into sparse explicit memories (MEMORY3.md, "Writing a memory").

For every memory layer and KV head, each reference token j is scored by the attention it receives
from all reference tokens i, with q and k taken *before* RoPE, no causal mask, and the prefix and
padding excluded as queries and as candidates:

    softmax: w_j = sum_i softmax_j(q_i . k_j / sqrt(d))
    exp:     w_j = sum_i exp(q_i . k_j / sqrt(d))          (computed as log w_j, stably)

Query heads that share a KV head are combined by `group_reduce` (sum or max). The top
`tokens_per_memory` tokens are kept and their post-RoPE keys and values gathered.

`score="value_norm"` (an m3jax option, not the paper's rule) keeps the tokens whose value vectors
are longest, w_j = ||v_j||, per kv head. In a model never trained with memory, the attention a
token receives is dominated by sinks and function words (".", "the", "is"), whose values are
short: they absorb attention without writing much. Value norms rank content tokens first, so the
stored tokens hold the names and numbers a question asks for (measured on SmolLM2-135M with
invented facts, experiments/README.md).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ModelConfig
from m3jax.model.memory import MemoryKV
from m3jax.model.transformer import Params, check_token_ids, encode_states

Array = jax.Array
_NEG = -1e30


def token_scores(q_IRKGH: Array, k_IRKH: Array, valid_IR: Array, *, score: str, group_reduce: str,
                 v_IRKH: Array | None = None) -> Array:
    """Log importance of each reference token per kv head: [I, K, R] (very negative for padding).

    Returned in log space for every score so that the top-k and the group reduction are stable.
    `score="value_norm"` needs the values `v_IRKH` (and ignores q, k and `group_reduce`).
    """
    if score == "value_norm":
        if v_IRKH is None:
            raise ValueError("score='value_norm' needs the values v_IRKH")
        v = v_IRKH.astype(jnp.float32)
        logw_IKR = 0.5 * jnp.log(jnp.maximum(jnp.einsum("IRKH,IRKH->IKR", v, v), 1e-30))
        return jnp.where(valid_IR[:, None, :], logw_IKR, _NEG)
    H = q_IRKGH.shape[-1]
    q = q_IRKGH.astype(jnp.float32)
    k = k_IRKH.astype(jnp.float32)
    logits = jnp.einsum("IRKGH,IJKH->IKGRJ", q, k) * H ** -0.5  # query positions R, candidates J
    cand = valid_IR[:, None, None, None, :]
    logits = jnp.where(cand, logits, _NEG)
    query_ok = valid_IR[:, None, None, :, None]
    if score == "softmax":
        contrib = jnp.where(query_ok, jax.nn.softmax(logits, axis=-1), 0.0)
        w = jnp.sum(contrib, axis=3)  # [I, K, G, J]
        logw_IKGJ = jnp.log(jnp.maximum(w, 1e-30))
    elif score == "exp":
        logw_IKGJ = jax.nn.logsumexp(jnp.where(query_ok, logits, _NEG), axis=3)
    else:
        raise ValueError(f"unknown score {score!r}")
    if group_reduce == "sum":
        logw_IKJ = jax.nn.logsumexp(logw_IKGJ, axis=2)
    elif group_reduce == "max":
        logw_IKJ = jnp.max(logw_IKGJ, axis=2)
    else:
        raise ValueError(f"unknown group_reduce {group_reduce!r}")
    return jnp.where(valid_IR[:, None, :], logw_IKJ, _NEG)


def select_tokens(logw_IKR: Array, valid_IR: Array, top: int) -> tuple[Array, Array]:
    """Indices [I, K, E] of the `top` best-scored valid tokens (ascending positions, invalid
    slots last and pointing at position 0) and the slot mask [I, E]."""
    R = logw_IKR.shape[-1]
    top_eff = min(top, R)
    _, idx = jax.lax.top_k(logw_IKR, top_eff)
    n_valid = jnp.sum(valid_IR, axis=-1)  # [I]
    slot_ok_IE = jnp.arange(top_eff)[None, :] < n_valid[:, None]
    idx = jnp.where(slot_ok_IE[:, None, :], idx, R)
    idx = jnp.sort(idx, axis=-1)  # valid positions ascending, sentinel R last
    if top_eff < top:  # references padded shorter than `top`: pad with invalid slots
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, top - top_eff)), constant_values=R)
        slot_ok_IE = jnp.pad(slot_ok_IE, ((0, 0), (0, top - top_eff)))
    return jnp.where(idx == R, 0, idx), slot_ok_IE


def encode(params: Params, config: ModelConfig, ref_tokens: Array, ref_mask: Array) -> MemoryKV:
    """Encode I references into I memories.

    ref_tokens: int [I, R] with R <= reference_len (valid tokens first, padding after),
    ref_mask: bool [I, R]. Returns `MemoryKV` with kv [I, L, Z, K, E, H] (L: the memory layers) (keys post-RoPE at
    their positions r..r+R-1 of the encoding sequence) and mask [I, E]. Jittable (config static);
    differentiable with respect to params through the gathered keys and values.
    """
    c = config
    ref_tokens = jnp.asarray(ref_tokens)
    ref_mask = jnp.asarray(ref_mask, bool)
    if ref_tokens.ndim != 2 or ref_tokens.shape != ref_mask.shape:
        raise ValueError(f"ref_tokens {tuple(ref_tokens.shape)} and ref_mask {tuple(ref_mask.shape)} "
                         "must both be [I, R]")
    n, R = ref_tokens.shape
    K, G, H, E = c.num_kv_heads, c.group_size, c.head_dim, c.tokens_per_memory

    def per_layer(q_pre, k_pre, k_post, v):
        logw = token_scores(q_pre.reshape(n, R, K, G, H), k_pre, ref_mask,
                            score=c.score, group_reduce=c.group_reduce, v_IRKH=v)
        idx_IKE, slot_ok = select_tokens(logw, ref_mask, E)
        gather = jax.vmap(jax.vmap(lambda x_RH, i_E: x_RH[i_E], in_axes=(1, 0)), in_axes=(0, 0))
        k_sel = gather(k_post, idx_IKE)  # [I, K, E, H]
        v_sel = gather(v, idx_IKE)
        return jnp.stack([k_sel, v_sel], axis=1), slot_ok  # [I, Z, K, E, H]

    kv_LIZKEH, ok_LIE = encode_states(params, c, ref_tokens, ref_mask, per_layer)
    kv = jnp.transpose(kv_LIZKEH, (1, 0, 2, 3, 4, 5))
    return MemoryKV(kv, ok_LIE[0])


@functools.partial(jax.jit, static_argnums=(1,))
def encode_jit(params: Params, config: ModelConfig, ref_tokens: Array, ref_mask: Array) -> MemoryKV:
    return encode(params, config, ref_tokens, ref_mask)


def make_encode_fn(params: Params, config: ModelConfig) -> Callable[[np.ndarray, np.ndarray], MemoryKV]:
    """A host-side `encode_fn(tokens [n, R], mask [n, R]) -> MemoryKV` for bank building: pads
    references to `reference_len` and the batch to a power of two so the jitted encoder compiles
    only a handful of times."""

    def fn(tokens: np.ndarray, mask: np.ndarray) -> MemoryKV:
        tokens = np.asarray(tokens, np.int32)
        mask = np.asarray(mask, bool)
        n, R = tokens.shape
        if R > config.reference_len:
            raise ValueError(f"references of {R} tokens exceed reference_len={config.reference_len}")
        check_token_ids(tokens, config, "reference tokens")  # on the host: the jitted encoder cannot raise
        nb = 1 << max(0, (n - 1).bit_length())
        tok = np.full((nb, config.reference_len), config.pad_id, np.int32)
        msk = np.zeros((nb, config.reference_len), bool)
        tok[:n, :R], msk[:n, :R] = tokens, mask
        mem = encode_jit(params, config, jnp.asarray(tok), jnp.asarray(msk))
        return mem.take(slice(0, n))

    return fn
