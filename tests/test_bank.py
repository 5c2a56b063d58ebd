"""Memory bank on TensorStore: round trips, gather order, resume after a kill, clear errors."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m3jax.config import preset
from m3jax.memory.bank import MemoryBank
from m3jax.memory.codec import make_codec, memory_bytes, relative_error
from m3jax.memory.errors import (BankConfigError, BankCorruptError, BankError, BankExistsError,
                                 BankFingerprintError, BankIndexError, BankNotFoundError, BankReadOnlyError)
from m3jax.memory.fingerprint import params_fingerprint
from m3jax.memory.populate import build_bank
from m3jax.memory.references import Reference, ReferenceBatch
from m3jax.model.memory import MemoryKV

CFG = preset("tiny")  # Lm=2, K=2, T=4, H=16, R=32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_encode(tokens, mask):
    """Deterministic per row: memory values are a smooth function of the reference's tokens."""
    c = CFG
    n = tokens.shape[0]
    t = tokens.astype(np.float32)
    tok = t[:, : c.tokens_per_memory]  # [n, T]
    s = t.sum(1)[:, None, None, None, None, None]
    grid = (np.arange(c.memory_layers)[:, None, None, None, None] * 1.3
            + np.arange(2)[None, :, None, None, None] * 0.7
            + np.arange(c.num_kv_heads)[None, None, :, None, None] * 0.3
            + np.arange(c.head_dim)[None, None, None, None, :] * 0.11)
    kv = np.sin(tok[:, None, None, None, :, None] * 0.37 + grid[None] + s * 1e-3)
    kv = kv * (1 + tok[:, None, None, None, :, None] / 256)
    return MemoryKV(jnp.asarray(kv.astype(np.float32)), jnp.asarray(mask[:, : c.tokens_per_memory]))


def make_refs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Reference(i, i // 3, 10 * i, 10 * i + 9,
                      tuple(rng.integers(7, CFG.vocab_size, int(rng.integers(1, CFG.reference_len + 1))).tolist()))
            for i in range(n)]


def expected(refs):
    tokens = np.full((len(refs), CFG.reference_len), CFG.pad_id, np.int32)
    for i, r in enumerate(refs):
        tokens[i, : len(r.tokens)] = r.tokens
    mask = np.arange(CFG.reference_len)[None] < np.array([len(r.tokens) for r in refs])[:, None]
    m = fake_encode(tokens, mask)
    return np.asarray(m.kv_ILZKEH), np.asarray(m.mask_IE)


def build(path, refs, codec="bf16", **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("shard_size", 16)
    kw.setdefault("show_progress", False)
    return build_bank(str(path), CFG, "fp-A", refs, fake_encode, codec=codec, **kw)


def pq_codec():
    return make_codec("pq", CFG.head_dim, iters=4)


def same_bank(a: MemoryBank, b: MemoryBank):
    assert len(a) == len(b)
    ids = np.arange(len(a))
    ca, ma = a.gather_codes(ids)
    cb, mb = b.gather_codes(ids)
    np.testing.assert_array_equal(ca.view(np.uint8), cb.view(np.uint8))
    np.testing.assert_array_equal(ma, mb)
    for f in dataclasses.fields(ReferenceBatch):
        np.testing.assert_array_equal(getattr(a.metadata(ids), f.name), getattr(b.metadata(ids), f.name))
    assert a.codec.state()["options"] == b.codec.state()["options"]
    for k, v in a.codec.state()["arrays"].items():
        np.testing.assert_array_equal(v, b.codec.state()["arrays"][k])


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", ["bf16", "int8", "pq"])
def test_round_trip(tmp_path, codec):
    refs = make_refs(37)
    bank = build(tmp_path / "b", refs, pq_codec() if codec == "pq" else codec, pq_sample=24)
    assert len(bank) == 37
    kv, mask = expected(refs)
    got = MemoryBank.open(str(tmp_path / "b"), CFG, "fp-A").gather(np.arange(37), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got.mask_IE), mask)
    y = np.asarray(got.kv_ILZKEH)
    if codec == "bf16":
        np.testing.assert_array_equal(y, kv.astype(ml_dtypes.bfloat16).astype(np.float32))
    elif codec == "int8":
        assert relative_error(kv, y, mask) < 0.01
    else:  # the bank adds nothing to the codec's own error
        np.testing.assert_array_equal(y, np.asarray(bank.codec.decode(bank.codec.encode(kv))))
        assert relative_error(kv, y, mask) < 0.2  # measured 0.057 (3 bytes / 16 dims, 24 training memories)
    meta = bank.metadata(np.arange(37))
    np.testing.assert_array_equal(meta.lengths, [len(r.tokens) for r in refs])
    np.testing.assert_array_equal(meta.doc_id, [r.doc_id for r in refs])
    np.testing.assert_array_equal(meta.char_start, [r.char_start for r in refs])
    np.testing.assert_array_equal(meta.char_end, [r.char_end for r in refs])
    assert meta.tokens[5, : meta.lengths[5]].tolist() == list(refs[5].tokens)
    s = bank.summary()
    assert s["count"] == 37 and s["bytes_per_memory"] == memory_bytes(CFG, codec, **bank.codec.options())
    assert bank.nbytes >= 37 * s["bytes_per_memory"]
    assert MemoryBank.exists(str(tmp_path / "b")) and not MemoryBank.exists(str(tmp_path / "nothing"))


