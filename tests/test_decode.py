"""Generation: cache/decoding equal the full forward, memory swaps every chunk, sampling, modes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import config as C
from m3jax import model as M
from m3jax.decode import Generator, sample
from m3jax.memory import encode

CFG = C.preset("tiny")
DC = C.DecodeConfig(max_new_tokens=40, max_cache_len=128, prompt_bucket=CFG.chunk_size)


@functools.lru_cache(maxsize=None)
def _params():
    return jax.tree_util.tree_map(lambda x: x * 3.0, M.init(CFG, jax.random.PRNGKey(0)))


class TableRetriever:
    """A deterministic stand-in retriever over a small table of really encoded references."""

    def __init__(self, params, cfg, n=12, seed=0):
        rng = np.random.default_rng(seed)
        self.refs = [list(rng.integers(3, cfg.vocab_size, rng.integers(2, cfg.reference_len + 1)))
                     for _ in range(n)]
        toks = np.zeros((n, cfg.reference_len), np.int32)
        mask = np.zeros((n, cfg.reference_len), bool)
        for i, r in enumerate(self.refs):
            toks[i, : len(r)], mask[i, : len(r)] = r, True
        self.mem = encode(params, cfg, jnp.asarray(toks), jnp.asarray(mask))
        self.k = cfg.memories_per_chunk
        self.calls = []

    def ids_for(self, query):
        h = sum(int(t) * (i + 1) for i, t in enumerate(query))
        return [(h + 5 * j) % len(self.refs) for j in range(self.k)]

    def retrieve(self, queries):
        self.calls.append([list(q) for q in queries])
        ids = np.array([self.ids_for(q) for q in queries], np.int64)
        return ids, self.mem.take(jnp.asarray(ids.reshape(-1)))

    def search(self, queries):
        return self.retrieve(queries)[0]

    def reference_tokens(self, ids):
        return [[self.refs[i] for i in row if i >= 0] for row in np.asarray(ids)]


@functools.lru_cache(maxsize=None)
def _setup():
    p = _params()
    ret = TableRetriever(p, CFG)
    return p, ret, Generator(p, CFG, None, ret, DC)


def _block(ret, query):
    return ret.mem.take(jnp.asarray(ret.ids_for(query)))


def test_greedy_memory_generation_equals_full_forward_argmax():
    p, ret, gen = _setup()
    cs = CFG.chunk_size
    prompt = [CFG.bos_id] + list(np.random.default_rng(1).integers(3, 256, 2 * cs - 1))
    res = gen.generate([prompt], mode="memory", ignore_eos=True)
    out = res.tokens[0]
    assert len(out) == 40
    # the memory each absolute chunk reads: prompt chunks retrieve with their text, generated
    # chunk 0 keeps the last prompt chunk's, generated chunk k retrieves with generated chunk k-1
    blocks = [_block(ret, prompt[:cs]), _block(ret, prompt[cs:2 * cs]), _block(ret, prompt[cs:2 * cs]),
              _block(ret, out[:cs]), _block(ret, out[cs:2 * cs])]
    full = jnp.asarray([prompt + out])
    mem = M.ChunkMemory.from_memories(M.MemoryKV.concat(blocks), 1, len(blocks))
    logits = np.asarray(jax.jit(M.forward, static_argnums=2)(p, full, CFG, memory=mem))
    want = logits[0, len(prompt) - 1: len(prompt) + len(out) - 1].argmax(-1)
    np.testing.assert_array_equal(np.asarray(out), want)
    # and memory matters here: without memory the greedy continuation differs
    assert gen.generate([prompt], mode="none", ignore_eos=True).tokens[0] != out


def test_decode_logits_equal_forward_across_a_swap():
    """Prefill + one-token steps with the memory buffer swapped at the chunk boundary give the
    same logits as the train-mode forward."""
    p, ret, _ = _setup()
    cs = CFG.chunk_size
    toks = np.random.default_rng(2).integers(3, 256, (2, 3 * cs)).astype(np.int32)
    toks[:, 0] = CFG.bos_id
    blocks = [ret.mem.take(jnp.arange(b * 2, b * 2 + 2) % 12) for b in range(6)]  # [B=2 x C=3]
    cm = M.ChunkMemory.from_memories(M.MemoryKV.concat(blocks), 2, 3)
    full = np.asarray(jax.jit(M.forward, static_argnums=2)(p, jnp.asarray(toks), CFG, memory=cm))
    ext = jax.jit(M.extend, static_argnums=1)
    cache = M.init_cache(CFG, 2, 64)
    pre = M.ChunkMemory(cm.k_LBCMKH[:, :, :2], cm.v_LBCMKH[:, :, :2], cm.mask_BCM[:, :2])
    lo, cache = ext(p, CFG, jnp.asarray(toks[:, : 2 * cs]), cache, memory=pre)
    got = [np.asarray(lo)]
    step_mem = M.ChunkMemory(cm.k_LBCMKH[:, :, 2:3], cm.v_LBCMKH[:, :, 2:3], cm.mask_BCM[:, 2:3])
    for t in range(2 * cs, 3 * cs):
        lo, cache = ext(p, CFG, jnp.asarray(toks[:, t:t + 1]), cache, memory=step_mem)
        got.append(np.asarray(lo))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=3e-4)


def test_memory_swaps_exactly_every_chunk():
    p, ret, gen = _setup()
    ret.calls.clear()
    res = gen.generate([[CFG.bos_id, 7, 8, 9]], mode="memory", max_new_tokens=40, ignore_eos=True)
    s = res.stats
    assert s.swap_steps == [16, 32] and s.memory_swaps == 2
    assert s.retrievals == 3  # one prompt chunk + two swaps
    assert len(ret.calls) == 3
    assert ret.calls[1] == [res.tokens[0][:16]] and ret.calls[2] == [res.tokens[0][16:32]]
    assert [len(r) for r in res.retrieved[0]] == [2, 2, 2]


def test_batch_with_different_lengths_equals_one_by_one():
    p, ret, gen = _setup()
    a = [CFG.bos_id] + list(range(10, 30))
    b = [CFG.bos_id] + list(range(40, 45))
    both = gen.generate([a, b], mode="memory", max_new_tokens=20).tokens
    assert both[0] == gen.generate([a], mode="memory", max_new_tokens=20).tokens[0]
    assert both[1] == gen.generate([b], mode="memory", max_new_tokens=20).tokens[0]


def test_sampling_reproducible_with_seed():
    p, ret, _ = _setup()
    dc = dataclasses.replace(DC, temperature=1.0, top_k=50, top_p=0.9)
    gen = Generator(p, CFG, None, ret, dc)
    prompt = [[CFG.bos_id, 5, 6, 7]]
    x = gen.generate(prompt, mode="memory", seed=3).tokens
    assert x == gen.generate(prompt, mode="memory", seed=3).tokens
    assert x != gen.generate(prompt, mode="memory", seed=4).tokens


def test_sample_filters_per_row():
    """Rows of one call each use their own settings: 200 rows of each of greedy, top-k 2,
    nucleus 0.7, top-k 3 + nucleus 0.6, plain sampling."""
    probs = np.array([0.45, 0.3, 0.15, 0.1])
    settings = [(0.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.7), (1.0, 3, 0.6), (1.0, 0, 1.0)]
    n = 200
    t, k, p = (np.repeat(np.array(col), n) for col in zip(*settings))
    logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (len(t), 4)))
    keys = jax.random.split(jax.random.PRNGKey(0), len(t))
    draws = np.asarray(sample(logits, keys, jnp.asarray(t, jnp.float32), jnp.asarray(k, jnp.int32),
                              jnp.asarray(p, jnp.float32))).reshape(len(settings), n)
    assert set(draws[0]) == {0}  # greedy
    assert set(draws[1]) == {0, 1}  # top-k 2
    assert set(draws[2]) == {0, 1}  # nucleus 0.7 keeps the two best (0.45 + 0.3 >= 0.7)
    assert set(draws[3]) == {0, 1}  # top-k 3, then nucleus 0.6 of the renormalized three
    assert set(draws[4]) == {0, 1, 2, 3}
    frac = (draws[4] == 0).mean()  # plain sampling follows the probabilities
    assert abs(frac - 0.45) < 0.12, frac


def test_stop_tokens_and_modes():
    p, ret, gen = _setup()
    prompt = [CFG.bos_id, 11, 12, 13]
    free = gen.generate([prompt], mode="none", max_new_tokens=12).tokens[0]
    stop = free[4]
    cut = gen.generate([prompt], mode="none", max_new_tokens=12, stop_tokens=[stop]).tokens[0]
    assert cut == free[: free.index(stop) + 1]
    rag = gen.generate([prompt], mode="rag", max_new_tokens=8)
    refs = ret.reference_tokens(np.array([ret.ids_for(prompt)]))[0]
    assert rag.stats.prompt_tokens == len(prompt) + sum(len(r) for r in refs)
    assert rag.stats.retrievals == 1 and rag.stats.memory_swaps == 0


def test_bad_inputs_raise():
    p, ret, gen = _setup()
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[CFG.bos_id]], mode="none")
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        gen.generate([[CFG.bos_id] + [5] * 120], mode="none", max_new_tokens=20)
    with pytest.raises(ValueError, match="mode"):
        gen.generate([[1, 5]], mode="magic")
    with pytest.raises(ValueError, match="needs a retriever"):
        Generator(p, CFG, None, None, DC).generate([[1, 5]], mode="memory")
    bad = TableRetriever(p, CFG)
    bad.k = 3
    with pytest.raises(ValueError, match="memories per chunk"):
        Generator(p, CFG, None, bad, DC)
    other = dataclasses.replace(CFG, memory_layers=1)
    wrong = TableRetriever(M.init(other, jax.random.PRNGKey(1)), other)
    with pytest.raises(ValueError, match="does not fit the model"):
        Generator(p, CFG, None, wrong, DC).generate([[1, 5, 6]], mode="memory")


# ------------------------------------------------------------------------------ pipelined batches
def _batches():
    rng = np.random.default_rng(5)
    mk = lambda n: [CFG.bos_id] + [int(t) for t in rng.integers(3, 256, n)]
    return [[mk(20), mk(35)], [mk(5)], [mk(40), mk(9), mk(17)]]


@pytest.mark.parametrize("mode", ["memory", "rag", "none"])
def test_generate_many_equals_generate_per_batch(mode):
    p, ret, _ = _setup()
    dc = dataclasses.replace(DC, temperature=1.0, top_k=20, max_cache_len=CFG.max_len)
    gen = Generator(p, CFG, None, ret, dc)
    batches = _batches()
    alone = [gen.generate(b, mode=mode, seed=7, max_new_tokens=40) for b in batches]
    for depth in (1, 2, 3):
        many = gen.generate_many(batches, mode=mode, seed=7, max_new_tokens=40, pipeline=depth)
        assert [r.tokens for r in many] == [r.tokens for r in alone]
        for r, a in zip(many, alone):
            assert r.stats.swap_steps == a.stats.swap_steps and r.stats.retrievals == a.stats.retrievals
            assert [list(x) for seq in r.retrieved for x in seq] == [list(x) for seq in a.retrieved for x in seq]
    if mode == "memory":
        assert alone[0].stats.swap_steps == [16, 32]  # the test exercises swaps
    with pytest.raises(ValueError, match="pipeline"):
        gen.generate_many(batches, mode=mode, pipeline=0)
    if mode != "rag":  # a batch that cannot fit fails before any batch is generated
        calls = len(ret.calls)
        with pytest.raises(ValueError, match="batch 1: prompt of 250 tokens"):
            gen.generate_many([batches[0], [[CFG.bos_id] + [5] * 249]], mode=mode, max_new_tokens=40)
        assert len(ret.calls) == calls


class GatedRetriever(TableRetriever):
    """Each swap retrieval returns only once the generator has enqueued another decoding chunk
    (or after `timeout` s): it proves that a swap's retrieval ran while other work decoded."""

    def __init__(self, *a, timeout, **kw):
        super().__init__(*a, **kw)
        self.timeout, self.overlapped, self.dispatched = timeout, [], 0
        self.cv = __import__("threading").Condition()

    def on_dispatch(self):
        with self.cv:
            self.dispatched += 1
            self.cv.notify_all()

    def prepare(self, queries):  # called when the generator submits the retrieval
        with self.cv:
            return self.dispatched

    def retrieve(self, queries, prepared=None):
        assert prepared is not None  # the generator hands over what prepare() returned
        if all(len(q) == CFG.chunk_size for q in queries):  # a swap (prompts are shorter)
            with self.cv:
                self.overlapped.append(self.cv.wait_for(lambda: self.dispatched > prepared, self.timeout))
        return super().retrieve(queries)


