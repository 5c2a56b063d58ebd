"""Where the model's own pytrees live on a device mesh: params, KV cache and memory.

Each layout comes from the logical axis names of the pytree (`transformer.param_axes`,
`transformer.CACHE_AXES`, `memory.MEMORY_AXES`) through the one rule table of `m3jax.sharding`.
A dimension that a mesh axis does not divide is replicated over it (warned, and listed in
`report` where a function takes one).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
from jax.sharding import Mesh

from m3jax.config import ModelConfig
from m3jax.model.cache import KVCache
from m3jax.model.memory import MEMORY_AXES, MEMORY_MASK_AXES, ChunkMemory
from m3jax.model.transformer import (CACHE_AXES, CACHE_V_AXES, Params, check_params, init, param_axes,
                                     param_shapes, stack_sizes)
from m3jax.sharding import LOGICAL_RULES, MeshAxes, named_sharding


# ---------------------------------------------------------------------------- params
def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_shardings(config: ModelConfig, mesh: Mesh, *, rules: Iterable[tuple[str, MeshAxes]] = LOGICAL_RULES,
                    report: list | None = None) -> dict[str, Any]:
    """NamedShardings of every parameter (same tree as `init(config, key)`), from `param_axes`."""
    shapes = param_shapes(config)
    axes = param_axes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    flat_axes = jax.tree_util.tree_structure(shapes, is_leaf=_is_shape).flatten_up_to(axes)
    out = [named_sharding(mesh, ax, shape, rules=rules, label=jax.tree_util.keystr(path), report=report)
           for (path, shape), ax in zip(flat, flat_axes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(config: ModelConfig, mesh: Mesh | None = None) -> Params:
    """`ShapeDtypeStruct`s of the params (no memory used), with their shardings when `mesh` is
    given: an Orbax restore target, an AOT compile input, or input to `sharding_report`."""
    abstract = jax.eval_shape(lambda k: init(config, k), jax.random.key(0))
    if mesh is None:
        return abstract
    shardings = param_shardings(config, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """Place existing params on `mesh` according to `param_shardings` (checked against `config`)."""
    check_params(params, config)
    return jax.device_put(params, param_shardings(config, mesh))


def init_sharded(config: ModelConfig, key: jax.Array, mesh: Mesh) -> Params:
    """`init(config, key)` computed directly into its shards (never whole on one device)."""
    return jax.jit(lambda k: init(config, k), out_shardings=param_shardings(config, mesh))(key)


# ---------------------------------------------------------------------- memory, cache
def memory_sharding(config: ModelConfig, mesh: Mesh, *, batch: int | None = None, lookback: int = 0,
                    memory: ChunkMemory | None = None) -> ChunkMemory:
    """A `ChunkMemory` of NamedShardings: k/v [Lm, B, C, M, K, H] sharded over batch (data x fsdp)
    and kv_heads (tensor, when divisible); layers, chunks and memory tokens replicated.
    Pass `memory` (arrays or ShapeDtypeStructs) to take the batch size and lookback from it."""
    if memory is not None:
        batch, lookback = memory.k_LBCMKH.shape[1], memory.lookback
    kv_shape = (config.memory_layers, batch, None, None, config.num_kv_heads, config.head_dim)
    kv = named_sharding(mesh, MEMORY_AXES, kv_shape, label="memory.k/v")
    mask = named_sharding(mesh, MEMORY_MASK_AXES, (batch, None, None), label="memory.mask")
    return ChunkMemory(kv, kv, mask, lookback)


def cache_sharding(config: ModelConfig, mesh: Mesh, *, batch: int | None = None) -> KVCache:
    """A `KVCache` of NamedShardings: per layer k [B, K, S, H] and v [B, K, H, S] over batch and
    kv_heads; lengths [B] over batch."""
    kv = {}
    for name, L in stack_sizes(config).items():
        sk = named_sharding(mesh, CACHE_AXES, (batch, config.num_kv_heads, None, config.head_dim),
                            label=f"cache.{name}")
        sv = named_sharding(mesh, CACHE_V_AXES, (batch, config.num_kv_heads, config.head_dim, None),
                            label=f"cache.{name}")
        kv[name] = tuple((sk, sv) for _ in range(L))
    return KVCache(kv, named_sharding(mesh, ("batch",), (batch,), label="cache.lengths"))