def test_gather_order_duplicates_and_bounds(tmp_path):
    refs = make_refs(40)
    bank = build(tmp_path / "b", refs)
    kv, mask = expected(refs)
    ids = [33, 2, 33, 0, 17, 2]
    got = bank.gather(ids, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got.kv_ILZKEH),
                                  kv[ids].astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got.mask_IE), mask[ids])
    assert bank.metadata(ids).doc_id.tolist() == [refs[i].doc_id for i in ids]
    codes, m = bank.gather_codes_async(np.array(ids)).result()
    assert codes.shape == (6,) + bank.codec.code_shape(CFG) and m.shape == (6, CFG.tokens_per_memory)
    assert bank.gather([]).kv_ILZKEH.shape[0] == 0
    with pytest.raises(BankIndexError, match="outside"):
        bank.gather([0, 40])
    with pytest.raises(BankIndexError):
        bank.gather([-1])


def test_append_api_and_read_only(tmp_path):
    path = str(tmp_path / "b")
    bank = MemoryBank.create(path, CFG, "int8", "fp-A", shard_size=4)
    tokens = np.random.default_rng(0).integers(7, 200, (6, CFG.reference_len)).astype(np.int32)
    mem = fake_encode(tokens, np.ones_like(tokens, bool))
    meta = dict(tokens=tokens[:, :10], lengths=np.full(6, 10), doc_id=np.arange(6),
                char_start=np.zeros(6, int), char_end=np.full(6, 50))
    assert bank.append(mem, meta).tolist() == list(range(6))
    assert bank.append(mem.take(slice(0, 3)), ReferenceBatch.coerce(meta, 6, 32).take(slice(0, 3))).tolist() == [6, 7, 8]
    # zero memories are stored too (not dropped as fill values)
    zero = MemoryKV(jnp.zeros_like(mem.kv_ILZKEH[:1]), jnp.zeros_like(mem.mask_IE[:1]))
    assert bank.append(zero, ReferenceBatch.coerce(meta, 6, 32).take(slice(0, 1))).tolist() == [9]
    ro = MemoryBank.open(path, CFG, "fp-A", check="full")
    assert len(ro) == 10 and not ro.writable
    assert float(jnp.abs(ro.gather([9]).kv_ILZKEH).max()) == 0.0
    with pytest.raises(BankReadOnlyError):
        ro.append(mem, meta)
    with pytest.raises(BankExistsError):
        MemoryBank.create(path, CFG, "int8", "fp-A")
    with pytest.raises(BankError, match="lacks"):
        bank.append(mem, {"tokens": tokens})
    # a reader sees later appends after refresh()
    bank.append(mem.take(slice(0, 2)), ReferenceBatch.coerce(meta, 6, 32).take(slice(0, 2)))
    assert ro.refresh() == 12 and ro.gather([11]).num == 1
    # a second writer: whoever commits second is refused
    other = MemoryBank.open(path, CFG, "fp-A", mode="a")
    other.append(mem.take(slice(0, 1)), ReferenceBatch.coerce(meta, 6, 32).take(slice(0, 1)))
    with pytest.raises(BankError, match="another writer"):
        bank.append(mem.take(slice(3, 4)), ReferenceBatch.coerce(meta, 6, 32).take(slice(3, 4)))
    np.testing.assert_array_equal(MemoryBank.open(path).gather_codes([12])[0],
                                  bank.codec.encode(mem.kv_ILZKEH[:1]))  # not overwritten


