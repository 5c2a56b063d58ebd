"""Ahead-of-time compilation for a TPU topology on this CPU machine (experiments/aot_compile.py).

Needs `libtpu` (`pip install 'libtpu==0.0.42.*'`, the version jax 0.10.2's `tpu` extra pins):
the tests are skipped, saying so, when it cannot be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import aot_compile as A  # noqa: E402
from experiments.pod_configs import POD_CONFIGS, pod_config  # noqa: E402


def _need_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*'): cannot compile for TPU topologies")


def test_parse_mesh_and_oom_messages():
    assert A.parse_mesh("1,32,8", (1, -1, 1)) == (1, 32, 8)
    assert A.parse_mesh("data,fsdp,tensor", (1, 32, 8)) == (1, 32, 8)
    assert A.parse_mesh("tensor=8", (1, 1, 1)) == (1, -1, 8)
    assert A.parse_mesh("data=2,fsdp=16,tensor=8", (1, 1, 1)) == (2, 16, 8)
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(18.84G) exceeds available HBM (15.75G).")
    info = A.oom_info(RuntimeError(msg))
    assert info["required_bytes"] == pytest.approx(18.84 * 2**30)
    assert info["available_bytes"] == pytest.approx(15.75 * 2**30)
    assert A.oom_info(ValueError("something else")) is None


def test_pod_configs_are_consistent():
    from m3jax.config import preset

    for name, pod in POD_CONFIGS.items():
        cfg = preset(pod.preset)
        assert pod.chip.hbm_gib > 0 and pod.chip.peak_flops > 0, name
        data, fsdp, tensor = pod.mesh
        assert cfg.num_kv_heads % tensor == 0 and cfg.num_heads % tensor == 0, name
        if fsdp > 0:
            assert cfg.hidden % fsdp == 0, name
            assert pod.global_batch % (data * fsdp) == 0, name


def test_aot_compile_tiny_v5e():
    """The project's continual train step and the decode chunk compile for a v5e 2x2 host (4 chips)
    with the tiny preset; memory_analysis reports sane per-chip numbers."""
    _need_libtpu()
    pod = pod_config("v5e-4-tiny")
    rec = A.run_pod(pod, search=False, log=lambda *_: None)
    assert rec["chips"] == 4 and rec["device_kind"].startswith("TPU v5")
    assert rec["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    t = rec["train"]
    assert t["fits"] and t["fits_hbm"], t
    assert t["global_batch"] == pod.global_batch and t["tokens_per_step"] == pod.global_batch * pod.seq_len
    mem = t["memory"]
    # Arguments hold the state shard: bf16-free tiny model in f32 = params + 2 Adam moments, sharded 4 ways
    # (at least a quarter of it, at most all of it) plus the batch.
    from m3jax.config import preset

    n_params = preset("tiny").num_params(embedding=True)
    assert 3 * 4 * n_params / 4 <= mem["argument"] <= 3 * 4 * n_params + (1 << 20), mem
    assert mem["alias"] > 0, "the state is donated: outputs alias arguments"
    assert mem["temp"] > 0 and 0 < mem["total"] < pod.chip.hbm_gib * 2**30, mem
    assert t["model_flops_per_step"] > 0 and t["projected_step_s"] > 0
    assert t["xla_flops_per_chip"] and t["xla_flops_per_chip"] > 0
    d = rec["decode"]
    assert d["fits"] and d["batch"] == pod.decode_batch_per_shard * 2, d
    assert d["memory"]["argument"] > 0 and d["roofline_tokens_per_s"] > 0


def test_aot_oom_is_reported_not_raised():
    """A batch that cannot fit is reported (fits=False, with the bytes the compiler needed), not raised."""
    _need_libtpu()
    pod = pod_config("v5e-4-tiny")
    # A huge batch: the dense attention of 256-token sequences overflows 16 GiB.
    from m3jax.config import MeshConfig, TrainConfig, preset

    devices = A.topology_devices(pod.topology)
    mesh, _ = A.build_mesh((1, 4, 1), devices)
    cfg = preset("tiny")
    tc = TrainConfig(stage="warmup", seq_len=256, batch_size=1 << 16, steps=10, warmup_steps=1,
                     mesh=MeshConfig(1, 4, 1))
    r = A.compile_train(cfg, tc, mesh, 1 << 16, 256)
    assert r["fits"] is False and r["oom"]["required_bytes"] > r["oom"]["available_bytes"] > 0, r
    # the same global batch in 64 microbatches (TrainConfig.grad_accum): one microbatch's activations
    import dataclasses

    r = A.compile_train(cfg, dataclasses.replace(tc, grad_accum=64), mesh, 1 << 16, 256)
    assert r["fits"] and r["memory"]["temp"] < 16 * 2**30, r
