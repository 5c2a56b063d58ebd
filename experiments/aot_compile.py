"""Ahead-of-time compile the Memory3 train and decode steps for a TPU pod, on a CPU-only machine.

    python experiments/aot_compile.py --config v5e-256 --out aot_v5e.json
    python experiments/aot_compile.py --topology v5e:16x16 --preset memory3-2b --global-batch 2048 \
        --seq-len 2048 --mesh 1,32,8 --out aot.json
    python experiments/aot_compile.py --config v5e-256,v4-128 --remat full --out aot_remat.json
    python experiments/aot_compile.py --config v6e-256,v4-128 --remat dots,attention \
        --global-batch 192 --no-decode --out figures/aot_remat_policies.json       # the policy search

Needs `libtpu` (`pip install 'm3jax[tpu]'`, or `pip install libtpu==0.0.42.1` for jax 0.10.2):
`jax.experimental.topologies.get_topology_desc` then describes the devices of a TPU topology
without any TPU attached, and `jax.jit(f).lower(abstract args with shardings).compile()` runs the
real TPU compiler (SPMD partitioning, fusion, memory assignment) for it. No parameter is ever
materialized: state and batch are `jax.ShapeDtypeStruct`s carrying `NamedSharding`s.

What is compiled:
  train   the project's jitted step (`m3jax.train.step.make_train_step(model_cfg, train_cfg,
          mesh)`, stage "continual" by default: one reference per 64-token chunk encoded by the
          model in the step, chunk c reading the memories of chunks c-4..c), its state
          (`abstract_state_on`: bf16 params, fp32 master copy and Adam moments) and a batch of
          tokens/loss_mask [B, T] + ref_tokens/ref_mask [B, C, R].
  decode  `m3jax.decode.decode_round` (the jitted `lax.while_loop` that generates one 64-token
          chunk, one `extend` of one token per iteration, reading a memory block of
          memories_per_chunk memories), with params, KV cache and memory sharded on the decode
          mesh.

Per chip it reports `compiled.memory_analysis()` (arguments, outputs, aliased, temporaries, code,
total = arguments + outputs - aliased + temporaries + code) and whether it fits the chip's HBM.
When a batch does not fit, the TPU compiler fails with RESOURCE_EXHAUSTED (naming the bytes it
needed); with `--search` (default) the global batch is then lowered (in multiples of
data x fsdp, the smallest batch that keeps every chip busy) until it fits, and tokens per step
are reported for the batch that fits. The project's step has no gradient accumulation, so a
smaller batch is the only way down.

FLOPs and projections (all per optimizer step):
  model_flops   `m3jax.train.loop.flops_per_token` x B x T: the project's analytic model FLOPs
                (dense matmuls, attention, in-step memory writing; remat recompute not counted).
  xla_flops     `compiled.cost_analysis()["flops"]` of one chip's partitioned program, as XLA
                counts it. XLA's HLO cost analysis counts the body of a while loop once, and the
                model scans its layers, so this is far below the real count; it is reported, not
                used.
  recompute     `recompute_flops_per_token` x B x T: the forward FLOPs the remat policy repeats in
                the backward pass (full: the layer stacks' whole forward; dots: the attention
                core; attention: nothing with splash).
  step_s        (model_flops + recompute) / (chips x peak x assumed utilization) (`--assumed-mfu`,
                default 0.40, a typical figure for dense 1-3B models on TPU with XLA, applied to
                every FLOP the chips execute: "the same assumed MFU" for two policies means the
                same efficiency on what each executes, so recomputation costs time; the MFU proper
                is then assumed x model / (model + recompute), reported as `implied_mfu`; the real
                value comes from a run: `m3jax.train.loop` logs it), and tokens/s = B x T / step_s.
  decode        a bandwidth roofline: one generated token reads every argument of the decode
                program once (params shard, KV cache, memory), so a token of the whole batch
                takes at least arguments / HBM bandwidth, i.e. tokens/s <= B x bandwidth /
                arguments (per-chip, all chips in parallel).

Remat policies (`--remat none,full,dots,attention`, several compared in one run: the model's own
`ModelConfig.remat`, see `m3jax.model.transformer.remat_policy`) and attention (`--attention`:
"splash", the Pallas kernel that `attention(impl="auto")` takes on TPU, or "xla", the dense
path): for each pod and policy the largest batch that fits (one step, no accumulation), its
per-chip memory and FLOPs, and the projected time of the paper's ~4M-token step (2048 x 2048
tokens, as `TrainConfig.grad_accum` microbatches of that batch) against full remat. Confirm
the 4M step itself with `--global-batch 2048 --grad-accum N --no-search`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import typing
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GIB = 2.0**30


def setup_tpu_env(topology: str | None = None) -> None:
    """Environment for a compile-only libtpu client on a machine without TPUs: skip the GCE
    metadata query and name the worker and accelerator, which silences libtpu's warnings
    (it runs without them too), and allow several processes to load libtpu (without it a second
    process fails on /tmp/libtpu_lockfile, which any JAX process holds while libtpu is loaded).
    Existing values win."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if topology and ":" in topology:
        gen = topology.split(":")[0].lower()
        kind = {"v5e": "v5litepod", "v6e": "v6e", "v4": "v4", "v5p": "v5p"}.get(gen)
        if kind:
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-8" if gen in ("v4", "v5p") else f"{kind}-4")


