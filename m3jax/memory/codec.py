"""Codecs for stored memory vectors (one head_dim vector of a key or value at a time).

A memory is `(Lm, 2, K, T, H)` vectors: memory layers x (key, value) x kv heads x tokens x head dim
(`MemoryKV.kv_ILZKEH` without its batch axis). A codec turns a batch of memories
`[I, L, Z, K, E, H]` (float) into a NumPy array of codes `[I, *code_shape]` of one fixed dtype (what
the bank stores, one memory per chunk) and back into a JAX array on device.

- `bf16`: raw bfloat16, `2 * H` bytes per vector (exact up to bf16 rounding).
- `f32`: raw float32, `4 * H` bytes per vector (for tests and references).
- `int8`: symmetric int8 with one float16 scale per vector: `H + 2` bytes per vector, stored as
  uint8 `[..., H + 2]` (H int8 bytes, then the 2 bytes of the float16 scale, little endian).
- `pq`: product quantization. The H dims are (optionally permuted, then) cut into M contiguous
  subspaces (`default_pq_subspaces(H)`, 14 for H=80, the paper's 14 bytes per vector; uneven when
  M does not divide H: the first H % M subspaces get one dim more), each coded by one byte (256
  centroids): M bytes per vector, codes uint8 `[..., M]`. Codebooks are trained by k-means in JAX
  (k-means++ init, fixed Lloyd iterations, jitted) on a sample of the bank's vectors.
  Codebook layout [decision]: one set of M codebooks per (memory layer, key/value, kv head),
  `codebooks [Lm, 2, K, M, 256, dsub_max]` float32 (`per_head=True`, the default: heads have
  different distributions; on the structured synthetic data of experiments/bench_bank.py it
  lowered the error from 0.37 to 0.34 at the same training vectors per codebook; 1.4 MB of
  codebooks per memory layer at the 2B geometry, 30 MB in all), or one set shared by the heads of
  a (memory layer, key/value), `[Lm, 2, 1, M, 256, dsub_max]` (`per_head=False`, 8x cheaper to
  train). Subspaces shorter than dsub_max are zero padded.
  Dim order [decision]: `pairing="rope"` (default) interleaves the two halves of the head dim
  before cutting subspaces, so each subspace holds whole RoPE pairs (i, i + H/2) of the
  "rotate_half" layout m3jax uses: a post-RoPE key pair is a 2-vector rotated by a
  position-dependent angle, which one codebook can quantize jointly (measured gain on synthetic
  data: small, 0.336 vs 0.340; values are unaffected either way). `pairing="none"` keeps the
  natural order. The permutation is folded into the decode gather, so it costs nothing at read
  time. No OPQ rotation or residual stage: a rotation costs an H x H matmul per vector at decode.

All codecs decode on device with one jitted function (gather + scale); `bytes_per_vector` below is
the single source of truth for sizes (`memory_bytes` multiplies it out) and every codec's
`code_shape` agrees with it (codebooks excluded: they are shared by the whole bank).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Array = jax.Array
CODEC_NAMES = ("bf16", "f32", "int8", "pq")


def default_pq_subspaces(head_dim: int) -> int:
    """Bytes (= subspaces of 256 centroids) per vector for `pq`: the paper's 14 per 80 dims."""
    return max(1, min(head_dim, math.ceil(14 * head_dim / 80)))


def bytes_per_vector(codec: str, head_dim: int, *, subspaces: int | None = None, **_: Any) -> int:
    """Stored bytes of one head_dim vector under `codec` (codebooks excluded: they are shared).

    Extra keyword options of a codec that do not change its size (e.g. `per_head`) are accepted
    and ignored, so `memory_bytes(config, codec.name, **codec.options())` works for any codec.
    """
    if codec == "bf16":
        return 2 * head_dim
    if codec == "f32":
        return 4 * head_dim
    if codec == "int8":
        return head_dim + 2
    if codec == "pq":
        return subspaces if subspaces is not None else default_pq_subspaces(head_dim)
    raise ValueError(f"unknown memory codec {codec!r}; choose from {', '.join(CODEC_NAMES)}")