def test_pipeline_overlaps_swap_retrieval_with_another_batchs_decoding(monkeypatch):
    import m3jax.decode as D

    p = _params()
    ret = GatedRetriever(p, CFG, timeout=30.0)
    real = D.decode_round

    def counting(*a, **kw):
        out = real(*a, **kw)
        ret.on_dispatch()
        return out

    monkeypatch.setattr(D, "decode_round", counting)
    gen = Generator(p, CFG, None, ret, DC)
    # prompts shorter than a chunk, so only swap queries are full chunks
    batches = [[[CFG.bos_id] + list(range(10 + i, 10 + i + 9))] for i in range(2)]
    many = gen.generate_many(batches, mode="memory", max_new_tokens=48, ignore_eos=True, pipeline=2)
    assert [r.stats.memory_swaps for r in many] == [2, 2]
    assert ret.overlapped == [True] * 4  # every swap retrieval ran while another chunk decoded
    # one batch alone cannot overlap: its swap waits (and times out here)
    ret.timeout, ret.overlapped = 0.3, []
    one = gen.generate(batches[0], mode="memory", max_new_tokens=48, ignore_eos=True)
    assert one.stats.memory_swaps == 2 and ret.overlapped == [False, False]
    assert one.stats.retrieval_s >= 0.5  # waited for both swaps (>= 2 x 0.3 s minus slack)


