"""One command for the first run on a GPU or TPU: decode and training throughput, MFU, HBM use.

    python experiments/accelerator_report.py --out figures/accelerator_<device>.json
    python experiments/accelerator_report.py --markdown        # + the table for experiments/README.md

It runs, in one process, on `jax.devices()[0]`'s platform:
  decode  `bench_decode.py` (the paper's Table 21 setting: batch 32, 128 prompt + 128 generated
          tokens, 5 memories per 64-token chunk, modes none / memory / RAG; its own function,
          called with these sizes), in bf16 on an accelerator;
  train   `bench_train.py` (warmup step vs continual step with the memory written in the step,
          with and without gradients through the write path), in bf16 with the `--remat` policy.
For each it prints tokens/s, MFU against the dense bf16 peak table `m3jax.train.loop.PEAK_FLOPS`
(train: the model FLOPs of `flops_per_token`; decode: 2 x parameters per generated token, a lower
bound that leaves out attention, prefill and retrieval) and the device's HBM use
(`Device.memory_stats()`: peak bytes in use over the bytes it may use; after each part).

On a CPU (no accelerator) it runs both with tiny sizes and says so: a smoke test of the one
command, not a measurement (`tests/test_accelerator_report.py` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # _bench_utils, bench_decode, bench_train (and the repo root, via them)

# Sizes per platform: (decode preset, batch, prompt, new tokens, references, train preset, batch, seq_len).
ACCELERATOR_SIZES = dict(decode_preset="memory3-2b", batch=32, prompt_len=128, new_tokens=128, references=2000,
                         train_preset="memory3-2b", train_batch=8, train_seq_len=2048, train_steps=10)
SMOKE_SIZES = dict(decode_preset="demo", batch=2, prompt_len=64, new_tokens=64, references=24,
                   train_preset="tiny", train_batch=2, train_seq_len=128, train_steps=2)


def hbm_use(device: Any = None) -> dict[str, Any] | None:
    """Peak and current bytes in use and the limit of `device` (None where the backend keeps no
    statistics, e.g. the CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without allocator statistics raise or return None)
        stats = None
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    out = {k: int(stats[k]) for k in keys if k in stats}
    if out.get("bytes_limit") and "peak_bytes_in_use" in out:
        out["peak_fraction"] = out["peak_bytes_in_use"] / out["bytes_limit"]
    return out


def decode_mfu(tokens_per_s: float, n_params: int, peak: float | None, count: int) -> float | None:
    """2 x parameters FLOPs per generated token over the peak of all devices (a lower bound)."""
    return 2.0 * n_params * tokens_per_s / (peak * count) if peak else None


def run_decode(sizes: dict[str, Any], dtype: str | None, repeats: int, work: str) -> dict[str, Any]:
    """`bench_decode.main` with these sizes; its JSON record plus MFU and HBM use."""
    import bench_decode
    from m3jax.config import preset

    out_path = os.path.join(work, "decode.json")
    argv = ["--preset", sizes["decode_preset"], "--batch", str(sizes["batch"]), "--batches", "1",
            "--pipeline", "1", "--prompt-len", str(sizes["prompt_len"]), "--new-tokens", str(sizes["new_tokens"]),
            "--references", str(sizes["references"]), "--repeats", str(repeats), "--no-serial",
            "--hf-python", "none", "--work", os.path.join(work, "decode_cache"), "--out", out_path]
    if dtype:
        argv += ["--dtype", dtype]
    bench_decode.main(argv)
    with open(out_path) as f:
        rec = json.load(f)
    info = rec["device_info"]
    cfg = preset(sizes["decode_preset"])
    n = cfg.num_params() + cfg.hidden * cfg.vocab_size  # the LM head runs for every token too
    rec["mfu_lower_bound"] = {m: decode_mfu(t, n, info.get("peak_flops"), info.get("count", 1))
                              for m, t in rec["tokens_per_s"].items()}
    rec["hbm"] = hbm_use()
    return rec


