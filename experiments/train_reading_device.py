"""The reading recipe on an accelerator whose image lacks tfds / grain / orbax (how the shipped
`smollm2-135m-memory` adapter was trained, on one NVIDIA H200).

`m3jax train --recipe reading` is the product command; this script splits it in two so that the
device needs only jax, flax, optax, tokenizers, safetensors and gguf:

  # here (any machine with m3jax installed): the rows of the recipe, same `reading_rows`, same seed
  python experiments/train_reading_device.py prepare --model runs/smollm2 --data-dir runs/smollm2-memory/data \
      --mix facts=30000 --mix qa=6000 --mix text=6000 --batch-size 16 --out rows.npz
  # on the device: the same TrainState and train step as `m3jax train` (m3jax.train.step)
  python experiments/train_reading_device.py train --rows rows.npz --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
      --steps 2000 --batch-size 16 --lr 1e-3 --save-at 1000,1600 --out run

Equivalent product command (same rows, step, schedule and LoRA; only the batch order differs):
  m3jax train --stage continual --model runs/smollm2 --out runs/smollm2-memory --recipe reading \
      --mix facts=30000 --mix qa=6000 --mix text=6000 --set memory_layers=30 --set score=value_norm \
      --set bos_id=0 --set "reference_prefix=[0,23682,42]" --set max_len=2048 --train-set lora_rank=16 \
      --batch-size 16 --steps 2000 --lr 1e-3
The `train` output (adapter_<step>.safetensors, metrics.jsonl, run.json) becomes a run directory for
experiments/package_model.py (model/config.json = run.json's model_config, adapter.safetensors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

MODEL_SET = ("memory_layers=30", "score=value_norm", "bos_id=0", "reference_prefix=[0,23682,42]", "max_len=2048")


def prepare(a: argparse.Namespace) -> None:
    from m3jax.config import apply_overrides
    from m3jax.convert import load_checkpoint_dir
    from m3jax.train import data as D
    from m3jax.train.recipe import ReadingMix, describe, reading_rows

    cfg, _, tok = load_checkpoint_dir(a.model, with_params=False)
    cfg = apply_overrides(cfg, list(a.set or MODEL_SET))
    dcfg = D.DataConfig(data_dir=os.path.abspath(a.data_dir), corpus=a.corpus, seq_len=512, batch_size=a.batch_size)
    t0 = time.perf_counter()
    mix = apply_overrides(ReadingMix(seed=a.seed), list(a.mix))
    rows = reading_rows(D.read_records(dcfg, ("train",)), tok, cfg, mix, batch_size=a.batch_size,
                        embeddings_path=os.path.join(a.data_dir, "m3jax_pairs",
                                                     f"reading-{mix.qa}-{mix.text}-{mix.seed}-embeddings.npy"))
    refs = rows.reference_tokens
    np.savez_compressed(a.out, tokens=rows.rows["tokens"].astype(np.uint16),
                        loss_mask=np.packbits(rows.rows["loss_mask"], axis=1), ref_ids=rows.rows["ref_ids"],
                        ref_flat=np.concatenate([np.asarray(r, np.uint16) for r in refs]),
                        ref_len=np.array([len(r) for r in refs], np.int32), batch=np.int32(a.batch_size),
                        config=json.dumps(cfg.to_dict()))
    print(f"{describe(rows)} -> {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f} s)")


def train(a: argparse.Namespace) -> None:
    import jax

    from m3jax import convert
    from m3jax import sharding as S
    from m3jax.config import ModelConfig, TrainConfig
    from m3jax.train.pairs import PairedRows
    from m3jax.train.step import create_state, make_train_step

    t_all = time.perf_counter()
    z = np.load(a.rows)
    cfg = ModelConfig.from_dict(json.loads(str(z["config"])))
    tokens = z["tokens"].astype(np.int32)
    n, L = tokens.shape
    offs = np.concatenate([[0], np.cumsum(z["ref_len"])])
    flat = z["ref_flat"].astype(np.int32)
    refs = [flat[offs[i]:offs[i + 1]].tolist() for i in range(len(offs) - 1)]
    rows = {"tokens": tokens, "loss_mask": np.unpackbits(z["loss_mask"], axis=1)[:, :L].astype(bool),
            "ref_ids": z["ref_ids"].astype(np.int32)}
    B = a.batch_size
    if int(z["batch"]) % B:
        raise SystemExit(f"{a.rows}: rows come in blocks of {int(z['batch'])}, not a multiple of --batch-size {B}")
    ref_fn = PairedRows(rows, refs).reference_fn(cfg.reference_len, cfg.pad_id, cfg.vocab_size)
    # `m3jax train`'s TrainConfig for these flags (warmup = steps // 20, the other fields the defaults)
    tc = TrainConfig(stage="continual", seq_len=L, batch_size=B, steps=a.steps, lr=a.lr,
                     warmup_steps=min(a.steps, max(1, a.steps // 20)), lora_rank=a.lora_rank, seed=a.seed,
                     checkpoint_every=a.steps)
    _, base, _ = convert.load_gguf(a.gguf, memory_layers=cfg.memory_layers, reference_prefix=None)
    from m3jax.memory.fingerprint import params_fingerprint

    fp = params_fingerprint(jax.device_get(base))
    mesh = S.make_mesh(tc.mesh)
    state = create_state(cfg, tc, base, mesh=mesh)
    step_fn = make_train_step(cfg, tc, mesh)
    os.makedirs(a.out, exist_ok=True)
    save_at = {int(s) for s in a.save_at.split(",") if s} | {a.steps}
    rng = np.random.default_rng(a.seed)
    order: list[int] = []
    pending = []
    t0 = time.perf_counter()
    compile_s = None
    with open(os.path.join(a.out, "metrics.jsonl"), "w") as log:
        for step in range(1, a.steps + 1):
            if not order:  # an epoch: a permutation of the blocks of B rows (one kind each)
                order = list(rng.permutation(n // B))
            b = order.pop()
            state, m = step_fn(state, ref_fn({k: v[b * B:(b + 1) * B] for k, v in rows.items()}))
            pending.append((step, m))
            if compile_s is None:
                jax.block_until_ready(m)
                compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
            if step % 25 == 0 or step in save_at:
                el = time.perf_counter() - t0
                for (s, _), r in zip(pending, jax.device_get([x for _, x in pending])):
                    log.write(json.dumps({"step": s, "stage": "continual", **{k: float(v) for k, v in r.items()},
                                          "step_time_s": el / max(step - 1, 1)}) + "\n")
                log.flush()
                print(f"step {step}: loss {float(r['loss']):.4f}, {el / max(step - 1, 1):.3f} s/step", flush=True)
                pending = []
            if step in save_at:
                convert.save_adapter(os.path.join(a.out, f"adapter_{step}.safetensors"), jax.device_get(state.params),
                                     tc, base_fingerprint=fp, dtype="bfloat16")
    with open(os.path.join(a.out, "run.json"), "w") as f:
        json.dump({"model_config": cfg.to_dict(), "train_config": {k: getattr(tc, k) for k in (
            "stage", "seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup_steps", "decay_fraction",
            "weight_decay", "b1", "b2", "grad_clip", "memory_grad", "memory_lookback", "lora_rank", "lora_alpha",
            "seed")} | {"lora_targets": list(tc.lora_targets)}, "base_fingerprint": fp,
            "devices": [str(d) for d in jax.devices()], "compile_s": compile_s,
            "train_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_all}, f, indent=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="the recipe's rows, compactly (.npz)")
    q.add_argument("--model", required=True, help="the `m3jax convert` model dir of the base")
    q.add_argument("--data-dir", required=True, help="where the corpus is prepared (as m3jax train --data-dir)")
    q.add_argument("--corpus", default=None, help="a JSONL corpus (default: the shipped Wikipedia leads)")
    q.add_argument("--set", action="append", default=[], help=f"model overrides (default {' '.join(MODEL_SET)})")
    q.add_argument("--mix", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train a LoRA adapter on the rows (no tfds / grain / orbax needed)")
    t.add_argument("--rows", required=True)
    t.add_argument("--gguf", required=True, help="the base model's GGUF")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lora-rank", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-at", default="", help="steps to save an adapter at besides the last (comma-separated)")
    t.add_argument("--out", required=True)
    a = p.parse_args(argv)
    prepare(a) if a.cmd == "prepare" else train(a)


if __name__ == "__main__":
    main()
