"""The Memory3 decoder as pure functions over a params pytree.

Params (shape letters: the table in docs/ARCHITECTURE.md):

    embed         [V, D]                      ("vocab", "embed")
    mem_blocks    stacked layers 0..Lm-1      (the memory layers; absent if Lm == 0)
    blocks        stacked layers Lm..L-1      (absent if Lm == L)
    final_norm    [D]
    lm_head       [D, V]                      (absent with tied embeddings)

    each stack:   attn_norm [L, D], wq [L, D, N, H], wk [L, D, K, H], wv [L, D, K, H],
                  wo [L, N, H, D], mlp_norm [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D]
                  with qkv_bias: bq [L, N, H], bk [L, K, H], bv [L, K, H]
                  with qk_norm:  q_norm [L, H], k_norm [L, H]

The family switches act in the projections (`_project_qkv`), before RoPE, so that every path
that computes keys (forward, prefill, decoding, the reference prefix and memory writing) applies
them alike: memory keys are stored post-RoPE with the family's own rotary.

Positions (MEMORY3.md, "parallel position encoding"): the reference prefix ("BOS Reference:")
sits at 0..r-1, every memory shares the window r..r+reference_len-1 (baked into its keys), and the
context starts at r + reference_len. With `reference_prefix=None` there is no sink, no memory and
the context starts at 0: a plain Llama.

Token ids outside [0, vocab_size) are refused at the API boundary: `forward`, `attention_mass`
and `encode_states` raise ValueError (`check_token_ids`) when given concrete arrays. Inside jit
(traced ids) they cannot raise; there the embedding lookup is the guard: an out-of-range id,
negative ones included (no wrap-around), embeds as NaN, which reaches every logit of its
sequence (attention multiplies even masked values by zero weights): NaN instead of plausible
numbers, the other sequences of the batch unharmed. The guard is one compare and select on the
[B, T] ids (no measurable cost).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ModelConfig
from m3jax.model.attention import ATTENTION_NAME, MemoryBlocks, PrefixKV, attention
from m3jax.model.layers import apply_rope, dense, fused_mlp, mlp, rms_norm, rope_angles
from m3jax.model.memory import ChunkMemory
from m3jax.sharding import constrain

Array = jax.Array
Params = dict[str, Any]
STACKS = ("mem_blocks", "blocks")
# Logical axes (m3jax.sharding's rule table) of one KV cache layer (`init_kv_layers`).
CACHE_AXES = ("batch", "kv_heads", "kv_length", "head_dim")  # keys [B, K, S, H]
CACHE_V_AXES = ("batch", "kv_heads", "head_dim", "kv_length")  # values [B, K, H, S]

_BLOCK_AXES = {
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
_BIAS_AXES = {"bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
              "bv": ("layers", "kv_heads", "head_dim")}
_QK_NORM_AXES = {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}


def stack_sizes(config: ModelConfig) -> dict[str, int]:
    """Number of layers in each present stack, in execution order."""
    sizes = {"mem_blocks": config.memory_layers, "blocks": config.num_layers - config.memory_layers}
    return {k: v for k, v in sizes.items() if v > 0}


def _block_shapes(c: ModelConfig, L: int) -> dict[str, tuple[int, ...]]:
    D, N, K, H, F = c.hidden, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    shapes = {"attn_norm": (L, D), "wq": (L, D, N, H), "wk": (L, D, K, H), "wv": (L, D, K, H),
              "wo": (L, N, H, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
              "w_down": (L, F, D)}
    if c.qkv_bias:
        shapes.update(bq=(L, N, H), bk=(L, K, H), bv=(L, K, H))
    if c.qk_norm:
        shapes.update(q_norm=(L, H), k_norm=(L, H))
    return shapes


def _block_axes(c: ModelConfig) -> dict[str, tuple[str, ...]]:
    return {**_BLOCK_AXES, **(_BIAS_AXES if c.qkv_bias else {}), **(_QK_NORM_AXES if c.qk_norm else {})}


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The params pytree as nested dicts of shape tuples."""
    shapes: dict[str, Any] = {"embed": (config.vocab_size, config.hidden)}
    for name, L in stack_sizes(config).items():
        shapes[name] = _block_shapes(config, L)
    shapes["final_norm"] = (config.hidden,)
    if not config.tie_embeddings:
        shapes["lm_head"] = (config.hidden, config.vocab_size)
    return shapes


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter (same tree as the params), for sharding rules."""
    axes: dict[str, Any] = {"embed": ("vocab", "embed")}
    for name in stack_sizes(config):
        axes[name] = _block_axes(config)
    axes["final_norm"] = ("embed",)
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def init(config: ModelConfig, key: Array) -> Params:
    """Random params: truncated normal(0.02), output projections scaled by 1/sqrt(2 * layers);
    norms one, biases zero."""
    dtype = jnp.dtype(config.param_dtype)
    shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    out_std = 0.02 / math.sqrt(2 * config.num_layers)
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
            continue
        if name in _BIAS_AXES:
            leaves.append(jnp.zeros(shape, dtype))
            continue
        std = out_std if name in ("wo", "w_down") else 0.02
        leaves.append((std * jax.random.truncated_normal(k, -2.0, 2.0, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restack(params: Params, memory_layers: int) -> Params:
    """The same weights with the first `memory_layers` layers in `mem_blocks` and the rest in
    `blocks` (a config's `memory_layers` decides how the layer stack is split; the weights of a
    layer do not depend on it)."""
    stacks = [params[n] for n in STACKS if n in params]
    names = stacks[0].keys()
    whole = {k: jnp.concatenate([st[k] for st in stacks], axis=0) for k in names}
    L = next(iter(whole.values())).shape[0]
    if not 0 <= memory_layers <= L:
        raise ValueError(f"memory_layers={memory_layers} is not in [0, {L}]")
    out = {k: v for k, v in params.items() if k not in STACKS}
    if memory_layers:
        out["mem_blocks"] = {k: v[:memory_layers] for k, v in whole.items()}
    if memory_layers < L:
        out["blocks"] = {k: v[memory_layers:] for k, v in whole.items()}
    return out


def unstack_layers(params: Params, dtype=None) -> Params:
    """The same weights with each stack as a tuple of per-layer dicts (the cached path of
    `_cached_layers` accepts both layouts), optionally cast to `dtype` (the activation dtype; norm
    scales stay as they are). A jitted decoding loop takes its layers from this layout, sliced
    and cast once before the loop: slicing a stacked weight (or casting it) inside the loop body
    copies the whole layer on every step on CPU (XLA does not hoist it out of the loop)."""
    def cast(name, x):
        keep = dtype is None or name.endswith("norm") or not jnp.issubdtype(x.dtype, jnp.floating)
        return x if keep else x.astype(dtype)

    out = {k: (cast(k, v) if k not in STACKS else v) for k, v in params.items()}
    for name in STACKS:
        if name in params and isinstance(params[name], dict):
            L = next(iter(params[name].values())).shape[0]
            stack = {k: cast(k, v) for k, v in params[name].items()}
            out[name] = tuple(_layer(stack, i) for i in range(L))
    return out


def decode_layers(params: Params, dtype=None, lanes: int = 1) -> Params:
    """`unstack_layers`, then each layer's matrices in the decode layout, every contraction over
    the minor dimension of the weight (the [B, D] x [O, D] form XLA:CPU runs fastest, about 1.3x
    the [D, O] form at B = 32):
      w_qkv_OD   q / k / v projections fused, [(N + 2K) H, D] (biases fused: b_qkv_O)
      wo_HND     the output projection [H, N, D] (the order XLA lays the attention output in:
                 with [N, H, D] it transposes the weight inside the loop, every step)
      w_gu_OD    gate and up fused, [2F, D]; w_down_DF the down projection [D, F].
    Each is a tuple of `lanes` blocks (split along O, the output D, and F; the MLP blocks pair
    gate and up columns, their down products are summed): independent products that XLA:CPU
    runs on different threads. For the jitted decoding loop: prepared before it (once per round,
    or once for good with `decode.round_params`)."""
    out = unstack_layers(params, dtype)
    for name in STACKS:
        if name in out:
            out[name] = tuple(_decode_layer(p, lanes) for p in out[name])
    return out


def is_decode_layout(params: Params) -> bool:
    """Whether `params` are `decode_layers`'s (per-layer tuples in the decode layout)."""
    stacks = [params[n] for n in STACKS if n in params]
    return bool(stacks) and isinstance(stacks[0], tuple) and "w_qkv_OD" in stacks[0][0]