def test_memory_kvstore():
    refs = make_refs(20)
    url = "memory://m3jax-test-bank/x"
    build_bank(url, CFG, "fp-A", refs, fake_encode, codec="int8", batch_size=8, shard_size=8,
               show_progress=False)
    bank = MemoryBank.open(url, CFG, "fp-A")
    assert len(bank) == 20 and bank.url.startswith("memory://")
    kv, mask = expected(refs)
    assert relative_error(kv, np.asarray(bank.gather(np.arange(20), jnp.float32).kv_ILZKEH), mask) < 0.01


# ---------------------------------------------------------------------- resume
class Boom(RuntimeError):
    pass


def exploding(k):
    calls = {"n": 0}

    def enc(tokens, mask):
        calls["n"] += 1
        if calls["n"] > k:
            raise Boom("killed")
        return fake_encode(tokens, mask)
    return enc


@pytest.mark.parametrize("codec", ["bf16", "pq"])
def test_resume_after_failure_is_identical(tmp_path, codec):
    refs = make_refs(61)
    c = pq_codec() if codec == "pq" else codec
    full = build(tmp_path / "full", refs, c, pq_sample=20)
    path = str(tmp_path / "part")
    with pytest.raises(Boom):  # dies in the 5th batch: 32 encoded, 32 committed (shards of 16)
        build_bank(path, CFG, "fp-A", refs, exploding(4), codec=c, batch_size=8, shard_size=16,
                   pq_sample=20, show_progress=False)
    assert len(MemoryBank.open(path)) == 32
    with pytest.raises(Boom):  # dies again, mid shard
        build_bank(path, CFG, "fp-A", refs, exploding(1), codec=c, batch_size=8, shard_size=16,
                   show_progress=False)
    part = build(path, refs, c, pq_sample=20)
    same_bank(full, part)
    assert len(build(path, refs, c)) == 61  # a finished bank: nothing to do


def test_resume_overwrites_written_but_uncommitted(tmp_path, monkeypatch):
    refs = make_refs(40)
    full = build(tmp_path / "full", refs)
    path = str(tmp_path / "part")
    real = MemoryBank._commit
    state = {"commits": 0, "calls": 0}

    def flaky(self, count):
        state["commits"] += 1
        if state["commits"] == 3:  # shard 2's data is written, its commit is lost
            raise Boom("crash before the manifest update")
        real(self, count)

    def wrong_after_two_shards(tokens, mask):  # batches 5+ (shard 2 on) get other values
        state["calls"] += 1
        m = fake_encode(tokens, mask)
        return MemoryKV(m.kv_ILZKEH + (100.0 if state["calls"] > 4 else 0.0), m.mask_IE)

    monkeypatch.setattr(MemoryBank, "_commit", flaky)
    with pytest.raises(Boom):
        build_bank(path, CFG, "fp-A", refs, wrong_after_two_shards, batch_size=8, shard_size=16,
                   show_progress=False)
    monkeypatch.setattr(MemoryBank, "_commit", real)
    bank = MemoryBank.open(path)
    assert len(bank) == 16 + 16
    # the uncommitted memories 32..39 are on disk (shifted values), and resuming overwrites them
    on_disk = bank._arrays["codes"][32:40].read().result().astype(np.float32)
    assert np.abs(on_disk - np.asarray(full.gather_codes(np.arange(32, 40))[0], np.float32)).min() > 50
    same_bank(full, build(path, refs))


