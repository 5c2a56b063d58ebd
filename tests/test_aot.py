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
    r = A.compile_train(cfg, tc, mesh, 1 << 16, 256, attention="xla")
    assert r["fits"] is False and r["oom"]["required_bytes"] > r["oom"]["available_bytes"] > 0, r
    # the same global batch in 64 microbatches (TrainConfig.grad_accum): one microbatch's activations
    import dataclasses

    r = A.compile_train(cfg, dataclasses.replace(tc, grad_accum=64), mesh, 1 << 16, 256, attention="xla")
    assert r["fits"] and r["memory"]["temp"] < 16 * 2**30, r


def test_recompute_flops_of_the_remat_policies():
    """What each policy recomputes, from the model's FLOP formula: full = the layers' forward
    (a third of the model FLOPs less the LM head), dots = the attention forward, attention with
    splash = nothing; at the paper's size (continual step, memory_grad) the policies that keep
    the matmul outputs project a >= 20% shorter step than full remat at the same utilization."""
    from m3jax.config import preset
    from m3jax.train.loop import flops_per_token

    c = preset("memory3-2b")
    rc = lambda p, att="splash", **kw: A.recompute_flops_per_token(c, 2048, p, att, **kw)
    warm = flops_per_token(c, 2048, stage="warmup")
    assert rc("full", stage="warmup") == pytest.approx(warm / 3 - 2 * c.hidden * c.vocab_size)
    assert rc("none") == 0 and rc("attention", "splash") == 0
    assert rc("full") > rc("dots") > rc("attention", "xla") > 0
    assert rc("dots") == pytest.approx(2 * rc("attention", "xla"))
    fpt = flops_per_token(c, 2048, stage="continual")
    for policy in ("dots", "attention"):
        assert (fpt + rc(policy)) / (fpt + rc("full")) <= 0.8, policy
    # without gradients through the write path, full remat does not recompute the write path
    assert rc("full", memory_grad=False) < rc("full")


def test_policy_table_compares_with_full():
    rec = lambda remat, b, s4m, fits=True: {
        "config": {"name": "v5e-256"}, "remat": remat, "attention": "splash",
        "train": {"fits": fits, "global_batch": b, "tokens_per_step": b * 2048, "xla_flops_per_chip": 1e12,
                  "memory": {"argument": 2**30, "temp": 10 * 2**30, "total": 11 * 2**30},
                  "model_flops_per_token": 34.5e9, "recompute_flops_per_token": 1e9,
                  "projected_s_per_4m_tokens": s4m} if fits else {"fits": False, "smallest_tried": 32}}
    text = A.policy_table([rec("full", 192, 10.0), rec("dots", 64, 7.5), rec("none", 0, 0, fits=False)],
                          markdown=True)
    lines = text.splitlines()
    assert "| v5e-256 | dots | splash | 64 |" in lines[3] and "| -25.0% | 32 |" in lines[3]
    assert "+0.0%" in lines[2] and "none (>= 32)" in lines[4]


@pytest.mark.slow
def test_aot_train_step_with_splash_and_remat_policies_for_tpu():
    """The continual train step with splash attention (the Pallas kernel compiled by Mosaic, one
    per shard under shard_map) compiles for a v5e host under each remat policy; the dense path
    does not call the kernel."""
    _need_libtpu()
    import dataclasses

    from m3jax.config import MeshConfig, TrainConfig, preset
    from m3jax.model.attention import compile_for

    pod = pod_config("v5e-4-tiny")
    devices = A.topology_devices(pod.topology)
    mesh, _ = A.build_mesh(pod.mesh, devices)
    cfg = preset("tiny")
    tc = TrainConfig(stage="continual", seq_len=128, batch_size=4, steps=10, warmup_steps=1,
                     mesh=MeshConfig(*pod.mesh))
    texts = {}
    for attention, remat in (("splash", "full"), ("splash", "dots"), ("splash", "attention"), ("xla", "dots")):
        r = A.compile_train(cfg, tc, mesh, 4, 128, remat=remat, attention=attention)
        assert r["fits"] and r["memory"]["temp"] > 0, (attention, remat, r)
        with compile_for("tpu", fused=attention == "splash"):
            lowered, _ = A.lower_train(dataclasses.replace(cfg, remat=remat), tc, mesh, 4, 128)
        texts[attention, remat] = lowered.as_text()
    assert all("tpu_custom_call" in t for (a, _), t in texts.items() if a == "splash")
    assert "tpu_custom_call" not in texts["xla", "dots"]
