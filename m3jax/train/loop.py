"""The training loop: both stages, Orbax checkpoints, metrics, progress.

    params = train(model_cfg, TrainConfig(stage="warmup", ...), batches, "runs/stage1")
    params = train(model_cfg, TrainConfig(stage="continual", lr=..., ...), batches, "runs/stage2",
                   init_params="runs/stage1", reference_fn=add_references)

`out_dir` layout:

    checkpoints/<step>/{params, opt_state, data, meta}   Orbax CheckpointManager (async, keep-N)
    config.json                                         model and train configs of the run
    metrics.jsonl                                       one record per step (process 0)
    tb/                                                 TensorBoard event files (tensorboardX)
    loss.png                                            loss curve (matplotlib)

Checkpoints hold the params, the optimizer state, the step (in `meta`) and the data iterator's
state (`data`, from `get_state()`): a run killed after a checkpoint and started again with the
same arguments resumes exactly (same batches, same updates). They are restored against an
abstract target carrying the shardings of the *current* mesh, so a run may resume on a different
mesh shape (or number of devices). A stage-2 run starts from the params of a stage-1 checkpoint
(`init_params=path`) with a fresh optimizer; the model configs must agree.

Throughput: tokens/s counts every position of the batch (B x T) per second of wall time between
log points (the first step, which compiles, is timed separately as `compile_s`). MFU is reported
on accelerators with a known peak (`PEAK_FLOPS`) as model FLOPs/s over the peak of all devices;
model FLOPs per token are `flops_per_token` (dense matmuls, attention, and the in-step memory
writing of the continual stage). On CPU only tokens/s is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ConfigError, ModelConfig, TrainConfig
from m3jax.model.transformer import Params
from m3jax.train.step import (TrainState, abstract_state_on, create_state, make_train_step, model_params,
                              state_shardings)

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

# ModelConfig fields that may differ between a checkpoint and the model restoring it.
_FREE_FIELDS = ("name", "dtype", "param_dtype", "max_len", "remat")


# ---------------------------------------------------------------------------- FLOPs / MFU
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


# ---------------------------------------------------------------------------- checkpoints
def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def checkpoint_dir(path: str | os.PathLike) -> tuple[str, int | None]:
    """(CheckpointManager directory, step or None) of `path`: a run's out_dir, its
    `checkpoints/` directory, or one step directory `checkpoints/<step>`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(base)
    return path, None


def _manager(directory: str, train_cfg: TrainConfig | None = None, read_only: bool = False):
    ocp = _ocp()
    if read_only:
        opts = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        opts = ocp.CheckpointManagerOptions(max_to_keep=train_cfg.keep_checkpoints, create=True,
                                            enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=opts)


def _config_diff(saved: Mapping[str, Any], model_cfg: ModelConfig, free: Iterable[str] = _FREE_FIELDS) -> list[str]:
    want = model_cfg.to_dict()
    # a field newer than the checkpoint was at its default when it was written (the plain Llama)
    saved = {**ModelConfig().to_dict(), **saved}
    return [f"{k}: checkpoint {saved.get(k)!r} vs {want[k]!r}" for k in want
            if k not in free and saved.get(k) != want[k]]


def _check_model(meta: Mapping[str, Any], model_cfg: ModelConfig, where: str,
                 free: Iterable[str] = _FREE_FIELDS) -> None:
    diff = _config_diff(meta.get("model_config", {}), model_cfg, free)
    if diff:
        raise ConfigError(f"checkpoint {where} was written by model config "
                          f"{meta.get('model_config', {}).get('name')!r}, which differs from {model_cfg.name!r}: "
                          + "; ".join(diff))


def _latest(mngr, directory: str, step: int | None) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (steps: {sorted(steps)})")
    return step


