"""The memory write path against the NumPy re-derivation, and reading a memory back."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
from m3jax import config as C
from m3jax import model as M
from m3jax.memory import encode
from m3jax.memory.encode import make_encode_fn, select_tokens, token_scores

CFG = C.preset("tiny")
enc = jax.jit(encode, static_argnums=1)


@functools.lru_cache(maxsize=None)
def _params(seed=0):
    p = M.init(CFG, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(lambda x: x * 4.0, p)  # sharper scores, fewer near-ties


def _refs(lengths, R=None, seed=3):
    R = R or CFG.reference_len
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, CFG.vocab_size, (len(lengths), R)).astype(np.int32)
    mask = np.arange(R)[None] < np.asarray(lengths)[:, None]
    toks[~mask] = CFG.pad_id
    return toks, mask


@pytest.mark.parametrize("score,reduce", [("softmax", "sum"), ("exp", "sum"), ("softmax", "max"), ("exp", "max")])
def test_encoder_matches_numpy(score, reduce):
    cfg = dataclasses.replace(CFG, score=score, group_reduce=reduce)
    p = _params()
    lengths = [CFG.reference_len, 11, 3]  # full, partial, shorter than tokens_per_memory (4)
    toks, mask = _refs(lengths)
    mem = enc(p, cfg, jnp.asarray(toks), jnp.asarray(mask))
    mem.check(cfg)
    for n, L in enumerate(lengths):
        kv, m, _ = ref.encode_reference(p, cfg, list(toks[n, :L]), score=score, group_reduce=reduce)
        np.testing.assert_array_equal(np.asarray(mem.mask_IE[n]), m)
        got = np.asarray(mem.kv_ILZKEH[n])
        np.testing.assert_allclose(got[..., m, :], kv[..., m, :], atol=2e-4)


def test_padding_and_prefix_do_not_change_memories():
    """The same reference, padded to different widths and batched with others, gives the same memory."""
    p = _params()
    toks, mask = _refs([13, 30])
    a = enc(p, CFG, jnp.asarray(toks[:1, :13]), jnp.asarray(mask[:1, :13]))
    b = enc(p, CFG, jnp.asarray(toks), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a.kv_ILZKEH[0]), np.asarray(b.kv_ILZKEH[0]), atol=1e-5)


def test_exp_score_is_stable_for_large_logits():
    q = jnp.full((1, 4, 1, 1, 2), 300.0)
    k = jnp.full((1, 4, 1, 2), 300.0).at[0, 2].set(301.0)
    valid = jnp.ones((1, 4), bool)
    lw = token_scores(q, k, valid, score="exp", group_reduce="sum")
    assert bool(jnp.all(jnp.isfinite(lw)))
    idx, ok = select_tokens(lw, valid, 1)
    assert int(idx[0, 0, 0]) == 2 and bool(ok[0, 0])


def test_stored_keys_are_post_rope():
    """Attending to a stored memory equals attending to the reference's own KV at the same
    positions, restricted to the selected tokens (the memory is never rotated again)."""
    p = _params()
    L = 20
    toks, mask = _refs([L])
    mem = enc(p, CFG, jnp.asarray(toks), jnp.asarray(mask))
    kv_ref, _, sel = ref.encode_reference(p, CFG, list(toks[0, :L]))
    # rebuild the reference's own post-RoPE keys at layer 0 (positions r.. r+L-1) in NumPy
    P = ref.to_np(p)
    layer = ref.layer_list(P, CFG)[0]
    r = CFG.prefix_len
    seq = np.array(list(CFG.reference_prefix) + list(toks[0, :L]))
    x = P["embed"][seq]
    _, _, _, k_rot, v = ref.qkv(layer, x, np.arange(len(seq)), CFG)
    q = np.random.default_rng(0).normal(size=(CFG.head_dim,))
    for kh in range(CFG.num_kv_heads):
        own_k = k_rot[r + sel[0, kh], kh]
        own_v = v[r + sel[0, kh], kh]
        stored_k = np.asarray(mem.kv_ILZKEH[0, 0, 0, kh])
        stored_v = np.asarray(mem.kv_ILZKEH[0, 0, 1, kh])
        np.testing.assert_allclose(stored_k, own_k, atol=2e-4)
        a = ref.softmax(own_k @ q) @ own_v
        b = ref.softmax(stored_k @ q) @ stored_v
        np.testing.assert_allclose(a, b, atol=2e-4)


def test_encoded_memory_feeds_the_model():
    p = _params()
    toks, mask = _refs([32, 20, 7, 32])  # batch 1 x 2 chunks x 2 memories
    fn = make_encode_fn(p, CFG)
    mem = fn(toks, mask)
    assert mem.num == 4
    cm = M.ChunkMemory.from_memories(mem, batch=1, chunks=2)
    assert cm.k_LBCMKH.shape == (CFG.memory_layers, 1, 2, CFG.memory_block_len, CFG.num_kv_heads, CFG.head_dim)
    np.testing.assert_array_equal(np.asarray(cm.k_LBCMKH[0, 0, 1, 4:8, 0]), np.asarray(mem.kv_ILZKEH[3, 0, 0, 0]))
    ctx = jnp.arange(3, 3 + 2 * CFG.chunk_size)[None]
    lo = jax.jit(M.forward, static_argnums=2)(p, ctx, CFG, memory=cm)
    assert bool(jnp.all(jnp.isfinite(lo)))


def test_encoder_gradients_flow_to_params():
    p = _params()
    toks, mask = _refs([32])
    g = jax.grad(lambda q: jnp.sum(encode(q, CFG, jnp.asarray(toks), jnp.asarray(mask)).kv_ILZKEH ** 2))(p)
    assert float(jnp.abs(g["mem_blocks"]["wk"]).sum()) > 0
    assert float(jnp.abs(g["blocks"]["wk"]).sum()) == 0  # only memory layers write


def test_encoder_errors():
    p = _params()
    with pytest.raises(ValueError, match="exceed reference_len"):
        make_encode_fn(p, CFG)(np.zeros((1, CFG.reference_len + 1), np.int32), np.ones((1, CFG.reference_len + 1), bool))
    with pytest.raises(ValueError, match="must both be"):
        encode(p, CFG, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="memory off"):
        encode(p, dataclasses.replace(CFG, reference_prefix=None), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