def run_train(sizes: dict[str, Any], dtype: str | None, remat: str, work: str) -> dict[str, Any]:
    """`bench_train.main` with these sizes (its record carries tokens/s and MFU per mode) + HBM use."""
    import bench_train

    overrides = [f"remat={remat}"] + ([f"dtype={dtype}"] if dtype else [])
    argv = ["--preset", sizes["train_preset"], "--batch", str(sizes["train_batch"]),
            "--seq-len", str(sizes["train_seq_len"]), "--steps", str(sizes["train_steps"]), "--warmup", "1",
            "--out", os.path.join(work, "train.json"), *overrides]
    rec = bench_train.main(argv)
    rec["hbm"] = hbm_use()
    rec["remat"] = remat
    return rec


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured case: part, mode, tokens/s, MFU, peak HBM GiB."""
    rows = []
    d, t = report.get("decode"), report.get("train")
    if d:
        hbm = (d.get("hbm") or {}).get("peak_bytes_in_use")
        for m, tps in d["tokens_per_s"].items():
            rows.append({"part": "decode", "mode": m, "tokens_per_s": tps, "mfu": d["mfu_lower_bound"].get(m),
                         "hbm_gib": hbm / 2**30 if hbm else None})
    if t:
        hbm = (t.get("hbm") or {}).get("peak_bytes_in_use")
        for m, r in t["results"].items():
            rows.append({"part": "train", "mode": m, "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"),
                         "hbm_gib": hbm / 2**30 if hbm else None})
    return rows


def markdown(report: dict[str, Any]) -> str:
    s = report["sizes"]
    head = (f"{report['device']} ({report['device_info']['count']} device(s), peak "
            f"{(report['device_info'].get('peak_flops') or 0) / 1e12:.0f} TFLOP/s bf16), jax {report['jax']}; "
            f"decode {s['decode_preset']} batch {s['batch']}, {s['prompt_len']} + {s['new_tokens']} tokens; "
            f"train {s['train_preset']} {s['train_batch']} x {s['train_seq_len']} tokens, remat {report['remat']}")
    lines = [head, "", "| part | mode | tokens/s | MFU | peak HBM GiB |", "|---|---|---|---|---|"]
    for r in summary_rows(report):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        hbm = f"{r['hbm_gib']:.1f}" if r["hbm_gib"] is not None else "-"
        lines.append(f"| {r['part']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {mfu} | {hbm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="decode,train", help="decode, train or both")
    ap.add_argument("--dtype", default=None, help="activation dtype (default: bfloat16 on an accelerator, "
                                                  "float32 on the CPU)")
    ap.add_argument("--remat", default="dots", help="ModelConfig.remat of the train step (none/full/dots/attention)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode calls per mode")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes even on an accelerator")
    for k, v in ACCELERATOR_SIZES.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"accelerator default {v}")
    ap.add_argument("--work", default=None, help="scratch dir (knowledge base cache, part JSONs)")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print the README table too")
    args = ap.parse_args(argv)

    from _bench_utils import device_info, device_name, log, table, write_json

    info = device_info()
    accelerator = info["platform"] in ("gpu", "tpu", "cuda", "rocm")
    smoke = args.smoke or not accelerator
    sizes = dict(SMOKE_SIZES if smoke else ACCELERATOR_SIZES)
    sizes.update({k: getattr(args, k) for k in ACCELERATOR_SIZES if getattr(args, k) is not None})
    n = jax.device_count()  # bench_train shards the batch over every device (mesh 1 x n x 1)
    sizes["train_batch"] = -(-sizes["train_batch"] // n) * n
    dtype = args.dtype or ("bfloat16" if accelerator else None)
    if smoke:
        log(f"no accelerator ({device_name()}): a SMOKE run with tiny sizes, not a measurement"
            if not accelerator else "smoke run with tiny sizes (--smoke)")
    work = args.work or tempfile.mkdtemp(prefix="m3jax_accel_")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    report: dict[str, Any] = {"device": device_name(), "device_info": info, "jax": jax.__version__,
                              "smoke": smoke, "sizes": sizes, "dtype": dtype or "float32", "remat": args.remat}
    if "decode" in parts:
        log("decode benchmark (bench_decode) ...")
        report["decode"] = run_decode(sizes, dtype, 1 if smoke else args.repeats, work)
    if "train" in parts:
        log("train-step benchmark (bench_train) ...")
        report["train"] = run_train(sizes, dtype, args.remat, work)
    rows = summary_rows(report)
    print(f"\naccelerator report: {report['device']}" + ("  [SMOKE RUN: tiny sizes, no accelerator]" if smoke else ""))
    print(table(rows, [("part", "part", ""), ("mode", "mode", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("mfu", "MFU", ".1%"), ("hbm_gib", "peak HBM GiB", ".2f")]))
    if not info.get("peak_flops"):
        print("MFU: no peak for this device in m3jax.train.loop.PEAK_FLOPS")
    if args.markdown:
        print()
        print(markdown(report))
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