from experiments.pod_configs import POD_CONFIGS, PodConfig, for_topology, pod_config  # noqa: E402


def libtpu_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return None


def topology_devices(topology: str, **kwargs: Any) -> list:
    """Compile-only devices of a TPU topology (raises ImportError-like RuntimeError without libtpu)."""
    setup_tpu_env(topology)
    from jax.experimental.topologies import get_topology_desc

    return list(get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)


# ------------------------------------------------------------------------------ helpers
def parse_mesh(text: str | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """`1,32,8`, `data=1,fsdp=32,tensor=8`, or the axis names alone (`data,fsdp,tensor`: default)."""
    if not text or text.replace(" ", "") == "data,fsdp,tensor":
        return tuple(default)  # type: ignore[return-value]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("=" in p for p in parts):
        d = {k: int(v) for k, v in (p.split("=") for p in parts)}
        unknown = set(d) - {"data", "fsdp", "tensor"}
        if unknown:
            raise ValueError(f"--mesh: unknown axes {sorted(unknown)}")
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, **d}
        if "fsdp" not in d and -1 not in d.values():
            sizes["fsdp"] = -1
        return (sizes["data"], sizes["fsdp"], sizes["tensor"])
    if len(parts) != 3:
        raise ValueError(f"--mesh {text!r}: give data,fsdp,tensor sizes (e.g. 1,32,8)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def memory_dict(ma: Any) -> dict[str, float]:
    """Per-chip bytes of a `CompiledMemoryStats`, with total = args + outputs - alias + temps + code."""
    d = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    d["code"] = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    d["total"] = d["argument"] + d["output"] - d["alias"] + d["temp"] + d["code"]
    return d


def cost_dict(compiled: Any) -> dict[str, float]:
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)[:200]}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {k: float(v) for k, v in (ca or {}).items() if "{" not in k and isinstance(v, (int, float))}


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_info(err: BaseException) -> dict[str, Any] | None:
    """{required_bytes, available_bytes, message} of a TPU compiler out-of-memory error, else None."""
    msg = str(err)
    if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
        return None
    nums = re.findall(r"([\d.]+)([KMGT]?)i?B?\)?\s*(?:exceeds|of)\s+(?:available\s+HBM\s+)?\(?([\d.]+)([KMGT])", msg)
    info: dict[str, Any] = {"message": " ".join(msg.split())[:400]}
    if nums:
        a, au, b, bu = nums[0]
        info["required_bytes"] = float(a) * _UNITS[au]
        info["available_bytes"] = float(b) * _UNITS[bu]
    return info