def _decode_layer(p: Params, n: int) -> Params:
    D, F = p["wq"].shape[0], p["w_gate"].shape[1]
    q = {k: v for k, v in p.items() if k not in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "bq", "bk", "bv")}
    qkv = jnp.concatenate([p[w].reshape(D, -1) for w in ("wq", "wk", "wv")], axis=1).T
    O = qkv.shape[0]
    n_qkv = n if O % n == 0 else 1
    q["w_qkv_OD"] = tuple(jnp.split(qkv, n_qkv, axis=0))
    if "bq" in p:
        q["b_qkv_O"] = jnp.concatenate([p[b].reshape(-1) for b in ("bq", "bk", "bv")])
    wo = jnp.transpose(p["wo"], (1, 0, 2))
    n_o = n if D % n == 0 else 1
    q["wo_HND"] = tuple(jnp.split(wo, n_o, axis=2))
    n_f = n if F % n == 0 else 1
    gate, up = jnp.split(p["w_gate"].T, n_f, axis=0), jnp.split(p["w_up"].T, n_f, axis=0)
    q["w_gu_OD"] = tuple(jnp.concatenate([g, u], axis=0) for g, u in zip(gate, up))
    q["w_down_DF"] = tuple(jnp.split(p["w_down"].T, n_f, axis=1))
    return q