# ------------------------------------------------------------------------------ on a mesh
def _laid_out(x, *spec) -> bool:
    """x is laid out as PartitionSpec(*spec) on its mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    return x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, PartitionSpec(*spec)), len(spec))


def test_generator_on_a_mesh_equals_unsharded(monkeypatch):
    """Generator(mesh=...) on 8 fake CPU devices (2 data x 2 fsdp x 2 tensor): the same jitted
    prefill and rounds on sharded params, cache, memory and state give the unsharded greedy
    tokens and logits (memory mode: prompt memories, then a swap every chunk)."""
    import m3jax.decode as D
    from m3jax import sharding as S

    p, ret, gen = _setup()
    mesh = S.make_mesh(C.MeshConfig(2, 2, 2))
    seen = []
    real = D.decode_round

    def recording(*a, **kw):
        state, out, ran = real(*a, **kw)
        seen.append((np.asarray(state.logits_BV), a[3], state))
        return state, out, ran

    monkeypatch.setattr(D, "decode_round", recording)
    rng = np.random.default_rng(11)
    prompts = [[CFG.bos_id] + [int(t) for t in rng.integers(3, 256, n)] for n in (30, 5, 21, 12)]
    want = gen.generate(prompts, mode="memory", max_new_tokens=40, ignore_eos=True)
    want_logits, seen[:] = [x[0] for x in seen], []
    with Generator(p, CFG, None, ret, DC, mesh=mesh) as sgen:
        got = sgen.generate(prompts, mode="memory", max_new_tokens=40, ignore_eos=True)
        assert _laid_out(sgen.params["blocks"]["wq"], None, "fsdp", "tensor", None)
    assert got.tokens == want.tokens and got.stats.memory_swaps == 2
    assert len(seen) == len(want_logits) == 3
    for (logits, memory, state), w in zip(seen, want_logits):
        np.testing.assert_allclose(logits, w, atol=2e-5, rtol=1e-5)
        # rows over data x fsdp, kv heads over tensor: the rules' placement, kept by the rounds
        assert _laid_out(memory.k_LBCMKH, None, ("data", "fsdp"), None, None, "tensor", None)
        assert _laid_out(state.cache.kv["blocks"][0][0], ("data", "fsdp"), "tensor", None, None)
        assert len(state.logits_BV.sharding.device_set) == 8


def test_stats_compile_time_and_default_cache_and_close():
    p, ret, _ = _setup()
    with Generator(p, CFG, None, ret, C.DecodeConfig(prompt_bucket=CFG.chunk_size)) as gen:
        assert gen.decode_config.max_cache_len == CFG.max_len  # the default follows the model
        prompts = [[CFG.bos_id, 9, 8, 7]] * 3  # a batch size no other test compiles
        first = gen.generate(prompts, mode="none", max_new_tokens=20, ignore_eos=True).stats
        again = gen.generate(prompts, mode="none", max_new_tokens=20, ignore_eos=True).stats
    assert first.compile_s > 0 and again.compile_s < 0.1 * first.compile_s
    assert first.tokens_per_s == pytest.approx(first.new_tokens / (first.total_s - first.compile_s))
    assert gen._pool._shutdown and not any(t.is_alive() for t in gen._pool._threads)


@pytest.mark.parametrize("family", [{}, {"qkv_bias": True}, {"qk_norm": True}])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_decode_layout_steps_equal_the_model_layout(family, lanes):
    """`decode_layers` (fused q/k/v and gate/up, contractions over the weight's minor dimension,
    `lanes` column blocks) computes the same decode steps as the stacked weights; a fresh
    prefill (the prompt's own keys, last-token logits only) equals the full forward."""
    cfg = dataclasses.replace(CFG, **family)
    p = M.init(cfg, jax.random.PRNGKey(3))
    p = jax.tree_util.tree_map(lambda x: x * 2.0, p)
    if family.get("qkv_bias"):  # nonzero biases, else a bias bug would not show
        for s in ("mem_blocks", "blocks"):
            if s in p:
                for b in ("bq", "bk", "bv"):
                    p[s][b] = jax.random.normal(jax.random.PRNGKey(len(b)), p[s][b].shape) * 0.1
    layers = M.transformer.decode_layers(p, jnp.float32, lanes)
    assert M.transformer.is_decode_layout(layers) and not M.transformer.is_decode_layout(p)
    blocks = layers["blocks"][0]
    assert len(blocks["w_qkv_OD"]) in (1, lanes) and len(blocks["w_gu_OD"]) == len(blocks["w_down_DF"])
    toks = np.random.default_rng(4).integers(3, cfg.vocab_size, (3, 21)).astype(np.int32)
    lengths = np.array([21, 15, 9], np.int32)
    full = np.asarray(M.forward(p, jnp.asarray(toks), cfg))
    from m3jax.decode import compute_prefix, prefill
    prefix = compute_prefix(p, cfg)
    tok = np.where(np.arange(21)[None] < lengths[:, None], toks, cfg.pad_id)
    last, cache = prefill(p, cfg, prefix, jnp.asarray(tok), M.init_cache(cfg, 3, 32), jnp.asarray(lengths), None)
    want = full[np.arange(3), lengths - 1]
    np.testing.assert_allclose(np.asarray(last), want, atol=2e-4, rtol=1e-5)
    ext = jax.jit(M.extend, static_argnums=1)
    c1 = c2 = cache
    for t in range(3):
        nxt = jnp.asarray(toks[np.arange(3), np.minimum(lengths + t, 20)][:, None])
        a, c1 = ext(p, cfg, nxt, c1, prefix=prefix)
        b, c2 = ext(layers, cfg, nxt, c2, prefix=prefix)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(c1.kv), jax.tree.leaves(c2.kv)):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5)


