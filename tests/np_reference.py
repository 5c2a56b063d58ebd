"""An independent NumPy re-derivation of the Memory3 model, written from MEMORY3.md with plain
loops over layers, heads and query positions (no code shared with m3jax.model).

Used by the model, encoder, cache and decoding tests as the numerical reference.
"""

from __future__ import annotations

import numpy as np


def to_np(tree):
    if isinstance(tree, dict):
        return {k: to_np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def layer_list(params, cfg):
    """The layers in order as a list of dicts of 2-D/3-D numpy arrays."""
    out = []
    for stack, n in (("mem_blocks", cfg.memory_layers), ("blocks", cfg.num_layers - cfg.memory_layers)):
        for i in range(n):
            out.append({k: np.asarray(v[i], np.float64) for k, v in params[stack].items()})
    return out


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def inv_freq(cfg):
    """Rotary frequencies theta^(-2i/H); with rope_type "llama3" (Llama 3.1), frequency i of
    wavelength w = 2 pi / f: kept when w < original_max_len / high_freq_factor, divided by
    factor when w > original_max_len / low_freq_factor, else interpolated with weight
    s = (original_max_len / w - low) / (high - low) on the unscaled one."""
    H = cfg.head_dim
    freqs = []
    for i in range(H // 2):
        f = cfg.rope_theta ** (-2.0 * i / H)
        if cfg.rope_type == "llama3":
            w, old = 2 * np.pi / f, cfg.rope_original_max_len
            if w > old / cfg.rope_low_freq_factor:
                f = f / cfg.rope_factor
            elif w >= old / cfg.rope_high_freq_factor:
                s = (old / w - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
                f = (1 - s) * f / cfg.rope_factor + s * f
        freqs.append(f)
    return freqs


def rope(x_TNH, pos_T, cfg):
    """HF rotate_half convention: pairs (i, i + H/2) rotate by pos * inv_freq(cfg)[i]."""
    T, N, H = x_TNH.shape
    half = H // 2
    freqs = inv_freq(cfg)
    out = np.empty_like(x_TNH)
    for t in range(T):
        for i in range(half):
            a = pos_T[t] * freqs[i]
            c, s = np.cos(a), np.sin(a)
            x1, x2 = x_TNH[t, :, i], x_TNH[t, :, i + half]
            out[t, :, i] = x1 * c - x2 * s
            out[t, :, i + half] = x2 * c + x1 * s
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def qkv(layer, x_TD, pos_T, cfg):
    """Pre-RoPE q [T,N,H], k [T,K,H], post-RoPE q, k, and v for one sequence at one layer
    (with the family's q/k/v biases and per-head q/k RMSNorm when the config has them)."""
    h = rmsnorm(x_TD, layer["attn_norm"], cfg.norm_eps)
    q = np.einsum("td,dnh->tnh", h, layer["wq"])
    k = np.einsum("td,dkh->tkh", h, layer["wk"])
    v = np.einsum("td,dkh->tkh", h, layer["wv"])
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    if cfg.qk_norm:
        q, k = rmsnorm(q, layer["q_norm"], cfg.norm_eps), rmsnorm(k, layer["k_norm"], cfg.norm_eps)
    return q, k, rope(q, pos_T, cfg), rope(k, pos_T, cfg), v


def finish_layer(layer, x_TD, attn_TNH, cfg):
    T = x_TD.shape[0]
    x = x_TD + attn_TNH.reshape(T, -1) @ layer["wo"].reshape(-1, cfg.hidden)
    h = rmsnorm(x, layer["mlp_norm"], cfg.norm_eps)
    return x + (silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]


def prefix_kv(params, cfg):
    """Per-layer post-RoPE keys and values of the reference prefix (causal, positions 0..r-1)."""
    if cfg.reference_prefix is None:
        return None
    toks = np.array(cfg.reference_prefix)
    x = np.asarray(params["embed"], np.float64)[toks]
    pos = np.arange(len(toks))
    out = []
    for layer in layer_list(params, cfg):
        _, _, q, k, v = qkv(layer, x, pos, cfg)
        out.append((k, v))
        attn = causal_attention(q, k, v, cfg)
        x = finish_layer(layer, x, attn, cfg)
    return out


def causal_attention(q_TNH, k_TKH, v_TKH, cfg):
    T, N, H = q_TNH.shape
    G = cfg.num_heads // cfg.num_kv_heads
    out = np.zeros_like(q_TNH)
    for n in range(N):
        kh = n // G
        for t in range(T):
            s = np.array([q_TNH[t, n] @ k_TKH[j, kh] for j in range(t + 1)]) / np.sqrt(H)
            out[t, n] = softmax(s) @ v_TKH[: t + 1, kh]
    return out


def forward(params, cfg, tokens_BT, memory=None):
    """Logits [B, T, V]. memory: dict(k=[Lm,B,C,S,K,H], v=..., mask=[B,C,S], lookback=int)."""
    params = to_np(params)
    tokens_BT = np.asarray(tokens_BT)
    B, T = tokens_BT.shape
    G = cfg.num_heads // cfg.num_kv_heads
    H = cfg.head_dim
    pkv = prefix_kv(params, cfg)
    offset = 0 if cfg.reference_prefix is None else len(cfg.reference_prefix) + cfg.reference_len
    layers = layer_list(params, cfg)
    logits = []
    for b in range(B):
        x = params["embed"][tokens_BT[b]]
        pos = offset + np.arange(T)
        for li, layer in enumerate(layers):
            _, _, q, k, v = qkv(layer, x, pos, cfg)
            attn = np.zeros_like(q)
            for n in range(cfg.num_heads):
                kh = n // G
                for t in range(T):
                    keys, vals = [], []
                    if pkv is not None:  # the prefix sink, at every layer
                        keys += list(pkv[li][0][:, kh]); vals += list(pkv[li][1][:, kh])
                    if memory is not None and li < cfg.memory_layers:
                        c = t // cfg.chunk_size
                        for cc in range(max(0, c - memory["lookback"]), c + 1):
                            for s in range(memory["mask"].shape[2]):
                                if memory["mask"][b, cc, s]:
                                    keys.append(memory["k"][li, b, cc, s, kh])
                                    vals.append(memory["v"][li, b, cc, s, kh])
                    keys += list(k[: t + 1, kh]); vals += list(v[: t + 1, kh])
                    sc = np.array([q[t, n] @ kk for kk in keys]) / np.sqrt(H)
                    attn[t, n] = softmax(sc) @ np.array(vals)
            x = finish_layer(layer, x, attn, cfg)
        x = rmsnorm(x, params["final_norm"], cfg.norm_eps)
        w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits.append(x @ w)
    return np.stack(logits)


def encode_reference(params, cfg, ref_tokens, score="softmax", group_reduce="sum"):
    """One reference -> (kv [Lm, 2, K, T, H], mask [T], selected positions [Lm, K, T]).

    Runs prefix + reference causally through the memory layers; scores every reference token j
    per (layer, kv head) with pre-RoPE q/k, no causal mask, prefix excluded; keeps the top T.
    """
    params = to_np(params)
    prefix = list(cfg.reference_prefix)
    r = len(prefix)
    toks = np.array(prefix + list(ref_tokens))
    R = len(ref_tokens)
    x = params["embed"][toks]
    pos = np.arange(len(toks))
    G, H, Tm = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.tokens_per_memory
    kvs, sels = [], []
    for li, layer in enumerate(layer_list(params, cfg)[: cfg.memory_layers]):
        q_pre, k_pre, q, k, v = qkv(layer, x, pos, cfg)
        layer_kv = np.zeros((2, cfg.num_kv_heads, Tm, H))
        layer_sel = np.zeros((cfg.num_kv_heads, Tm), int)
        for kh in range(cfg.num_kv_heads):
            per_head = []
            for g in range(G):
                n = kh * G + g
                logit = np.array([[q_pre[r + i, n] @ k_pre[r + j, kh] for j in range(R)] for i in range(R)])
                logit /= np.sqrt(H)
                if score == "softmax":
                    w = sum(softmax(logit[i]) for i in range(R))
                else:
                    w = np.exp(logit).sum(axis=0)
                per_head.append(w)
            w = np.sum(per_head, axis=0) if group_reduce == "sum" else np.max(per_head, axis=0)
            top = np.sort(np.argsort(-w, kind="stable")[: min(Tm, R)])
            layer_sel[kh, : len(top)] = top
            layer_kv[0, kh, : len(top)] = k[r + top, kh]
            layer_kv[1, kh, : len(top)] = v[r + top, kh]
        kvs.append(layer_kv)
        sels.append(layer_sel)
        x = finish_layer(layer, x, causal_attention(q, k, v, cfg), cfg)
    mask = np.arange(Tm) < min(Tm, R)
    return np.stack(kvs), mask, np.stack(sels)
