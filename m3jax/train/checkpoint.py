"""Orbax checkpoints of a training run: save, restore onto any mesh, read params and metadata.

    checkpoints/<step>/{params, opt_state, data, meta}   Orbax CheckpointManager (async, keep-N)

Checkpoints hold the params, the optimizer state, the step (in `meta`) and the data iterator's
state (`data`, from `get_state()`): a run killed after a checkpoint and started again with the
same arguments resumes exactly (same batches, same updates). They are restored against an
abstract target carrying the shardings of the *current* mesh, so a run may resume on a different
mesh shape (or number of devices). A stage-2 run starts from the params of a stage-1 checkpoint
(`load_params`) with a fresh optimizer; the model configs must agree (`RUNTIME_FIELDS` aside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from m3jax import sharding as S
from m3jax.config import RUNTIME_FIELDS, ConfigError, ModelConfig, TrainConfig
from m3jax.memory.fingerprint import params_fingerprint
from m3jax.model.placement import abstract_params
from m3jax.model.transformer import Params
from m3jax.train.step import TrainState, abstract_state_on, state_shardings

log = logging.getLogger(__name__)

# ModelConfig fields a resumed run may change (the others are those of its checkpoint)
RESUME_FREE_FIELDS = ("name", "max_len")


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


def manager(directory: str, train_cfg: TrainConfig | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager of `directory`: read-only, or writing asynchronously and keeping
    `train_cfg.keep_checkpoints` steps."""
    if read_only:
        opts = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
        opts = ocp.CheckpointManagerOptions(max_to_keep=train_cfg.keep_checkpoints, create=True,
                                            enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=opts)


def config_diff(saved: Mapping[str, Any], model_cfg: ModelConfig, free: Iterable[str] = RUNTIME_FIELDS) -> list[str]:
    """The fields (but `free` ones) in which a saved model config (a dict) differs from `model_cfg`,
    as "field: checkpoint X vs Y" lines."""
    want = model_cfg.to_dict()
    # a field newer than the checkpoint was at its default when it was written (the plain Llama)
    saved = {**ModelConfig().to_dict(), **saved}
    return [f"{k}: checkpoint {saved.get(k)!r} vs {want[k]!r}" for k in want
            if k not in free and saved.get(k) != want[k]]


def _check_model(meta: Mapping[str, Any], model_cfg: ModelConfig, where: str,
                 free: Iterable[str] = RUNTIME_FIELDS) -> None:
    diff = config_diff(meta.get("model_config", {}), model_cfg, free)
    if diff:
        raise ConfigError(f"checkpoint {where} was written by model config "
                          f"{meta.get('model_config', {}).get('name')!r}, which differs from {model_cfg.name!r}: "
                          + "; ".join(diff))


def _step(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    """`step`, checked to exist, or the latest one."""
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (steps: {sorted(steps)})")
    return step


def _meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def read_meta(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The `meta` record of a checkpoint: step, stage, model_config, train_config."""
    directory, s = checkpoint_dir(path)
    with contextlib.closing(manager(directory, read_only=True)) as mngr:
        return _meta(mngr, _step(mngr, directory, step if step is not None else s))


def load_params(path: str | os.PathLike, model_cfg: ModelConfig, mesh=None, *, step: int | None = None) -> Params:
    """The params of a checkpoint (latest step unless `step`), placed on `mesh` (default: all
    devices, fsdp), in `model_cfg.param_dtype`. Raises ConfigError when the checkpoint was
    written by a model of another shape."""
    directory, s = checkpoint_dir(path)
    mesh = mesh if mesh is not None else S.make_mesh()
    with contextlib.closing(manager(directory, read_only=True)) as mngr:
        s = _step(mngr, directory, step if step is not None else s)
        meta = _meta(mngr, s)
        _check_model(meta, model_cfg, f"{directory}/{s}")
        saved_dtype = meta["model_config"].get("param_dtype", model_cfg.param_dtype)
        target = abstract_params(dataclasses.replace(model_cfg, param_dtype=saved_dtype), mesh)
        params = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    if saved_dtype != model_cfg.param_dtype:
        params = jax.tree.map(lambda x: x.astype(model_cfg.param_dtype), params)
    return params


def restore(mngr: ocp.CheckpointManager, step: int, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh,
            where: str, frozen: Params | None = None) -> tuple[TrainState, Any, dict[str, Any]]:
    """(TrainState on `mesh`, data iterator state or None, meta) of checkpoint `step`. `mesh` may
    have any shape: the target carries its shardings. `frozen`: the base weights of a LoRA run
    (checked against the fingerprint the checkpoint recorded). Raises ConfigError on a model,
    stage or LoRA mismatch."""
    meta = _meta(mngr, step)
    _check_model(meta, model_cfg, where, free=RESUME_FREE_FIELDS)
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
        want, got = meta.get("base_fingerprint"), base_fingerprint(frozen)
        if want and got and want != got:
            raise ConfigError(f"checkpoint {where} adapts base weights {want}, but init_params are {got}")
    changed = [k for k, v in dataclasses.asdict(train_cfg).items()
               if k != "mesh" and k in saved_tc and _jsonish(saved_tc[k]) != _jsonish(v)]
    if changed:
        log.warning("resuming %s with changed TrainConfig fields: %s", where,
                    ", ".join(f"{k} {saved_tc[k]!r} -> {getattr(train_cfg, k)!r}" for k in changed))
    target = abstract_state_on(model_cfg, train_cfg, mesh)
    r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target.params),
                                                   opt_state=ocp.args.StandardRestore(target.opt_state),
                                                   data=ocp.args.JsonRestore()))
    opt_state = jax.tree.unflatten(jax.tree.structure(target.opt_state), jax.tree.leaves(r.opt_state))
    shardings = state_shardings(model_cfg, train_cfg, mesh)
    step_arr = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step)
    if frozen is not None:
        frozen = jax.device_put(frozen, shardings.frozen)
    return TrainState(step_arr, r.params, opt_state, frozen), (r.data or {}).get("state"), meta


def save(mngr: ocp.CheckpointManager, state: TrainState, data_state: Any, model_cfg: ModelConfig,
         train_cfg: TrainConfig, base_fingerprint: str | None = None) -> None:
    """Save `state` (asynchronously) with the data iterator's state and the run's metadata."""
    step = int(jax.device_get(state.step))
    meta = {"step": step, "stage": train_cfg.stage, "model_config": model_cfg.to_dict(),
            "train_config": dataclasses.asdict(train_cfg), "time": time.time()}
    if base_fingerprint:
        meta["base_fingerprint"] = base_fingerprint
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                            opt_state=ocp.args.StandardSave(state.opt_state),
                                            data=ocp.args.JsonSave({"state": _json_safe(data_state)}),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def base_fingerprint(params: Params | None) -> str | None:
    """`params_fingerprint` of host-addressable params (None for params spread over hosts)."""
    if params is None or not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params)):
        return None
    return params_fingerprint(params)


def _jsonish(x: Any) -> Any:
    """A config value as JSON gives it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(x, default=str))


def _json_safe(x: Any) -> Any:
    """`x` when JSON can hold it, else None (a data iterator state that cannot be saved)."""
    try:
        json.dumps(x)
        return x
    except TypeError:
        return None