def test_resume_after_sigkill(tmp_path):
    refs_path = tmp_path / "refs.npy"
    n = 45
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        os.environ["JAX_PLATFORMS"] = "cpu"
        import test_bank as tb
        from m3jax.memory.populate import build_bank
        calls = [0]
        def enc(tokens, mask):
            calls[0] += 1
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return tb.fake_encode(tokens, mask)
        build_bank({str(tmp_path / 'part')!r}, tb.CFG, "fp-A", tb.make_refs({n}), enc,
                   batch_size=8, shard_size=16, show_progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert len(MemoryBank.open(str(tmp_path / "part"))) == 16
    refs = make_refs(n)
    same_bank(build(tmp_path / "full", refs), build(tmp_path / "part", refs))


def test_resume_refuses_other_references_config_codec(tmp_path):
    refs = make_refs(20)
    path = tmp_path / "b"
    with pytest.raises(Boom):
        build_bank(str(path), CFG, "fp-A", refs, exploding(2), batch_size=8, shard_size=8,
                   show_progress=False)
    with pytest.raises(BankError, match="differs from"):
        build(path, make_refs(20, seed=9))
    with pytest.raises(BankFingerprintError):
        build_bank(str(path), CFG, "fp-B", refs, fake_encode, show_progress=False)
    with pytest.raises(BankConfigError, match="codec"):
        build(path, refs, "int8")


# ---------------------------------------------------------------------- errors
def test_wrong_config_and_fingerprint(tmp_path):
    path = str(tmp_path / "b")
    build(path, make_refs(10))
    with pytest.raises(BankFingerprintError, match="other weights"):
        MemoryBank.open(path, CFG, "fp-B")
    with pytest.raises(BankConfigError, match="another shape.*head_dim"):
        MemoryBank.open(path, dataclasses.replace(CFG, head_dim=32))
    with pytest.raises(BankConfigError, match="rope_theta"):
        MemoryBank.open(path, dataclasses.replace(CFG, rope_theta=5e5))
    # read-time-only fields may differ
    assert len(MemoryBank.open(path, dataclasses.replace(CFG, max_len=64, chunk_size=8), "fp-A")) == 10
    with pytest.raises(BankNotFoundError):
        MemoryBank.open(str(tmp_path / "nothing"))


def _corrupt_bank(tmp_path):
    path = tmp_path / "b"
    build(path, make_refs(40), "int8")
    return path


def test_corrupt_chunk_fails_loudly(tmp_path):
    path = _corrupt_bank(tmp_path)
    shard = path / "codes" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    bank = MemoryBank.open(str(path), CFG, "fp-A")
    bank.gather([0, 39])  # other shards still read
    with pytest.raises(BankCorruptError, match="Digest mismatch|damaged"):
        bank.gather(np.arange(16, 32))
    with pytest.raises(BankCorruptError):
        MemoryBank.open(str(path), check="full")


def test_truncated_or_missing_shards(tmp_path):
    path = _corrupt_bank(tmp_path)
    shard = path / "codes" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(BankCorruptError):
        MemoryBank.open(str(path)).gather([20])
    shard.unlink()
    with pytest.raises(BankCorruptError, match="lacks 1 of its 3 committed shards"):
        MemoryBank.open(str(path))
    (path / "refs" / "info" / "zarr.json").unlink()
    with pytest.raises(BankCorruptError, match="refs/info"):
        MemoryBank.open(str(path), check="none")


def test_bad_manifest_and_codec_arrays(tmp_path):
    path = tmp_path / "b"
    build(path, make_refs(20), pq_codec(), pq_sample=16)
    npz = path / "codec.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(BankCorruptError, match="sha256"):
        MemoryBank.open(str(path))
    npz.write_bytes(good)
    man = path / "manifest.json"
    text = man.read_text()
    man.write_text(text[: len(text) // 2])
    with pytest.raises(BankCorruptError, match="not valid JSON"):
        MemoryBank.open(str(path))
    man.write_text(text.replace('"count": 20', '"count": 90'))
    with pytest.raises(BankCorruptError, match="fewer than the 90 committed|lacks"):
        MemoryBank.open(str(path))
    man.unlink()
    with pytest.raises(BankCorruptError, match="manifest.json is missing"):
        MemoryBank.open(str(path))


# ---------------------------------------------------------------------- fingerprint
def test_params_fingerprint():
    rng = np.random.default_rng(0)
    params = {"layers": {"w": rng.standard_normal((64, 64)).astype(np.float32),
                         "b": np.zeros(64, np.float32)},
              "embed": rng.standard_normal((300, 100)).astype(np.float32)}
    fp = params_fingerprint(params, max_leaf_elements=1000)
    assert fp.startswith("sha256:") and fp == params_fingerprint(params, max_leaf_elements=1000)
    # jax arrays and numpy arrays of the same values agree, for small and sampled leaves
    jparams = {"layers": {k: jnp.asarray(v) for k, v in params["layers"].items()},
               "embed": jnp.asarray(params["embed"])}
    assert params_fingerprint(jparams, max_leaf_elements=1000) == fp
    # a change off the strided sample of a large leaf is still seen (checksums cover all elements)
    p2 = {**params, "embed": params["embed"].copy()}
    p2["embed"][0, 1] += 1e-3
    assert params_fingerprint(p2, max_leaf_elements=1000) != fp
    # swapped elements, changed dtype, shape or key change it too
    p3 = {**params, "embed": params["embed"].copy()}
    p3["embed"][0, [1, 2]] = p3["embed"][0, [2, 1]]
    assert params_fingerprint(p3, max_leaf_elements=1000) != fp
    assert params_fingerprint({**params, "embed": params["embed"].astype(ml_dtypes.bfloat16)}) != \
        params_fingerprint(params)
    assert params_fingerprint({**params, "embed": params["embed"].reshape(100, 300)}) != params_fingerprint(params)
    assert params_fingerprint({"x": params["embed"]}) != params_fingerprint({"y": params["embed"]})
