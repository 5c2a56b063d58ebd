"""The attention implementations agree: "xla", "chunked", "splash" (Pallas, interpret mode on CPU)
and "cudnn" (its code path through jax's XLA implementation on CPU) against the float32
"reference" and a NumPy loop (prefix sink, chunk-local memory, causal and padded masks, odd
lengths, bf16)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib

A = importlib.import_module("m3jax.model.attention")  # the module (m3jax.model.attention is also the function)

B, N, K, H = 2, 4, 2, 8


@functools.partial(jax.jit, static_argnames=("impl", "return_probs", "causal"))
def attend(q, k, v, mask, pre, mem, impl, return_probs=False, causal=False):
    return A.attention(q, k, v, mask, prefix=pre, memory=mem, impl=impl, return_probs=return_probs,
                       causal=causal)


small_blocks = jax.jit(lambda *a: A._chunked(*a, block_q=8, block_k=8))


def _inputs(T, S, *, prefix=True, chunks=0, M=6, seed=0, lengths=None, offset=None):
    """q [B,T,N,H], k [B,K,S,H], v [B,K,H,S], a causal mask of queries at slots offset..offset+T-1 over S
    slots (keys past `lengths` hidden: padding), optional prefix and memory (30% masked)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = 2.0 * jax.random.normal(ks[0], (B, T, N, H))
    k = 2.0 * jax.random.normal(ks[1], (B, K, S, H))
    v = jax.random.normal(ks[2], (B, K, H, S))
    off = S - T if offset is None else offset
    slots = off + jnp.arange(T)
    mask = jnp.arange(S)[None, :] <= slots[:, None]
    mask = jnp.broadcast_to(mask, (B, T, S))
    if lengths is not None:
        mask = mask & (jnp.arange(S)[None, None, :] < jnp.asarray(lengths)[:, None, None])
    pre = A.PrefixKV(jax.random.normal(ks[3], (3, K, H)), jax.random.normal(ks[4], (3, K, H))) if prefix else None
    mem = None
    if chunks:
        mem = A.MemoryBlocks(2.0 * jax.random.normal(ks[5], (B, chunks, M, K, H)),
                             jax.random.normal(ks[6], (B, chunks, M, K, H)),
                             jax.random.uniform(ks[7], (B, chunks, M)) < 0.7)
    return q, k, v, mask, pre, mem


