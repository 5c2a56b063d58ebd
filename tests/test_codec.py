"""Memory codecs: sizes agree with bytes_per_vector, round trips, PQ against a NumPy reference."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m3jax.config import preset
from m3jax.memory.codec import (Codec, CodecError, PQCodec, _subspace_sizes, bytes_per_vector,
                                default_pq_subspaces, kmeans, make_codec, memory_bytes, relative_error)
from m3jax.model.memory import MemoryKV


def _gauss(n, Lm=2, K=2, T=4, H=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, Lm, 2, K, T, H)).astype(np.float32)


def _fit(codec, x, **kw):
    kw.setdefault("iters", 4)
    return codec.fit(x, **kw)


@pytest.mark.parametrize("name", ["bf16", "f32", "int8", "pq"])
@pytest.mark.parametrize("cfg_name", ["tiny", "memory3-2b"])
def test_sizes_agree_with_bytes_per_vector(name, cfg_name):
    cfg = preset(cfg_name)
    c = make_codec(name, cfg.head_dim)
    shape = c.code_shape(cfg)
    assert shape[:4] == (cfg.memory_layers, 2, cfg.num_kv_heads, cfg.tokens_per_memory)
    assert c.memory_bytes(cfg) == memory_bytes(cfg, name, **c.options())
    assert c.bytes_per_vector == bytes_per_vector(name, cfg.head_dim, **c.options())


def test_paper_sizes():
    cfg = preset("memory3-2b")
    assert default_pq_subspaces(80) == 14
    assert make_codec("bf16", 80).memory_bytes(cfg) == 450_560
    assert make_codec("pq", 80).memory_bytes(cfg) == 39_424
    assert make_codec("int8", 80).memory_bytes(cfg) == 22 * 2 * 8 * 8 * 82
    assert _subspace_sizes(80, 14) == [6] * 10 + [5] * 4


def test_bf16_exact_up_to_rounding():
    x = _gauss(3)
    c = make_codec("bf16", 16)
    codes = c.encode(x)
    assert codes.dtype == np.dtype(ml_dtypes.bfloat16) and codes.shape == x.shape
    np.testing.assert_array_equal(np.asarray(c.decode(codes, jnp.float32)),
                                  x.astype(ml_dtypes.bfloat16).astype(np.float32))
    # jax input, bf16 output dtype by default
    assert c.decode(c.encode(jnp.asarray(x))).dtype == jnp.bfloat16


def test_int8_error_bound_and_edge_cases():
    x = _gauss(4) * np.float32(3.0)
    x[0, 0, 0, 0, 0] = 0.0  # an all-zero vector
    x[1, 0, 0, 0, 0] = 1e4 * np.sign(x[1, 0, 0, 0, 0])  # a large one
    c = make_codec("int8", 16)
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape[:-1] + (18,)
    y = np.asarray(c.decode(codes, jnp.float32))
    np.testing.assert_array_equal(y[0, 0, 0, 0, 0], 0.0)
    # independent reference: scale = f16(max|x| / 127), |x - y| <= scale / 2 (+ f16 rounding slack)
    scale = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    assert np.all(np.abs(x - y) <= scale * 0.5 + 1e-3 * np.abs(x) + 1e-7)
    assert relative_error(x, y) < 0.01
    assert c.decode(jnp.asarray(codes), jnp.bfloat16).dtype == jnp.bfloat16


def test_codec_rejects_bad_inputs():
    c = make_codec("int8", 16)
    with pytest.raises(CodecError, match="expected"):
        c.decode(np.zeros((2, 2, 2, 2, 4, 17), np.uint8))
    with pytest.raises(CodecError, match="dtype"):
        c.decode(np.zeros((2, 2, 2, 2, 4, 18), np.int8))
    with pytest.raises(CodecError, match="kv of shape"):
        c.encode(np.zeros((2, 2, 2, 4, 16), np.float32))
    with pytest.raises(CodecError, match="not fitted"):
        make_codec("pq", 16).encode(_gauss(1))
    with pytest.raises(CodecError, match="unknown"):
        make_codec("vq", 16)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 3)) * 20
    x = (centers[rng.integers(0, 8, 400)] + 0.01 * rng.standard_normal((400, 3))).astype(np.float32)
    c = np.asarray(kmeans(x[None], np.ones((1, 400)), jax.random.PRNGKey(0), k=8, iters=10))[0]
    d = np.linalg.norm(centers[:, None] - c[None], axis=-1).min(1)
    assert d.max() < 0.1


def _discrete_data(n, H=16, Lm=2, K=2, T=4, values=200, seed=0):
    """Each (layer, k/v, head) draws its vectors from `values` fixed vectors: PQ can be exact."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((Lm, 2, K, values, H)).astype(np.float32)
    pick = rng.integers(0, values, (n, Lm, 2, K, T))
    return np.take_along_axis(table[None], pick[..., None], axis=4)  # [n, Lm, 2, K, T, H]