def memory_bytes(config: Any, codec: str = "bf16", **codec_options: Any) -> int:
    """Stored bytes of one memory of a ModelConfig, (memory_layers, 2, kv_heads, tokens_per_memory)
    head_dim vectors, each coded by `codec` (codebooks excluded)."""
    return config.memory_vectors * bytes_per_vector(codec, config.head_dim, **codec_options)


class CodecError(ValueError):
    """A codec was misused: unfitted pq, codes of the wrong shape or dtype, a bad state."""


def _kv_and_mask(sample: Any) -> tuple[Any, np.ndarray | None]:
    """(kv [I, L, Z, K, E, H], mask [I, E] or None) from a MemoryKV or a bare array."""
    if hasattr(sample, "kv_ILZKEH"):
        return sample.kv_ILZKEH, np.asarray(sample.mask_IE, bool)
    return sample, None


def _geometry_of(config_or_shape: Any) -> tuple[int, int, int, int]:
    """(Lm, K, T, H) from a ModelConfig or a per-memory shape (Lm, 2, K, T, H)."""
    if hasattr(config_or_shape, "memory_layers"):
        c = config_or_shape
        return c.memory_layers, c.num_kv_heads, c.tokens_per_memory, c.head_dim
    Lm, two, K, T, H = tuple(config_or_shape)
    if two != 2:
        raise CodecError(f"memory shape {tuple(config_or_shape)} is not (Lm, 2, K, T, H)")
    return Lm, K, T, H


