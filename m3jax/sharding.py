"""Device mesh, the one table of logical axis rules, and sharding helpers.

Every parameter and every important activation carries *logical* axis names (`batch`, `length`,
`embed`, `heads`, ...). `LOGICAL_RULES` maps each name to mesh axes of the 3-axis mesh
`("data", "fsdp", "tensor")`; nothing else in m3jax names a mesh axis.

    data    pure data parallelism: batch only, params replicated (across slices on a TPU pod)
    fsdp    batch *and* parameters: weights are sharded along `embed` and gathered per layer
    tensor  Megatron-style model parallelism: heads / kv_heads / mlp / vocab

Resolution of a logical spec (`logical_to_spec`), dimension by dimension, left to right:
  * each mesh axis of the dimension's rule is kept unless it is already used by an earlier
    dimension of the same array (e.g. activations `("batch", "length", "embed")`: batch takes
    data+fsdp, so embed stays replicated; a mesh axis appears at most once in a PartitionSpec),
  * or the dimension's size is not divisible by the product of the kept axes times this one
    (e.g. 9 heads on tensor=2): the axis is dropped, that dimension is replicated over it, and a
    warning is logged (once per case; DEBUG level for `constrain`, whose activations often have
    legitimately small dims such as batch 1) and appended to `report` when one is given.

Activations are constrained with `constrain(x, axes)` inside jitted code: it reads the mesh set by
`with jax.set_mesh(mesh):` (not the deprecated `with mesh:`) and is a no-op without one, so the
model runs unchanged on one device. Recommended call sites in the model:

    embedding  table = constrain(params["embed"], ("vocab", None)) before `jnp.take`, then
               x = constrain(x, ("batch", "length", "embed")). Gathering straight from the
               (tensor, fsdp)-sharded table yields x sharded over embed, and the move to batch
               sharding is an "involuntary full rematerialization" in XLA's SPMD partitioner
               (seen on the 8 fake CPU devices, forward and backward); this pair removes it.
    x_BTD      constrain(x, ("batch", "length", "embed"))        block (scan body) input and output
    q_BTNH     constrain(q, ("batch", "length", "heads", "head_dim"))
    k/v_BTKH   constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    h_BTF      constrain(h, ("batch", "length", "mlp"))          gated MLP hidden (optional)
    logits     constrain(logits, ("batch", "length", "vocab"))
    memory     whole ChunkMemory at the top of forward/extend: k, v with `MEMORY_AXES`, mask with
               `MEMORY_MASK_AXES` (same layout as `memory_sharding`); per layer in the scan
               constrain(mem_k, ("batch", "chunks", "memories", "kv_heads", "head_dim"))
    KV cache   per layer constrain(ck, ("batch", "kv_heads", "kv_length", "head_dim")) (whole
               cache: `cache_sharding`, `CACHE_AXES`)
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from m3jax.config import MeshConfig, ModelConfig

if TYPE_CHECKING:  # the model imports this module (for `constrain`): import it lazily here
    from m3jax.model.cache import KVCache
    from m3jax.model.memory import ChunkMemory, MemoryKV

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
LogicalAxes = Sequence[str | None]

# The one table. Order inside a rule matters: a dimension takes the axes left to right.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # --- batch-like (activations, data, memory, cache) ---
    ("batch", ("data", "fsdp")),  # B (and N, a batch of stored memories)
    ("length", None),             # T: query / context positions
    ("kv_length", None),          # S: key positions (context keys, KV cache slots, prefix)
    ("chunks", None),             # C: retrieval chunks of the context
    ("memories", None),           # memory tokens: S of a ChunkMemory block, T of a MemoryKV
    ("kv_pair", None),            # the key/value axis (2) of a stored MemoryKV
    # --- parameters (and the activations that share their dimensions) ---
    ("layers", None),             # stacked layers (scanned)
    ("vocab", "tensor"),          # V
    ("embed", "fsdp"),            # D
    ("heads", "tensor"),          # N
    ("kv_heads", "tensor"),       # K
    ("head_dim", None),           # H
    ("mlp", "tensor"),            # F
)


class ShardingError(AssertionError):
    """Parameters are not sharded as much as required (raised by `check_sharded`)."""


# ------------------------------------------------------------------------------------- mesh
def mesh_shape(mesh_config: MeshConfig | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the -1 resolved against `num_devices`; raises ValueError
    when they cannot cover exactly `num_devices` devices."""
    mc = mesh_config if isinstance(mesh_config, MeshConfig) else MeshConfig(*mesh_config)
    sizes = [mc.data, mc.fsdp, mc.tensor]
    desc = f"MeshConfig(data={mc.data}, fsdp={mc.fsdp}, tensor={mc.tensor})"
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{desc} cannot fill {num_devices} devices: {num_devices} is not a multiple "
                             f"of the product of the fixed sizes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"{desc} needs data*fsdp*tensor = {known} devices, but there are {num_devices}; "
                         "set one size to -1 to fill the devices")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_config: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence[Any] | None = None,
              *, axis_types: AxisType = AxisType.Auto) -> Mesh:
    """A `Mesh` over ("data", "fsdp", "tensor") using all of `devices` (default: all devices).

    Axes are `AxisType.Auto` (shardings propagated by the compiler, activations steered by
    `constrain`). On a multi-slice TPU pod the slices are laid along "data" (slow network),
    which must then be a multiple of the number of slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    shape = mesh_shape(mesh_config, len(devices))
    types = (axis_types,) * len(MESH_AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        from jax.experimental import mesh_utils

        n = len(slices)
        if shape[0] % n:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} spans {n} slices: the data axis "
                             f"({shape[0]}) must be a multiple of the number of slices")
        ici = (shape[0] // n, shape[1], shape[2])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (n, 1, 1), devices,
                                                   allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # e.g. tensor=8 on a 4x4x4 TPU torus: a logical axis must split a physical one
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES, axis_types=types)


# ------------------------------------------------------------------------------ distributed
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


# ----------------------------------------------------------------------------- logical rules
_WARNED: set[tuple] = set()


def _rule_table(rules: Iterable[tuple[str, MeshAxes]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return table


def _mesh_sizes(mesh: Any) -> dict[str, int] | None:
    if mesh is None:
        return None
    return dict(mesh.shape)


def logical_to_spec(axes: LogicalAxes, shape: Sequence[int | None] | None = None, mesh: Any = None, *,
                    rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES, label: str = "",
                    report: list | None = None, log_level: int = logging.WARNING) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have the logical names `axes` (None = replicated).

    With `mesh` (a Mesh or AbstractMesh) and `shape`, a mesh axis that does not divide its
    dimension is dropped (that dimension is replicated over it): a warning is logged and a dict
    {label, axis, dim, mesh_axis, mesh_size} appended to `report`. Rule axes absent from `mesh`
    are ignored. A shape entry None skips the divisibility check for that dimension.
    """
    table = _rule_table(rules)
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"{label or 'array'}: {len(axes)} logical axes {axes} for a shape of rank {len(shape)} "
                         f"{tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"{label or 'array'}: unknown logical axis {name!r}; known: {sorted(table)}")
        dim = None if shape is None else shape[i]
        kept: list[str] = []
        prod = 1
        for ax in table[name]:
            if ax in used or (sizes is not None and ax not in sizes):
                continue
            size = 1 if sizes is None else sizes[ax]
            if dim is not None and sizes is not None and dim % (prod * size):
                rec = {"label": label, "axis": name, "dim": int(dim), "mesh_axis": ax, "mesh_size": size}
                if report is not None:
                    report.append(rec)
                key = (label, name, int(dim), ax, size)
                if key not in _WARNED:
                    _WARNED.add(key)
                    split = f" x {prod} already" if prod > 1 else ""
                    logger.log(log_level, "sharding: %s%r of size %d is not divisible by mesh axis %r (size %d%s); "
                                   "replicating it over %r", f"{label} " if label else "", name, dim, ax,
                                   size, split, ax)
                continue
            kept.append(ax)
            used.add(ax)
            prod *= size
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: LogicalAxes, shape: Sequence[int | None] | None = None, *,
                   rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES, label: str = "",
                   report: list | None = None) -> NamedSharding:
    """`NamedSharding` on `mesh` for an array with logical `axes` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules=rules, label=label, report=report))


def current_mesh() -> Any:
    """The mesh set by `jax.set_mesh` (an AbstractMesh inside jit), or None without one."""
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def constrain(x: jax.Array, axes: LogicalAxes, mesh: Any = None, *,
              rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` of `x` to the logical `axes`. Uses `mesh`, else the mesh of the
    enclosing `jax.set_mesh`; a no-op (returns x) when there is neither. On Explicit mesh axes it
    reshards instead (with_sharding_constraint only asserts there)."""
    if mesh is None:
        mesh = current_mesh()
        if mesh is None:
            return x
    # Activations legitimately have small dims (batch 1 of the prefix sink, decode): log at DEBUG.
    spec = logical_to_spec(axes, x.shape, mesh, rules=rules, label="constrain", log_level=logging.DEBUG)
    sharding = NamedSharding(mesh, spec)
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