def test_round_params_decode_the_same_tokens():
    """A Generator's rounds read weights prepared once (`round_params`, on CPU); passing the
    model's own weights to `decode_round` gives the same greedy tokens."""
    from m3jax.decode import DecodeState, compute_prefix, decode_round, prefill, round_params, row_keys
    p = _params()
    prefix = compute_prefix(p, CFG)
    toks = np.random.default_rng(5).integers(3, 256, (2, CFG.chunk_size)).astype(np.int32)
    outs = []
    for weights in (p, round_params(p, CFG)):
        lo, cache = prefill(p, CFG, prefix, jnp.asarray(toks), M.init_cache(CFG, 2, 128),
                            jnp.asarray([CFG.chunk_size, 20], jnp.int32), None)
        st = DecodeState.create(cache, lo, budget=30, key_B=row_keys(0, 2), stops_BX=[[-1]])
        st, out, ran = decode_round(weights, CFG, prefix, None, st, jnp.int32(CFG.chunk_size))
        outs.append(np.asarray(out))
        cs = CFG.chunk_size
        assert int(ran) == cs and list(np.asarray(st.cache.lengths)) == [2 * cs, 20 + cs]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_rope_table_equals_rope_angles():
    """The cached path's cos / sin rows (numpy constants) equal `rope_angles` at those positions,
    for default and llama3 RoPE, with a context offset."""
    from m3jax.model.layers import rope_angles, rope_table
    assert CFG.context_offset > 0  # the prefix sink's positions come first
    for cfg in (CFG, dataclasses.replace(CFG, rope_type="llama3", rope_factor=8.0, rope_original_max_len=64)):
        cos_t, sin_t = rope_table(cfg, 100)
        cos, sin = rope_angles(cfg.context_offset + jnp.arange(100), cfg)
        np.testing.assert_allclose(cos_t, np.asarray(cos), atol=2e-6)
        np.testing.assert_allclose(sin_t, np.asarray(sin), atol=2e-6)