class Codec:
    """Base class: one head_dim vector at a time; see the module docstring for the formats.

    Subclasses set `name`, and implement `code_shape`, `code_dtype`, `encode`, `decode`.
    """

    name: ClassVar[str] = ""

    def __init__(self, head_dim: int) -> None:
        if not (isinstance(head_dim, int) and head_dim > 0):
            raise CodecError(f"{type(self).__name__}: head_dim must be a positive int, got {head_dim!r}")
        self.head_dim = head_dim

    # ------------------------------------------------------------------ description
    def options(self) -> dict[str, Any]:
        """JSON-able options that define the code format (compared when a bank is reopened)."""
        return {}

    @property
    def bytes_per_vector(self) -> int:
        return bytes_per_vector(self.name, self.head_dim, **self.options())

    @property
    def fitted(self) -> bool:
        return True

    @property
    def code_dtype(self) -> np.dtype:
        raise NotImplementedError

    def vector_code_shape(self) -> tuple[int, ...]:
        """Trailing code shape of one vector (replaces H)."""
        raise NotImplementedError

    def code_shape(self, config: Any) -> tuple[int, ...]:
        """Per-memory code shape for a ModelConfig (or a memory shape (Lm, 2, K, T, H))."""
        Lm, K, T, H = _geometry_of(config)
        if H != self.head_dim:
            raise CodecError(f"{self.name} codec was built for head_dim {self.head_dim}, not {H}")
        return (Lm, 2, K, T) + self.vector_code_shape()

    def memory_bytes(self, config: Any) -> int:
        """Stored bytes of one memory (equals `memory_bytes(config, self.name, **self.options())`)."""
        return int(np.prod(self.code_shape(config))) * self.code_dtype.itemsize

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(head_dim={self.head_dim}{', ' + opts if opts else ''})"

    # ------------------------------------------------------------------ coding
    def fit(self, sample: Any, **kwargs: Any) -> "Codec":
        """Train on a sample (MemoryKV or array [I, L, Z, K, E, H]); a no-op for raw codecs."""
        return self

    def encode(self, kv: Any) -> np.ndarray:
        """kv [I, L, Z, K, E, H] float (NumPy or JAX) -> codes [I, *code_shape] NumPy."""
        raise NotImplementedError

    def decode(self, codes: Any, dtype: Any = None) -> Array:
        """codes [I, *code_shape] (NumPy or JAX) -> jax array [I, L, Z, K, E, H] on device."""
        raise NotImplementedError

    def codes_finite(self, codes: np.ndarray) -> bool:
        """Whether host codes [I, *code_shape] decode to finite values only (index codes always do)."""
        return True

    def _check_codes(self, codes: Any) -> None:
        want = self.vector_code_shape()
        if codes.ndim != 5 + len(want) or tuple(codes.shape[5:]) != want or codes.shape[2] != 2:
            raise CodecError(f"{self.name} codes of shape {tuple(codes.shape)}: expected "
                             f"[I, L, Z, K, E, {', '.join(map(str, want))}]")
        if np.dtype(codes.dtype) != self.code_dtype:
            raise CodecError(f"{self.name} codes have dtype {codes.dtype}, expected {self.code_dtype}")

    def _check_kv(self, kv: Any) -> None:
        if kv.ndim != 6 or kv.shape[2] != 2 or kv.shape[-1] != self.head_dim:
            raise CodecError(f"{self.name} codec: kv of shape {tuple(kv.shape)} is not "
                             f"[I, L, Z, K, E, {self.head_dim}]")

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """{"name": str, "head_dim": int, "options": json-able, "arrays": {str: np.ndarray}}."""
        return {"name": self.name, "head_dim": self.head_dim, "options": self.options(), "arrays": {}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Codec":
        """Rebuild any codec from `state()` output (dispatches on state["name"])."""
        name = state.get("name")
        if name not in _CODECS:
            raise CodecError(f"unknown codec {name!r} in state; choose from {', '.join(CODEC_NAMES)}")
        return _CODECS[name]._from_state(state)

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "Codec":
        return cls(int(state["head_dim"]), **state.get("options", {}))


# ---------------------------------------------------------------------- raw codecs
class RawCodec(Codec):
    """Raw floats: `bf16` (bfloat16) or `f32` (float32)."""

    _dtype: ClassVar[Any] = np.float32

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(self._dtype)

    def vector_code_shape(self) -> tuple[int, ...]:
        return (self.head_dim,)

    def encode(self, kv: Any) -> np.ndarray:
        self._check_kv(kv)
        if isinstance(kv, jax.Array):
            return np.asarray(kv.astype(jnp.dtype(self._dtype)))
        return np.asarray(kv).astype(self._dtype)  # ml_dtypes rounds to nearest even

    def decode(self, codes: Any, dtype: Any = None) -> Array:
        self._check_codes(codes)
        x = jnp.asarray(codes)
        return x if dtype is None else x.astype(dtype)

    def codes_finite(self, codes: np.ndarray) -> bool:
        return bool(np.all(np.isfinite(np.asarray(codes).astype(np.float32))))


class BF16Codec(RawCodec):
    name = "bf16"
    _dtype = ml_dtypes.bfloat16


class F32Codec(RawCodec):
    name = "f32"
    _dtype = np.float32


# ---------------------------------------------------------------------- int8
@functools.partial(jax.jit, static_argnames=("dtype",))
def _int8_decode(codes: Array, dtype: Any) -> Array:
    H = codes.shape[-1] - 2
    q = jax.lax.bitcast_convert_type(codes[..., :H], jnp.int8)
    s = jax.lax.bitcast_convert_type(codes[..., H:].reshape(codes.shape[:-1] + (1, 2)), jnp.float16)
    return (q.astype(jnp.float32) * s.astype(jnp.float32)).astype(dtype)


@jax.jit
def _int8_encode(x: Array) -> Array:
    """[..., H] float -> [..., H + 2] uint8: H int8 values, then the float16 scale (little endian).
    scale = max|x| / 127 rounded to float16 (capped at 65504, so |x| up to ~8.3e6); q = round(x /
    scale) clipped to [-127, 127]; an all-zero vector gets scale 0 and q 0."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.minimum(amax / 127.0, 65504.0).astype(jnp.float16)
    s32 = scale.astype(jnp.float32)
    q = jnp.where(s32 > 0, jnp.round(x / jnp.where(s32 > 0, s32, 1.0)), 0.0)
    q = jnp.clip(q, -127, 127).astype(jnp.int8)
    qb = jax.lax.bitcast_convert_type(q, jnp.uint8)
    sb = jax.lax.bitcast_convert_type(scale, jnp.uint8).reshape(x.shape[:-1] + (2,))
    return jnp.concatenate([qb, sb], axis=-1)


class Int8Codec(Codec):
    """Symmetric per-vector int8: q = round(x / s), s = max|x| / 127 rounded to float16."""

    name = "int8"

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def vector_code_shape(self) -> tuple[int, ...]:
        return (self.head_dim + 2,)

    def encode(self, kv: Any) -> np.ndarray:
        self._check_kv(kv)
        return np.asarray(_int8_encode(jnp.asarray(kv)))

    def decode(self, codes: Any, dtype: Any = None) -> Array:
        self._check_codes(codes)
        return _int8_decode(jnp.asarray(codes), jnp.dtype(dtype or jnp.float32))

    def codes_finite(self, codes: np.ndarray) -> bool:
        scales = np.ascontiguousarray(np.asarray(codes)[..., self.head_dim:]).view(np.float16)
        return bool(np.all(np.isfinite(scales)))


# ---------------------------------------------------------------------- k-means (JAX)
def _kmeans_one(x: Array, w: Array, key: Array, k: int, iters: int) -> Array:
    """k-means of one problem. x [n, d], w [n] (0 = ignore the row) -> centroids [k, d]."""
    n, d = x.shape
    x2 = jnp.sum(x * x, axis=-1)

    def draw(key, p):  # one row with probability ~ p (inverse CDF: one uniform, no n-way RNG)
        cdf = jnp.cumsum(p)
        u = jax.random.uniform(key, (), x.dtype) * cdf[-1]
        i = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, n - 1)
        return x[i]

    # k-means++: each next centroid drawn with probability ~ w * (squared distance to the nearest).
    keys = jax.random.split(key, k)
    c0 = draw(keys[0], w)
    d2 = jnp.sum((x - c0) ** 2, axis=-1)
    cents = jnp.zeros((k, d), x.dtype).at[0].set(c0)

    def init_step(i, carry):
        cents, d2 = carry
        p = w * jnp.maximum(d2, 0.0)
        p = jnp.where(jnp.sum(p) > 0, p, w)  # fewer distinct points than k: repeat some
        c = draw(keys[i], p)
        return cents.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, axis=-1))

    cents, _ = jax.lax.fori_loop(1, k, init_step, (cents, d2))

    def lloyd(_, cents):
        dist = x2[:, None] - 2.0 * x @ cents.T + jnp.sum(cents * cents, axis=-1)[None, :]
        a = jnp.argmin(dist, axis=-1)
        sums = jax.ops.segment_sum(x * w[:, None], a, num_segments=k)
        cnt = jax.ops.segment_sum(w, a, num_segments=k)
        return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1e-12)[:, None], cents)

    return jax.lax.fori_loop(0, iters, lloyd, cents)


@functools.partial(jax.jit, static_argnames=("k", "iters", "batch"))
def _kmeans(x_PND: Array, w_PN: Array, key: Array, k: int, iters: int, batch: int) -> Array:
    keys = jax.random.split(key, x_PND.shape[0])
    return jax.lax.map(lambda a: _kmeans_one(a[0], a[1], a[2], k, iters), (x_PND, w_PN, keys),
                       batch_size=batch)


def kmeans(x_PND: Any, w_PN: Any, key: Array, *, k: int = 256, iters: int = 16,
           batch: int | None = None) -> Array:
    """P independent k-means problems: x [P, n, d], weights w [P, n] -> centroids [P, k, d].

    k-means++ init, then `iters` Lloyd iterations (an empty cluster keeps its centroid), jitted.
    Problems run `batch` at a time (vmapped); by default one at a time on CPU (measured fastest
    there) and as many as fit in ~256 MiB of distances on accelerators.
    """
    P, n, _ = x_PND.shape
    if batch is None:
        batch = 1 if jax.default_backend() == "cpu" else max(1, min(P, (256 << 20) // max(1, n * k * 4)))
    return _kmeans(jnp.asarray(x_PND, jnp.float32), jnp.asarray(w_PN, jnp.float32), key, k, iters, batch)


# ---------------------------------------------------------------------- pq
def _subspace_sizes(head_dim: int, m: int) -> list[int]:
    base, extra = divmod(head_dim, m)
    return [base + 1] * extra + [base] * (m - extra)


def _pq_perm(head_dim: int, pairing: str) -> np.ndarray:
    """Order of the head dims before cutting subspaces (position -> original dim)."""
    if pairing == "none":
        return np.arange(head_dim)
    if pairing == "rope":  # rotate_half pairs (i, i + H/2) next to each other
        h = head_dim // 2
        return np.stack([np.arange(h), np.arange(h) + h], axis=1).reshape(-1)
    raise CodecError(f"pq pairing must be 'rope' or 'none', got {pairing!r}")


def _pq_layout(head_dim: int, m: int, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    """split_idx [M, dmax]: original dim of each padded subspace slot (head_dim = zero pad);
    dec_cols [H]: for each original dim, its slot in the flattened [M * dmax] decode layout."""
    sizes = _subspace_sizes(head_dim, m)
    dmax = max(sizes)
    perm = _pq_perm(head_dim, pairing)
    split_idx = np.full((m, dmax), head_dim, np.int32)
    dec_cols = np.zeros(head_dim, np.int32)
    pos = 0
    for j, s in enumerate(sizes):
        for t in range(s):
            split_idx[j, t] = perm[pos]
            dec_cols[perm[pos]] = j * dmax + t
            pos += 1
    return split_idx, dec_cols


def _split(x: Array, split_idx: np.ndarray) -> Array:
    """[..., H] -> [..., M, dmax] (zero padded subspaces, dims permuted)."""
    xp = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
    return xp[..., split_idx]


@functools.partial(jax.jit, static_argnames=("batch",))
def _pq_encode(x_ILZKEH: Array, cb_LZKUAD: Array, split_idx: Array, batch: int) -> Array:
    """Nearest centroid per subspace -> codes [I, L, Z, K, E, U] uint8."""
    K = x_ILZKEH.shape[3]
    cb = jnp.broadcast_to(cb_LZKUAD, cb_LZKUAD.shape[:2] + (K,) + cb_LZKUAD.shape[3:])
    c2 = jnp.sum(cb * cb, axis=-1)  # [Lm, 2, K, M, C]

    def one(x_LZKEH):
        xs = _split(x_LZKEH.astype(jnp.float32), split_idx)  # [L, Z, K, E, U, d]
        dot = jnp.einsum("lzktmd,lzkmcd->lzktmc", xs, cb)
        return jnp.argmin(c2[:, :, :, None] - 2.0 * dot, axis=-1).astype(jnp.uint8)

    return jax.lax.map(one, x_ILZKEH, batch_size=batch)


@functools.partial(jax.jit, static_argnames=("remap",))
def _pq_decode(codes: Array, flat_cb: Array, base: Array, dec_cols: Array, remap: bool) -> Array:
    """codes [I, L, Z, K, E, U] -> [I, L, Z, K, E, H]: one gather from the flat codebook."""
    idx = codes.astype(jnp.int32) + base  # base [Lm, 2, K, 1, M]
    v = flat_cb.at[idx].get(mode="promise_in_bounds")  # [..., M, dmax]
    v = v.reshape(v.shape[:-2] + (v.shape[-2] * v.shape[-1],))
    return v.at[..., dec_cols].get(mode="promise_in_bounds") if remap else v


class PQCodec(Codec):
    """Product quantization, `subspaces` bytes per vector; see the module docstring.

    Training options (not part of the code format): `iters` Lloyd iterations, `train_vectors`
    vectors per codebook (a random subset of the valid vectors of the sample), `seed`.
    """

    name = "pq"

    def __init__(self, head_dim: int, subspaces: int | None = None, per_head: bool = True,
                 pairing: str = "rope", *, iters: int = 16, train_vectors: int = 16384, seed: int = 0,
                 codebooks: np.ndarray | None = None) -> None:
        super().__init__(head_dim)
        m = default_pq_subspaces(head_dim) if subspaces is None else int(subspaces)
        if not 1 <= m <= head_dim:
            raise CodecError(f"pq subspaces must be in [1, head_dim={head_dim}], got {subspaces!r}")
        if pairing == "rope" and head_dim % 2:
            raise CodecError(f"pq pairing='rope' needs an even head_dim, got {head_dim}")
        self.subspaces, self.per_head, self.pairing = m, bool(per_head), pairing
        self.iters, self.train_vectors, self.seed = int(iters), int(train_vectors), int(seed)
        self._split_idx, self._dec_cols = _pq_layout(head_dim, m, pairing)
        self.dsub = self._split_idx.shape[1]
        self._remap = not np.array_equal(self._dec_cols, np.arange(head_dim))
        self.codebooks: np.ndarray | None = None
        self._device: dict[Any, tuple[Array, Array]] = {}  # dtype -> (flat codebook, base offsets)
        if codebooks is not None:
            self._set_codebooks(np.asarray(codebooks, np.float32))

    def options(self) -> dict[str, Any]:
        return {"subspaces": self.subspaces, "per_head": self.per_head, "pairing": self.pairing}

    @property
    def fitted(self) -> bool:
        return self.codebooks is not None

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def vector_code_shape(self) -> tuple[int, ...]:
        return (self.subspaces,)

    def _set_codebooks(self, cb: np.ndarray) -> None:
        if cb.ndim != 6 or cb.shape[1] != 2 or cb.shape[3:] != (self.subspaces, 256, self.dsub):
            raise CodecError(f"pq codebooks of shape {cb.shape}: expected [Lm, 2, K or 1, "
                             f"{self.subspaces}, 256, {self.dsub}]")
        if not self.per_head and cb.shape[2] != 1:
            raise CodecError(f"pq codebooks of shape {cb.shape} are per head, but per_head=False")
        if not np.all(np.isfinite(cb)):
            raise CodecError("pq codebooks hold non-finite values")
        self.codebooks = cb
        self._device = {}

    def _require_fit(self) -> np.ndarray:
        if self.codebooks is None:
            raise CodecError("pq codec is not fitted: call codec.fit(sample) (build_bank does it) "
                             "or load it with Codec.from_state")
        return self.codebooks

    def _check_geometry(self, Lm: int, K: int) -> None:
        cb = self._require_fit()
        if cb.shape[0] != Lm or (self.per_head and cb.shape[2] != K):
            raise CodecError(f"pq codebooks {cb.shape} were trained for {cb.shape[0]} memory layers"
                             f"{' and %d kv heads' % cb.shape[2] if self.per_head else ''}, "
                             f"not {Lm} layers and {K} heads")

    def code_shape(self, config: Any) -> tuple[int, ...]:
        shape = super().code_shape(config)
        if self.codebooks is not None:
            self._check_geometry(shape[0], shape[2])
        return shape

    # ------------------------------------------------------------------ training
    def fit(self, sample: Any, **kwargs: Any) -> "PQCodec":
        """Train codebooks on sample kv [I, L, Z, K, E, H] (a MemoryKV: masked slots are skipped).

        Returns a new fitted PQCodec (self is unchanged). Keyword overrides: iters, train_vectors,
        seed.
        """
        iters = int(kwargs.pop("iters", self.iters))
        train_vectors = int(kwargs.pop("train_vectors", self.train_vectors))
        seed = int(kwargs.pop("seed", self.seed))
        if kwargs:
            raise CodecError(f"unknown pq fit options {sorted(kwargs)}")
        kv, mask = _kv_and_mask(sample)
        self._check_kv(kv)
        N, Lm, _, K, T, H = kv.shape
        x = np.asarray(kv)  # any float dtype; only the chosen rows are converted to float32
        valid_IE = np.ones((N, T), bool) if mask is None else mask.astype(bool)
        if valid_IE.shape != (N, T):
            raise CodecError(f"sample mask of shape {valid_IE.shape}, expected {(N, T)}")
        Kc = K if self.per_head else 1
        # rows of one codebook: (memory, token) per head, or (memory, head, token) when shared.
        if self.per_head:
            rows = np.argwhere(valid_IE)  # [(n, t)]
        else:
            v = np.broadcast_to(valid_IE[:, None, :], (N, K, T))
            rows = np.argwhere(v)  # [(n, k, t)]
        if len(rows) == 0:
            raise CodecError("pq fit: the sample has no valid (unmasked) vectors")
        rng = np.random.default_rng(seed)
        if len(rows) > train_vectors:
            rows = rows[np.sort(rng.choice(len(rows), train_vectors, replace=False))]
        if self.per_head:
            xs = x[rows[:, 0], :, :, :, rows[:, 1], :]  # [n, Lm, 2, K, H]
        else:
            xs = x[rows[:, 0], :, :, rows[:, 1], rows[:, 2], :][:, :, :, None, :]  # [n, Lm, 2, 1, H]
        xs = xs.astype(np.float32)
        n = xs.shape[0]
        sub = np.asarray(_split(jnp.asarray(xs), self._split_idx))  # [n, Lm, 2, Kc, M, d]
        P = Lm * 2 * Kc * self.subspaces
        prob = np.moveaxis(sub, 0, 4).reshape(P, n, self.dsub)
        w = np.ones((P, n), np.float32)
        cents = kmeans(prob, w, jax.random.PRNGKey(seed), k=256, iters=iters)
        cb = np.asarray(cents).reshape(Lm, 2, Kc, self.subspaces, 256, self.dsub)
        return PQCodec(self.head_dim, self.subspaces, self.per_head, self.pairing, iters=iters,
                       train_vectors=train_vectors, seed=seed, codebooks=cb)

    # ------------------------------------------------------------------ coding
    def encode(self, kv: Any) -> np.ndarray:
        self._check_kv(kv)
        N, Lm, _, K, T, H = kv.shape
        self._check_geometry(Lm, K)
        per_mem = Lm * 2 * K * T * self.subspaces * 256 * 4
        batch = max(1, min(N, (256 << 20) // per_mem))
        codes = _pq_encode(jnp.asarray(kv), jnp.asarray(self.codebooks), jnp.asarray(self._split_idx),
                           batch)
        return np.asarray(codes)

    def _device_tables(self, dtype: Any) -> tuple[Array, Array]:
        key = jnp.dtype(dtype)
        if key not in self._device:
            cb = self._require_fit()
            Lm, _, Kc, M, C, d = cb.shape
            flat = jnp.asarray(cb.reshape(-1, d), key)
            K = Kc  # base offsets are broadcast over heads for shared codebooks
            g = np.arange(Lm * 2 * K).reshape(Lm, 2, K, 1, 1)
            base = ((g * M + np.arange(M).reshape(1, 1, 1, 1, M)) * C).astype(np.int32)
            self._device[key] = (flat, jnp.asarray(base))
        return self._device[key]

    def decode(self, codes: Any, dtype: Any = None) -> Array:
        self._check_codes(codes)
        self._check_geometry(codes.shape[1], codes.shape[3])
        flat, base = self._device_tables(dtype or jnp.float32)
        return _pq_decode(jnp.asarray(codes), flat, base, jnp.asarray(self._dec_cols), self._remap)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        st = super().state()
        st["options"].update(iters=self.iters, train_vectors=self.train_vectors, seed=self.seed)
        if self.codebooks is not None:
            st["arrays"] = {"codebooks": self.codebooks}
        return st

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> "PQCodec":
        arrays = state.get("arrays", {})
        return cls(int(state["head_dim"]), **state.get("options", {}),
                   codebooks=arrays.get("codebooks"))


_CODECS: dict[str, type[Codec]] = {"bf16": BF16Codec, "f32": F32Codec, "int8": Int8Codec, "pq": PQCodec}


def make_codec(codec: "str | Codec", head_dim: int, **options: Any) -> Codec:
    """A codec by name (options go to its constructor), or `codec` itself if already a Codec."""
    if isinstance(codec, Codec):
        if codec.head_dim != head_dim:
            raise CodecError(f"{codec!r} was built for head_dim {codec.head_dim}, not {head_dim}")
        return codec
    if codec not in _CODECS:
        raise CodecError(f"unknown memory codec {codec!r}; choose from {', '.join(CODEC_NAMES)}")
    return _CODECS[codec](head_dim, **options)


def relative_error(x: Any, y: Any, mask_IE: Any = None) -> float:
    """||x - y|| / ||x|| over [I, L, Z, K, E, H] (only unmasked token slots when mask [I, E])."""
    x = np.asarray(jnp.asarray(x, jnp.float32)) if isinstance(x, jax.Array) else np.asarray(x, np.float32)
    y = np.asarray(jnp.asarray(y, jnp.float32)) if isinstance(y, jax.Array) else np.asarray(y, np.float32)
    if mask_IE is not None:
        m = np.asarray(mask_IE, bool)[:, None, None, None, :, None]
        x, y = x * m, y * m
    den = float(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    return float(np.sqrt(np.sum((x.astype(np.float64) - y) ** 2))) / max(den, 1e-30)
