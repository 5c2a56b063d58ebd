"""Package a LoRA run over the shipped SmolLM2 GGUF as a model that ships with m3jax.

    python experiments/package_model.py --run runs/smollm2-memory --name smollm2-135m-memory

Reads the run's `model/config.json` and `adapter.safetensors` (an `m3jax train ... --train-set
lora_rank=R` run whose `--init` was `m3jax convert` of the shipped GGUF), checks that the base it
was trained on IS the shipped GGUF (the adapter's base fingerprint against the GGUF's weights), and
writes `m3jax/models/NAME/`: config.json, adapter.safetensors (bfloat16 factors), base.json
({"gguf": "asset:..."} plus the GGUF's sha256) and TRAINING.json (the run's train config and last
metrics). The tokenizer is the GGUF's (with the config's special ids), so nothing else is copied.
`m3jax.load_model(NAME)` then merges the adapter into the GGUF's weights after the same check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GGUF_ASSET = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> str:
    from m3jax.assets import asset_path, file_sha256
    from m3jax.config import ModelConfig, TrainConfig
    from m3jax.convert import load_adapter, load_base_params, save_adapter
    from m3jax.memory.fingerprint import params_fingerprint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an `m3jax train` LoRA run directory")
    p.add_argument("--name", required=True, help="the shipped model's name")
    p.add_argument("--dest", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "m3jax", "models"))
    a = p.parse_args(argv)
    with open(os.path.join(a.run, "model", "config.json"), encoding="utf-8") as f:
        config = ModelConfig.from_dict(json.load(f))
    adapter, info = load_adapter(os.path.join(a.run, "adapter.safetensors"))
    gguf = asset_path(GGUF_ASSET)
    base = load_base_params({"gguf": "asset:" + GGUF_ASSET}, config, where=a.run)
    fp = params_fingerprint(base)
    if fp != info["base_fingerprint"]:
        raise SystemExit(f"{a.run}: the adapter was trained on base weights {info['base_fingerprint']}, not on the "
                         f"shipped GGUF ({fp})")
    out = os.path.join(os.path.abspath(a.dest), a.name)
    os.makedirs(out, exist_ok=True)
    tc = TrainConfig(lora_rank=info["rank"], lora_alpha=info["alpha"], lora_targets=tuple(info["targets"]))
    save_adapter(os.path.join(out, "adapter.safetensors"), adapter, tc, base_fingerprint=fp, dtype="bfloat16")
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=1)
    with open(os.path.join(out, "base.json"), "w", encoding="utf-8") as f:
        json.dump({"gguf": "asset:" + GGUF_ASSET, "gguf_sha256": file_sha256(gguf), "fingerprint": fp}, f, indent=1)
    run_cfg = json.load(open(os.path.join(a.run, "config.json"), encoding="utf-8"))
    metrics = [json.loads(line) for line in open(os.path.join(a.run, "metrics.jsonl"), encoding="utf-8") if line.strip()]
    with open(os.path.join(out, "TRAINING.json"), "w", encoding="utf-8") as f:
        json.dump({"train_config": run_cfg.get("train_config"), "steps": metrics[-1].get("step") if metrics else 0,
                   "last": metrics[-1] if metrics else None}, f, indent=1)
    size = os.path.getsize(os.path.join(out, "adapter.safetensors"))
    print(f"wrote {out}: adapter {size / 2**20:.1f} MiB (rank {info['rank']}, {len(info['targets'])} targets), base {fp}")
    return out


if __name__ == "__main__":
    main()
