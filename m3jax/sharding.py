"""Device mesh, the one table of logical axis rules, `constrain`, and sharding checks: a leaf
(it imports nothing of m3jax but the config). Where the model's own pytrees go (params, KV cache,
memory) is decided next to the model, in `m3jax.model.placement`; multi-host start-up is
`m3jax.distributed`.

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
    memory     whole ChunkMemory at the top of forward/extend (`ChunkMemory.constrain`: k, v with
               `model.memory.MEMORY_AXES`, mask with `MEMORY_MASK_AXES`, the layout of
               `model.placement.memory_sharding`)
    KV cache   per layer constrain(ck, CACHE_AXES), constrain(cv, CACHE_V_AXES) (both in
               `model.transformer`; whole cache: `model.placement.cache_sharding`)
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from m3jax.config import MeshConfig

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
    ("memories", None),           # M: memory tokens a chunk reads (E of one stored memory)
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


# ---------------------------------------------------------------------------- data
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
    a `sharding` (e.g. `m3jax.model.placement.abstract_params(config, mesh)`); leaves without one
    count as replicated.

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