def _layer(stack: dict | tuple, i: int) -> Params:
    """Layer i of a stack, stacked ({name: [L, ...]}) or unstacked (`unstack_layers`)."""
    return stack[i] if isinstance(stack, tuple) else {k: v[i] for k, v in stack.items()}


def check_params(params: Params, config: ModelConfig) -> None:
    """Raise a clear error if `params` does not have the tree and shapes of `config`."""
    want = param_shapes(config)
    flat_want = {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]}
    flat_got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(flat_want) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_want))
    bad = sorted(k for k in set(flat_want) & set(flat_got) if flat_want[k] != flat_got[k])
    if missing or extra or bad:
        msg = [f"params do not match config {config.name!r}:"]
        if missing:
            msg.append(f"missing {missing}")
        if extra:
            msg.append(f"unexpected {extra}")
        for k in bad[:5]:
            msg.append(f"{k} has shape {flat_got[k]}, expected {flat_want[k]}")
        raise ValueError(" ".join(msg))


# ---------------------------------------------------------------------------- core
def _project_qkv(p: Params, h_BTD: Array, c: ModelConfig) -> tuple[Array, Array, Array]:
    """q [B, T, N, H], k, v [B, T, K, H] before RoPE: the projections, plus the family's biases
    (`qkv_bias`) and per-head query/key RMSNorm (`qk_norm`)."""
    dt = jnp.dtype(c.dtype)
    if "w_qkv_OD" in p:  # the decode layout (`decode_layers`): one fused product
        B, T, _ = h_BTD.shape
        N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = jnp.concatenate([dense("BTD,OD->BTO", h_BTD, w) for w in p["w_qkv_OD"]], axis=-1)
        if c.qkv_bias:
            qkv = qkv + p["b_qkv_O"].astype(dt)
        q = qkv[..., :N * H].reshape(B, T, N, H)
        k = qkv[..., N * H:(N + K) * H].reshape(B, T, K, H)
        v = qkv[..., (N + K) * H:].reshape(B, T, K, H)
    else:
        q = dense("BTD,DNH->BTNH", h_BTD, p["wq"])
        k = dense("BTD,DKH->BTKH", h_BTD, p["wk"])
        v = dense("BTD,DKH->BTKH", h_BTD, p["wv"])
        if c.qkv_bias:
            q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if c.qk_norm:
        q, k = rms_norm(q, p["q_norm"], c.norm_eps), rms_norm(k, p["k_norm"], c.norm_eps)
    return (constrain(q, ("batch", "length", "heads", "head_dim")),
            constrain(k, ("batch", "kv_length", "kv_heads", "head_dim")),
            constrain(v, ("batch", "kv_length", "kv_heads", "head_dim")))


