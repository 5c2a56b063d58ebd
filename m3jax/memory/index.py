"""Vector index over reference embeddings: maximum inner product (= cosine for unit vectors).

Two backends behind one class, `VectorIndex`:

* "exact": brute force with NumPy (a float32 matrix product, then a top-k), exact results.
  `method="auto"` picks it below `EXACT_BELOW` (20k) vectors, ScaNN's own rule of thumb.
* "scann": ScaNN (`scann.scann_ops_pybind`). Below 100k vectors: asymmetric hashing (2 dims per
  block, anisotropic threshold 0.2) scored over the whole set, then exact re-scoring ("reorder") of
  the best 200; from 100k on, a k-means tree in front (num_leaves ~ sqrt(n)), as ScaNN's docs
  advise. Tiny sets (< 256 vectors) use ScaNN's brute force.

Ids are arbitrary unique int64 (memory ids of the bank); searches return ids, not positions.
An index grown by `add` keeps the quantizer trained at build time; rebuild it after large growth.

Saved indexes are data, never code: ScaNN's own `load_searcher` unpickles `scann_docids.pkl`
(a crafted pickle would run on open), so `save` writes only the native searcher's assets (NumPy
arrays, protobufs, the text asset list) and `load` builds the searcher from them with the
positions 0..n-1 as its docids (ids.npy maps them to ids); a pickle in the directory is ignored.
Asset paths must be plain file names inside the index directory. Every index records what it was
built from, `source` (`source_of(vectors, ids)`, chained through `add`), saved in index.json, so
a cache holding an index of other vectors is told apart (`m3jax.memory.build` rebuilds it).

Measured on a 2-core CPU shared with other jobs (load ~6), k=5:
* 20k random unit vectors, dim 384, 2,000 queries (noisy copies + random): ScaNN (AH + reorder
  200) recall@5 0.997-0.998, ~10k queries/s batched (~2k/s one query per call), build ~2-5 s;
  exact ~2.8k queries/s.
* 100k x 128, tree of 316 leaves, 32 searched: clustered data recall@5 1.00 at ~7k queries/s;
  structureless random vectors only 0.54 (a partition cannot help there; use tree=False).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import dataclasses
import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

EXACT_BELOW = 20_000  # "auto" uses exact search below this many vectors
TREE_FROM = 100_000  # ScaNN: add a partitioning tree from this many vectors on
_SCANN_BRUTE_BELOW = 256  # ScaNN: AH needs a few hundred points to train its codebooks
_META = "index.json"
_IDS = "ids.npy"
_VECTORS = "vectors.npy"
_SCANN_DIR = "scann"
_SCANN_ASSETS = "scann_assets.pbtxt"  # text: the asset files of the native searcher
_SCANN_CONFIG = "scann_config.pb"
_SCANN_PICKLE = "scann_docids.pkl"  # written by ScannSearcher.serialize; never read (see load)
_SCANN_ASSET_PATH = re.compile(r'asset_path\s*:\s*"([^"]*)"')
_MAX_ASSETS_TEXT = 1 << 20
_FORMAT = "m3jax.VectorIndex"
_VERSION = 1


@dataclass(frozen=True)
class ScannParams:
    """ScaNN build settings (see the module docstring for how they are chosen from n).

    tree: partition with a k-means tree (num_leaves, searching num_leaves_to_search per query).
    dims_per_block / quantization_threshold: asymmetric hashing (score_ah).
    reorder: candidates re-scored exactly (0 = none); at search time at least max(reorder, 40k).
    brute_force: ScaNN brute force instead of AH (tiny sets).
    """

    tree: bool = False
    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 100_000
    dims_per_block: int = 2
    quantization_threshold: float = 0.2
    reorder: int = 200
    brute_force: bool = False
    num_threads: int = 0  # 0: ScaNN's default thread pool

    @classmethod
    def for_size(cls, n: int, **overrides: Any) -> "ScannParams":
        """Defaults for n vectors (aiming at recall@5 >= 0.95), then `overrides` applied."""
        valid = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise TypeError(f"unknown ScaNN option(s) {bad}; valid: {sorted(valid)}")
        tree = bool(overrides.get("tree", n >= TREE_FROM))
        leaves = max(2, int(round(math.sqrt(max(n, 1)))))
        p = cls(
            tree=tree,
            num_leaves=leaves,
            # 10% of the leaves (at least 32): recall@5 ~1.0 on clustered 100k sets (a tree cannot
            # help on structureless random vectors: 0.54 there; such data needs tree=False)
            num_leaves_to_search=min(leaves, max(32, int(math.ceil(0.1 * leaves)))),
            training_sample_size=min(max(n, 1), 100_000),
            brute_force=n < _SCANN_BRUTE_BELOW,
        )
        p = replace(p, **overrides)
        if p.tree and not p.brute_force:
            if p.num_leaves < 2 or p.num_leaves > max(n, 2):
                raise ValueError(f"num_leaves must be in [2, n={n}], got {p.num_leaves}")
            if not 1 <= p.num_leaves_to_search <= p.num_leaves:
                raise ValueError(f"num_leaves_to_search must be in [1, num_leaves={p.num_leaves}], "
                                 f"got {p.num_leaves_to_search}")
        if p.reorder < 0 or p.dims_per_block < 1 or p.training_sample_size < 1:
            raise ValueError(f"bad ScaNN settings: {p}")
        return p


def read_npy(path: str, what: str = "array file") -> np.ndarray:
    """A .npy file, read without pickles and without trusting its header: the file is memory
    mapped first, so a header that claims more data than the file holds (a truncated or edited
    file) raises ValueError naming `path` before anything of that size is allocated."""
    try:
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt {what} {path} (damaged or truncated: {e})") from None


def _as_vectors(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """Validate a float matrix [n, d]: 2-D, finite, matching `dim`; returned as C float32."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} have dimension {a.shape[1]}, the index has dimension {dim}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} have dimension 0")
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(a), axis=1))[0])
        raise ValueError(f"{name} contain non-finite values (row {bad})")
    return a


