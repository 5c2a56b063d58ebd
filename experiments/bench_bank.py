"""Benchmark memory codecs and the TensorStore memory bank; prints a table and writes JSON.

For each codec (bf16, int8, pq): bytes per memory, reconstruction error (relative L2) on
synthetic memories (Gaussian, and a structured generator: per-head means, decaying spectra,
outlier channels, RoPE-rotated keys), decode time of 160 memories, and gather latency (p50) of 5
and 160 random memories from a bank of `--n` memories, cold and warm.

- Error: codecs are trained and measured on a `--err-layers`-layer slice of the geometry
  (codebooks are independent per memory layer, so the error per layer is what a full bank gets;
  training all 22 layers of memory3-2b per head takes minutes on a 2-core CPU).
- Bank contents: random codes of the right shape and dtype (gather time does not depend on the
  values), appended with `MemoryBank.append_codes`.
- Cold: the bank's files are evicted from the page cache (fsync + posix_fadvise DONTNEED, or
  /proc/sys/vm/drop_caches with --drop-caches), the bank is reopened with a fresh ts.Context (empty
  cache pool) and new random ids are read. Warm: the same ids read again on the same bank.
  Every figure is the median of `--repeats` runs.

    python experiments/bench_bank.py --preset memory3-2b --n 4096 --out bench_bank.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import median_ms, write_json  # noqa: E402
from m3jax.config import ModelConfig, preset  # noqa: E402
from m3jax.memory.bank import MemoryBank  # noqa: E402
from m3jax.memory.codec import PQCodec, make_codec, relative_error  # noqa: E402


def synthetic(n: int, Lm: int, K: int, T: int, H: int, seed: int, structured: bool) -> np.ndarray:
    """[n, Lm, 2, K, T, H] float32 memories; the distribution is fixed, `seed` draws samples."""
    rng = np.random.default_rng(seed)
    if not structured:
        return rng.standard_normal((n, Lm, 2, K, T, H)).astype(np.float32)
    d = np.random.default_rng(1234)  # the distribution
    G = Lm * 2 * K
    spec = (np.arange(1, H + 1) ** -0.8)[None] * d.uniform(0.5, 2.0, (G, 1))
    basis = np.linalg.qr(d.standard_normal((G, H, H)))[0]
    mean = d.standard_normal((G, H)) * 0.5
    outliers = d.choice(H, 4, replace=False)
    z = rng.standard_normal((n, T, G, H)) * np.sqrt(spec)[None, None] * 3
    x = np.einsum("ntgh,gdh->ntgd", z, basis) + mean
    x[..., outliers] *= 4
    x = x.reshape(n, T, Lm, 2, K, H).transpose(0, 2, 3, 4, 1, 5).copy()
    pos = rng.integers(3, 131, (n, 1, 1, T))  # RoPE (rotate_half) on keys
    ang = pos[..., None] * 1e4 ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(ang), np.sin(ang)
    k = x[:, :, 0]
    a, b = k[..., : H // 2], k[..., H // 2:]
    x[:, :, 0] = np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
    return x.astype(np.float32)


def cold_warm_gather(bank, ids) -> tuple[float, float]:
    """Seconds of a first (cold: just evicted / reopened) and a second (warm) read of `ids`."""
    t = time.perf_counter()
    bank.gather_codes(ids)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    bank.gather_codes(ids)
    return cold, time.perf_counter() - t


def evict(path: str, drop_caches: bool) -> str:
    """Drop the bank's files from the page cache; returns how. posix_fadvise(DONTNEED) on each
    file (after fsync) touches only our files; --drop-caches uses the global
    /proc/sys/vm/drop_caches instead (needs root, and slows everything else on the machine)."""
    if drop_caches:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "posix_fadvise(DONTNEED)"


def codec_errors(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    Lm, K, T, H = args.err_layers, cfg.num_kv_heads, cfg.tokens_per_memory, cfg.head_dim
    out: dict[str, Any] = {}
    for kind in ("gaussian", "structured"):
        train = synthetic(args.pq_sample, Lm, K, T, H, 1, kind == "structured")
        test = synthetic(64, Lm, K, T, H, 2, kind == "structured")
        for name in args.codecs:
            c = make_codec(name, H)
            t0 = time.perf_counter()
            if name == "pq":
                c = c.fit(train, iters=args.pq_iters, train_vectors=args.pq_train_vectors)
            fit_s = time.perf_counter() - t0
            y = c.decode(c.encode(test), jnp.float32)
            out.setdefault(name, {})[kind] = {
                "rel_error": relative_error(test, y),
                "rel_error_keys": relative_error(test[:, :, :1], y[:, :, :1]),
                "rel_error_values": relative_error(test[:, :, 1:], y[:, :, 1:]),
                "fit_s": fit_s}
    return out


def random_codes(codec, cfg: ModelConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n,) + codec.code_shape(cfg)
    if codec.name == "bf16":  # finite bf16 values
        return rng.standard_normal(shape, np.float32).astype(codec.code_dtype)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def bench_codec_bank(cfg: ModelConfig, name: str, root: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    if name == "pq":  # timing only: random codebooks of the full geometry
        m = PQCodec(cfg.head_dim).subspaces
        d = PQCodec(cfg.head_dim).dsub
        codec = PQCodec(cfg.head_dim, codebooks=rng.standard_normal(
            (cfg.memory_layers, 2, cfg.num_kv_heads, m, 256, d)).astype(np.float32))
    else:
        codec = make_codec(name, cfg.head_dim)
    res: dict[str, Any] = {"bytes_per_vector": codec.bytes_per_vector,
                           "bytes_per_memory": codec.memory_bytes(cfg)}
    # decode of 160 memories (device = default backend), warm jit
    codes160 = random_codes(codec, cfg, 160, rng)
    dev = jax.device_put(codes160)
    jax.block_until_ready(codec.decode(dev, jnp.bfloat16))
    res["decode160_ms"] = median_ms(lambda: jax.block_until_ready(codec.decode(dev, jnp.bfloat16)), args.repeats)
    res["decode160_with_h2d_ms"] = median_ms(
        lambda: jax.block_until_ready(codec.decode(codes160, jnp.bfloat16)), args.repeats)
    # the bank
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    bank = MemoryBank.create(path, cfg, codec, "bench", shard_size=args.shard_size)
    t0 = time.perf_counter()
    step = bank.shard_size
    R, T = cfg.reference_len, cfg.tokens_per_memory
    for a in range(0, args.n, step):
        n = min(step, args.n - a)
        meta = dict(tokens=rng.integers(0, cfg.vocab_size, (n, R)).astype(np.int32),
                    lengths=np.full(n, R), doc_id=np.arange(a, a + n), char_start=np.zeros(n, int),
                    char_end=np.zeros(n, int))
        bank.append_codes(random_codes(codec, cfg, n, rng), np.ones((n, T), bool), meta)
    res["write_s"] = time.perf_counter() - t0
    res["shard_size"] = bank.shard_size
    res["disk_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    for k in (5, 160):
        cold, warm, warm_dec = [], [], []
        for _ in range(args.repeats):
            res["evict"] = evict(path, args.drop_caches)
            b = MemoryBank.open(path, cfg, "bench", check="none",
                                context=ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}}))
            ids = rng.choice(args.n, k, replace=False)
            c_s, w_s = cold_warm_gather(b, ids)
            cold.append(c_s)
            warm.append(w_s)
            jax.block_until_ready(b.gather(ids, jnp.bfloat16).kv_ILZKEH)  # jit warm
            t = time.perf_counter()
            jax.block_until_ready(b.gather(ids, jnp.bfloat16).kv_ILZKEH)
            warm_dec.append(time.perf_counter() - t)
        res[f"gather{k}_cold_ms"] = float(np.median(cold) * 1e3)
        res[f"gather{k}_warm_ms"] = float(np.median(warm) * 1e3)
        res[f"gather{k}_decoded_warm_ms"] = float(np.median(warm_dec) * 1e3)
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="memory3-2b")
    p.add_argument("--n", type=int, default=4096, help="memories in each benchmark bank")
    p.add_argument("--codecs", default="bf16,int8,pq")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=None, help="default: ~64 MiB shards")
    p.add_argument("--err-layers", type=int, default=1, help="memory layers used for the error test")
    p.add_argument("--pq-sample", type=int, default=512, help="memories to train pq on")
    p.add_argument("--pq-iters", type=int, default=8)
    p.add_argument("--pq-train-vectors", type=int, default=4096)
    p.add_argument("--dir", default=None, help="where to write the banks (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the banks")
    p.add_argument("--drop-caches", action="store_true",
                   help="cold reads after /proc/sys/vm/drop_caches (default: posix_fadvise per file)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    cfg = preset(args.preset)
    args.err_layers = min(args.err_layers, cfg.memory_layers)
    root = args.dir or tempfile.mkdtemp(prefix="m3jax-bench-bank-")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "preset": args.preset, "n": args.n, "repeats": args.repeats, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "geometry": {"memory_layers": cfg.memory_layers, "kv_heads": cfg.num_kv_heads,
                     "tokens_per_memory": cfg.tokens_per_memory, "head_dim": cfg.head_dim},
        "error_setup": {"layers": args.err_layers, "pq_sample": args.pq_sample, "pq_iters": args.pq_iters,
                        "pq_train_vectors": args.pq_train_vectors, "test_memories": 64},
        "codecs": {}}
    errors = codec_errors(cfg, args)
    for name in args.codecs:
        r = bench_codec_bank(cfg, name, root, args)
        r["error"] = errors[name]
        result["codecs"][name] = r
    if not args.dir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    result["total_s"] = time.perf_counter() - t0
    if args.preset == "memory3-2b":
        if "bf16" in result["codecs"]:
            assert result["codecs"]["bf16"]["bytes_per_memory"] == 450_560
        if "pq" in result["codecs"]:
            assert result["codecs"]["pq"]["bytes_per_memory"] <= 39_424

    hdr = (f"{'codec':6} {'B/mem':>8} {'err gauss':>9} {'err struct':>10} {'dec160':>7} "
           f"{'g5 cold':>8} {'g5 warm':>8} {'g160 cold':>9} {'g160 warm':>9} {'g160+dec':>8}")
    print(f"\n{args.preset}: {args.n} memories, backend {result['backend']}, median of {args.repeats}; "
          f"times in ms; cold = {result['codecs'][args.codecs[0]].get('evict')}")
    print(hdr)
    for name, r in result["codecs"].items():
        e = r["error"]
        print(f"{name:6} {r['bytes_per_memory']:>8} {e['gaussian']['rel_error']:>9.4f} "
              f"{e['structured']['rel_error']:>10.4f} {r['decode160_ms']:>7.1f} "
              f"{r['gather5_cold_ms']:>8.2f} {r['gather5_warm_ms']:>8.2f} {r['gather160_cold_ms']:>9.2f} "
              f"{r['gather160_warm_ms']:>9.2f} {r['gather160_decoded_warm_ms']:>8.1f}")
    print(f"total {result['total_s']:.1f} s")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