class Shared(NamedTuple):
    """What every layer of one call shares: the rotary angles of the query positions, the
    attention mask [B, T, S], and (with a KV cache) the cache slots the new keys go to.
    `fresh`: the cache is empty before the call (a prefill): the new keys and values are still
    written to the cache, but attention reads only them (mask [B, T, T], causal), not every
    slot of the cache."""

    cos_BTH: Array
    sin_BTH: Array
    mask_BTS: Array
    slots_BT: Array | None = None
    fresh: bool = False


class Reads(NamedTuple):
    """What a run of the stacks reads besides x: the reference prefix's keys and values
    ({stack: (k [L, r, K, H], v [L, r, K, H])}), explicit memory (read by the memory layers) and
    the KV cache ({stack: ((k [B, K, S, H], v [B, K, H, S]) per layer)})."""

    prefix: dict[str, tuple[Array, Array]] | None = None
    memory: ChunkMemory | None = None
    cache: dict[str, tuple[tuple[Array, Array], ...]] | None = None


class LayerReads(NamedTuple):
    """`Reads` of one layer: its prefix keys/values, memory blocks and cache layer."""

    prefix: PrefixKV | None = None
    memory: MemoryBlocks | None = None
    kv: tuple[Array, Array] | None = None


class Acts(NamedTuple):
    """What a layer computed on the way, for the paths that keep some of it: queries and keys
    before RoPE (q [B, T, N, H], k [B, T, K, H]), keys after RoPE, values, and (`mass=True`
    only) the head-averaged attention mass on (prefix, memory, context), [3, B, T]."""

    q_BTNH: Array
    k_BTKH: Array
    k_rot_BTKH: Array
    v_BTKH: Array
    mass: Array | None


def _set_slots(cache: Array, index: tuple, new: Array, dt) -> Array:
    """`cache.at[index].set(new)` in the cache's storage: `dt` itself, or the uint16 bits of a
    16-bit `dt` (`decode.decode_round` on CPU carries bf16 caches so). XLA:CPU has no bfloat16
    scatter: it would convert the whole cache layer to float32 and back at every step, so a
    16-bit float cache is written through its bits too (the values are the same bits)."""
    bits = jax.lax.bitcast_convert_type
    if cache.dtype == jnp.uint16:
        return cache.at[index].set(bits(new.astype(dt), jnp.uint16))
    new = new.astype(cache.dtype)
    if cache.dtype.itemsize != 2 or not jnp.issubdtype(cache.dtype, jnp.floating):
        return cache.at[index].set(new)
    return bits(bits(cache, jnp.uint16).at[index].set(bits(new, jnp.uint16)), cache.dtype)


def cache_view(cache: Array, dt) -> Array:
    """A cache layer as attention reads it: uint16 storage (`_set_slots`) viewed as `dt`."""
    return jax.lax.bitcast_convert_type(cache, dt) if cache.dtype == jnp.uint16 else cache


