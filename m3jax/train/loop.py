"""The training loop: both stages, with checkpoints (`m3jax.train.checkpoint`), metrics and
progress (`m3jax.train.metrics`).

    params = train(model_cfg, TrainConfig(stage="warmup", ...), batches, "runs/stage1")
    params = train(model_cfg, TrainConfig(stage="continual", lr=..., ...), batches, "runs/stage2",
                   init_params="runs/stage1", reference_fn=add_references)

`out_dir` layout:

    checkpoints/<step>/{params, opt_state, data, meta}   Orbax CheckpointManager (async, keep-N)
    config.json                                         model and train configs of the run
    metrics.jsonl                                       one record per step (process 0)
    tb/                                                 TensorBoard event files (tensorboardX)
    loss.png                                            loss curve (matplotlib)

A run killed after a checkpoint and started again with the same arguments resumes exactly (same
batches, same updates), on any mesh shape. A stage-2 run starts from the params of a stage-1
checkpoint (`init_params=path`) with a fresh optimizer; the model configs must agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from m3jax import sharding as S
from m3jax.config import ConfigError, ModelConfig, TrainConfig
from m3jax.convert import save_adapter
from m3jax.model.transformer import Params
from m3jax.train import checkpoint as ckpt
from m3jax.train.checkpoint import load_params, read_meta  # noqa: F401 - re-exported: their former home
from m3jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from m3jax.train.step import TrainState, create_state, make_train_step, model_params

log = logging.getLogger(__name__)

DataSource = Iterator[Mapping[str, np.ndarray]] | Callable[[], Iterator[Mapping[str, np.ndarray]]]
ReferenceFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Callback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What one `train` call fixes for its step loop."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    mesh: Any
    manager: Any  # the run's orbax CheckpointManager
    writer: MetricsWriter
    reference_fn: ReferenceFn | None = None
    callback: Callback | None = None
    base_fingerprint: str | None = None  # of the frozen base weights of a LoRA run
    progress: bool = True


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
          init_params: Params | str | os.PathLike | None = None, reference_fn: ReferenceFn | None = None,
          mesh=None, resume: bool = True, progress: bool = True, tensorboard: bool = True,
          callback: Callback | None = None) -> Params:
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
    tc = train_cfg
    if tc.stage == "continual" and not model_cfg.memory_enabled:
        raise ConfigError(f"stage 'continual' needs a model with memory; {model_cfg.name!r} has none")
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    mesh = mesh if mesh is not None else S.make_mesh(tc.mesh)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mngr = ckpt.manager(ckpt_dir, tc)
    it = _as_iterator(data)
    writer = None
    try:
        if not resume and mngr.latest_step() is not None:
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints (steps {sorted(mngr.all_steps())}); "
                                  "pass resume=True to continue that run, or use a new out_dir")
        base, base_fp = None, None
        if tc.lora_rank:
            if init_params is None:
                raise ConfigError("LoRA training (TrainConfig.lora_rank > 0) needs init_params: the base weights")
            base = _initial_params(init_params, model_cfg, mesh)
            base_fp = ckpt.base_fingerprint(jax.device_get(base) if jax.process_count() == 1 else base)
        if resume and mngr.latest_step() is not None:
            state, start = _resume(mngr, ckpt_dir, model_cfg, tc, mesh, it, base, init_params)
        else:
            params = base if base is not None else _initial_params(init_params, model_cfg, mesh)
            state, start = create_state(model_cfg, tc, params, mesh=mesh), 0
        if jax.process_index() == 0:
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump({"model_config": model_cfg.to_dict(), "train_config": dataclasses.asdict(tc),
                           "mesh": dict(mesh.shape), "devices": [str(d) for d in jax.devices()]}, f, indent=1)
        writer = MetricsWriter(out_dir, resume_step=start if start else None, tensorboard=tensorboard)
        setup = RunSetup(model_cfg, tc, mesh, mngr, writer, reference_fn, callback, base_fp, progress)
        state = _run(state, start, it, setup)
        mngr.wait_until_finished()
        writer.plot(title=f"{model_cfg.name} {tc.stage}")
        if state.frozen is None:
            return state.params
        if jax.process_index() == 0:
            save_adapter(os.path.join(out_dir, "adapter.safetensors"), jax.device_get(state.params), tc,
                         base_fingerprint=base_fp)
        return jax.jit(model_params, static_argnums=1)(state, tc)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        if writer is not None:
            writer.close()


def _resume(mngr, ckpt_dir: str, model_cfg: ModelConfig, tc: TrainConfig, mesh, it, base: Params | None,
            init_params) -> tuple[TrainState, int]:
    """The state of the latest checkpoint and its step; the data iterator is brought to it."""
    s = mngr.latest_step()
    state, data_state, _ = ckpt.restore(mngr, s, model_cfg, tc, mesh, f"{ckpt_dir}/{s}", frozen=base)
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
    return state, start


class _StepLog:
    """Step metrics between log points: their records, throughput (tokens/s over the steps since
    the last log point; the first step, which compiles, is timed alone as `compile_s`) and MFU."""

    def __init__(self, setup: RunSetup, start: int):
        self.stage, self.start = setup.train_cfg.stage, start
        self.peak, self.n_dev = peak_flops(), jax.device_count()
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.compile_s: float | None = None
        self.t_mark, self.steps_mark = 0.0, 0
        self.tokens_per_step = 0
        self.fpt: float | None = None

    def before(self, batch: Mapping[str, Any], setup: RunSetup) -> float:
        """Note the batch's size; returns the step's start time."""
        B, T = np.shape(batch["tokens"])
        B *= jax.process_count() if not isinstance(batch["tokens"], jax.Array) else 1
        self.tokens_per_step = B * T
        if self.fpt is None:
            tc = setup.train_cfg
            self.fpt = flops_per_token(setup.model_cfg, T, stage=tc.stage, memory_grad=tc.memory_grad,
                                       lookback=tc.memory_lookback)
        return time.perf_counter()

    def after(self, step: int, metrics: dict[str, jax.Array], t0: float) -> None:
        self.pending.append((step, metrics))
        if self.compile_s is None:  # the first step compiles: time it alone
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - t0
            self.restart_clock()
        else:
            self.steps_mark += 1

    def restart_clock(self) -> None:
        """Throughput is measured from now (after a compile or the blocking part of a save)."""
        self.t_mark, self.steps_mark = time.perf_counter(), 0

    def records(self, timed: bool = True) -> list[dict[str, Any]]:
        """The pending steps' records (fetched from the device), with throughput when `timed`."""
        values = jax.device_get([m for _, m in self.pending])
        rate = None
        if timed and self.steps_mark:
            rate = self.tokens_per_step / ((time.perf_counter() - self.t_mark) / self.steps_mark)
        out = []
        for (s, _), m in zip(self.pending, values):
            r = {"step": s, "stage": self.stage, **{k: float(v) for k, v in m.items()}}
            if timed and s == self.start + 1:
                r["compile_s"] = self.compile_s
            if rate is not None:
                r["tokens_per_s"] = rate
                r["step_time_s"] = self.tokens_per_step / rate
                if self.peak is not None:
                    r["mfu"] = self.fpt * rate / (self.peak * self.n_dev)
            out.append(r)
        self.pending = []
        if timed and self.steps_mark:
            self.restart_clock()
        return out