def test_extend_without_the_rope_table_is_the_same(monkeypatch):
    """Caches too large for a RoPE table (`ROPE_TABLE_MAX`) compute the angles in the step: the
    same logits and cache."""
    from m3jax.model import cache as cache_mod
    p = _params()
    toks = jnp.asarray(np.random.default_rng(6).integers(3, 256, (2, 9)).astype(np.int32))
    outs = []
    for limit in (cache_mod.ROPE_TABLE_MAX, 0):
        monkeypatch.setattr(cache_mod, "ROPE_TABLE_MAX", limit)
        lo, c = M.extend(p, CFG, toks, M.init_cache(CFG, 2, 32))
        lo2, c = M.extend(p, CFG, toks[:, :1], c)
        outs.append((np.asarray(lo), np.asarray(lo2), np.asarray(c.kv["blocks"][0][0])))
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, atol=2e-5)


def test_bfloat16_decode_writes_the_cache_and_tracks_float32():
    """A bf16 model decodes within bf16 tolerance of the float32 one; its bf16 cache (written
    through the bits, `transformer._set_slots`) holds each new key at its row's slot and nothing
    elsewhere, and a second token lands in the next slot."""
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
    p = _params()
    rng = np.random.default_rng(7)
    toks = jnp.asarray(rng.integers(3, 256, (2, 8)).astype(np.int32))
    lengths = jnp.asarray([8, 5], jnp.int32)
    out = {}
    for cfg in (CFG, cfg16):
        cache = M.init_cache(cfg, 2, 32)
        lo, cache = M.extend(p, cfg, toks, cache, new_lengths=lengths)
        lo2, cache = M.extend(p, cfg, toks[:, :1], cache)
        out[cfg.dtype] = (np.asarray(lo, np.float32), np.asarray(lo2, np.float32),
                          np.asarray(cache.kv["blocks"][0][0], np.float32), np.asarray(cache.kv["blocks"][0][1], np.float32))
    k16, v16 = out["bfloat16"][2], out["bfloat16"][3]
    assert k16.dtype == np.float32 and np.isfinite(k16).all()
    for b, n in enumerate((8, 5)):  # 8 prompt slots written (row 1's last 3 are padding), then the
        end = max(8, n + 1)         # decoded token at slot n: nothing after
        assert np.abs(k16[b, :, :end]).max(axis=-1).min() > 0
        assert not k16[b, :, end:].any() and not v16[b, :, :, end:].any()
    k32 = out["float32"][2]
    np.testing.assert_allclose(k16, k32, atol=0.05 * np.abs(k32).max())
    for a16, a32 in zip(out["bfloat16"][:2], out["float32"][:2]):
        scale = np.abs(a32).max()
        np.testing.assert_allclose(a16, a32, atol=0.05 * scale)
        assert (a16.argmax(-1) == a32.argmax(-1)).mean() >= 0.5


