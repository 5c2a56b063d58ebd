"""The foundation: configs, presets and the Memory3 forward against an independent NumPy model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from m3jax import config as C
from m3jax import model as M
from m3jax.memory.codec import memory_bytes

CFG = C.preset("tiny")
fwd = jax.jit(M.forward, static_argnums=2)
ext = jax.jit(M.extend, static_argnums=1)


@functools.lru_cache(maxsize=None)
def _params(cfg=CFG, seed=0):
    p = M.init(cfg, jax.random.PRNGKey(seed))
    # Random norm scales so a transposed or missing norm cannot hide behind ones.
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 16))
    def bump(path, x):
        if path[-1].key.endswith("norm"):
            return x + 0.3 * jax.random.normal(next(keys), x.shape)
        return x * 4.0  # larger weights: sharper attention, a stronger test
    return jax.tree_util.tree_map_with_path(bump, p)


def _tokens(B, T, seed=1, cfg=CFG):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 3, cfg.vocab_size)


def _memory(B, C_, S, seed=2, cfg=CFG, lookback=0, p_valid=0.7):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (cfg.memory_layers, B, C_, S, cfg.num_kv_heads, cfg.head_dim)
    k = jax.random.normal(ks[0], shape)
    v = jax.random.normal(ks[1], shape)
    mask = jax.random.uniform(ks[2], (B, C_, S)) < p_valid
    return M.ChunkMemory(k, v, mask, lookback)


def _np_mem(mem):
    return {"k": np.asarray(mem.k_LBCMKH, np.float64), "v": np.asarray(mem.v_LBCMKH, np.float64),
            "mask": np.asarray(mem.mask_BCM), "lookback": mem.lookback}


def test_forward_matches_numpy_without_memory():
    p, toks = _params(), _tokens(2, 21)
    got = np.asarray(fwd(p, toks, CFG))
    want = ref.forward(p, CFG, toks)
    assert np.max(np.abs(got - want)) < 2e-4, np.max(np.abs(got - want))


@pytest.mark.parametrize("lookback", [0, 2])
def test_forward_matches_numpy_with_memory(lookback):
    T = 3 * CFG.chunk_size - 5  # a partial last chunk exercises the padding path
    p, toks = _params(), _tokens(2, T)
    mem = _memory(2, 3, CFG.memory_block_len, lookback=lookback)
    got = np.asarray(fwd(p, toks, CFG, memory=mem))
    want = ref.forward(p, CFG, toks, memory=_np_mem(mem))
    assert np.max(np.abs(got - want)) < 2e-4, np.max(np.abs(got - want))
    # and memory really matters at this scale (otherwise the test proves nothing)
    assert np.max(np.abs(got - np.asarray(fwd(p, toks, CFG)))) > 1e-2


def test_plain_llama_without_prefix_matches_numpy():
    cfg = dataclasses.replace(CFG, reference_prefix=None, tie_embeddings=True)
    p = _params(cfg)
    toks = _tokens(1, 17, cfg=cfg)
    got = np.asarray(M.forward(p, toks, cfg))
    want = ref.forward(p, cfg, toks)
    assert np.max(np.abs(got - want)) < 2e-4
    assert cfg.context_offset == 0 and not cfg.memory_enabled
    with pytest.raises(ValueError, match="memory off"):
        M.forward(p, toks, cfg, memory=_memory(1, 2, 4, cfg=cfg))


def test_all_masked_memory_equals_no_memory():
    p, toks = _params(), _tokens(2, 2 * CFG.chunk_size)
    mem = _memory(2, 2, CFG.memory_block_len, p_valid=0.0)
    a = np.asarray(fwd(p, toks, CFG, memory=mem))
    b = np.asarray(fwd(p, toks, CFG))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("lookback", [0, 1])
def test_memory_block_visible_only_to_its_chunks(lookback):
    """In attention, block c is read only by the queries of chunks c..c+lookback. Through the
    whole model it then reaches later tokens via the context, never earlier ones."""
    p, toks = _params(), _tokens(1, 4 * CFG.chunk_size)
    mem = _memory(1, 4, CFG.memory_block_len, lookback=lookback, p_valid=1.0)
    c, cs = 1, CFG.chunk_size
    pert = mem.replace(k_LBCMKH=mem.k_LBCMKH.at[:, :, c].add(3.0))
    # attention level: exact chunk locality
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    T, N, K, H = 4 * cs, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    q = jax.random.normal(ks[0], (1, T, N, H))
    k = jax.random.normal(ks[1], (1, T, K, H))
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    def attn(m):
        w = m.windowed()
        kt = jnp.swapaxes(k, 1, 2)
        return np.asarray(M.attention(q, kt, jnp.swapaxes(kt, 2, 3), mask, memory=M.MemoryBlocks(w.k_LBCMKH[0], w.v_LBCMKH[0], w.mask_BCM)))
    d = np.abs(attn(pert) - attn(mem)).max(axis=(0, 2, 3)).reshape(4, cs).max(-1)
    for chunk in range(4):
        assert (d[chunk] > 1e-5) == (c <= chunk <= c + lookback), (chunk, d)
    # model level: tokens before chunk c never see it, chunk c does
    base = np.asarray(fwd(p, toks, CFG, memory=mem))
    diff = np.abs(np.asarray(fwd(p, toks, CFG, memory=pert)) - base).max(axis=-1)[0]
    assert diff[: c * cs].max() == 0.0
    assert diff[c * cs:(c + 1) * cs].min() > 1e-5


def test_causality_by_gradients():
    p = _params()
    T = 2 * CFG.chunk_size
    toks = jnp.arange(10, 10 + T)[None]  # distinct tokens: embed row i belongs to one position
    mem = _memory(1, 2, CFG.memory_block_len)
    t = 20
    def f(embed):
        q = dict(p, embed=embed)
        return fwd(q, toks, CFG, memory=mem)[0, t].sum()
    g = np.asarray(jax.grad(f)(p["embed"]))
    row_norm = np.abs(g[10:10 + T]).sum(axis=-1)
    assert np.all(row_norm[t + 1:] == 0.0)
    assert np.all(row_norm[: t + 1] > 0.0)


def test_attention_probs_report_memory_mass():
    B, T, N, H, K = 1, 4, 4, 8, 2
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    mk = jax.random.normal(ks[3], (B, 2, 3, K, H))
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    mem = M.MemoryBlocks(mk, mk, jnp.ones((B, 2, 3), bool))
    pre = M.PrefixKV(jax.random.normal(ks[4], (2, K, H)), jax.random.normal(ks[5], (2, K, H)))
    _, (pm, mm, cm) = M.attention(q, jnp.swapaxes(k, 1, 2), jnp.transpose(v, (0, 2, 3, 1)), mask, prefix=pre,
                                  memory=mem, return_probs=True)
    np.testing.assert_allclose(np.asarray(pm + mm + cm), 1.0, atol=1e-5)
    assert float(mm.min()) > 0


def test_presets_build_and_counts():
    for name in C.preset_names():
        cfg = C.preset(name)
        shapes = jax.eval_shape(lambda k, cfg=cfg: M.init(cfg, k), jax.random.PRNGKey(0))
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
        assert n == cfg.num_params(embedding=True), name
        axes = M.param_axes(cfg)
        jax.tree_util.tree_map(lambda s, a: None if len(a) == len(s.shape) else pytest.fail(name),
                               shapes, axes, is_leaf=lambda x: isinstance(x, tuple))
    big = C.preset("memory3-2b")
    assert abs(big.num_params() / 2.43e9 - 1) < 0.01  # paper: ~2.43B non-embedding
    assert memory_bytes(big, "bf16") == 450_560
    assert memory_bytes(big, "pq") <= 39_424
    assert big.memory_layers == 22 and big.num_layers == 44
    small = C.preset("smollm2-135m")
    assert abs(small.num_params(embedding=True) - 134_515_008) == 0


@pytest.mark.parametrize("bad,match", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(memory_layers=9), "memory_layers"),
    (dict(score="dot"), "score"),
    (dict(group_reduce="mean"), "group_reduce"),
    (dict(head_dim=15), "even"),
    (dict(tokens_per_memory=64), "tokens_per_memory"),
    (dict(reference_prefix=(1, 999)), "outside the vocab"),
    (dict(hidden=0), "hidden"),
    (dict(dtype="int8"), "dtype"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(C.ConfigError, match=match):
        dataclasses.replace(CFG, **bad)


def test_config_overrides_and_dict_round_trip():
    cfg = C.apply_overrides(CFG, ["memory_layers=3", "score=exp", "reference_prefix=[1,7]", "rope_theta=500"])
    assert cfg.memory_layers == 3 and cfg.score == "exp" and cfg.reference_prefix == (1, 7)
    assert C.ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(C.ConfigError, match="no field"):
        C.apply_overrides(CFG, ["nope=1"])
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("gpt5")


def test_wrong_memory_and_token_shapes_raise():
    p, toks = _params(), _tokens(2, 2 * CFG.chunk_size)
    with pytest.raises(ValueError, match="expects k and v"):
        fwd(p, toks, CFG, memory=_memory(2, 3, CFG.memory_block_len))  # 3 chunks for 2
    bad = _memory(2, 2, 8)
    bad = bad.replace(k_LBCMKH=bad.k_LBCMKH[..., :8])
    with pytest.raises(ValueError, match="expects k and v"):
        fwd(p, toks, CFG, memory=bad)
    with pytest.raises(ValueError, match="batch, length"):
        M.forward(p, toks[0], CFG)
    with pytest.raises(ValueError, match="max_len"):
        M.forward(p, jnp.zeros((1, CFG.max_len + 1), jnp.int32), CFG)
    with pytest.raises(ValueError, match="missing"):
        M.check_params({k: v for k, v in p.items() if k != "lm_head"}, CFG)


def test_cache_extend_matches_forward():
    """Prefill a prompt into the cache, then feed tokens one by one: same logits as forward."""
    p = _params()
    T = 2 * CFG.chunk_size + 3
    toks = _tokens(2, T)
    full = np.asarray(fwd(p, toks, CFG))
    cache = M.init_cache(CFG, 2, 64)
    P = CFG.chunk_size
    lo, cache = ext(p, CFG, toks[:, :P], cache)
    outs = [np.asarray(lo)]
    for t in range(P, T):
        lo, cache = ext(p, CFG, toks[:, t:t + 1], cache)
        outs.append(np.asarray(lo))
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, full, atol=2e-4)
    assert np.all(np.asarray(cache.lengths) == T)


def test_attention_mass_sums_to_one_and_sees_memory():
    p, toks = _params(), _tokens(1, 2 * CFG.chunk_size)
    mem = _memory(1, 2, CFG.memory_block_len, p_valid=1.0)
    m = jax.jit(M.attention_mass, static_argnums=2)(p, toks, CFG, memory=mem)
    total = np.asarray(m["prefix"] + m["memory"] + m["context"])
    assert total.shape == (CFG.num_layers, 1, toks.shape[1])
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert float(m["memory"][: CFG.memory_layers].min()) > 0  # memory layers read memory
    assert float(np.abs(m["memory"][CFG.memory_layers:]).max()) == 0  # the others cannot


@pytest.mark.parametrize("policy", ["full", "dots", "attention"])
def test_remat_gives_the_same_gradients(policy):
    p, toks = _params(), _tokens(2, 2 * CFG.chunk_size)
    mem = _memory(2, 2, CFG.memory_block_len, lookback=1)
    def loss(q, cfg):
        return jnp.mean(M.forward(q, toks, cfg, memory=mem) ** 2)
    g0 = jax.jit(jax.grad(loss), static_argnums=1)(p, CFG)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(p, dataclasses.replace(CFG, remat=policy))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_remat_policies_save_what_they_say():
    """Bytes kept for the backward pass: full < dots < attention < none, old true/false configs
    still load, and a bad name is refused."""
    from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints, as data

    p, toks = _params(), _tokens(2, 2 * CFG.chunk_size)
    def saved(policy):
        cfg = dataclasses.replace(CFG, remat=policy)
        res = saved_residuals(lambda q: jnp.mean(M.forward(q, toks, cfg) ** 2), p)
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in res)
    sizes = {k: saved(k) for k in ("full", "dots", "attention", "none")}
    assert sizes["full"] < sizes["dots"] < sizes["attention"] < sizes["none"], sizes
    assert C.ModelConfig(remat=True).remat == "full" and C.ModelConfig(remat=False).remat == "none"
    assert C.ModelConfig.from_dict({**CFG.to_dict(), "remat": True}).remat == "full"
    assert C.apply_overrides(CFG, ["remat=dots"]).remat == "dots"
    with pytest.raises(C.ConfigError, match="remat"):
        C.ModelConfig(remat="some")