def _block(p: Params, x_BTD: Array, c: ModelConfig, shared: Shared, reads: LayerReads, *, mass: bool = False
           ) -> tuple[Array, tuple[Array, Array] | None, Acts]:
    """One decoder layer: (x, the updated cache layer or None, `Acts`). With a cache layer
    (`reads.kv`) the new keys/values are written at `shared.slots_BT` and attention reads the
    whole cache layer (the new ones only when `shared.fresh`); otherwise the new ones. `mass`
    also returns the attention mass."""
    dt = jnp.dtype(c.dtype)
    x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
    h = rms_norm(x_BTD, p["attn_norm"], c.norm_eps)
    q, k, v = _project_qkv(p, h, c)
    q_rot = apply_rope(q, shared.cos_BTH, shared.sin_BTH)
    k_rot = apply_rope(k, shared.cos_BTH, shared.sin_BTH)
    new_kv = None
    if reads.kv is not None:
        ck, cv = reads.kv
        b_idx = jnp.arange(x_BTD.shape[0])[:, None]
        ck = _set_slots(ck, (b_idx, slice(None), shared.slots_BT), k_rot, dt)  # [B, T, K, H] rows into [B, K, S, H]
        cv = _set_slots(cv, (b_idx, slice(None), slice(None), shared.slots_BT), v, dt)  # columns into [B, K, H, S]
        keys, values, new_kv = cache_view(ck, dt), cache_view(cv, dt), (ck, cv)
    if reads.kv is None or shared.fresh:
        keys, values = jnp.swapaxes(k_rot, 1, 2), jnp.transpose(v, (0, 2, 3, 1))
    masses = None
    if mass:  # attention mass on (prefix, memory, context), head-averaged: [3, B, T]
        o, probs = attention(q_rot, keys, values, shared.mask_BTS, prefix=reads.prefix, memory=reads.memory,
                             return_probs=True)
        masses = jnp.stack([m.mean(axis=1) for m in probs])
    else:
        # without a cache (or reading only the new keys) every caller's mask is causal & key-valid
        # (`attention`'s `causal`)
        o = attention(q_rot, keys, values, shared.mask_BTS, prefix=reads.prefix, memory=reads.memory,
                      causal=reads.kv is None or shared.fresh)
    if "wo_HND" in p:  # the decode layout (`decode_layers`)
        x_BTD = x_BTD + jnp.concatenate([dense("BTNH,HND->BTD", o, w) for w in p["wo_HND"]], axis=-1)
        h = rms_norm(x_BTD, p["mlp_norm"], c.norm_eps)
        x_BTD = x_BTD + sum(fused_mlp(h, gu, down) for gu, down in zip(p["w_gu_OD"], p["w_down_DF"]))
    else:
        x_BTD = x_BTD + dense("BTNH,NHD->BTD", o, p["wo"])
        h = rms_norm(x_BTD, p["mlp_norm"], c.norm_eps)
        x_BTD = x_BTD + mlp(h, p["w_gate"], p["w_up"], p["w_down"])
    return constrain(x_BTD, ("batch", "length", "embed")), new_kv, Acts(q, k, k_rot, v, masses)


