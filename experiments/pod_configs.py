"""Named TPU pod configurations for Memory3 training and decoding (used by `aot_compile.py` and
documented in `launch_pod.sh`).

A pod config names a TPU topology (as `jax.experimental.topologies.get_topology_desc` spells it),
the training mesh and batch, and the decode mesh and batch. Chip facts (HBM per chip, dense bf16
peak, HBM bandwidth) are the vendors' published figures.

Why the default training mesh is (data=1, fsdp=chips/8, tensor=8) for memory3-2b:
  * m3jax's attention is dense (the full [B, N, T, S] score matrix in float32 for 2048-token
    sequences), and it dominates the activation memory of a step. Only the `tensor` axis splits it
    over heads; `data`/`fsdp` split it only over sequences, and a chip cannot hold fewer than one
    sequence. So `tensor` is as large as the heads allow: 8 = the KV heads of memory3-2b (40 query
    heads, 8 KV heads, MLP 3200 and vocab 60416 are all multiples of 8; 16 divides none of the KV
    heads and would replicate them).
  * `fsdp` takes the rest of the slice: parameters, fp32 master copy and Adam moments (~39 GB in
    all for 2.8B parameters) are sharded over fsdp x tensor, and the batch over fsdp. The hidden
    size 3200 = 2^7 x 25 must be a multiple of fsdp (fsdp <= 128).
  * `data` (pure replication of the parameters) only pays off across slices (DCN): multi-slice
    configs put the slices on `data`, as `sharding.make_mesh` requires.
  * On a 3-D torus (v4, v5p 4x4x4) and per slice of a multi-slice v5e, tensor=8 has to split a
    physical axis (`allow_split_physical_axes=True`); `aot_compile.py` builds such meshes itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chip:
    """Per-chip facts: HBM (GiB), dense bf16 peak (FLOP/s), HBM bandwidth (bytes/s)."""

    name: str
    hbm_gib: float
    peak_flops: float
    hbm_bw: float


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32.0, 275e12, 1.2e12),
    "v5e": Chip("TPU v5e", 16.0, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95.0, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32.0, 918e12, 1.64e12),
}


def chip_of(topology: str) -> Chip:
    """The chip of a topology name such as `v5e:16x16` or `v4:4x4x4`."""
    gen = topology.split(":", 1)[0].lower()
    if gen not in CHIPS:
        raise KeyError(f"unknown TPU generation {gen!r} in topology {topology!r}; known: {sorted(CHIPS)}")
    return CHIPS[gen]


@dataclass(frozen=True)
class PodConfig:
    """One pod run: topology + training mesh/batch + decode mesh/batch.

    mesh, decode_mesh: (data, fsdp, tensor) sizes, one of them may be -1 (fill the devices).
    global_batch, seq_len: the training batch (sequences) and sequence length.
    decode_batch_per_shard: sequences per batch shard (data x fsdp) of the decode mesh.
    """

    name: str
    topology: str
    preset: str = "memory3-2b"
    chip_config_name: str | None = None  # "megacore" on v4 (one JAX device per chip)
    num_slices: int = 1
    mesh: tuple[int, int, int] = (1, -1, 8)
    global_batch: int = 2048
    seq_len: int = 2048
    stage: str = "continual"
    decode_mesh: tuple[int, int, int] = (-1, 1, 8)
    decode_batch_per_shard: int = 32
    decode_cache_len: int = 2048
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def chip(self) -> Chip:
        return chip_of(self.topology)

    def topology_kwargs(self) -> dict:
        kw: dict = {}
        if self.chip_config_name:
            kw["chip_config_name"] = self.chip_config_name
        if self.num_slices > 1:
            kw["num_slices"] = self.num_slices
        return kw

    def replace(self, **changes) -> "PodConfig":
        return dataclasses.replace(self, **changes)


# The paper trains with 2048-token sequences and ~4M tokens per step (global batch 2048).
POD_CONFIGS: dict[str, PodConfig] = {c.name: c for c in (
    PodConfig("v5e-256", "v5e:16x16", mesh=(1, 32, 8),
              notes="one v5e pod slice (256 chips, 64 hosts x 4 chips)"),
    PodConfig("v4-128", "v4:4x4x4", chip_config_name="megacore", mesh=(1, 8, 8),
              notes="v4-128 = 64 chips (16 hosts x 4 chips, megacore: one device per chip)"),
    PodConfig("v5p-128", "v5p:4x4x4", mesh=(1, 8, 8),
              notes="v5p-128 = 64 chips (16 hosts x 4 chips)"),
    PodConfig("v6e-256", "v6e:16x16", mesh=(1, 32, 8),
              notes="one v6e (Trillium) pod slice (256 chips)"),
    PodConfig("2xv5e-256", "v5e:16x16", num_slices=2, mesh=(2, 32, 8), decode_mesh=(-1, 1, 8),
              notes="two v5e-256 slices over DCN: slices on the data axis"),
    # Small ones for tests and quick checks.
    PodConfig("v5e-4-tiny", "v5e:2x2", preset="tiny", mesh=(1, 2, 2), global_batch=4, seq_len=128,
              decode_mesh=(-1, 1, 2), decode_batch_per_shard=2, decode_cache_len=128,
              notes="one v5e host (4 chips), tiny model: for tests"),
    PodConfig("v4-8-tiny", "v4:2x2x1", preset="tiny", chip_config_name="megacore", mesh=(1, 2, 2),
              global_batch=4, seq_len=128, decode_mesh=(-1, 1, 2), decode_batch_per_shard=2,
              decode_cache_len=128, notes="one v4 host (4 chips), tiny model: for tests"),
)}


def pod_config(name: str, **overrides) -> PodConfig:
    if name not in POD_CONFIGS:
        raise KeyError(f"unknown pod config {name!r}; choose from {sorted(POD_CONFIGS)}")
    cfg = POD_CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg


def for_topology(topology: str) -> PodConfig:
    """The first named config of `topology` (or a fresh one with the default mesh rule)."""
    for c in POD_CONFIGS.values():
        if c.topology == topology and c.num_slices == 1 and c.preset == "memory3-2b":
            return c
    kw = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
    return PodConfig(topology.replace(":", "-"), topology, **kw)
