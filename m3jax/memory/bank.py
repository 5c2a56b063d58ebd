"""The memory bank: coded explicit memories and their references on TensorStore (zarr3).

A bank lives under one TensorStore kvstore location (`m3jax.memory.store`); its manifest and the
layout of its arrays are described in `m3jax.memory.manifest`. This module is the bank itself:
create, open, append, gather. Filling a bank from references with a model is
`m3jax.memory.populate.build_bank`.

Only `count` memories are committed: an append writes its data in one `ts.Transaction`, and only
once that transaction committed does it rewrite the manifest with the new count, so a crash never
commits a partial batch and the next writer simply overwrites anything past `count`. Arrays grow
with `resize` in whole shards. Missing chunks are never read as fill values: a lost or truncated
shard raises `BankCorruptError`.

One writer at a time (`m3jax.memory.lease`): every write holds the bank's writer lease. Under the
lease a writer first checks that the manifest is still the one it read (another writer may have
committed since), and only then writes rows past `count` and commits the manifest, again
conditionally. So a losing writer fails with `BankLockedError` (lease held) or a BankError naming
the other writer (manifest changed) before it has written anything, and no committed row is ever
written twice. `create` never deletes a committed bank (one with a manifest). Any number of
readers.

What a manifest says is checked against what the store holds before anything is sized from it:
`count` (an int, not a bool) must be covered by the arrays and by the shards actually listed.
Non-finite memories (NaN / inf) are refused on append. All banks of a process share one
`ts.Context` (`default_context()`: a cache pool, so shard indexes and recent memories are cached,
and one in-memory kvstore, so `memory://` banks can be reopened within the process).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from m3jax.config import ModelConfig
from m3jax.memory.codec import Codec, CodecError, make_codec, memory_bytes
from m3jax.memory.errors import (BankConfigError, BankCorruptError, BankError, BankExistsError,  # noqa: F401
                                 BankFingerprintError, BankIndexError, BankLockedError, BankNotFoundError,
                                 BankReadOnlyError)
from m3jax.memory.fingerprint import params_fingerprint  # noqa: F401 - re-exported from its former home
from m3jax.memory.lease import WriterLease
from m3jax.memory.manifest import (FORMAT, FORMAT_VERSION, MANIFEST_KEY, array_layout, codec_entry,
                                   compare_configs, default_shard_size, dump, load_codec, parse_manifest)
from m3jax.memory.references import INFO_FIELDS, ReferenceBatch
from m3jax.memory.store import (array_spec, default_context, describe, kvstore_spec, open_kvstore, open_spec,
                                read_key, read_key_gen, sub_spec, ts_error, write_key)
from m3jax.model.memory import MemoryKV


def check_finite(kv: Any, where: str) -> None:
    """Refuse memories that hold NaN or inf (computed on device for jax arrays)."""
    if isinstance(kv, jax.Array):
        ok = bool(jnp.all(jnp.isfinite(kv)))
    else:
        ok = bool(np.all(np.isfinite(np.asarray(kv, np.float32))))
    if not ok:
        raise BankError(f"{where}: the memories hold NaN or inf values (out-of-range token ids or a "
                        f"diverged model?): a bank stores finite memories only")


class PendingGather:
    """Reads in flight (from `MemoryBank.gather_codes_async`); `result()` -> (codes, mask)."""

    def __init__(self, bank: "MemoryBank", futures: list[Any], inverse: np.ndarray | None, ids: np.ndarray):
        self._bank, self._futures, self._inv, self._ids = bank, futures, inverse, ids

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            codes, mask = (f.result() for f in self._futures)
        except ValueError as e:
            raise ts_error(f"bank {self._bank.url}: reading memories {self._ids[:8].tolist()}"
                            f"{'...' if len(self._ids) > 8 else ''}", e) from None
        if self._inv is not None:
            codes, mask = codes[self._inv], mask[self._inv]
        return codes, mask


class MemoryBank:
    """Coded memories + reference metadata on TensorStore; see the module docstring.

    Use `MemoryBank.create` / `MemoryBank.open` (or `build_bank`), not the constructor.
    """

    def __init__(self, *, base: dict[str, Any], context: ts.Context, manifest: dict[str, Any],
                 config: ModelConfig, codec: Codec, arrays: dict[str, ts.TensorStore],
                 kv: ts.KvStore, writable: bool, generation: bytes) -> None:
        self._base, self._context, self._manifest = base, context, manifest
        self._generation = generation  # of the manifest we last read or wrote
        self._config, self._codec, self._arrays, self._kv = config, codec, arrays, kv
        self._writable = writable
        self._count = int(manifest["count"])
        self._capacity = min(int(a.shape[0]) for a in arrays.values())

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def shard_size(self) -> int:
        return int(self._manifest["shard_size"])

    @property
    def url(self) -> str:
        return describe(self._base)

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"MemoryBank({self.url!r}, {self._count} memories, codec={self._codec!r}, "
                f"model={self._config.name!r})")

    @property
    def bytes_per_memory(self) -> int:
        """Stored code bytes of one memory (what the paper counts)."""
        return self._codec.memory_bytes(self._config)

    @property
    def metadata_bytes_per_memory(self) -> int:
        c = self._config
        return c.tokens_per_memory + 4 * c.reference_len + 8 * len(INFO_FIELDS)

    @property
    def codec_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self._codec.state()["arrays"].values())

    @property
    def nbytes(self) -> int:
        """Logical bytes of the committed bank: codes + masks + metadata + codec arrays."""
        return self._count * (self.bytes_per_memory + self.metadata_bytes_per_memory) + self.codec_bytes

    def summary(self) -> dict[str, Any]:
        return {"url": self.url, "count": self._count, "model": self._config.name,
                "codec": self._codec.name, "codec_options": self._codec.options(),
                "bytes_per_vector": self._codec.bytes_per_vector,
                "bytes_per_memory": self.bytes_per_memory,
                "metadata_bytes_per_memory": self.metadata_bytes_per_memory,
                "code_bytes": self._count * self.bytes_per_memory, "codec_bytes": self.codec_bytes,
                "nbytes": self.nbytes, "shard_size": self.shard_size, "fingerprint": self.fingerprint}

    # ------------------------------------------------------------------ create / open
    @classmethod
    def exists(cls, path: "str | dict[str, Any]", context: ts.Context | None = None) -> bool:
        """Whether a bank (its manifest) is at `path`."""
        base = kvstore_spec(path)
        return read_key(open_kvstore(base, context or default_context()), MANIFEST_KEY, base) is not None

    @classmethod
    def create(cls, path: "str | dict[str, Any]", config: ModelConfig, codec: "str | Codec" = "bf16",
               fingerprint: str = "", *, shard_size: int | None = None, exist_ok: bool = False,
               context: ts.Context | None = None) -> "MemoryBank":
        """Create an empty bank (opened for appending).

        `codec`: a name ("bf16", "int8", "f32"; "pq" needs a fitted PQCodec) or a Codec.
        `shard_size`: memories per shard (default `default_shard_size`, ~64 MiB shards).
        exist_ok: if a bank is already there, open it for appending instead, after checking that
        its config, fingerprint and codec format match (else BankConfigError /
        BankFingerprintError); without it an existing bank raises BankExistsError.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BankError("MemoryBank.create needs a non-empty fingerprint string "
                            "(params_fingerprint(params) of the weights that write the memories)")
        codec = make_codec(codec, config.head_dim)
        if not config.memory_enabled:
            raise BankConfigError(f"model {config.name!r} has memory disabled (memory_layers=0 or "
                                  f"reference_prefix=None): it writes no memories")
        context = context or default_context()
        base = kvstore_spec(path)
        kv = open_kvstore(base, context)
        if read_key(kv, MANIFEST_KEY, base) is None:
            with WriterLease(kv, base):
                # under the lease: nobody else creates or appends; look again, then never delete a
                # committed bank (one with a manifest)
                raw, gen = read_key_gen(kv, MANIFEST_KEY, base)
                if raw is None:
                    return cls._create_new(base, kv, gen, config, codec, fingerprint, shard_size, context)
        if not exist_ok:
            raise BankExistsError(f"a memory bank already exists at {describe(base)}; open it "
                                  f"with MemoryBank.open, or pass exist_ok=True to append to it")
        bank = cls.open(path, config, fingerprint, mode="a", context=context)
        bank._check_codec_compatible(codec)
        return bank

    @classmethod
    def _create_new(cls, base: dict[str, Any], kv: ts.KvStore, absent: bytes, config: ModelConfig,
                    codec: Codec, fingerprint: str, shard_size: int | None, context: ts.Context
                    ) -> "MemoryBank":
        """The arrays and manifest of a new bank (the caller holds the writer lease and saw no
        manifest, whose generation `absent` the manifest write is conditioned on)."""
        if not codec.fitted:
            raise CodecError(f"{codec!r} is not fitted; fit it on sample memories first "
                             f"(build_bank does this for codec='pq')")
        mem_bytes = codec.memory_bytes(config)
        if mem_bytes != memory_bytes(config, codec.name, **codec.options()):
            raise CodecError(f"{codec!r}: code bytes {mem_bytes} disagree with bytes_per_vector")
        shard = int(shard_size or default_shard_size(mem_bytes))
        if shard < 1:
            raise BankError(f"shard_size must be >= 1, got {shard_size}")
        entry = codec_entry(kv, codec, base)
        arrays = {}
        for name, (shape, dtype, sharded) in array_layout(config, codec, shard).items():
            spec = array_spec(sub_spec(base, name + "/"), shape, dtype, shard, sharded)
            try:
                arrays[name] = ts.open(spec, create=True, delete_existing=True, context=context).result()
            except ValueError as e:
                raise BankError(f"creating array {name!r} of bank {describe(base)}: {e}") from None
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
            "codec": entry, "fingerprint": fingerprint, "count": 0, "shard_size": shard,
            "code_shape": list(codec.code_shape(config)), "code_dtype": codec.code_dtype.name,
            "bytes_per_memory": mem_bytes, "arrays": sorted(arrays), "created": now, "updated": now,
        }
        # last: its presence marks a bank; conditional: never over another bank's manifest
        gen = write_key(kv, MANIFEST_KEY, dump(manifest), base, if_equal=absent)
        return cls(base=base, context=context, manifest=manifest, config=config, codec=codec,
                   arrays=arrays, kv=kv, writable=True, generation=gen)

    @classmethod
    def open(cls, path: "str | dict[str, Any]", config: ModelConfig | None = None,
             fingerprint: str | None = None, *, mode: str = "r", check: str = "shards",
             context: ts.Context | None = None) -> "MemoryBank":
        """Open a bank; mode "r" (read-only, default) or "a" (append).

        Raises BankNotFoundError (nothing there), BankConfigError (written for another model config:
        a MEMORY_FIELDS value differs), BankFingerprintError (written by other weights),
        BankCorruptError (manifest missing / unparseable, codec arrays damaged, arrays shorter than
        the committed count, missing shards). check: "shards" (default: list the stored shards and
        require every committed one), "full" (also read and checksum every committed chunk, see
        `verify`) or "none".
        """
        if mode not in ("r", "a"):
            raise BankError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        if check not in ("none", "shards", "full"):
            raise BankError(f"check must be 'none', 'shards' or 'full', got {check!r}")
        context = context or default_context()
        base = kvstore_spec(path)
        where = f"memory bank at {describe(base)}"
        kv = open_kvstore(base, context)
        raw, gen = read_key_gen(kv, MANIFEST_KEY, base)
        if raw is None:
            try:
                keys = kv.list().result()
            except ValueError:
                keys = []
            if keys:
                raise BankCorruptError(f"{where}: {MANIFEST_KEY} is missing but the store holds "
                                       f"{len(keys)} keys (e.g. {keys[0].decode(errors='replace')!r}): "
                                       f"its creation was interrupted or the manifest was deleted")
            raise BankNotFoundError(f"no memory bank at {describe(base)} (no {MANIFEST_KEY})")
        manifest = parse_manifest(raw, where)
        try:
            stored = ModelConfig.from_dict(manifest["config"])
        except Exception as e:  # noqa: BLE001 - any bad config in the manifest
            raise BankCorruptError(f"{where}: the manifest's model config is invalid: {e}") from None
        if config is not None:
            compare_configs(stored, config, where)
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise BankFingerprintError(
                f"{where}: this bank was written by other weights (fingerprint "
                f"{manifest['fingerprint']!r}), not by the weights given ({fingerprint!r}); its "
                f"memories would be wrong for this model: rebuild the bank with build_bank")
        cfg = config if config is not None else stored
        codec = load_codec(kv, manifest, base, where)
        try:
            want_shape = list(codec.code_shape(cfg))
        except CodecError as e:
            raise BankCorruptError(f"{where}: the manifest's codec does not fit the model: {e}") from None
        if manifest.get("code_shape") != want_shape:
            raise BankCorruptError(f"{where}: manifest code_shape {manifest.get('code_shape')} does not "
                                   f"match codec {codec!r} for the model ({want_shape})")
        arrays = {}
        shard = int(manifest["shard_size"])
        count = int(manifest["count"])
        for name, (shape, dtype, _) in array_layout(cfg, codec, shard).items():
            spec = open_spec(base, name)
            try:
                a = ts.open(spec, open=True, read=True, write=mode == "a", context=context).result()
            except ValueError as e:
                raise ts_error(f"{where}: opening array {name!r}", e) from None
            if tuple(a.shape[1:]) != tuple(shape[1:]) or a.dtype.numpy_dtype != np.dtype(dtype):
                raise BankCorruptError(f"{where}: array {name!r} is {a.dtype.name}{list(a.shape)}, "
                                       f"expected {np.dtype(dtype).name}[N, {', '.join(map(str, shape[1:]))}]")
            if a.shape[0] < count:
                raise BankCorruptError(f"{where}: array {name!r} holds {a.shape[0]} rows, fewer than the "
                                       f"{count} committed memories: the store is truncated")
            if a.chunk_layout.write_chunk.shape[0] != shard:
                raise BankCorruptError(f"{where}: array {name!r} is stored in shards of "
                                       f"{a.chunk_layout.write_chunk.shape[0]} memories, the manifest says {shard}")
            arrays[name] = a
        bank = cls(base=base, context=context, manifest=manifest, config=cfg, codec=codec,
                   arrays=arrays, kv=kv, writable=mode == "a", generation=gen)
        if check in ("shards", "full"):
            bank._check_shards()
        if check == "full":
            bank.verify()
        return bank

    def _check_codec_compatible(self, codec: Codec) -> None:
        mine = self._codec
        if codec.name != mine.name or codec.options() != mine.options():
            raise BankConfigError(f"bank at {self.url} stores codec {mine!r}, not {codec!r}")

    def _check_shards(self) -> None:
        """Every committed shard / chunk of every array exists in the store."""
        need = math.ceil(self._count / self.shard_size)
        if need == 0:
            return
        for name in self._arrays:
            kv = open_kvstore(sub_spec(self._base, name + "/c/"), self._context)
            try:
                keys = kv.list().result()
            except ValueError as e:
                raise ts_error(f"bank {self.url}: listing {name!r}", e) from None
            have = set()
            for k in keys:
                try:
                    i = int(k.split(b"/")[0])
                except ValueError:
                    continue
                if 0 <= i < need:
                    have.add(i)
            if len(have) < need:  # sized by the listing, never by the manifest's count
                first = next(i for i in range(need) if i not in have)
                s = self.shard_size
                raise BankCorruptError(
                    f"bank {self.url}: array {name!r} lacks {need - len(have)} of its {need} committed "
                    f"shards (e.g. shard {first}: memories {first * s}..{(first + 1) * s - 1}); "
                    f"the store is truncated or damaged")

    def verify(self, batch: int | None = None) -> dict[str, Any]:
        """Read every committed memory and its metadata (checksums verified); raises
        BankCorruptError naming the first damaged range. Returns {"count", "seconds"}."""
        t0 = time.perf_counter()
        step = int(batch or self.shard_size)
        for a in range(0, self._count, step):
            b = min(self._count, a + step)
            for name, arr in self._arrays.items():
                try:
                    arr[a:b].read().result()
                except ValueError as e:
                    raise ts_error(f"bank {self.url}: array {name!r} memories {a}..{b - 1}", e) from None
        return {"count": self._count, "seconds": time.perf_counter() - t0}

    def refresh(self) -> int:
        """Re-read the manifest (another process may have appended); returns the new count."""
        raw, gen = read_key_gen(self._kv, MANIFEST_KEY, self._base)
        if raw is None:
            raise BankCorruptError(f"bank {self.url}: {MANIFEST_KEY} disappeared")
        m = parse_manifest(raw, f"bank {self.url}")
        if m["fingerprint"] != self.fingerprint or m["codec"] != self._manifest["codec"]:
            raise BankCorruptError(f"bank {self.url} was replaced by another bank while open")
        if int(m["count"]) > self._capacity:
            for name, a in list(self._arrays.items()):
                self._arrays[name] = ts.open(open_spec(self._base, name), open=True, read=True,
                                             write=self._writable, context=self._context).result()
            self._capacity = min(int(a.shape[0]) for a in self._arrays.values())
        self._manifest, self._count, self._generation = m, int(m["count"]), gen
        return self._count

    # ------------------------------------------------------------------ writing
    def append(self, memories: MemoryKV, metadata: "ReferenceBatch | dict[str, Any]") -> np.ndarray:
        """Encode and append N memories (kv [I, L, Z, K, E, H], mask [I, E]) with their metadata.
        Returns their ids [N] int64 (consecutive). Commits before returning."""
        memories.check(self._config)
        check_finite(memories.kv_ILZKEH, f"bank {self.url}")
        codes = self._codec.encode(memories.kv_ILZKEH)
        return self.append_codes(codes, np.asarray(memories.mask_IE), metadata)

    def append_codes(self, codes: np.ndarray, mask_IE: np.ndarray,
                     metadata: "ReferenceBatch | dict[str, Any]") -> np.ndarray:
        """Append already coded memories: codes [I, *code_shape], mask [I, E] bool, metadata."""
        if not self._writable:
            raise BankReadOnlyError(f"bank {self.url} was opened read-only; open it with mode='a'")
        codes = np.asarray(codes)
        n = codes.shape[0] if codes.ndim else 0
        want = tuple(self._manifest["code_shape"])
        if codes.ndim == 0 or tuple(codes.shape[1:]) != want or codes.dtype != self._codec.code_dtype:
            raise BankError(f"codes {codes.dtype}{list(codes.shape)}: expected "
                            f"{self._codec.code_dtype.name}[N, {', '.join(map(str, want))}]")
        mask = np.asarray(mask_IE, bool)
        if mask.shape != (n, self._config.tokens_per_memory):
            raise BankError(f"mask of shape {mask.shape}, expected ({n}, {self._config.tokens_per_memory})")
        meta = ReferenceBatch.coerce(metadata, n, self._config.reference_len, self._config.pad_id)
        start, end = self._count, self._count + n
        if n == 0:
            return np.zeros(0, np.int64)
        if not self._codec.codes_finite(codes):
            raise BankError(f"bank {self.url}: the codes decode to NaN or inf values: a bank stores "
                            f"finite memories only")
        with WriterLease(self._kv, self._base):
            _, gen = read_key_gen(self._kv, MANIFEST_KEY, self._base)
            if gen != self._generation:  # checked under the lease, before writing past our count
                raise BankError(f"bank {self.url}: {MANIFEST_KEY} was changed by someone else since "
                                f"this bank read it: another writer appended to it (one writer at a "
                                f"time; refresh() to continue after it)")
            self._ensure_capacity(end)
            data = {"codes": codes, "mask": mask, "refs/tokens": meta.tokens, "refs/info": meta.info()}
            txn = ts.Transaction()
            try:
                futs = [self._arrays[k].with_transaction(txn)[start:end].write(v) for k, v in data.items()]
                for f in futs:
                    f.copy.result()
                txn.commit_sync()
            except ValueError as e:
                if not txn.commit_started:
                    txn.abort()
                raise BankError(f"bank {self.url}: writing memories {start}..{end - 1} failed: {e}") from None
            self._commit(end)
        return np.arange(start, end, dtype=np.int64)

    def _ensure_capacity(self, end: int) -> None:
        if end <= self._capacity:
            return
        s = self.shard_size
        new = -(-end // s) * s
        for name, a in list(self._arrays.items()):
            try:
                self._arrays[name] = a.resize(exclusive_max=[new] + [None] * (a.rank - 1),
                                              expand_only=True).result()
            except ValueError as e:
                raise BankError(f"bank {self.url}: growing array {name!r} to {new} rows: {e}") from None
        self._capacity = new

    def _commit(self, count: int) -> None:
        m = dict(self._manifest)
        m["count"] = int(count)
        m["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._generation = write_key(self._kv, MANIFEST_KEY, dump(m), self._base,
                                      if_equal=self._generation)
        self._manifest, self._count = m, int(count)

    # ------------------------------------------------------------------ reading
    def _check_ids(self, ids: Any) -> np.ndarray:
        a = np.asarray(ids)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise BankIndexError(f"memory ids must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        bad = (a < 0) | (a >= self._count)
        if np.any(bad):
            raise BankIndexError(f"memory ids {a[bad][:8].tolist()} are outside [0, {self._count}) "
                                 f"of bank {self.url}")
        return a

    def gather_codes_async(self, ids: Any) -> PendingGather:
        """Start reading the codes and masks of `ids` (any order, repeats allowed); returns a
        PendingGather whose result() is (codes [n, *code_shape], mask [n, E]). The reads of one
        call are coalesced in one `ts.Batch` (sorted, deduplicated ids)."""
        ids = self._check_ids(ids)
        if ids.size == 0:
            futs = [_Done(np.zeros((0,) + tuple(self._manifest["code_shape"]), self._codec.code_dtype)),
                    _Done(np.zeros((0, self._config.tokens_per_memory), bool))]
            return PendingGather(self, futs, None, ids)
        uniq, inv = np.unique(ids, return_inverse=True)
        same = len(uniq) == len(ids) and bool(np.all(uniq == ids))
        try:
            with ts.Batch() as batch:
                futs = [self._arrays["codes"][uniq].read(batch=batch),
                        self._arrays["mask"][uniq].read(batch=batch)]
        except ValueError as e:
            raise ts_error(f"bank {self.url}: reading memories", e) from None
        return PendingGather(self, futs, None if same else inv, ids)

    def gather_codes(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(codes [n, *code_shape] NumPy, mask [n, E] bool) of the memories `ids`, in order."""
        return self.gather_codes_async(ids).result()

    def decode(self, codes: Any, mask_IE: Any, dtype: Any = None) -> MemoryKV:
        """Codes from gather_codes -> MemoryKV on device (kv in `dtype`, default config.dtype)."""
        kv = self._codec.decode(codes, jnp.dtype(dtype or self._config.dtype))
        return MemoryKV(kv, jnp.asarray(mask_IE))

    def gather(self, ids: Any, dtype: Any = None) -> MemoryKV:
        """Memories `ids` (any order, repeats allowed) decoded on device: MemoryKV with
        kv [n, L, Z, K, E, H] in `dtype` (default config.dtype) and mask [n, E]."""
        codes, mask = self.gather_codes(ids)
        return self.decode(codes, mask, dtype)

    def metadata(self, ids: Any) -> ReferenceBatch:
        """ReferenceBatch of the memories `ids` (any order, repeats allowed)."""
        ids = self._check_ids(ids)
        uniq, inv = np.unique(ids, return_inverse=True)
        try:
            with ts.Batch() as batch:
                ft = self._arrays["refs/tokens"][uniq].read(batch=batch)
                fi = self._arrays["refs/info"][uniq].read(batch=batch)
            tokens, info = ft.result(), fi.result()
        except ValueError as e:
            raise ts_error(f"bank {self.url}: reading metadata", e) from None
        return ReferenceBatch.from_info(tokens[inv], info[inv])


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value

