"""Multi-host start-up: detect a launch on several hosts and join them with `jax.distributed`.

Call `maybe_initialize_distributed()` first thing in a process, before any JAX computation (the
`m3jax train` command does). On one host it does nothing, so the same script runs on a laptop, a
single TPU VM and a pod slice.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def detect_multihost(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process looks like one of several (a short reason), or None on a single host.

    Recognized: explicit `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES` > 1 when set),
    SLURM with more than one task, Open MPI with more than one rank, TPU pods / GKE
    (`TPU_PROCESS_ADDRESSES` / `TPU_WORKER_HOSTNAMES` with several hosts, `MEGASCALE_*`).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        n = _int_env(env, "JAX_NUM_PROCESSES")
        if n is None or n > 1:
            return "JAX_COORDINATOR_ADDRESS"
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")) and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 2) > 1:
        return "Open MPI"
    for k in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(k, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return k
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") and (_int_env(env, "MEGASCALE_NUM_SLICES") or 2) > 1:
        return "MEGASCALE"
    return None


def maybe_initialize_distributed(force: bool | None = None, **kwargs: Any) -> bool:
    """Call `jax.distributed.initialize()` when launched on several hosts; no-op on one host.

    Call it first thing, before any JAX computation. Idempotent: returns True when the
    distributed runtime is (now) initialized, False on a single host. `force` (or env
    `M3JAX_DISTRIBUTED=1|0`) overrides detection, e.g. on a GCE multi-host TPU VM whose hosts are
    only discoverable through the metadata server (which `jax.distributed.initialize()` queries).
    `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` fill `num_processes` / `process_id`; other kwargs go to
    `jax.distributed.initialize`.
    """
    if jax.distributed.is_initialized():
        return True
    if force is None:
        flag = os.environ.get("M3JAX_DISTRIBUTED", "").strip().lower()
        if flag in _TRUE:
            force = True
        elif flag in _FALSE:
            force = False
    reason = "forced" if force else (None if force is False else detect_multihost())
    if reason is None:
        return False
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and _int_env(os.environ, env) is not None:
            kwargs[key] = _int_env(os.environ, env)
    logger.info("initializing jax.distributed (%s)", reason)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({reason} detected): {e}. "
                           "Call maybe_initialize_distributed() before any JAX computation.") from e
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