def test_bfloat16_products_and_cache_writes_stay_16_bit_on_cpu():
    """What makes bf16 decoding fast on XLA:CPU (read from the compiled programs): the dense
    products take bf16 operands with a float32 result (`layers.dense`), and a bf16 cache write
    converts nothing to float32 (`transformer._set_slots`)."""
    import re

    from m3jax.model.layers import dense
    from m3jax.model.transformer import _set_slots

    x = jnp.ones((4, 1, 64), jnp.bfloat16)
    w = jnp.ones((64, 96), jnp.float32)
    hlo = jax.jit(lambda x, w: dense("BTD,DO->BTO", x, w)).lower(x, w).compile().as_text()
    dots = re.findall(r"= (\w+)\[[\d,]*\][^ ]* dot\((.*)", hlo)
    assert dots and all(out == "f32" for out, _ in dots), dots
    assert re.search(r"dot\(bf16\[4,64\]\S* %[\w.]+, bf16\[64,96\]", hlo) or \
        re.search(r"\(param_0[.\d]*: bf16\[4,64\], param_1[.\d]*: bf16\[64,96\]\)", hlo), hlo
    got = np.asarray(jax.jit(lambda x, w: dense("BTD,DO->BTO", x, w))(x * 1.5, w * 0.25), np.float32)
    np.testing.assert_allclose(got, np.full((4, 1, 96), 64 * 1.5 * 0.25), rtol=1e-2)

    cache = jnp.zeros((4, 2, 256, 8), jnp.bfloat16)
    slots = jnp.asarray([[3], [0], [255], [7]])
    new = jnp.arange(4 * 1 * 2 * 8, dtype=jnp.float32).reshape(4, 1, 2, 8) / 7
    write = jax.jit(lambda c, s, n: _set_slots(c, (jnp.arange(4)[:, None], slice(None), s), n, jnp.bfloat16))
    assert not re.search(r"f32\[4,2,256,8\]", write.lower(cache, slots, new).compile().as_text())
    got = np.asarray(write(cache, slots, new), np.float32)
    want = np.zeros((4, 2, 256, 8), np.float32)
    for b, s in enumerate([3, 0, 255, 7]):
        want[b, :, s] = np.asarray(new[b, 0].astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_decode_round_carries_the_cache_bits(monkeypatch):
    """On CPU a bf16 `decode_round` carries its cache as uint16 bits inside the loop
    (`decode._carries_bits`): tokens and the returned bf16 cache are bit for bit those of the
    same round without it, and the greedy tokens those of stepping `extend` one at a time."""
    from m3jax import decode as D

    cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
    p = _params()
    toks = jnp.asarray(np.random.default_rng(8).integers(3, 256, (3, 8)).astype(np.int32))
    lengths = jnp.asarray([8, 6, 3], jnp.int32)
    prefix = D.compute_prefix(p, cfg16)
    logits, cache = D.prefill(p, cfg16, prefix, toks, M.init_cache(cfg16, 3, 32), lengths, None)
    lo, want_cache, want = logits, cache, []
    for _ in range(5):
        t = jnp.argmax(lo, -1).astype(jnp.int32)
        want.append(np.asarray(t))
        lo, want_cache = M.extend(p, cfg16, t[:, None], want_cache, prefix=prefix)
        lo = lo[:, 0].astype(jnp.float32)
    assert D._carries_bits(cache, jnp.dtype(jnp.bfloat16)) and not D._carries_bits(cache, jnp.dtype(jnp.float32))

    def run():
        state = D.DecodeState.create(jax.tree.map(jnp.copy, cache), jnp.copy(logits), budget=5,  # donated
                                     key_B=D.row_keys(0, 3), stops_BX=[[-1]])
        state, out, n = D.decode_round(p, cfg16, prefix, None, state, jnp.int32(5))
        assert int(n) == 5
        return np.asarray(out)[:, :5], [np.asarray(a, np.float32) for a in jax.tree.leaves(state.cache.kv)], \
            {a.dtype for a in jax.tree.leaves(state.cache.kv)}

    out, kv, dtypes = run()
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(out, np.stack(want, axis=1))
    for a, b in zip(kv, jax.tree.leaves(want_cache.kv)):
        np.testing.assert_allclose(a, np.asarray(b, np.float32), atol=0.05 * np.abs(a).max())
    jax.clear_caches()
    monkeypatch.setattr(D, "_carries_bits", lambda cache, dt: False)
    out0, kv0, _ = run()
    jax.clear_caches()
    np.testing.assert_array_equal(out, out0)
    for a, b in zip(kv, kv0):
        np.testing.assert_array_equal(a, b)


def test_grow_cache_keeps_the_held_slots():
    """`grow_cache`: every held key / value where it was (keys on their slot axis 2, transposed
    values on axis 3), zeros after, lengths unchanged; shrinking is refused."""
    rng = np.random.default_rng(5)
    cache = M.init_cache(CFG, 2, 32)
    kv = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), cache.kv)
    cache = cache.replace(kv=kv, lengths=jnp.array([5, 32], jnp.int32))
    big = M.grow_cache(cache, 48)
    assert big.max_len == 48
    np.testing.assert_array_equal(np.asarray(big.lengths), [5, 32])
    for (k, v), (k2, v2) in zip(cache.kv["blocks"], big.kv["blocks"]):
        k, v, k2, v2 = map(np.asarray, (k, v, k2, v2))
        assert k2.shape == k.shape[:2] + (48,) + k.shape[3:] and v2.shape == v.shape[:3] + (48,)
        np.testing.assert_array_equal(k2[:, :, :32], k)
        np.testing.assert_array_equal(v2[..., :32], v)
        assert not k2[:, :, 32:].any() and not v2[..., 32:].any()
    with pytest.raises(ValueError, match="already holds 32 slots"):
        M.grow_cache(cache, 16)