def remat_policy(name: str) -> Callable:
    """The `jax.checkpoint` policy of a `ModelConfig.remat` name (not "none").

    full       nothing saved but the layer input: the whole layer is recomputed once.
    dots       outputs of matmuls without batch dimensions (the q/k/v/o projections and the MLP)
               saved: the attention core (scores, softmax, probabilities x values) and the
               elementwise ops (norms, RoPE, SiLU) are recomputed.
    attention  "dots" plus the values `attention` names "attention" (its output, and with splash
               attention the kernel's softmax statistics): a fused kernel's backward then needs no
               forward recomputation; the XLA path still recomputes its probabilities.
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "attention":
        return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                          cp.save_only_these_names(ATTENTION_NAME))
    raise ValueError(f"unknown remat policy {name!r}; choose from none, full, dots, attention")


def _scan_layers(params: Params, c: ModelConfig, x_BTD: Array, shared: Shared, reads: Reads = Reads(), *,
                 keep: Callable[[Acts], Any] | None = None, mass: bool = False,
                 stacks: tuple[str, ...] = STACKS) -> tuple[Array, dict[str, Any]]:
    """The layers of every present stack in `stacks` over x, each stack in one `lax.scan` (fast to
    compile: the training path; no cache). Returns (x, {stack: keep(acts) stacked over its
    layers}) (an empty dict without `keep`); what `keep` leaves out is never materialized."""
    kept: dict[str, Any] = {}
    for name in stack_sizes(c):
        if name not in stacks:
            continue
        use_mem = reads.memory is not None and name == "mem_blocks"

        def body(x, xs, use_mem=use_mem):
            pre = PrefixKV(*xs["prefix"]) if "prefix" in xs else None
            mem = MemoryBlocks(xs["mem_k"], xs["mem_v"], reads.memory.mask_BCM) if use_mem else None
            x, _, acts = _block(xs["p"], x, c, shared, LayerReads(pre, mem), mass=mass)
            return x, (keep(acts) if keep is not None else None)

        xs: dict[str, Any] = {"p": params[name]}
        if reads.prefix is not None:
            xs["prefix"] = reads.prefix[name]
        if use_mem:
            xs["mem_k"], xs["mem_v"] = reads.memory.k_LBCMKH, reads.memory.v_LBCMKH
        if c.remat != "none":  # what the backward pass keeps of each layer: `remat_policy`
            body = jax.checkpoint(body, policy=remat_policy(c.remat))
        x_BTD, out = jax.lax.scan(body, x_BTD, xs)
        if keep is not None:
            kept[name] = out
    return x_BTD, kept


def _cached_layers(params: Params, c: ModelConfig, x_BTD: Array, shared: Shared, reads: Reads
                   ) -> tuple[Array, dict[str, tuple[tuple[Array, Array], ...]]]:
    """The layers of every stack over x with the KV cache `reads.cache` (prefill, decoding):
    unrolled over per-layer cache arrays, so that each step updates its cache in place instead of
    copying a stacked cache layer. `params` stacked or unstacked (`unstack_layers`). Returns
    (x, the updated cache)."""
    new_cache: dict[str, tuple[tuple[Array, Array], ...]] = {}
    for name, L in stack_sizes(c).items():
        use_mem = reads.memory is not None and name == "mem_blocks"
        layers = []
        for i in range(L):
            pre = PrefixKV(reads.prefix[name][0][i], reads.prefix[name][1][i]) if reads.prefix is not None else None
            mem = (MemoryBlocks(reads.memory.k_LBCMKH[i], reads.memory.v_LBCMKH[i], reads.memory.mask_BCM)
                   if use_mem else None)
            ck, cv = reads.cache[name][i]
            kv = (constrain(ck, CACHE_AXES), constrain(cv, CACHE_V_AXES))
            x_BTD, new_kv, _ = _block(_layer(params[name], i), x_BTD, c, shared, LayerReads(pre, mem, kv))
            layers.append(new_kv)
        new_cache[name] = tuple(layers)
    return x_BTD, new_cache


def check_token_ids(tokens: Any, config: ModelConfig, what: str = "tokens") -> None:
    """Raise ValueError if a token id is outside [0, vocab_size). Checked on the host (ids are
    small: [B, T] int32) for lists, NumPy arrays and concrete jax arrays, also when a jitted
    function closes over them; traced ids and arrays spread over several hosts are skipped (the
    jitted lookup in `_embed` turns an out-of-range id into NaN instead)."""
    if isinstance(tokens, jax.core.Tracer) or (isinstance(tokens, jax.Array) and not tokens.is_fully_addressable):
        return
    a = np.asarray(tokens)
    if a.size == 0:
        return
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {a.dtype}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {config.vocab_size}) of "
                         f"model {config.name!r} (a tokenizer of another model?)")


def _embed(params: Params, c: ModelConfig, tokens_BT: Array) -> Array:
    table = constrain(params["embed"], ("vocab", None))  # avoids a full rematerialization under fsdp
    # out-of-range ids (negative too: no wrap-around) read NaN rows, never another token's
    ids = jnp.where(tokens_BT < 0, table.shape[0], tokens_BT)
    x = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan).astype(jnp.dtype(c.dtype))
    return constrain(x, ("batch", "length", "embed"))


def _logits(params: Params, c: ModelConfig, x_BTD: Array) -> Array:
    x = rms_norm(x_BTD, params["final_norm"], c.norm_eps)
    w = params["embed"].T if c.tie_embeddings else params["lm_head"]
    logits = jnp.einsum("BTD,DV->BTV", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def prefix_kv(params: Params, config: ModelConfig) -> dict[str, tuple[Array, Array]] | None:
    """Keys (post-RoPE) and values of the reference prefix at every layer, per stack:
    {stack: (k [L, r, K, H], v [L, r, K, H])}. Constant for given weights: compute once."""
    if config.reference_prefix is None:
        return None
    r = config.prefix_len
    tokens = jnp.asarray(config.reference_prefix, jnp.int32)[None]
    pos = jnp.arange(r, dtype=jnp.int32)[None]
    x = _embed(params, config, tokens)
    # The scanned (training) path keeping each layer's keys and values: `forward` calls this
    # inside the train step, where unrolled layers would multiply the compile.
    cos, sin = rope_angles(pos, config)
    _, kept = _scan_layers(params, config, x, Shared(cos, sin, _causal_mask(pos[0], r)[None]),
                           keep=lambda a: (a.k_rot_BTKH[0], a.v_BTKH[0]))
    return kept


def init_kv_layers(config: ModelConfig, batch: int, length: int, dtype=jnp.float32):
    """Zeroed key/value buffers per layer: {stack: ((k, v) per layer)}, k [B, K, length, H] and
    v [B, K, H, length] (values transposed: both attention contractions then run over the minor
    dimension of both operands, the layout XLA's CPU matmuls run fastest, bf16 included)."""
    K, H = config.num_kv_heads, config.head_dim
    return {name: tuple((jnp.zeros((batch, K, length, H), dtype), jnp.zeros((batch, K, H, length), dtype))
                        for _ in range(L))
            for name, L in stack_sizes(config).items()}


def grow_kv_layers(kv: dict, length: int) -> dict:
    """`init_kv_layers` buffers with room for `length` slots: the new slots (zeros) after the
    held ones, keys padded on their slot axis 2, transposed values on axis 3."""
    def pad(a: Array, axis: int) -> Array:
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, length - a.shape[axis])
        return jnp.pad(a, widths)

    return {name: tuple((pad(k, 2), pad(v, 3)) for k, v in layers) for name, layers in kv.items()}