def _as_ids(ids: Any, n: int, name: str = "ids") -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name} must be a 1-D array of {n} ids, got shape {a.shape}")
    if n and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if len(np.unique(a)) != n:
        raise ValueError(f"{name} contain duplicates")
    return a


def exact_topk(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions [q, k] and scores [q, k] of the k largest q @ db.T per row, best first.
    Ties go to the lower position. Computed in query blocks to bound memory."""
    n = db.shape[0]
    block = max(1, min(len(q), (1 << 24) // max(n, 1)))
    pos = np.empty((len(q), k), np.int64)
    sc = np.empty((len(q), k), np.float32)
    for s in range(0, len(q), block):
        s_QN = q[s:s + block] @ db.T
        if k < n:
            part = np.argpartition(-s_QN, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n), (s_QN.shape[0], n))
        vals = np.take_along_axis(s_QN, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)  # by score desc, then position asc
        pos[s:s + block] = np.take_along_axis(part, order, axis=1)
        sc[s:s + block] = np.take_along_axis(vals, order, axis=1)
    return pos, sc


class VectorIndex:
    """Maximum-inner-product index with int64 ids. Build with `VectorIndex.build`."""

    def __init__(self, *, method: str, dim: int, ids: np.ndarray, vectors: np.ndarray | None = None,
                 searcher: Any = None, params: ScannParams | None = None, source: str | None = None):
        self.method = method
        self.source = source  # source_of the indexed vectors and ids (None: an index saved without it)
        self.dim = int(dim)
        self._ids = ids
        self._vectors = vectors
        self._searcher = searcher
        self.params = params
        self._id_set = set(ids.tolist())
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, vectors: Any, ids: Any | None = None, *, method: str = "auto",
              **overrides: Any) -> "VectorIndex":
        """Index vectors [n, d] (float32, unit norm for cosine) under ids [n] (default 0..n-1).

        method: "exact", "scann" or "auto" (exact below EXACT_BELOW vectors). `overrides` are
        `ScannParams` fields (e.g. reorder=400, tree=True, num_leaves_to_search=64).
        """
        v = _as_vectors(vectors, "vectors")
        n, d = v.shape
        ids = np.arange(n, dtype=np.int64) if ids is None else _as_ids(ids, n)
        source = source_of(v, ids)
        if method == "auto":
            method = "exact" if n < EXACT_BELOW else "scann"
        if method == "exact":
            if overrides:
                raise TypeError(f"method='exact' takes no options, got {sorted(overrides)}")
            return cls(method="exact", dim=d, ids=ids, vectors=v, source=source)
        if method != "scann":
            raise ValueError(f"unknown index method {method!r}; choose 'auto', 'exact' or 'scann'")
        if n == 0:
            raise ValueError("a ScaNN index needs at least one vector (use method='exact' to start "
                             "empty)")
        params = ScannParams.for_size(n, **overrides)
        return cls(method="scann", dim=d, ids=ids, searcher=_build_scann(v, params), params=params,
                   source=source)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> np.ndarray:
        """All ids in insertion order (a copy)."""
        return self._ids.copy()

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: queries [q, d] -> (ids int64 [q, k], scores float32 [q, k]),
        best first."""
        q = _as_vectors(queries, "queries", self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        with self._lock:
            n = len(self)
            if k > n:
                raise ValueError(f"k={k} exceeds the number of indexed vectors ({n})")
            if len(q) == 0:
                return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
            if self.method == "exact":
                pos, sc = exact_topk(self._vectors, q, k)
                return self._ids[pos], sc
            return self._search_scann(q, k)

    def _search_scann(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        kwargs: dict[str, Any] = {"final_num_neighbors": k}
        if not p.brute_force and p.reorder:
            kwargs["pre_reorder_num_neighbors"] = min(len(self), max(p.reorder, 40 * k))
        if len(q) > 1:
            pos, sc = self._searcher.search_batched_parallel(q, **kwargs)
        else:
            pos, sc = self._searcher.search_batched(q, **kwargs)
        try:
            pos_QK = np.asarray(pos, np.int64).reshape(len(q), k)
            sc_QK = np.asarray(sc, np.float32).reshape(len(q), k)
        except ValueError:  # rows can be short when the searched leaves hold < k vectors
            pos_QK = np.full((len(q), k), -1, np.int64)
            sc_QK = np.full((len(q), k), -np.inf, np.float32)
            for i, (row, srow) in enumerate(zip(pos, sc)):
                m = min(len(row), k)
                pos_QK[i, :m] = np.asarray(row[:m], np.int64)
                sc_QK[i, :m] = np.asarray(srow[:m], np.float32)
        ids = np.where(pos_QK >= 0, self._ids[np.maximum(pos_QK, 0)], -1)
        return ids, sc_QK

    # ------------------------------------------------------------------ updates
    def add(self, vectors: Any, ids: Any | None = None) -> None:
        """Append vectors [m, d] under new unique ids [m] (default: continuing after the largest)."""
        v = _as_vectors(vectors, "vectors", self.dim)
        m = len(v)
        with self._lock:
            if ids is None:
                start = int(self._ids.max()) + 1 if len(self._ids) else 0
                ids = np.arange(start, start + m, dtype=np.int64)
            ids = _as_ids(ids, m)
            clash = [i for i in ids.tolist() if i in self._id_set]
            if clash:
                raise ValueError(f"ids already in the index: {clash[:10]}")
            if m == 0:
                return
            if self.method == "exact":
                self._vectors = np.concatenate([self._vectors, v])
            else:
                n = len(self._ids)
                self._searcher.upsert(list(range(n, n + m)), v, batch_size=min(m, 1024))
            self._ids = np.concatenate([self._ids, ids])
            self._id_set.update(ids.tolist())
            self.source = _chain(self.source, source_of(v, ids))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        """Write the index to `directory` (created; existing index files are overwritten)."""
        os.makedirs(directory, exist_ok=True)
        with self._lock:
            meta = {"format": _FORMAT, "version": _VERSION, "method": self.method, "dim": self.dim,
                    "count": len(self), "ids_file": _IDS}
            if self.source is not None:
                meta["source"] = self.source
            np.save(os.path.join(directory, _IDS), self._ids)
            if self.method == "exact":
                np.save(os.path.join(directory, _VECTORS), self._vectors)
                meta["vectors_file"] = _VECTORS
            else:
                sdir = os.path.join(directory, _SCANN_DIR)
                os.makedirs(sdir, exist_ok=True)
                # The native searcher only: ScannSearcher.serialize would also pickle its docids
                # (positions 0..n-1 here, rebuilt at load from ids.npy), and a pickle is code.
                self._searcher.searcher.serialize(sdir, True)
                stale = os.path.join(sdir, _SCANN_PICKLE)
                if os.path.exists(stale):
                    os.remove(stale)
                meta["scann_dir"] = _SCANN_DIR
                meta["scann_params"] = asdict(self.params)
        tmp = os.path.join(directory, _META + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(directory, _META))

    @classmethod
    def load(cls, directory: str) -> "VectorIndex":
        """Read an index written by `save`. Missing pieces raise FileNotFoundError, inconsistent
        ones ValueError, each naming the path."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"index directory {directory} does not exist")
        meta_path = os.path.join(directory, _META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} is missing: {directory} is not a saved VectorIndex")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {_FORMAT!r}")
            if meta.get("version") != _VERSION:
                raise ValueError(f"version {meta.get('version')!r} is not supported")
            method, dim, count = meta["method"], meta["dim"], meta["count"]
            for key, v in (("dim", dim), ("count", count)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{key} {v!r} is not a non-negative integer")
            source = meta.get("source")
            if source is not None and not isinstance(source, str):
                raise ValueError(f"source {source!r} is not a string")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError, RecursionError) as e:
            raise ValueError(f"corrupt index metadata {meta_path}: {e}") from None

        def need(name: Any) -> str:
            if not isinstance(name, str) or not _plain_name(name):
                raise ValueError(f"corrupt index metadata {meta_path}: {name!r} is not a file name "
                                 f"inside the index directory")
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing from the saved index")
            return path

        ids_path = need(meta.get("ids_file", _IDS))
        ids = read_npy(ids_path, "ids file")
        if ids.ndim != 1 or len(ids) != count or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{ids_path} holds {ids.dtype} {ids.shape}, expected {count} int64 ids")
        ids = ids.astype(np.int64)

        if method == "exact":
            vpath = need(meta.get("vectors_file", _VECTORS))
            vectors = read_npy(vpath, "vectors file")
            if vectors.shape != (count, dim) or vectors.dtype != np.float32:
                raise ValueError(f"{vpath} holds {vectors.dtype} {vectors.shape}, expected float32 "
                                 f"({count}, {dim})")
            return cls(method="exact", dim=dim, ids=ids, vectors=vectors, source=source)
        if method != "scann":
            raise ValueError(f"corrupt index metadata {meta_path}: unknown method {method!r}")
        sdir = need(meta.get("scann_dir", _SCANN_DIR))
        try:
            params = ScannParams(**meta.get("scann_params", {}))
            for f in dataclasses.fields(ScannParams):
                v, want = getattr(params, f.name), type(f.default)
                if type(v) is not want and not (want is float and type(v) is int):
                    raise TypeError(f"{f.name}={v!r} is not a {want.__name__}")
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt index metadata {meta_path}: scann_params: {e}") from None
        searcher = _load_scann(sdir, count)
        return cls(method="scann", dim=dim, ids=ids, searcher=searcher, params=params, source=source)

    def __repr__(self) -> str:
        return f"VectorIndex(method={self.method!r}, dim={self.dim}, count={len(self)})"


def source_of(vectors: np.ndarray, ids: np.ndarray) -> str:
    """What an index of `vectors` [n, d] under `ids` [n] is derived from: a sha256 of both (as
    float32 / int64), recorded as `VectorIndex.source`."""
    h = hashlib.sha256(b"m3jax.index.source.v1\0")
    v = np.ascontiguousarray(vectors, np.float32)
    h.update(np.asarray(v.shape, np.int64).tobytes())
    h.update(v.tobytes())
    h.update(np.ascontiguousarray(ids, np.int64).tobytes())
    return "sha256:" + h.hexdigest()


def _chain(before: str | None, added: str) -> str:
    """The source of an index that held `before` and had `added` appended."""
    return "sha256:" + hashlib.sha256(f"{before}+{added}".encode()).hexdigest()


def _plain_name(name: str) -> bool:
    """A file name inside a directory: no separators, not absolute, not "." or ".."."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name \
        and not os.path.isabs(name) and "\0" not in name


def _load_scann(sdir: str, count: int) -> Any:
    """The ScaNN searcher serialized in `sdir`, built from its assets without unpickling anything
    (what `scann_ops_pybind.load_searcher` does, less its pickle of docids: the docids of our
    searchers are always the positions 0..count-1)."""
    from scann.scann_ops.py import scann_ops_pybind  # local: heavy, and exact indexes need no ScaNN

    assets_path = os.path.join(sdir, _SCANN_ASSETS)
    for name in (_SCANN_ASSETS, _SCANN_CONFIG):
        if not os.path.isfile(os.path.join(sdir, name)):
            raise FileNotFoundError(f"{os.path.join(sdir, name)} is missing from the saved index")
    if os.path.getsize(assets_path) > _MAX_ASSETS_TEXT:
        raise ValueError(f"{assets_path} is larger than {_MAX_ASSETS_TEXT} bytes: not a ScaNN asset list")
    try:
        with open(assets_path, encoding="utf-8") as f:
            assets = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{assets_path} is not text: {e}") from None
    for name in _SCANN_ASSET_PATH.findall(assets):
        if not _plain_name(name):
            raise ValueError(f"{assets_path} names the asset {name!r}: only files inside {sdir} are read")
        if not os.path.isfile(os.path.join(sdir, name)):
            raise FileNotFoundError(f"{os.path.join(sdir, name)} (listed in {assets_path}) is missing")
    try:
        native = scann_ops_pybind.scann_pybind.ScannNumpy(sdir, assets)
        searcher = scann_ops_pybind.ScannSearcher(native, list(range(count)))
    except Exception as e:  # noqa: BLE001 - the native loader raises several types on bad assets
        raise ValueError(f"could not load the ScaNN searcher in {sdir}: {e}") from None
    if searcher.size() != count:
        raise ValueError(f"ScaNN searcher in {sdir} holds {searcher.size()} vectors, metadata says {count}")
    return searcher


def _build_scann(v: np.ndarray, p: ScannParams) -> Any:
    from scann.scann_ops.py import scann_ops_pybind  # local: heavy, and exact indexes need no ScaNN

    n = len(v)
    b = scann_ops_pybind.builder(v, min(10, n), "dot_product")
    if p.brute_force:
        b = b.score_brute_force()
    else:
        if p.tree:
            b = b.tree(num_leaves=p.num_leaves, num_leaves_to_search=p.num_leaves_to_search,
                       training_sample_size=min(p.training_sample_size, n))
        b = b.score_ah(p.dims_per_block, anisotropic_quantization_threshold=p.quantization_threshold,
                       training_sample_size=min(p.training_sample_size, n))
        if p.reorder:
            b = b.reorder(p.reorder)
    searcher = b.build(docids=list(range(n)))
    if p.num_threads:
        searcher.set_num_threads(p.num_threads)
    return searcher