def test_rounds_grow_the_cache_and_decode_the_same_tokens(monkeypatch):
    """With `DecodeConfig.grow_cache` each round runs with a cache sized for it (prompt bucket +
    tokens so far + the round's, in chunks) and decodes the tokens of one cache for the call, in
    memory mode (swaps between the rounds) and with rows of different lengths."""
    import m3jax.decode as D

    p, ret, gen = _setup()
    sizes = []
    real = D.decode_round

    def recording(*a, **kw):
        sizes.append(a[4].cache.max_len)
        return real(*a, **kw)

    monkeypatch.setattr(D, "decode_round", recording)
    cs = CFG.chunk_size
    rng = np.random.default_rng(12)
    prompts = [[CFG.bos_id] + [int(t) for t in rng.integers(3, 256, n)] for n in (2 * cs + 5, 4)]
    got = gen.generate(prompts, mode="memory", max_new_tokens=40, ignore_eos=True)
    assert sizes == [4 * cs, 5 * cs, 5 * cs]  # the longest row (2cs + 6) holds 3cs + 6, 4cs + 6, 4cs + 14 after them
    sizes.clear()
    whole = Generator(p, CFG, None, ret, dataclasses.replace(DC, grow_cache=False))
    want = whole.generate(prompts, mode="memory", max_new_tokens=40, ignore_eos=True)
    assert sizes == [128] * 3  # one cache for the call: the power of two above 2cs + 6 + 40
    assert got.tokens == want.tokens and got.stats.memory_swaps == want.stats.memory_swaps == 2