# ---------------------------------------------------------------------------- params
def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_shardings(config: ModelConfig, mesh: Mesh, *, rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES,
                    report: list | None = None) -> dict[str, Any]:
    """NamedShardings of every parameter (same tree as `init(config, key)`), from `param_axes`.
    Dimensions that a mesh axis does not divide are replicated over it (warned, and listed in
    `report` when given)."""
    from m3jax.model.transformer import param_axes, param_shapes

    shapes = param_shapes(config)
    axes = param_axes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    flat_axes = jax.tree_util.tree_structure(shapes, is_leaf=_is_shape).flatten_up_to(axes)
    out = [named_sharding(mesh, ax, shape, rules=rules, label=jax.tree_util.keystr(path), report=report)
           for (path, shape), ax in zip(flat, flat_axes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(config: ModelConfig, mesh: Mesh | None = None) -> dict[str, Any]:
    """`ShapeDtypeStruct`s of the params (no memory used), with their shardings when `mesh` is
    given: an Orbax restore target, or input to `sharding_report`."""
    from m3jax.model.transformer import init

    abstract = jax.eval_shape(lambda k: init(config, k), jax.random.key(0))
    if mesh is None:
        return abstract
    shardings = param_shardings(config, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def shard_params(params: dict[str, Any], config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Place existing params on `mesh` according to `param_shardings`."""
    from m3jax.model.transformer import check_params

    check_params(params, config)
    return jax.device_put(params, param_shardings(config, mesh))


def init_sharded(config: ModelConfig, key: jax.Array, mesh: Mesh) -> dict[str, Any]:
    """`init(config, key)` computed directly into its shards (never whole on one device)."""
    from m3jax.model.transformer import init

    return jax.jit(lambda k: init(config, k), out_shardings=param_shardings(config, mesh))(key)


# ---------------------------------------------------------------------- data, memory, cache
def batch_sharding(mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of batch-major arrays (tokens [B, T], masks, labels): dim 0 over data x fsdp,
    the rest replicated. With `shape`, a batch not divisible by data*fsdp falls back per axis."""
    if shape is None:
        return named_sharding(mesh, ("batch",))
    return named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, label="batch")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a pytree of batch-major host arrays on `mesh` (`batch_sharding`). With several
    processes each passes its local rows and the global batch is their concatenation."""
    multi = jax.process_count() > 1

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if multi:
            gshape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
            return jax.make_array_from_process_local_data(batch_sharding(mesh, gshape), x, gshape)
        return jax.device_put(x, batch_sharding(mesh, x.shape))

    return jax.tree.map(put, batch)


MEMORY_AXES = ("layers", "batch", "chunks", "memories", "kv_heads", "head_dim")  # ChunkMemory k, v
MEMORY_MASK_AXES = ("batch", "chunks", "memories")
MEMORY_KV_AXES = ("batch", "layers", "kv_pair", "kv_heads", "memories", "head_dim")  # MemoryKV kv
CACHE_AXES = ("batch", "kv_heads", "kv_length", "head_dim")  # KVCache k of one layer [B, K, S, H]
CACHE_V_AXES = ("batch", "kv_heads", "head_dim", "kv_length")  # KVCache v of one layer [B, K, H, S]


def memory_sharding(config: ModelConfig, mesh: Mesh, *, batch: int | None = None, lookback: int = 0,
                    memory: ChunkMemory | None = None) -> ChunkMemory:
    """A `ChunkMemory` of NamedShardings: k/v [Lm, B, C, S, K, H] sharded over batch (data x fsdp)
    and kv_heads (tensor, when divisible); layers, chunks and memory tokens replicated.
    Pass `memory` (arrays or ShapeDtypeStructs) to take the batch size and lookback from it."""
    from m3jax.model.memory import ChunkMemory

    if memory is not None:
        batch, lookback = memory.k_LBCSKH.shape[1], memory.lookback
    kv_shape = (config.memory_layers, batch, None, None, config.num_kv_heads, config.head_dim)
    kv = named_sharding(mesh, MEMORY_AXES, kv_shape, label="memory.k/v")
    mask = named_sharding(mesh, MEMORY_MASK_AXES, (batch, None, None), label="memory.mask")
    return ChunkMemory(kv, kv, mask, lookback)


def shard_memory(memory: ChunkMemory, config: ModelConfig, mesh: Mesh) -> ChunkMemory:
    """Place a `ChunkMemory` on `mesh` (`memory_sharding`)."""
    return jax.device_put(memory, memory_sharding(config, mesh, memory=memory))


def memory_kv_sharding(config: ModelConfig, mesh: Mesh, *, num: int | None = None) -> MemoryKV:
    """A `MemoryKV` of NamedShardings: kv [N, Lm, 2, K, T, H] over N (as batch) and kv_heads; a
    sequence-major N (`ChunkMemory.from_memories`) then stays aligned with the batch shards."""
    from m3jax.model.memory import MemoryKV

    shape = (num, config.memory_layers, 2, config.num_kv_heads, config.tokens_per_memory, config.head_dim)
    kv = named_sharding(mesh, MEMORY_KV_AXES, shape, label="memory_kv")
    mask = named_sharding(mesh, ("batch", "memories"), (num, config.tokens_per_memory), label="memory_kv.mask")
    return MemoryKV(kv, mask)


def cache_sharding(config: ModelConfig, mesh: Mesh, *, batch: int | None = None) -> KVCache:
    """A `KVCache` of NamedShardings: per layer k [B, K, S_max, H] and v [B, K, H, S_max] over batch and kv_heads;
    lengths [B] over batch."""
    from m3jax.model.cache import KVCache
    from m3jax.model.transformer import stack_sizes

    kv = {}
    for name, L in stack_sizes(config).items():
        sk = named_sharding(mesh, CACHE_AXES, (batch, config.num_kv_heads, None, config.head_dim),
                            label=f"cache.{name}")
        sv = named_sharding(mesh, CACHE_V_AXES, (batch, config.num_kv_heads, config.head_dim, None),
                            label=f"cache.{name}")
        kv[name] = tuple((sk, sv) for _ in range(L))
    return KVCache(kv, named_sharding(mesh, ("batch",), (batch,), label="cache.lengths"))


# ------------------------------------------------------------------------------ checks
def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    out: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        out.extend([entry] if isinstance(entry, str) else [a for a in entry if isinstance(a, str)])
    return tuple(out)


def sharding_report(params: Any, *, mesh: Any = None, model_axes: Sequence[str] = ("fsdp", "tensor"),
                    required_axes: Sequence[str] = ("fsdp",), min_size: int = 1 << 16) -> dict[str, Any]:
    """How well a params pytree is sharded. Works on jax.Arrays and on ShapeDtypeStructs carrying
    a `sharding` (e.g. `abstract_params(config, mesh)`); leaves without one count as replicated.

    Returns {mesh, total_bytes, per_device_bytes (bytes one device holds), ideal_per_device_bytes
    (total / product of `model_axes` sizes), fraction (ideal / per_device, 1.0 = perfectly
    sharded), params {name: {shape, dtype, spec, mesh_axes, bytes, per_device_bytes}},
    unsharded [names of params with >= min_size elements not sharded over every `required_axes`
    axis of size > 1]}.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if mesh is None:
        for _, x in leaves:
            s = getattr(x, "sharding", None)
            if isinstance(s, NamedSharding):
                mesh = s.mesh
                break
    sizes = _mesh_sizes(mesh) or {}
    required = [a for a in required_axes if sizes.get(a, 1) > 1]
    table: dict[str, Any] = {}
    unsharded: list[str] = []
    total = per_device = 0
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        shape = tuple(int(d) for d in x.shape)
        itemsize = jnp.dtype(x.dtype).itemsize
        nbytes = math.prod(shape) * itemsize
        s = getattr(x, "sharding", None)
        if s is None:
            shard_shape, spec, axes = shape, None, ()
        else:
            shard_shape = tuple(s.shard_shape(shape))
            spec = s.spec if isinstance(s, NamedSharding) else None
            axes = _spec_axes(spec) if spec is not None else None
        dev_bytes = math.prod(shard_shape) * itemsize
        total += nbytes
        per_device += dev_bytes
        table[name] = {"shape": shape, "dtype": str(jnp.dtype(x.dtype)), "spec": spec, "mesh_axes": axes,
                       "bytes": nbytes, "per_device_bytes": dev_bytes}
        if math.prod(shape) >= min_size:
            if axes is None:  # not a NamedSharding: judge by the shard size alone
                ok = not required or dev_bytes * math.prod(sizes[a] for a in required) <= nbytes
            else:
                ok = all(a in axes for a in required)
            if not ok:
                unsharded.append(name)
    ideal = total / math.prod(sizes.get(a, 1) for a in model_axes)
    return {"mesh": sizes, "total_bytes": total, "per_device_bytes": per_device,
            "ideal_per_device_bytes": ideal, "fraction": (ideal / per_device) if per_device else 1.0,
            "params": table, "unsharded": unsharded}


def check_sharded(params: Any, min_fraction: float = 0.9, *, mesh: Any = None,
                  model_axes: Sequence[str] = ("fsdp", "tensor"), required_axes: Sequence[str] = ("fsdp",),
                  min_size: int = 1 << 16) -> dict[str, Any]:
    """Raise `ShardingError` unless every param of >= `min_size` elements is sharded over the
    `required_axes` (default fsdp) and one device holds at most total / (fsdp * tensor) /
    `min_fraction` bytes. Names the offending params; returns the `sharding_report`."""
    rep = sharding_report(params, mesh=mesh, model_axes=model_axes, required_axes=required_axes,
                          min_size=min_size)
    problems = []
    if rep["unsharded"]:
        problems.append(f"params not sharded over {list(required_axes)}: {rep['unsharded']}")
    if rep["fraction"] < min_fraction:
        worst = sorted(rep["params"].items(), key=lambda kv: -kv[1]["per_device_bytes"])[:5]
        detail = ", ".join(f"{n} {v['shape']} spec={v['spec']} {v['per_device_bytes'] / 2**20:.1f} MiB/device"
                           for n, v in worst)
        problems.append(
            f"one device holds {rep['per_device_bytes'] / 2**20:.1f} MiB of {rep['total_bytes'] / 2**20:.1f} MiB "
            f"params; ideal over {list(model_axes)} of mesh {rep['mesh']} is "
            f"{rep['ideal_per_device_bytes'] / 2**20:.1f} MiB (fraction {rep['fraction']:.3f} < {min_fraction}); "
            f"largest per device: {detail}")
    if problems:
        raise ShardingError("params are not sufficiently sharded: " + "; ".join(problems))
    return rep
