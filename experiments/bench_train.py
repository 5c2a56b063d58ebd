"""Training throughput: warmup step vs continual step (memory written in-step), one run, one model.

    python experiments/bench_train.py --preset demo --batch 4 --seq-len 512 --steps 10 --out bench.json

Modes, all on the same params and the same token batch:
  warmup               plain LM step
  continual_nograd     + one reference per chunk encoded by the model in the step, memory_grad=False
  continual_grad       the same with gradients through the memory write path (memory_grad=True)

Every reference is full length (`reference_len` valid tokens: the most expensive case). For each
mode the compile time is measured alone (AOT `lower().compile()`), then `--warmup` untimed steps
run, then `--steps` rounds are timed, each running one step of every mode in rotating order
(block_until_ready after each), so that load from other processes hits all modes alike. The
table reports each mode's median step time, its ratio to the warmup median, and the median over
rounds of the per-round ratio.
tokens/s counts B x T context tokens per step. MFU is printed on accelerators with a known peak
(`m3jax.train.metrics.PEAK_FLOPS`), from the model FLOPs of `flops_per_token`.
Target (brief): continual without memory_grad <= 1.5x a warmup step (the paper: ~2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import compile_timed, interleaved, write_json  # noqa: E402
from m3jax import sharding as S  # noqa: E402
from m3jax.config import MeshConfig, TrainConfig, apply_overrides, preset  # noqa: E402
from m3jax.model.placement import init_sharded  # noqa: E402
from m3jax.train import metrics as L  # noqa: E402
from m3jax.train import step as ST  # noqa: E402

MODES = (("warmup", "warmup", True), ("continual_nograd", "continual", False), ("continual_grad", "continual", True))


def make_batch(cfg, B: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 0] = cfg.bos_id
    C = -(-T // cfg.chunk_size)
    R = cfg.reference_len
    return {"tokens": tokens, "loss_mask": np.ones((B, T), bool),
            "ref_tokens": rng.integers(3, cfg.vocab_size, (B, C, R)).astype(np.int32),
            "ref_mask": np.ones((B, C, R), bool)}


class Mode:
    """One compiled step and its running state."""

    def __init__(self, name, cfg, tc, mesh, params, batch):
        self.name, self.tc = name, tc
        self.step = ST.make_train_step(cfg, tc, mesh)
        self.state = ST.create_state(cfg, tc, params, mesh=mesh)
        self.batch = self.step.prepare(batch)  # on device once: the timed steps move no data
        _, self.compile_s = compile_timed(self.step, self.state, self.batch)
        self.times, self.losses = [], []

    def run(self, timed: bool = True) -> None:
        t = time.perf_counter()
        self.state, m = self.step(self.state, self.batch)
        jax.block_until_ready(m)
        if timed:
            self.times.append(time.perf_counter() - t)
            self.losses.append(float(m["loss"]))


def bench(modes: list[Mode], steps: int, warmup: int) -> None:
    """Interleaved timing (`_bench_utils.interleaved`): each round runs one step of every mode (in
    rotating order), so that load from other processes on a shared host hits all modes alike;
    per-mode medians and per-round ratios are then comparable."""
    interleaved(modes, steps, warmup)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None, help="default: min(512, max_len)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode after compiling")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: 1,-1,1 over all devices)")
    ap.add_argument("--modes", default=",".join(m for m, _, _ in MODES))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="ModelConfig key=value overrides (e.g. dtype=bfloat16)")
    args = ap.parse_args(argv)

    cfg = apply_overrides(preset(args.preset), args.overrides)
    T = args.seq_len or min(512, cfg.max_len)
    mesh_cfg = MeshConfig(*map(int, args.mesh.split(","))) if args.mesh else MeshConfig(1, -1, 1)
    mesh = S.make_mesh(mesh_cfg)
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = L.peak_flops(dev)
    base = TrainConfig(seq_len=T, batch_size=args.batch, steps=1000, warmup_steps=10, mesh=mesh_cfg)
    params = init_sharded(cfg, jax.random.key(0), mesh)
    batch = make_batch(cfg, args.batch, T)
    print(f"device: {jax.device_count()} x {kind} ({dev.platform}), mesh {dict(mesh.shape)}, host {platform.node()}")
    print(f"model: {cfg.name} ({cfg.num_params() / 1e6:.2f}M non-embedding params), batch {args.batch} x {T} "
          f"tokens, {-(-T // cfg.chunk_size)} references/sequence of {cfg.reference_len} tokens, "
          f"lookback {base.memory_lookback}")

    wanted = args.modes.split(",")
    modes = []
    for name, stage, mg in MODES:
        if name in wanted:
            modes.append(Mode(name, cfg, dataclasses.replace(base, stage=stage, memory_grad=mg), mesh, params, batch))
            print(f"  compiled {name} in {modes[-1].compile_s:.1f}s", flush=True)
    bench(modes, args.steps, args.warmup)
    results = {}
    warm = next((m for m in modes if m.name == "warmup"), None)
    for m in modes:
        med = statistics.median(m.times)
        B, T_ = batch["tokens"].shape
        fpt = L.flops_per_token(cfg, T_, stage=m.tc.stage, memory_grad=m.tc.memory_grad, lookback=m.tc.memory_lookback)
        r = {"compile_s": m.compile_s, "step_s_median": med, "step_s_all": m.times, "tokens_per_s": B * T_ / med,
             "loss_last": m.losses[-1], "flops_per_token": fpt}
        r["mfu"] = fpt * r["tokens_per_s"] / (peak * jax.device_count()) if peak else None
        if warm is not None:  # median over rounds of (this step / the warmup step of the same round)
            r["ratio_round_median"] = statistics.median(a / b for a, b in zip(m.times, warm.times))
        results[m.name] = r

    ref = results.get("warmup", {}).get("step_s_median")
    print()
    head = (f"{'mode':<18}{'compile s':>10}{'step ms':>10}{'tokens/s':>12}{'x warmup':>10}{'x (rounds)':>11}"
            f"{'GFLOP/tok':>11}")
    head += f"{'MFU':>8}" if peak else ""
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        ratio = r["step_s_median"] / ref if ref else float("nan")
        r["ratio_vs_warmup"] = ratio if ref else None
        line = (f"{name:<18}{r['compile_s']:>10.1f}{r['step_s_median'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
                f"{ratio:>10.2f}{r.get('ratio_round_median', float('nan')):>11.2f}{r['flops_per_token'] / 1e9:>11.3f}")
        if peak:
            line += f"{r['mfu']:>8.1%}"
        print(line)
    if "continual_nograd" in results and ref:
        x = results["continual_nograd"]["ratio_vs_warmup"]
        ok = x <= 1.5
        print(f"\ncontinual without memory_grad: {x:.2f}x a warmup step "
              f"(target <= 1.5x: {'met' if ok else 'NOT met'}; paper ~2x)")
    out = {"device": {"platform": dev.platform, "kind": kind, "count": jax.device_count(), "peak_flops": peak},
           "jax": jax.__version__, "mesh": dict(mesh.shape), "model_config": cfg.to_dict(),
           "batch": args.batch, "seq_len": T, "steps": args.steps, "warmup": args.warmup,
           "memory_lookback": base.memory_lookback, "results": results}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