def read_meta(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The `meta` record of a checkpoint: step, stage, model_config, train_config."""
    ocp = _ocp()
    directory, s = checkpoint_dir(path)
    with contextlib.closing(_manager(directory, read_only=True)) as mngr:
        s = _latest(mngr, directory, step if step is not None else s)
        return dict(mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def _abstract_params(model_cfg: ModelConfig, mesh, dtype: str | None = None):
    from m3jax import sharding as S

    cfg = dataclasses.replace(model_cfg, param_dtype=dtype) if dtype else model_cfg
    return S.abstract_params(cfg, mesh)


def load_params(path: str | os.PathLike, model_cfg: ModelConfig, mesh=None, *, step: int | None = None) -> Params:
    """The params of a checkpoint (latest step unless `step`), placed on `mesh` (default: all
    devices, fsdp), in `model_cfg.param_dtype`. Raises ConfigError when the checkpoint was
    written by a model of another shape."""
    from m3jax import sharding as S

    ocp = _ocp()
    directory, s = checkpoint_dir(path)
    mesh = mesh if mesh is not None else S.make_mesh()
    with contextlib.closing(_manager(directory, read_only=True)) as mngr:
        s = _latest(mngr, directory, step if step is not None else s)
        meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        _check_model(meta, model_cfg, f"{directory}/{s}")
        saved_dtype = meta["model_config"].get("param_dtype", model_cfg.param_dtype)
        target = _abstract_params(model_cfg, mesh, saved_dtype)
        params = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    if saved_dtype != model_cfg.param_dtype:
        params = jax.tree.map(lambda x: x.astype(model_cfg.param_dtype), params)
    return params


def restore_state(path: str | os.PathLike, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, *,
                  step: int | None = None) -> tuple[TrainState, Any, dict[str, Any]]:
    """(TrainState on `mesh`, data iterator state or None, meta) of a checkpoint. `mesh` may have
    any shape: the target carries its shardings. Raises ConfigError on a model or stage mismatch."""
    ocp = _ocp()
    directory, s = checkpoint_dir(path)
    with contextlib.closing(_manager(directory, read_only=True)) as mngr:
        s = _latest(mngr, directory, step if step is not None else s)
        return _restore(mngr, s, model_cfg, train_cfg, mesh, f"{directory}/{s}")


def _restore(mngr, s: int, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, where: str,
             frozen: Params | None = None):
    ocp = _ocp()
    meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    _check_model(meta, model_cfg, where, free=("name", "max_len"))
    if meta.get("stage") != train_cfg.stage:
        raise ConfigError(f"checkpoint {where} is of stage {meta.get('stage')!r}, not {train_cfg.stage!r}: "
                          "start a new stage in a new out_dir (with init_params=<the previous run>)")
    saved_tc = dict(meta.get("train_config", {}))
    if int(saved_tc.get("lora_rank", 0)) != train_cfg.lora_rank:
        raise ConfigError(f"checkpoint {where} trained lora_rank={saved_tc.get('lora_rank', 0)}, this run "
                          f"lora_rank={train_cfg.lora_rank}: use the same TrainConfig or a new out_dir")
    if train_cfg.lora_rank:
        if frozen is None:
            raise ConfigError(f"checkpoint {where} holds a LoRA adapter: resuming needs its base weights "
                              "(init_params)")
        want, got = meta.get("base_fingerprint"), _fingerprint(frozen)
        if want and got and want != got:
            raise ConfigError(f"checkpoint {where} adapts base weights {want}, but init_params are {got}")
    changed = [k for k, v in _train_dict(train_cfg).items()
               if k != "mesh" and k in saved_tc and _jsonish(saved_tc[k]) != _jsonish(v)]
    if changed:
        log.warning("resuming %s with changed TrainConfig fields: %s", where,
                    ", ".join(f"{k} {saved_tc[k]!r} -> {getattr(train_cfg, k)!r}" for k in changed))
    target = abstract_state_on(model_cfg, train_cfg, mesh)
    r = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target.params),
                                                opt_state=ocp.args.StandardRestore(target.opt_state),
                                                data=ocp.args.JsonRestore()))
    opt_state = jax.tree.unflatten(jax.tree.structure(target.opt_state), jax.tree.leaves(r.opt_state))
    shardings = state_shardings(model_cfg, train_cfg, mesh)
    step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step)
    if frozen is not None:
        frozen = jax.device_put(frozen, shardings.frozen)
    return TrainState(step, r.params, opt_state, frozen), (r.data or {}).get("state"), meta


def _save(mngr, state: TrainState, data_state: Any, model_cfg: ModelConfig, train_cfg: TrainConfig,
          base_fingerprint: str | None = None) -> None:
    ocp = _ocp()
    step = int(jax.device_get(state.step))
    meta = {"step": step, "stage": train_cfg.stage, "model_config": model_cfg.to_dict(),
            "train_config": _train_dict(train_cfg), "time": time.time()}
    if base_fingerprint:
        meta["base_fingerprint"] = base_fingerprint
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                            opt_state=ocp.args.StandardSave(state.opt_state),
                                            data=ocp.args.JsonSave({"state": data_state}),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def _train_dict(train_cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(train_cfg)


def _jsonish(x: Any) -> Any:
    """A config value as JSON gives it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x, default=str))


