"""Filling a memory bank from references with a model: `build_bank` encodes references batch by
batch, fits a pq codec on the first ones when asked, and appends whole shards, resuming a partial
build (or a partial append) where its bank's committed count stands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from m3jax.config import ModelConfig
from m3jax.memory.bank import MemoryBank, check_finite
from m3jax.memory.codec import Codec, make_codec
from m3jax.memory.errors import BankError, BankNotFoundError
from m3jax.memory.manifest import MANIFEST_KEY
from m3jax.memory.references import Reference, ReferenceBatch
from m3jax.memory.store import default_context, describe, kvstore_spec
from m3jax.model.memory import MemoryKV

EncodeFn = Callable[[np.ndarray, np.ndarray], MemoryKV]
# encoded memories not yet written: (codes or kv [n, ...], mask [n, E], their references)
_Pending = list[tuple[np.ndarray, np.ndarray, ReferenceBatch]]


def _reference_batch(refs: Sequence[Reference], config: ModelConfig, batch_size: int
                     ) -> tuple[np.ndarray, np.ndarray, ReferenceBatch]:
    """tokens [batch_size, R] int32, mask [batch_size, R] bool (short batches repeat their last
    reference so a jitted encoder always sees one shape) and the metadata of the real rows."""
    meta = ReferenceBatch.of(refs, config.reference_len, config.pad_id)
    n = len(meta)
    tokens = meta.tokens
    mask = np.arange(config.reference_len)[None, :] < meta.lengths[:, None]
    if n < batch_size:
        pad = np.full(batch_size - n, n - 1)
        tokens = np.concatenate([tokens, tokens[pad]])
        mask = np.concatenate([mask, mask[pad]])
    return tokens, mask, meta


def _encode_batch(encode_fn: EncodeFn, refs: Sequence[Reference], config: ModelConfig, batch_size: int
                  ) -> tuple[Any, np.ndarray, ReferenceBatch]:
    """(kv [n, L, Z, K, E, H] as encode_fn returned it (left on device), mask [n, E], meta)."""
    tokens, mask, meta = _reference_batch(refs, config, batch_size)
    mem = encode_fn(tokens, mask)
    if not isinstance(mem, MemoryKV):
        raise BankError(f"encode_fn must return a MemoryKV, got {type(mem).__name__}")
    mem.check(config)
    n = len(meta)
    if mem.num != tokens.shape[0]:
        raise BankError(f"encode_fn returned {mem.num} memories for {tokens.shape[0]} references")
    check_finite(mem.kv_ILZKEH[:n], f"encode_fn, for the references of doc ids "
                                     f"{int(meta.doc_id[0])}..{int(meta.doc_id[-1])}")
    return mem.kv_ILZKEH[:n], np.asarray(mem.mask_IE[:n], bool), meta


def build_bank(path: "str | dict[str, Any]", config: ModelConfig, fingerprint: str,
               references: Sequence[Reference], encode_fn: EncodeFn, *, codec: "str | Codec" = "bf16",
               batch_size: int = 64, pq_sample: int = 1024, shard_size: int | None = None,
               show_progress: bool = True, context: ts.Context | None = None,
               first_id: int = 0) -> MemoryBank:
    """Encode `references` into a bank at `path`, resuming a partial build there.

    references: `m3jax.memory.references.Reference`s of 1..reference_len tokens.
    encode_fn(tokens [b, R] int32, mask [b, R] bool) -> MemoryKV of b memories; it always gets
    b = batch_size rows (a short last batch repeats its last reference) and row i of the output
    must depend only on row i of the input.

    pq: the codebooks are fitted on the first `pq_sample` memories (encoded once, then written)
    and persisted with the bank before its first append. Writes are shard aligned: encoded
    memories are buffered until a shard is full (or the input ends), then appended and committed
    in one transaction, so a killed build loses at most one shard of encoding work. Reopening the
    same path resumes at the committed count; a bank made with another config, fingerprint or
    codec is refused (BankConfigError / BankFingerprintError, by `MemoryBank.create`'s own
    create-or-open), and so are references whose record at the last committed id differs from
    the stored metadata.

    first_id: append to an existing bank: `references[i]` becomes memory `first_id + i` (the bank
    must hold at least `first_id` memories; memories past `first_id` are taken as a resumed part
    of this append). 0 builds a new bank (or resumes one).
    """
    if batch_size < 1:
        raise BankError(f"batch_size must be >= 1, got {batch_size}")
    if first_id < 0:
        raise BankError(f"first_id must be >= 0, got {first_id}")
    n_total = len(references)
    context = context or default_context()
    requested = make_codec(codec, config.head_dim)
    exists = MemoryBank.exists(path, context)
    if first_id and not exists:
        raise BankNotFoundError(f"no memory bank at {describe(kvstore_spec(path))} to append memories "
                                f"{first_id}.. to (no {MANIFEST_KEY})")
    bank: MemoryBank | None = None
    pending: _Pending = []
    if exists or requested.fitted:  # open it (checking config, fingerprint, codec) or create it
        bank = MemoryBank.create(path, config, requested, fingerprint, shard_size=shard_size, exist_ok=True,
                                 context=context)
        _check_resume(bank, references, first_id)
    start = len(bank) - first_id if bank is not None else 0
    bar = tqdm(total=n_total, initial=start, disable=not show_progress, unit="mem",
               desc=f"memory bank ({requested.name})", dynamic_ncols=True)
    try:
        pos = start
        if bank is None:  # a new bank of an unfitted (pq) codec: fit it on the first pq_sample memories
            n_fit = min(max(1, pq_sample), n_total)
            if n_fit == 0:
                raise BankError("cannot fit a pq codec on zero references")
            raw: _Pending = []
            bar.set_postfix_str("encoding the pq training sample")
            while pos < n_fit:
                refs = references[pos: min(n_total, pos + batch_size)]
                kv_b, mask_b, meta_b = _encode_batch(encode_fn, refs, config, batch_size)
                raw.append((np.asarray(kv_b), mask_b, meta_b))  # host copy, encoder dtype
                pos += len(refs)
                bar.update(len(refs))
            kv_all = np.concatenate([r[0] for r in raw])
            mask_all = np.concatenate([r[1] for r in raw])
            bar.set_postfix_str(f"fitting pq codebooks on {len(kv_all)} memories")
            fitted = requested.fit(MemoryKV(kv_all[:n_fit], mask_all[:n_fit]))
            pending = [(fitted.encode(k), m, meta) for k, m, meta in raw]
            del kv_all, mask_all, raw
            bank = MemoryBank.create(path, config, fitted, fingerprint, shard_size=shard_size, context=context)
        bar.set_postfix_str("")
        pending = _flush(bank, pending, force=pos >= n_total)
        while pos < n_total:
            refs = references[pos: min(n_total, pos + batch_size)]
            kv_b, mask_b, meta_b = _encode_batch(encode_fn, refs, config, batch_size)
            pending.append((bank.codec.encode(kv_b), mask_b, meta_b))
            pos += len(refs)
            pending = _flush(bank, pending, force=pos >= n_total)
            bar.update(len(refs))
            bar.set_postfix(committed=len(bank))
    finally:
        bar.close()
    return bank


def _flush(bank: MemoryBank, pending: _Pending, force: bool) -> _Pending:
    """Append the buffered memories up to the last full shard boundary (all of them if force)."""
    n = sum(len(p[2]) for p in pending)
    if n == 0:
        return []
    count, s = len(bank), bank.shard_size
    boundary = (count + n) // s * s
    take = n if force else max(0, boundary - count)
    if take == 0:
        return pending
    codes = np.concatenate([p[0] for p in pending])
    mask = np.concatenate([p[1] for p in pending])
    meta = ReferenceBatch.concat([p[2] for p in pending])
    bank.append_codes(codes[:take], mask[:take], meta.take(slice(0, take)))
    if take == n:
        return []
    return [(codes[take:], mask[take:], meta.take(slice(take, n)))]


def _check_resume(bank: MemoryBank, references: Sequence[Reference], first_id: int = 0) -> None:
    """The memories stored from `first_id` on are a prefix of `references` (checked on the last)."""
    n = len(bank) - first_id
    if n < 0:
        raise BankError(f"bank {bank.url} holds {len(bank)} memories, fewer than first_id={first_id}: "
                        f"it is not the bank these references are appended to")
    if n == 0:
        return
    if n > len(references):
        raise BankError(f"bank {bank.url} already holds {n} memories from id {first_id} on, more than the "
                        f"{len(references)} references given: these are not the references it was built from")
    # the last stored reference and up to 15 spread over the rest (cheap: metadata only)
    sample = np.unique(np.concatenate([np.linspace(0, n - 1, min(n, 15)).astype(np.int64), [n - 1]]))
    want = ReferenceBatch.of([references[i] for i in sample.tolist()], bank.config.reference_len,
                             bank.config.pad_id)
    got = bank.metadata(first_id + sample)
    differ = np.zeros(len(sample), bool)
    for f in dataclasses.fields(ReferenceBatch):
        a, b = getattr(want, f.name), getattr(got, f.name)
        differ |= (a != b).reshape(len(sample), -1).any(axis=1)
    if differ.any():
        i = int(sample[np.flatnonzero(differ)[-1]])
        raise BankError(f"bank {bank.url}: the stored reference of memory {first_id + i} differs from "
                        f"references[{i}]; resuming needs the same references in the same order")