def build_mesh(sizes: tuple[int, int, int], devices: list) -> tuple[Any, str | None]:
    """(Mesh over ("data", "fsdp", "tensor"), note). `sharding.make_mesh` first; when the TPU torus
    cannot be cut into the logical axes without splitting a physical axis (e.g. tensor=8 on a
    v4 4x4x4 torus), the same mesh with `allow_split_physical_axes=True` (and a note)."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from m3jax import sharding as S
    from m3jax.config import MeshConfig

    try:
        return S.make_mesh(MeshConfig(*sizes), devices), None
    except NotImplementedError as e:
        shape = S.mesh_shape(MeshConfig(*sizes), len(devices))
        n = len({getattr(d, "slice_index", 0) for d in devices})
        if n > 1:  # multi-slice: one ICI mesh per slice, the slices along "data" (as make_mesh does)
            ici = (shape[0] // n, shape[1], shape[2])
            arr = mesh_utils.create_hybrid_device_mesh(ici, (n, 1, 1), devices, allow_split_physical_axes=True)
        else:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        how = "create_hybrid_device_mesh" if n > 1 else "create_device_mesh"
        note = (f"sharding.make_mesh failed ({str(e).split('.')[0]}); built with "
                f"mesh_utils.{how}(allow_split_physical_axes=True)")
        return Mesh(arr, S.MESH_AXES, axis_types=(AxisType.Auto,) * 3), note


# ------------------------------------------------------------------------------ train
def abstract_batch(model_cfg, mesh, B: int, T: int, stage: str) -> dict[str, Any]:
    """ShapeDtypeStructs of a training batch, sharded like `TrainStep` expects (batch over data x fsdp)."""
    import jax
    import jax.numpy as jnp

    from m3jax import sharding as S

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=S.batch_sharding(mesh, shape))

    batch = {"tokens": sds((B, T), jnp.int32), "loss_mask": sds((B, T), jnp.bool_)}
    if stage == "continual":
        C, R = -(-T // model_cfg.chunk_size), model_cfg.reference_len
        batch.update(ref_tokens=sds((B, C, R), jnp.int32), ref_mask=sds((B, C, R), jnp.bool_))
    return batch


def lower_train(model_cfg, train_cfg, mesh, B: int, T: int):
    """(Lowered of the project's jitted train step on abstract state + batch, note)."""
    from m3jax.train.step import TrainStep, abstract_state_on

    # A fresh TrainStep (the class `make_train_step` returns, without its cache): a fresh jit,
    # so each remat policy / attention choice is traced anew.
    step = TrainStep(model_cfg, train_cfg, mesh)
    state = abstract_state_on(model_cfg, train_cfg, mesh)
    batch = abstract_batch(model_cfg, mesh, B, T, train_cfg.stage)
    # TrainStep.lower runs the step's own batch checks (grad_accum, mesh divisibility) on the
    # abstract batch: a batch the real step refuses is refused here too.
    return step.lower(state, batch), "TrainStep.lower"


def compile_train(model_cfg, train_cfg, mesh, B: int, T: int, remat: str = "none",
                  attention: str = "splash") -> dict[str, Any]:
    """Compile the train step with `ModelConfig.remat = remat`, attention traced for TPU
    (`attention.compile_for`): "splash" lets "auto" take the Pallas kernel, "xla" the dense path."""
    from m3jax.model.attention import compile_for

    rec: dict[str, Any] = {"global_batch": B, "seq_len": T, "tokens_per_step": B * T, "remat": remat,
                           "attention": attention}
    model_cfg = dataclasses.replace(model_cfg, remat=remat)

    def lower():
        with compile_for("tpu", fused=attention != "xla"):
            lowered, how = lower_train(model_cfg, train_cfg, mesh, B, T)
        rec["lowered_with"] = how.split(" (")[0]
        return lowered

    return _compile_into(rec, lower)


def recompute_flops_per_token(model_cfg, seq_len: int, remat: str, attention: str, *, stage: str = "continual",
                              memory_grad: bool = True, lookback: int = 4) -> float:
    """Forward FLOPs per context token that a remat policy recomputes in the backward pass (the
    model FLOPs of `train.loop.flops_per_token` count forward + backward = 3 x forward, no remat).

    attention forward  4 x layers x heads x head_dim x keys (scores + probabilities x values; the
                       memory keys of the continual stage at the memory layers) + the in-step
                       memory writing's attention and token scores (per chunk_size tokens)
    full               the whole forward of the scanned layers (everything but the LM head and the
                       embedding, which sit outside the layer scan): flops_per_token / 3 - 2 D V
                       (the write path's forward counts once: it is rematerialized as well)
    dots               the attention forward (the projections and the MLP are saved)
    attention          nothing with splash (its softmax statistics and output are saved; its
                       backward kernels recompute scores blockwise, as any flash backward does,
                       which the 3x model count does not include either); with the XLA path the
                       scores and softmax (half the attention forward: the output is saved)
    """
    from m3jax.train.loop import flops_per_token

    c = model_cfg
    if remat == "none":
        return 0.0
    fpt = flops_per_token(c, seq_len, stage=stage, memory_grad=memory_grad, lookback=lookback)
    if remat == "full":
        # without memory_grad the write path runs forward only (counted once, never recomputed)
        enc = 0.0 if memory_grad else (flops_per_token(c, seq_len, stage=stage, lookback=lookback) - fpt) / 2
        return (fpt - enc) / 3.0 - 2.0 * c.hidden * c.vocab_size
    nh = c.num_heads * c.head_dim
    attn = 4.0 * c.num_layers * nh * (seq_len + c.prefix_len)
    if stage == "continual":
        attn += 4.0 * c.memory_layers * nh * (lookback + 1) * c.tokens_per_memory
    if stage == "continual" and memory_grad:
        n = c.prefix_len + c.reference_len
        attn += c.memory_layers * (4.0 * nh * n * n + 2.0 * nh * c.reference_len ** 2) / c.chunk_size
    if remat == "dots":
        return attn
    if remat == "attention":
        return 0.0 if attention == "splash" else attn / 2
    raise ValueError(f"unknown remat policy {remat!r}")


def _compile_into(rec: dict[str, Any], lower: Callable[[], Any]) -> dict[str, Any]:
    """Lower and compile; fill `rec` with fits / memory / cost, or fits=False and the bytes the
    compiler asked for when the program does not fit (other errors propagate)."""
    t0 = time.perf_counter()
    try:
        lowered = lower()
        rec["lower_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
        info = oom_info(e)
        if info is None:
            raise
        rec.update(fits=False, oom=info, compile_s=time.perf_counter() - t0)
        return rec
    rec.update(fits=True, compile_s=time.perf_counter() - t0, memory=memory_dict(compiled.memory_analysis()),
               cost=cost_dict(compiled))
    return rec


def _fmt_mem(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {m[k] / GIB:.2f}" for k in ("argument", "output", "alias", "temp", "code", "total")) + " GiB"


def search_train(model_cfg, train_cfg, mesh, B: int, T: int, *, search: bool = True, remat: str = "none",
                 attention: str = "splash", max_tries: int = 4, hbm_bytes: float | None = None, on_attempt=None,
                 log=print) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Compile at global batch B; when it does not fit and `search`, find the largest batch (a
    multiple of data x fsdp) that does, with few compiles (a successful compile of a pod-size
    step takes minutes on a small CPU machine): the temporaries grow about linearly with the
    batch, so each next batch is read off a line through the attempts so far (the bytes the
    compiler needed on a failure, the temporaries it used on a success) against the bytes it
    had available. Returns (largest fitting attempt or None, all attempts)."""
    step_b = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)) * train_cfg.grad_accum
    tried: dict[int, dict[str, Any]] = {}
    avail: list[float] = []

    def attempt(b: int) -> dict[str, Any]:
        log(f"  compiling train step: global batch {b} x {T} tokens ...")
        r = compile_train(model_cfg, train_cfg, mesh, b, T, remat=remat, attention=attention)
        r["compiled"] = r["fits"]
        if r["fits"] and hbm_bytes is not None and r["memory"]["total"] > hbm_bytes:
            # The compiler accepted it, but memory_analysis() adds up to more than the chip has:
            # counted as not fitting (the conservative reading).
            m = r["memory"]
            log(f"    compiled in {r['compile_s']:.0f} s, but {_fmt_mem(m)} exceeds the {hbm_bytes / GIB:.0f} GiB HBM")
            r["fits"] = False
            r["oom"] = {"message": f"compiled, but memory_analysis total {m['total'] / GIB:.2f} GiB exceeds the "
                                   f"chip's {hbm_bytes / GIB:.0f} GiB HBM",
                        "required_bytes": m["temp"],
                        "available_bytes": min(avail) if avail else hbm_bytes - m["argument"] - m["code"]}
        tried[b] = r
        if r["fits"]:
            log(f"    compiled in {r['compile_s']:.0f} s: {_fmt_mem(r['memory'])}")
        elif r["compiled"]:
            avail.append(r["oom"]["available_bytes"])
        else:
            need = r["oom"].get("required_bytes")
            if r["oom"].get("available_bytes"):
                avail.append(r["oom"]["available_bytes"])
            log(f"    does not fit ({r['compile_s']:.0f} s): needs {need / GIB if need else float('nan'):.2f} GiB of "
                f"temporaries, {r['oom'].get('available_bytes', float('nan')) / GIB:.2f} GiB available")
        if on_attempt is not None:
            on_attempt(list(tried.values()))
        return r

    def used(r):  # temporaries: needed (failure) or used (success)
        return r["memory"]["temp"] if r["fits"] else r["oom"].get("required_bytes")

    def next_batch() -> int | None:
        pts = sorted((b, used(r)) for b, r in tried.items() if used(r))
        if not pts or not avail:
            return None
        cap = min(avail) * 0.95
        if len(pts) >= 2:
            below = [pt for pt in pts if pt[1] <= cap]
            above = [pt for pt in pts if pt[1] > cap]
            if below and above:  # interpolate between the two attempts that bracket the cap
                (b0, m0), (b1, m1) = below[-1], above[0]
            else:  # extrapolate from the two attempts nearest to it
                (b0, m0), (b1, m1) = (below[-2:] if len(below) >= 2 else above[:2])
            slope = (m1 - m0) / (b1 - b0) if b1 != b0 else m1 / b1
            est = b0 + (cap - m0) / slope if slope > 0 else b1
        else:
            b0, m0 = pts[0]
            est = b0 * cap / m0
        b = int(est // step_b) * step_b
        fits = [x for x, r in tried.items() if r["fits"]]
        fails = [x for x, r in tried.items() if not r["fits"]]
        lo, hi = max(fits, default=0), min(fails, default=float("inf"))
        b = min(max(b, lo + step_b, step_b), int(hi - step_b) if hi != float("inf") else b)
        if b in tried or b <= lo or b >= hi or b < step_b:
            return None
        return b

    r = attempt(B)
    if r["fits"] or not search:
        return (r if r["fits"] else None), list(tried.values())
    while len(tried) < max_tries:
        b = next_batch()
        if b is None:
            if not any(r["fits"] for r in tried.values()) and step_b not in tried:
                b = step_b  # the smallest batch that keeps every chip busy
            else:
                break
        attempt(b)
        fits = [x for x, r in tried.items() if r["fits"]]
        if fits and (max(fits) + step_b) in tried:
            break
        if fits and len(tried) >= 2 and not any(not r["fits"] and x < max(fits) * 1.2 for x, r in tried.items()):
            # one more step up only when the line promises >= 20% more tokens
            b2 = next_batch()
            if b2 is None or b2 < max(fits) * 1.2:
                break
    fits = [b for b, r in tried.items() if r["fits"]]
    if not fits:
        return None, list(tried.values())
    return tried[max(fits)], list(tried.values())


# ------------------------------------------------------------------------------ decode
def compile_decode(model_cfg, mesh, B: int, cache_len: int) -> dict[str, Any]:
    """AOT compile `m3jax.decode.decode_round` (one 64-token round, one memory block), with the
    Generator's own placement on `mesh` (`Generator(mesh=...)`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from m3jax.decode import DecodeState, decode_round
    from m3jax.model.cache import init_cache
    from m3jax.model.memory import ChunkMemory
    from m3jax.model.placement import abstract_params, memory_sharding
    from m3jax.model.transformer import prefix_kv

    c = model_cfg
    rep = NamedSharding(mesh, PartitionSpec())

    def placed(abstract, shardings):  # ShapeDtypeStructs (nothing materialized) with their shardings
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    params = abstract_params(c, mesh)
    prefix = None  # the prefix sink (a few tokens per layer) is replicated
    if c.reference_prefix is not None:
        prefix = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                              jax.eval_shape(lambda p: prefix_kv(p, c), params))
    state = jax.eval_shape(lambda: DecodeState.create(init_cache(c, B, cache_len), jnp.zeros((B, c.vocab_size)),
                                                      budget=0, key_B=jnp.zeros((B, 2), jnp.uint32),
                                                      stops_BX=[c.eos_id]))
    state = placed(state, DecodeState.sharding(c, mesh, B, 1))
    memory = None
    if c.memory_enabled:
        mem = jax.eval_shape(lambda: ChunkMemory.empty(c, B, 1, dtype=jnp.dtype(c.dtype)))  # one block
        memory = placed(mem, memory_sharding(c, mesh, memory=mem))
    steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    rec: dict[str, Any] = {"batch": B, "cache_len": cache_len, "memory_tokens": c.memory_block_len}

    def lower():
        from m3jax.model.attention import compile_for

        with jax.set_mesh(mesh), compile_for("tpu"):
            return decode_round.lower(params, c, prefix, memory, state, steps)

    return _compile_into(rec, lower)


# ------------------------------------------------------------------------------ one pod config
def run_pod(pod: PodConfig, *, search: bool = True, remat: str = "none", attention: str = "splash",
            train: bool = True, decode: bool = True, memory_grad: bool = True, assumed_mfu: float = 0.40,
            grad_accum: int = 1, on_progress=None, log=print) -> dict[str, Any]:
    """Compile the train (and decode) step of `pod`; returns a JSON-able record."""
    setup_tpu_env(pod.topology)
    import jax

    from m3jax import sharding as S
    from m3jax.config import MeshConfig, TrainConfig, preset
    from m3jax.train.loop import flops_per_token

    chip = pod.chip
    model_cfg = preset(pod.preset)
    devices = topology_devices(pod.topology, **pod.topology_kwargs())
    n = len(devices)
    hosts = len({d.process_index for d in devices})
    log(f"{pod.name}: {pod.topology} x{pod.num_slices} slice(s), {n} chips ({devices[0].device_kind}), "
        f"{hosts} hosts; preset {pod.preset}; libtpu {libtpu_version()}")
    rec: dict[str, Any] = {
        "config": {**dataclasses.asdict(pod), "mesh": list(pod.mesh), "decode_mesh": list(pod.decode_mesh)},
        "chips": n, "hosts": hosts, "device_kind": devices[0].device_kind, "chip": dataclasses.asdict(chip),
        "jax": jax.__version__, "libtpu": libtpu_version(), "remat": remat,
        "attention": attention,
        "assumed_mfu": assumed_mfu, "model": {"preset": pod.preset, "params": model_cfg.num_params(embedding=True),
                                               "non_embedding_params": model_cfg.num_params()},
    }
    hbm = chip.hbm_gib * GIB
    if train:
        mesh, note = build_mesh(pod.mesh, devices)
        rec["mesh"] = dict(mesh.shape)
        if note:
            rec["mesh_note"] = note
            log(f"  note: {note}")
        tc = TrainConfig(stage=pod.stage, seq_len=pod.seq_len, batch_size=pod.global_batch, steps=1000,
                         warmup_steps=10, memory_grad=memory_grad, grad_accum=grad_accum, mesh=MeshConfig(*pod.mesh))
        rec["grad_accum"] = grad_accum
        log(f"  train mesh {dict(mesh.shape)}, stage {pod.stage}, memory_grad {memory_grad}, remat {remat}, "
            f"attention {attention}, grad_accum {grad_accum}")
        def partial(attempts):  # keep what a long search found so far
            rec["train_attempts"] = attempts
            if on_progress is not None:
                on_progress(rec)

        best, attempts = search_train(model_cfg, tc, mesh, pod.global_batch, pod.seq_len, search=search,
                                      remat=remat, attention=attention, hbm_bytes=hbm, on_attempt=partial, log=log)
        rec["train_attempts"] = attempts
        out: dict[str, Any] = {"requested_global_batch": pod.global_batch, "seq_len": pod.seq_len,
                               "fits": best is not None}
        if best is not None:
            B, T = best["global_batch"], pod.seq_len
            fpt = flops_per_token(model_cfg, T, stage=pod.stage, memory_grad=memory_grad, lookback=tc.memory_lookback)
            model_flops = fpt * B * T
            rc = recompute_flops_per_token(model_cfg, T, remat, attention, stage=pod.stage, memory_grad=memory_grad,
                                           lookback=tc.memory_lookback)
            # the hardware executes the model FLOPs plus the recomputation: at the assumed MFU of the
            # executed FLOPs, a policy that recomputes less takes proportionally less time
            step_s = (fpt + rc) * B * T / (n * chip.peak_flops * assumed_mfu)
            rc_full = recompute_flops_per_token(model_cfg, T, "full", attention, stage=pod.stage,
                                                memory_grad=memory_grad, lookback=tc.memory_lookback)
            out.update(global_batch=B, per_batch_shard=B // (rec["mesh"]["data"] * rec["mesh"]["fsdp"]),
                       tokens_per_step=B * T, memory=best["memory"], fits_hbm=best["memory"]["total"] <= hbm,
                       hbm_bytes=hbm, xla_flops_per_chip=best["cost"].get("flops"),
                       model_flops_per_step=model_flops, model_flops_per_token=fpt,
                       recompute_flops_per_token=rc, recompute_flops_per_step=rc * B * T,
                       implied_mfu=assumed_mfu * fpt / (fpt + rc),
                       projected_s_per_4m_tokens=(fpt + rc) * 4 * 2**20 / (n * chip.peak_flops * assumed_mfu),
                       # the same projection under full remat (it depends on the FLOPs only, not on
                       # the batch): "vs full" when full itself was not compiled in the run
                       projected_s_per_4m_tokens_full=(fpt + rc_full) * 4 * 2**20
                       / (n * chip.peak_flops * assumed_mfu),
                       projected_step_s=step_s, projected_tokens_per_s=B * T / step_s,
                       projected_mfu=assumed_mfu, compile_s=best["compile_s"],
                       lowered_with=best.get("lowered_with"),
                       steps_for_4m_tokens=math.ceil(4 * 2**20 / (B * T)))
        else:
            smallest = min(attempts, key=lambda r: r["global_batch"])
            out.update(smallest_tried=smallest["global_batch"],
                       required_bytes=smallest["oom"].get("required_bytes"),
                       available_bytes=smallest["oom"].get("available_bytes"))
        rec["train"] = out
    if decode:
        dmesh, dnote = build_mesh(pod.decode_mesh, devices)
        shards = dmesh.shape["data"] * dmesh.shape["fsdp"]
        B = pod.decode_batch_per_shard * shards
        log(f"  compiling decode chunk: mesh {dict(dmesh.shape)}, batch {B}, cache {pod.decode_cache_len} ...")
        d = compile_decode(model_cfg, dmesh, B, pod.decode_cache_len)
        d["mesh"] = dict(dmesh.shape)
        if dnote:
            d["mesh_note"] = dnote
        if d["fits"]:
            args = d["memory"]["argument"]
            t_tok = args / chip.hbm_bw
            d.update(fits_hbm=d["memory"]["total"] <= hbm, roofline_token_s=t_tok,
                     roofline_tokens_per_s=B / t_tok,
                     roofline_note="one token of the batch reads every argument (params shard, KV cache, memory) "
                                   "once: time >= argument bytes / HBM bandwidth")
            log(f"    fits: {d['memory']['total'] / GIB:.2f} GiB per chip; roofline {1e3 * t_tok:.2f} ms/token "
                f"-> <= {B / t_tok:,.0f} tokens/s (compile {d['compile_s']:.0f} s)")
        rec["decode"] = d
    return rec


# ------------------------------------------------------------------------------ report
def table(records: list[dict[str, Any]]) -> str:
    hdr = (f"{'config':<12} {'chips':>5} {'mesh d/f/t':>10} {'remat':>9} {'batch':>6} {'tok/step':>9} {'fits':>4} "
           f"{'args':>6} {'temps':>6} {'total':>6} {'HBM':>4} {'XLA TF/chip':>11} {'model PF/step':>13} "
           f"{'step s':>7} {'tok/s':>9} {'MFU':>4}")
    lines = [hdr, "-" * len(hdr)]
    for r in records:
        t = r.get("train")
        m = r.get("mesh", {})
        mesh = f"{m.get('data')}/{m.get('fsdp')}/{m.get('tensor')}"
        name = r["config"]["name"]
        if t is None:
            continue
        if t["fits"]:
            mem = t["memory"]
            lines.append(
                f"{name:<12} {r['chips']:>5} {mesh:>10} {r['remat']:>9} {t['global_batch']:>6} {t['tokens_per_step']:>9,} "
                f"{'yes' if t['fits_hbm'] else 'NO':>4} {mem['argument'] / GIB:>6.2f} {mem['temp'] / GIB:>6.2f} "
                f"{mem['total'] / GIB:>6.2f} {r['chip']['hbm_gib']:>4.0f} {(t['xla_flops_per_chip'] or 0) / 1e12:>11.2f} "
                f"{t['model_flops_per_step'] / 1e15:>13.2f} {t['projected_step_s']:>7.3f} "
                f"{t['projected_tokens_per_s']:>9,.0f} {t['projected_mfu']:>4.0%}")
        else:
            need = t.get("required_bytes") or float("nan")
            lines.append(f"{name:<12} {r['chips']:>5} {mesh:>10} {r['remat']:>9} {t['smallest_tried']:>6} "
                         f"{t['smallest_tried'] * t['seq_len']:>9,} {'NO':>4}  needs {need / GIB:.2f} GiB of temporaries "
                         f"at the smallest batch tried (HBM {r['chip']['hbm_gib']:.0f} GiB)")
    lines.append("")
    dh = (f"{'config':<12} {'decode mesh':>11} {'batch':>6} {'cache':>6} {'fits':>4} {'args GiB':>8} "
          f"{'temps GiB':>9} {'total GiB':>9} {'ms/token':>8} {'tok/s <=':>10}")
    lines += [dh, "-" * len(dh)]
    for r in records:
        d = r.get("decode")
        if d is None:
            continue
        m = d["mesh"]
        mesh = f"{m['data']}/{m['fsdp']}/{m['tensor']}"
        if d["fits"]:
            mem = d["memory"]
            lines.append(f"{r['config']['name']:<12} {mesh:>11} {d['batch']:>6} {d['cache_len']:>6} "
                         f"{'yes' if d['fits_hbm'] else 'NO':>4} {mem['argument'] / GIB:>8.2f} {mem['temp'] / GIB:>9.2f} "
                         f"{mem['total'] / GIB:>9.2f} {1e3 * d['roofline_token_s']:>8.2f} {d['roofline_tokens_per_s']:>10,.0f}")
        else:
            lines.append(f"{r['config']['name']:<12} {mesh:>11} {d['batch']:>6} {d['cache_len']:>6} {'NO':>4} "
                         f"{d['oom']['message'][:60]}")
    return "\n".join(lines)


def policy_table(records: list[dict[str, Any]], markdown: bool = False) -> str:
    """Per pod and remat policy: the largest batch that fits, its per-chip memory and XLA FLOPs,
    FLOPs per token (model + recompute) and the projected time of a ~4M-token step, against the
    same pod's full remat (when it was compiled in the run)."""
    cols = ["config", "remat", "attention", "largest batch", "per-chip GiB (args + temps)", "XLA TFLOP/chip",
            "model + recompute GFLOP/token", "4M-token step s", "vs full", "microbatches for 4M"]
    rows = []
    full = {r["config"]["name"]: r["train"] for r in records
            if r.get("train", {}).get("fits") and r["remat"] == "full"}
    for r in records:
        t = r.get("train")
        if t is None:
            continue
        name = r["config"]["name"]
        if not t["fits"]:
            rows.append([name, r["remat"], r.get("attention", "-"), f"none (>= {t.get('smallest_tried')})", "-", "-",
                         "-", "-", "-", "-"])
            continue
        m = t["memory"]
        ref = full.get(name)
        s4m = t.get("projected_s_per_4m_tokens")  # absent in records of runs before the policies
        # full remat's projection: from its own compiled record when the run has one, else the same
        # formula with full's recompute FLOPs (the projection does not depend on the batch)
        s_full = (ref or {}).get("projected_s_per_4m_tokens") or t.get("projected_s_per_4m_tokens_full")
        vs = f"{s4m / s_full - 1:+.1%}" if s4m and s_full else "-"
        rc = t.get("recompute_flops_per_token")
        rows.append([name, r["remat"], r.get("attention", "xla"), str(t["global_batch"]),
                     f"{m['argument'] / GIB:.2f} + {m['temp'] / GIB:.2f} = {m['total'] / GIB:.2f}",
                     f"{(t['xla_flops_per_chip'] or 0) / 1e12:.2f}",
                     f"{t['model_flops_per_token'] / 1e9:.1f} + " + (f"{rc / 1e9:.1f}" if rc is not None else "?"),
                     f"{s4m:.2f}" if s4m else "-", vs, str(math.ceil(4 * 2**20 * r.get("grad_accum", 1) / t["tokens_per_step"]))])
    if markdown:
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                         + ["| " + " | ".join(x) + " |" for x in rows])
    widths = [max(len(c), *(len(x[i]) for x in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))
    return "\n".join([fmt(cols), "-" * (sum(widths) + 2 * len(cols))] + [fmt(x) for x in rows])


def build_pods(args: argparse.Namespace) -> list[PodConfig]:
    if args.config:
        pods = [pod_config(n.strip()) for n in args.config.split(",") if n.strip()]
    else:
        if not args.topology:
            raise SystemExit("give --config NAME[,NAME] or --topology (e.g. v5e:16x16)")
        pods = [for_topology(args.topology)]
    out = []
    for p in pods:
        ch: dict[str, Any] = {}
        if args.topology and args.config:
            ch["topology"] = args.topology
        for name in ("preset", "global_batch", "seq_len", "stage", "decode_batch_per_shard", "decode_cache_len",
                     "num_slices"):  # flags that replace the config's field of the same name
            if getattr(args, name):
                ch[name] = getattr(args, name)
        for name in ("mesh", "decode_mesh"):
            if getattr(args, name):
                ch[name] = parse_mesh(getattr(args, name), getattr(p, name))
        out.append(p.replace(**ch) if ch else p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"pod config name(s), comma separated: {', '.join(POD_CONFIGS)}")
    ap.add_argument("--topology", help="TPU topology, e.g. v5e:16x16, v4:4x4x4 (overrides the config's)")
    ap.add_argument("--num-slices", type=int, help="number of slices (multi-slice over DCN)")
    ap.add_argument("--preset", help="model preset (default: the config's, memory3-2b)")
    ap.add_argument("--global-batch", type=int, help="sequences per step (paper: 2048 = ~4M tokens)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (paper: 2048)")
    ap.add_argument("--stage", choices=["warmup", "continual"])
    ap.add_argument("--mesh", help="training mesh data,fsdp,tensor sizes (e.g. 1,32,8 or data=1,fsdp=-1,tensor=8)")
    ap.add_argument("--decode-mesh", help="decode mesh sizes (default: the config's, e.g. -1,1,8)")
    ap.add_argument("--decode-batch-per-shard", type=int, help="decode sequences per data x fsdp shard")
    ap.add_argument("--decode-cache-len", type=int)
    ap.add_argument("--no-memory-grad", action="store_true", help="continual stage without gradients through the write path")
    ap.add_argument("--remat", default="none",
                    help="remat policies (ModelConfig.remat), comma separated: none, full, dots, attention; "
                         "each is compiled (and searched) in turn and compared with full")
    ap.add_argument("--attention", choices=["splash", "xla"], default="splash",
                    help="attention on TPU: the Pallas splash kernel (what auto takes) or the dense XLA path")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="microbatches per step (TrainConfig.grad_accum): the global batch is summed over them")
    ap.add_argument("--no-search", action="store_true", help="compile only the requested batch")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--assumed-mfu", type=float, default=0.40)
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print the remat policy table as markdown too")
    ap.add_argument("--tables", nargs="+", metavar="JSON",
                    help="no compile: print the tables of earlier runs' JSON files (records concatenated; "
                         "with --out, written there as one file)")
    args = ap.parse_args(argv)

    if args.tables:
        records = []
        for path in args.tables:
            with open(path) as f:
                records += json.load(f)
        print(table(records))
        print()
        print(policy_table(records, markdown=args.markdown))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1, default=str)
        return 0
    pods = build_pods(args)
    policies = [p.strip() for p in args.remat.split(",") if p.strip()]
    from m3jax.config import Remat

    bad = sorted(set(policies) - set(typing.get_args(Remat)))
    if bad:
        raise SystemExit(f"--remat: unknown policies {bad}; choose from {typing.get_args(Remat)}")
    setup_tpu_env(pods[0].topology)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit("libtpu is not installed: pip install 'libtpu==0.0.42.*' (the version jax 0.10.2's "
                         "`tpu` extra pins) to compile for TPUs on this machine")
    records = []
    for pod in pods:
        for i, policy in enumerate(policies):
            t0 = time.perf_counter()
            def save(partial_rec, done=list(records)):
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(done + [partial_rec], f, indent=1, default=str)

            rec = run_pod(pod, search=not args.no_search, remat=policy, attention=args.attention,
                          train=not args.no_train, decode=not args.no_decode and i == 0,
                          memory_grad=not args.no_memory_grad, assumed_mfu=args.assumed_mfu,
                          grad_accum=args.grad_accum, on_progress=save)
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            if args.out:  # after every compile series: a long run keeps what it has
                with open(args.out, "w") as f:
                    json.dump(records, f, indent=1, default=str)
    print()
    print(table(records))
    print()
    print(policy_table(records, markdown=args.markdown))
    print(f"\nprojection: step time = (model + recompute FLOPs) / (chips x peak x {args.assumed_mfu:.0%} assumed "
          "utilization); "
          "decode = HBM-bandwidth roofline. Memory per chip from compiled.memory_analysis().")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