def _fingerprint(params: Params | None) -> str | None:
    """`params_fingerprint` of host-addressable params (None for params spread over hosts)."""
    if params is None or not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params)):
        return None
    from m3jax.memory.fingerprint import params_fingerprint

    return params_fingerprint(params)


def _json_safe(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return None


# ---------------------------------------------------------------------------- metrics
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
            keep = [line for line in open(self.path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

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
    from matplotlib.figure import Figure  # no pyplot: leaves the session's backend alone (notebooks)

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


# ---------------------------------------------------------------------------- the loop
DataSource = Iterator[Mapping[str, np.ndarray]] | Callable[[], Iterator[Mapping[str, np.ndarray]]]


def _as_iterator(data: DataSource) -> Iterator:
    if hasattr(data, "__next__"):
        return data
    if callable(data):
        it = data()
        return it if hasattr(it, "__next__") else iter(it)
    return iter(data)


def _initial_params(init_params, model_cfg: ModelConfig, mesh) -> Params | None:
    if init_params is None:
        return None
    if isinstance(init_params, (str, os.PathLike)):
        return load_params(init_params, model_cfg, mesh)
    return init_params


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataSource, out_dir: str | os.PathLike, *,
          init_params: Params | str | os.PathLike | None = None,
          reference_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
          mesh=None, resume: bool = True, progress: bool = True, tensorboard: bool = True,
          callback: Callable[[int, dict[str, float]], None] | None = None) -> Params:
    """Train `train_cfg.steps` steps of `train_cfg.stage`; returns the final params (on `mesh`).

    data: an iterator of host batches {"tokens", "loss_mask", ...} (global batch on one host, the
      process-local rows with several), or a callable returning one. Its `get_state()` /
      `set_state()` (grain iterators, `m3jax.train.data.make_iterator`) are checkpointed; an
      iterator without them is fast-forwarded on resume.
    init_params: None (random init, seed `train_cfg.seed`), a params pytree, or a checkpoint path
      (a run's out_dir, e.g. the stage-1 run for stage 2): its params, a fresh optimizer.
      Ignored when `out_dir` already holds a checkpoint of this run (resume wins), except under
      LoRA (`train_cfg.lora_rank`), where they are the frozen base (required, also on resume,
      and checked against the fingerprint the checkpoint recorded). The returned params are then
      the base merged with the adapter, and `out_dir/adapter.safetensors` holds the adapter.
    reference_fn: for stage "continual", a host callable adding `ref_tokens [B, C, R]` and
      `ref_mask [B, C, R]` to a batch (one reference per chunk; all-False mask = none).
    mesh: default `sharding.make_mesh(train_cfg.mesh)` over all devices.
    resume: continue from the latest checkpoint in `out_dir`; with False, an `out_dir` that
      already holds checkpoints is an error (use a new one).
    callback: called on process 0 as `callback(step, record)` for every logged step record.
    """
    from m3jax import sharding as S

    tc = train_cfg
    if tc.stage == "continual" and not model_cfg.memory_enabled:
        raise ConfigError(f"stage 'continual' needs a model with memory; {model_cfg.name!r} has none")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    mesh = mesh if mesh is not None else S.make_mesh(tc.mesh)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mngr = _manager(ckpt_dir, tc)
    it = _as_iterator(data)
    writer = None
    try:
        start = None
        data_state = None
        if not resume and mngr.latest_step() is not None:
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints (steps {sorted(mngr.all_steps())}); "
                                  "pass resume=True to continue that run, or use a new out_dir")
        base, base_fp = None, None
        if tc.lora_rank:
            if init_params is None:
                raise ConfigError("LoRA training (TrainConfig.lora_rank > 0) needs init_params: the base weights")
            base = _initial_params(init_params, model_cfg, mesh)
            base_fp = _fingerprint(jax.device_get(base) if jax.process_count() == 1 else base)
        if resume and mngr.latest_step() is not None:
            s = mngr.latest_step()
            state, data_state, _ = _restore(mngr, s, model_cfg, tc, mesh, f"{ckpt_dir}/{s}", frozen=base)
            start = int(jax.device_get(state.step))
            log.info("resuming %s from step %d of %s", tc.stage, start, ckpt_dir)
            if init_params is not None and base is None:
                log.info("init_params ignored: resuming from %s", ckpt_dir)
            if data_state is not None and hasattr(it, "set_state"):
                it.set_state(data_state)
            else:
                if data_state is not None:
                    log.warning("the data iterator has no set_state: fast-forwarding %d batches", start)
                for _ in range(start):
                    next(it)
        else:
            params = base if base is not None else _initial_params(init_params, model_cfg, mesh)
            state = create_state(model_cfg, tc, params, mesh=mesh)
            start = 0
        if jax.process_index() == 0:
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump({"model_config": model_cfg.to_dict(), "train_config": _train_dict(tc),
                           "mesh": dict(mesh.shape), "devices": [str(d) for d in jax.devices()]}, f, indent=1)
        writer = MetricsWriter(out_dir, resume_step=start if start else None, tensorboard=tensorboard)
        state = _run(state, start, model_cfg, tc, it, mesh, mngr, writer, reference_fn, progress, callback,
                     base_fp)
        mngr.wait_until_finished()
        writer.plot(title=f"{model_cfg.name} {tc.stage}")
        if state.frozen is None:
            return state.params
        if jax.process_index() == 0:
            from m3jax.convert import save_adapter

            save_adapter(os.path.join(out_dir, "adapter.safetensors"), jax.device_get(state.params), tc,
                         base_fingerprint=base_fp)
        return jax.jit(model_params, static_argnums=1)(state, tc)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        if writer is not None:
            writer.close()


def _run(state: TrainState, start: int, model_cfg: ModelConfig, tc: TrainConfig, it, mesh, mngr,
         writer: MetricsWriter, reference_fn, progress: bool, callback, base_fp: str | None = None) -> TrainState:
    from tqdm.auto import tqdm

    step_fn = make_train_step(model_cfg, tc, mesh)
    peak = peak_flops()
    n_dev = jax.device_count()
    fpt = None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_saved = start
    t_mark, steps_mark = None, 0
    compile_s = None
    tokens_per_step = None
    bar = tqdm(total=tc.steps, initial=start, desc=tc.stage, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    step = start
    try:
        while step < tc.steps:
            try:
                batch = next(it)
            except StopIteration:
                log.warning("data ran out after %d steps (of %d)", step, tc.steps)
                break
            batch = dict(batch)
            if reference_fn is not None:
                batch = dict(reference_fn(batch))
            B, T = np.shape(batch["tokens"])
            B *= jax.process_count() if not isinstance(batch["tokens"], jax.Array) else 1
            tokens_per_step = B * T
            if fpt is None:
                fpt = flops_per_token(model_cfg, T, stage=tc.stage, memory_grad=tc.memory_grad,
                                      lookback=tc.memory_lookback)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            if compile_s is None:  # the first step compiles: time it alone
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - t0
                t_mark, steps_mark = time.perf_counter(), 0
            else:
                steps_mark += 1
            save_now = step % tc.checkpoint_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or save_now or step == start + 1:
                records = jax.device_get([m for _, m in pending])
                now = time.perf_counter()
                rate = None
                if steps_mark:
                    dt = (now - t_mark) / steps_mark
                    rate = tokens_per_step / dt
                out = []
                for (s, _), m in zip(pending, records):
                    r = {"step": s, "stage": tc.stage, **{k: float(v) for k, v in m.items()}}
                    if s == start + 1:
                        r["compile_s"] = compile_s
                    if rate is not None:
                        r["tokens_per_s"] = rate
                        r["step_time_s"] = tokens_per_step / rate
                        if peak is not None:
                            r["mfu"] = fpt * rate / (peak * n_dev)
                    out.append(r)
                writer.write(out)
                if callback is not None and jax.process_index() == 0:
                    for r in out:
                        callback(r["step"], r)
                last = out[-1]
                post = {"loss": f"{last['loss']:.4f}"}
                if rate is not None:
                    post["tok/s"] = f"{rate:,.0f}"
                    if "mfu" in last:
                        post["mfu"] = f"{last['mfu']:.1%}"
                bar.set_postfix(post, refresh=False)
                pending = []
                if steps_mark:
                    t_mark, steps_mark = time.perf_counter(), 0
            bar.update(1)
            if save_now:
                # The iterator state after this step's batch: a resume reads the next batch.
                data_state = _json_safe(it.get_state()) if hasattr(it, "get_state") else None
                _save(mngr, state, data_state, model_cfg, tc, base_fp)
                last_saved = step
                t_mark = time.perf_counter()  # do not count the (blocking part of the) save
        if step > last_saved:  # data ran out: save what was done
            data_state = _json_safe(it.get_state()) if hasattr(it, "get_state") else None
            if pending:
                records = jax.device_get([m for _, m in pending])
                writer.write([{"step": s, "stage": tc.stage, **{k: float(v) for k, v in m.items()}}
                              for (s, _), m in zip(pending, records)])
            _save(mngr, state, data_state, model_cfg, tc, base_fp)
    finally:
        bar.close()
    return state
