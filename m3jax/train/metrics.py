"""Training metrics: model FLOPs per token, peak FLOP/s per device (MFU), and the writers of a
run's metrics (JSONL, TensorBoard, a PNG loss curve).

Throughput: tokens/s counts every position of the batch (B x T) per second of wall time between
log points (the first step, which compiles, is timed separately as `compile_s`). MFU is reported
on accelerators with a known peak (`PEAK_FLOPS`) as model FLOPs/s over the peak of all devices;
model FLOPs per token are `flops_per_token` (dense matmuls, attention, and the in-step memory
writing of the continual stage). On CPU only tokens/s is reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure  # no pyplot: leaves the session's backend alone (notebooks)
from tensorboardX import SummaryWriter

from m3jax.config import ModelConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (substring of `device_kind`, lower case, first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v6", 918e12),
)


def peak_flops(device: Any = None) -> float | None:
    """Peak dense bf16 FLOP/s of one `device` (default: the first device), None when unknown
    (CPU, or an accelerator not in `PEAK_FLOPS`)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak
    return None


def flops_per_token(model_cfg: ModelConfig, seq_len: int, *, stage: str = "warmup", memory_grad: bool = True,
                    lookback: int = 4) -> float:
    """Model FLOPs of one training step per context token (forward + backward = 3x forward).

    dense:     6 * (non-embedding params + hidden * vocab)   (the LM head is a matmul)
    attention: 12 * layers * heads * head_dim * keys, keys = seq_len + prefix (the full score matrix
               is computed; causal masking saves nothing here); memory layers of the continual
               stage add (lookback + 1) * tokens_per_memory keys
    continual: one reference per chunk_size tokens, encoded through the memory layers
               (prefix + reference_len tokens, attention and token scores included); counted
               3x with memory_grad (backward through the write path), 1x without.
    """
    c = model_cfg
    dense = 6.0 * (c.num_params() + c.hidden * c.vocab_size)
    keys = seq_len + c.prefix_len
    nh = c.num_heads * c.head_dim
    total = dense + 12.0 * c.num_layers * nh * keys
    if stage == "continual":
        total += 12.0 * c.memory_layers * nh * (lookback + 1) * c.tokens_per_memory
        per_layer = (c.num_params() - c.hidden) / c.num_layers
        n = c.prefix_len + c.reference_len
        enc = c.memory_layers * (2.0 * per_layer * n + 4.0 * nh * n * n + 2.0 * nh * c.reference_len ** 2)
        total += enc * (3.0 if memory_grad else 1.0) / c.chunk_size
    return total


class MetricsWriter:
    """JSONL + TensorBoard (tensorboardX) + PNG loss curve, written by process 0 only."""

    def __init__(self, out_dir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.png = os.path.join(out_dir, "loss.png")
        self.tb = None
        if not self.enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            # Records past the restored checkpoint were redone: drop them.
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.enabled or not records:
            return
        for r in records:
            self.file.write(json.dumps(r) + "\n")
            if self.tb is not None:
                for k, v in r.items():
                    if k not in ("step", "stage") and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"train/{k}", v, r["step"])
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def plot(self, title: str = "") -> None:
        if not self.enabled:
            return
        try:
            plot_loss(self.path, self.png, title=title)
        except Exception as e:  # noqa: BLE001 -- a plot must never stop training
            log.warning("could not plot the loss curve: %s", e)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss(jsonl_path: str, png_path: str, title: str = "") -> None:
    """Plot `loss` (and a running mean) against `step` from a metrics JSONL file into a PNG."""
    steps, loss = [], []
    with open(jsonl_path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "loss" in r:
                    steps.append(r["step"])
                    loss.append(r["loss"])
    if not steps:
        return
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    w = max(1, len(loss) // 50)
    if w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