@pytest.mark.parametrize("pairing", ["rope", "none"])
def test_pq_exact_on_few_distinct_vectors(pairing):
    x = _discrete_data(64)
    c = _fit(make_codec("pq", 16, pairing=pairing), x, iters=8)
    assert c.options() == {"subspaces": 3, "per_head": True, "pairing": pairing}
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape[:-1] + (3,)
    assert relative_error(x, c.decode(codes)) < 1e-3


def test_pq_matches_numpy_reference():
    """Encode = brute-force nearest centroid per subspace; decode = table lookup (NumPy)."""
    x = _gauss(24, H=10)
    c = _fit(PQCodec(10, subspaces=3, per_head=False, pairing="rope"), x)  # uneven: 4, 3, 3 dims
    cb = c.codebooks  # [Lm, 2, 1, M, 256, dmax]
    perm = np.stack([np.arange(5), np.arange(5) + 5], 1).reshape(-1)
    bounds = np.cumsum([0, 4, 3, 3])
    xp = x[..., perm]
    ref_codes = np.zeros(x.shape[:-1] + (3,), np.int64)
    ref_dec = np.zeros_like(xp)
    for m in range(3):
        lo, hi = bounds[m], bounds[m + 1]
        cent = cb[:, :, 0, m, :, : hi - lo]  # [Lm, 2, 256, d]
        d = ((xp[..., None, lo:hi] - cent[None, :, :, None, None]) ** 2).sum(-1)  # [n,Lm,2,K,T,256]
        ref_codes[..., m] = d.argmin(-1)
        ref_dec[..., lo:hi] = np.take_along_axis(cent[None, :, :, None, None], ref_codes[..., m, None, None], -2)[..., 0, :]
    codes = c.encode(x)
    agree = np.mean(codes == ref_codes)
    assert agree > 0.999  # float ties aside
    inv = np.argsort(perm)
    np.testing.assert_allclose(np.asarray(c.decode(ref_codes.astype(np.uint8))), ref_dec[..., inv], atol=1e-6)


def test_pq_error_gaussian_and_mask_excluded():
    x = _gauss(96, seed=1)
    test = _gauss(16, seed=2)
    # garbage in masked slots must not affect training
    mask = np.ones((96, 4), bool)
    mask[:, 3] = False
    xg = x.copy()
    xg[:, :, :, :, 3] = 1e6
    c = _fit(make_codec("pq", 16, per_head=False), MemoryKV(jnp.asarray(xg), jnp.asarray(mask)), iters=8)
    err = relative_error(test, c.decode(c.encode(test)))
    # 3 bytes for 16 Gaussian dims (1.5 bits/dim): measured 0.45, rate-distortion bound 0.35;
    # training on the masked garbage would give ~1e5, the zero codebook 1.
    assert err < 0.8, err


def test_state_round_trip():
    x = _gauss(32)
    c = _fit(make_codec("pq", 16, per_head=True), x)
    st = c.state()
    json.dumps({k: v for k, v in st.items() if k != "arrays"})
    c2 = Codec.from_state(st)
    assert isinstance(c2, PQCodec) and c2.options() == c.options()
    np.testing.assert_array_equal(np.asarray(c2.decode(c.encode(x))), np.asarray(c.decode(c.encode(x))))
    for name in ("bf16", "int8", "f32"):
        c = make_codec(name, 16)
        assert type(Codec.from_state(c.state())) is type(c)


def test_decode_is_jittable_and_dtype():
    x = _gauss(8)
    c = _fit(make_codec("pq", 16), x)
    codes = c.encode(x)
    y = jax.jit(lambda a: c.decode(a, jnp.bfloat16))(jnp.asarray(codes))
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(c.decode(codes)), rtol=1e-2, atol=1e-2)