def _causal_mask(query_slots: Array, key_len: int) -> Array:
    """[T, S] boolean: key slot j is visible to a query in slot i iff j <= i."""
    return jnp.arange(key_len)[None, :] <= query_slots[:, None]


def _check_tokens(tokens: Array, config: ModelConfig) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, length], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > config.max_len:
        raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_len={config.max_len} of "
                         f"config {config.name!r}")
    check_token_ids(tokens, config)


def _full_sequence(params: Params, c: ModelConfig, tokens: Array, memory: ChunkMemory | None, prefix, *,
                   mass: bool = False) -> tuple[Array, dict[str, Any]]:
    """The no-cache path shared by `forward` and `attention_mass`: checks, chunk padding,
    positions from `context_offset`, causal mask; returns (x [B, T, D], {stack: attention mass
    [L, 3, B, T]} with `mass`, else {})."""
    _check_tokens(tokens, c)
    B, T = tokens.shape
    if memory is not None:
        if not c.memory_enabled:
            raise ValueError(f"config {c.name!r} has memory off (reference_prefix=None or memory_layers=0) "
                             "but memory was given")
        memory.check(c, B, -(-T // c.chunk_size))
        memory = memory.windowed().constrain()
    if prefix is None and c.reference_prefix is not None:
        prefix = prefix_kv(params, c)
    # Chunks of memory are `chunk_size` queries each; one chunk may be shorter (no padding).
    Tp = T if memory is None or memory.num_chunks == 1 else memory.num_chunks * c.chunk_size
    tok = jnp.pad(tokens, ((0, 0), (0, Tp - T)), constant_values=c.pad_id) if Tp != T else tokens
    slots = jnp.arange(Tp, dtype=jnp.int32)
    cos, sin = rope_angles(jnp.broadcast_to(c.context_offset + slots, (B, Tp)), c)
    shared = Shared(cos, sin, jnp.broadcast_to(_causal_mask(slots, Tp), (B, Tp, Tp)))
    x, kept = _scan_layers(params, c, _embed(params, c, tok), shared, Reads(prefix, memory),
                           keep=(lambda a: a.mass) if mass else None, mass=mass)
    return x[:, :T], kept


def forward(params: Params, tokens: Array, config: ModelConfig, *, memory: ChunkMemory | None = None,
            prefix: dict[str, tuple[Array, Array]] | None = None) -> Array:
    """Logits [B, T, V] (float32) of a full sequence (training / evaluation).

    tokens: int [B, T], the context including its leading BOS. memory: optional `ChunkMemory`
    with one block per `chunk_size` tokens (ceil(T / chunk_size) chunks); chunk c reads blocks
    c-lookback..c. prefix: precomputed `prefix_kv` (computed here from params when omitted).
    """
    x, _ = _full_sequence(params, config, tokens, memory, prefix)
    return _logits(params, config, x)


def attention_mass(params: Params, tokens: Array, config: ModelConfig, *,
                   memory: ChunkMemory | None = None) -> dict[str, Array]:
    """Where attention goes: the head-averaged probability mass each token puts on the prefix
    sink, on explicit memory and on the context, per layer: {"prefix", "memory", "context"}
    each [L, B, T] (layers in order). Same inputs as `forward`; for inspection, not training."""
    _, kept = _full_sequence(params, config, tokens, memory, None, mass=True)
    T = tokens.shape[1]
    m = jnp.concatenate([kept[name] for name in stack_sizes(config)], axis=0)[..., :T]  # [L, 3, B, T]
    return {"prefix": m[:, 0], "memory": m[:, 1], "context": m[:, 2]}


def encode_states(params: Params, config: ModelConfig, ref_tokens: Array, ref_mask: Array,
                  fn: Callable[[Array, Array, Array, Array], Any]) -> Any:
    """The memory write path: run `reference_prefix + reference` through the memory layers only.

    ref_tokens: int [I, R] (I references, R <= reference_len, valid tokens first, then padding),
    ref_mask: bool [I, R]. At each memory layer `fn(q_pre [I, R, N, H], k_pre [I, R, K, H],
    k_post [I, R, K, H], v [I, R, K, H])` is called on the reference positions (prefix sliced off; q and k before RoPE,
    keys also after RoPE at positions r..r+R-1) inside the layer scan; its outputs are stacked
    over memory layers and returned. Activations of the whole stack are never materialized.
    """
    c = config
    if not c.memory_enabled:
        raise ValueError(f"config {c.name!r} has memory off: it cannot write memories")
    I, R = ref_tokens.shape
    if R > c.reference_len:
        raise ValueError(f"references of {R} tokens exceed reference_len={c.reference_len}")
    check_token_ids(ref_tokens, c, "reference tokens")
    r = c.prefix_len
    pre = jnp.broadcast_to(jnp.asarray(c.reference_prefix, ref_tokens.dtype), (I, r))
    tokens = jnp.concatenate([pre, ref_tokens], axis=1)
    valid = jnp.concatenate([jnp.ones((I, r), bool), ref_mask.astype(bool)], axis=1)
    slots = jnp.arange(r + R, dtype=jnp.int32)
    cos, sin = rope_angles(jnp.broadcast_to(slots, (I, r + R)), c)
    mask = _causal_mask(slots, r + R)[None] & valid[:, None, :]
    x = _embed(params, c, tokens)

    def keep(a: Acts):  # the reference positions only (the prefix sliced off)
        return fn(a.q_BTNH[:, r:], a.k_BTKH[:, r:], a.k_rot_BTKH[:, r:], a.v_BTKH[:, r:])

    _, kept = _scan_layers(params, c, x, Shared(cos, sin, mask), keep=keep, stacks=("mem_blocks",))
    return kept["mem_blocks"]


def num_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