def _postfix(r: dict[str, Any]) -> dict[str, str]:
    """The progress bar's view of a step record."""
    post = {"loss": f"{r['loss']:.4f}"}
    if "tokens_per_s" in r:
        post["tok/s"] = f"{r['tokens_per_s']:,.0f}"
        if "mfu" in r:
            post["mfu"] = f"{r['mfu']:.1%}"
    return post


def _save(setup: RunSetup, state: TrainState, it) -> None:
    """Checkpoint `state` with the data iterator's state after its last batch (a resume reads the
    next batch)."""
    data_state = it.get_state() if hasattr(it, "get_state") else None
    ckpt.save(setup.manager, state, data_state, setup.model_cfg, setup.train_cfg, setup.base_fingerprint)


def _run(state: TrainState, start: int, it, setup: RunSetup) -> TrainState:
    """Steps `start + 1 .. train_cfg.steps` (fewer when the data runs out): log, checkpoint."""
    tc = setup.train_cfg
    step_fn = make_train_step(setup.model_cfg, tc, setup.mesh)
    steps = _StepLog(setup, start)
    last_saved = step = start
    bar = tqdm(total=tc.steps, initial=start, desc=tc.stage, dynamic_ncols=True,
               disable=not setup.progress or jax.process_index() != 0)
    try:
        while step < tc.steps:
            try:
                batch = dict(next(it))
            except StopIteration:
                log.warning("data ran out after %d steps (of %d)", step, tc.steps)
                break
            if setup.reference_fn is not None:
                batch = dict(setup.reference_fn(batch))
            t0 = steps.before(batch, setup)
            state, metrics = step_fn(state, batch)
            step += 1
            steps.after(step, metrics, t0)
            save_now = step % tc.checkpoint_every == 0 or step == tc.steps
            if step % tc.log_every == 0 or save_now or step == start + 1:
                out = steps.records()
                setup.writer.write(out)
                if setup.callback is not None and jax.process_index() == 0:
                    for r in out:
                        setup.callback(r["step"], r)
                bar.set_postfix(_postfix(out[-1]), refresh=False)
            bar.update(1)
            if save_now:
                _save(setup, state, it)
                last_saved = step
                steps.restart_clock()  # do not count the (blocking part of the) save
        if step > last_saved:  # data ran out: save what was done
            if steps.pending:
                setup.writer.write(steps.records(timed=False))
            _save(setup, state, it)
    finally:
        bar.close()
    return state