def _numpy(q, k, v, mask, pre, mem):
    """Per (batch, head, query): one softmax over the visible prefix, memory and context keys."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, jnp.swapaxes(v, 2, 3), mask))
    Bq, T, Nq, Hq = q.shape
    G = Nq // k.shape[1]
    out = np.zeros_like(q)
    for b in range(Bq):
        for n in range(Nq):
            kh = n // G
            for t in range(T):
                keys, vals = [], []
                if pre is not None:
                    keys += list(np.asarray(pre.k_PKH, np.float64)[:, kh])
                    vals += list(np.asarray(pre.v_PKH, np.float64)[:, kh])
                if mem is not None:
                    C = mem.k_BCMKH.shape[1]
                    c = t // (T // C)
                    for s in range(mem.k_BCMKH.shape[2]):
                        if mem.mask_BCM[b, c, s]:
                            keys.append(np.asarray(mem.k_BCMKH[b, c, s, kh], np.float64))
                            vals.append(np.asarray(mem.v_BCMKH[b, c, s, kh], np.float64))
                vis = np.nonzero(mask[b, t])[0]
                keys += list(k[b, kh, vis]); vals += list(v[b, kh, vis])
                sc = np.array([q[b, t, n] @ kk for kk in keys]) / np.sqrt(Hq)
                p = np.exp(sc - sc.max())
                out[b, t, n] = (p / p.sum()) @ np.array(vals)
    return out


CASES = {  # name: (T, S, kwargs)
    "decode_step": (1, 13, dict(chunks=1)),
    "prefill_causal": (24, 24, dict()),
    "odd_lengths_padded": (21, 29, dict(offset=0, lengths=[17, 21])),
    "memory_chunks": (24, 24, dict(chunks=3)),
    "no_prefix_memory": (16, 20, dict(prefix=False, chunks=2, offset=0)),
    "no_prefix_no_memory": (11, 11, dict(prefix=False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_implementations_match_numpy_float32(name):
    T, S, kw = CASES[name]
    args = _inputs(T, S, **kw)
    want = _numpy(*args)
    ref = np.asarray(attend(*args, impl="reference"))
    assert np.abs(ref - want).max() < 1e-4
    got = {
        "xla": attend(*args, impl="xla"),
        "chunked": attend(*args, impl="chunked"),
        # blocks smaller than the sequence: several key blocks, some skipped by the causal mask
        "chunked_small_blocks": small_blocks(*args),
    }
    for impl, out in got.items():
        err = np.abs(np.asarray(out) - ref).max()
        assert err < 2e-5, (impl, err)


def test_auto_takes_the_chunked_path_for_long_prompts(monkeypatch):
    """A long prompt in a longer cache (keys past the prompt unused): on CPU the auto choice
    is the chunked path (a scan with a skip), and it equals the reference."""
    monkeypatch.setattr(A, "CHUNKED_MIN", 32)
    T, S = 40, 72
    q, k, v, mask, pre, _ = _inputs(T, S, offset=0, seed=3)
    ref = np.asarray(attend(q, k, v, mask, pre, None, impl="reference"))
    auto = jax.jit(lambda *a: A.attention(*a, prefix=pre))
    text = auto.lower(q, k, v, mask).as_text()
    assert "stablehlo.while" in text and ("stablehlo.case" in text or "stablehlo.if" in text)  # scan + skip
    assert np.abs(np.asarray(auto(q, k, v, mask)) - ref).max() < 2e-5


def test_memory_masses_agree():
    q, k, v, mask, pre, mem = _inputs(24, 24, chunks=3, seed=4)
    _, ref = attend(q, k, v, mask, pre, mem, impl="reference", return_probs=True)
    _, got = attend(q, k, v, mask, pre, mem, impl="xla", return_probs=True)
    for a, b in zip(ref, got):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5
    total = sum(np.asarray(m) for m in got)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_bf16_within_tolerance_of_float32(impl):
    """bf16 inputs (contractions in bf16, statistics in float32) stay close to the float32
    reference, and the output is bf16."""
    args = _inputs(24, 24, chunks=3, seed=5)
    ref = np.asarray(attend(*args, impl="reference"))
    bf = lambda x: None if x is None else jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, x)
    q, k, v = (x.astype(jnp.bfloat16) for x in args[:3])
    out = attend(q, k, v, args[3], bf(args[4]), bf(args[5]), impl=impl)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())


def test_chunked_gradients_match_reference():
    q, k, v, mask, pre, mem = _inputs(16, 16, chunks=2, seed=6)
    def loss(impl, q, k, v):
        if impl == "small":
            out = A._chunked(q, k, v, mask, pre, mem, block_q=8, block_k=8)
        else:
            out = A.attention(q, k, v, mask, prefix=pre, memory=mem, impl=impl)
        return jnp.sum(out * jnp.cos(out))
    want = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(lambda *a: loss("small", *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(want, got):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4


def test_bad_impl_and_probs_with_chunked_are_refused():
    q, k, v, mask, pre, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        A.attention(q, k, v, mask, impl="flash")
    with pytest.raises(ValueError, match="return_probs"):
        A.attention(q, k, v, mask, impl="chunked", return_probs=True)


# ------------------------------------------------------------------------------ fused kernels
# Cases whose mask is causal & key-valid (what `causal=True` promises): splash takes only these.
CAUSAL = ["prefill_causal", "memory_chunks", "no_prefix_no_memory", "causal_padded_keys"]
CASES["causal_padded_keys"] = (21, 21, dict(lengths=[17, 21], chunks=3))


@pytest.fixture
def cudnn_as_xla(monkeypatch):
    """impl="cudnn" runs its own code (joint keys, joint mask) through jax.nn.dot_product_attention
    with implementation="xla": the cuDNN kernel itself needs a GPU."""
    monkeypatch.setattr(A, "CUDNN_IMPLEMENTATION", "xla")


def _fused(impl, causal):
    # a fresh jit: `attend`'s cache would keep a trace made under another module setting
    return jax.jit(lambda q, k, v, mask, pre, mem: A.attention(q, k, v, mask, prefix=pre, memory=mem,
                                                               impl=impl, causal=causal))


@pytest.mark.parametrize("name", [n if n == "causal_padded_keys" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CAUSAL])  # Pallas interpret mode compiles slowly on CPU
def test_splash_matches_reference_float32(name):
    T, S, kw = CASES[name]
    args = _inputs(T, S, **kw)
    ref = np.asarray(attend(*args, impl="reference"))
    got = np.asarray(_fused("splash", True)(*args))
    assert np.abs(got - ref).max() < 2e-5, np.abs(got - ref).max()


@pytest.mark.parametrize("name", list(CASES))
def test_cudnn_path_matches_reference_float32(name, cudnn_as_xla):
    """Any mask (decoding, odd lengths, padding, memory): the joint mask expresses it."""
    T, S, kw = CASES[name]
    args = _inputs(T, S, **kw)
    ref = np.asarray(attend(*args, impl="reference"))
    got = np.asarray(_fused("cudnn", False)(*args))
    assert np.abs(got - ref).max() < 2e-5, np.abs(got - ref).max()


@pytest.mark.parametrize("impl", [pytest.param("splash", marks=pytest.mark.slow), "cudnn"])
def test_fused_bf16_within_tolerance_of_float32(impl, cudnn_as_xla):
    args = _inputs(24, 24, chunks=3, seed=5)
    ref = np.asarray(attend(*args, impl="reference"))
    bf = lambda x: None if x is None else jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, x)
    q, k, v = (x.astype(jnp.bfloat16) for x in args[:3])
    out = _fused(impl, True)(q, k, v, args[3], bf(args[4]), bf(args[5]))
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())


@pytest.mark.parametrize("impl", [pytest.param("splash", marks=pytest.mark.slow), "cudnn"])
def test_fused_gradients_match_reference(impl, cudnn_as_xla):
    q, k, v, mask, pre, mem = _inputs(16, 16, chunks=2, seed=6)
    def loss(impl, q, k, v):
        out = A.attention(q, k, v, mask, prefix=pre, memory=mem, impl=impl, causal=True)
        return jnp.sum(out * jnp.cos(out))
    want = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(want, got):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4


def test_auto_picks_the_platform_kernel():
    """auto: splash on TPU for causal calls of a chunk or more, cudnn on GPU for bf16 ones, xla
    for decoding steps and masks splash cannot take; `compile_for` names the platform."""
    f32 = jnp.zeros((1, 64, 4, 16), jnp.float32)
    bf = f32.astype(jnp.bfloat16)
    one = jnp.zeros((1, 1, 4, 16), jnp.bfloat16)
    with A.compile_for("tpu"):
        assert A.target_platform() == "tpu"
        assert A._auto_impl(bf, 64, False, causal=True) == "splash"
        assert A._auto_impl(bf, 64, False, causal=False) == "xla"
        assert A._auto_impl(one, 64, False, causal=True) == "xla"
        assert A._auto_impl(bf, 64, True, causal=True) == "xla"  # return_probs
    with A.compile_for("tpu", fused=False):  # the dense path on an accelerator
        assert A._auto_impl(bf, 64, False, causal=True) == "xla"
    with A.compile_for("gpu"):
        assert A._auto_impl(bf, 64, False, causal=False) == "cudnn"
        assert A._auto_impl(f32, 64, False, causal=False) == "xla"  # cuDNN flash attention: 16-bit only
        assert A._auto_impl(one, 64, False, causal=False) == "xla"
    assert A.target_platform() == jax.default_backend() == "cpu"
    assert A._auto_impl(f32, 1024, False, causal=True) == "xla"  # 64 queries: below CHUNKED_MIN
    assert A._auto_impl(jnp.zeros((1, 1024, 4, 16)), 1024, False, causal=True) == "chunked"
    q, k, v, mask, pre, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match="causal=True"):
        A.attention(q, k, v, mask, impl="splash")
    with pytest.raises(ValueError, match="return_probs"):
        A.attention(q, k, v, mask, impl="splash", causal=True, return_probs=True)
