"""Low-rank adapters (LoRA) over the stacked decoder weights: a cheap trainable part of a model.

A LoRA pytree holds, for each adapted matrix `W` (a stacked parameter of `mem_blocks` or
`blocks`), two factors over its layers,

    a [L, I, r]   (initialised N(0, 1/I))      b [L, r, O]   (initialised to zero)

where `I` and `O` are `W`'s input and output sizes with the head axes flattened (wq [L, D, N, H]
is a [D, N*H] matrix per layer, wo [L, N, H, D] a [N*H, D] one). The adapted weight is

    W' = W + (alpha / r) * a @ b

so a fresh adapter changes nothing. `merge` folds an adapter into a params pytree: the result is
an ordinary params pytree of the same config (memories written with it belong to it, like any
other weights). Only the factors are trained (`TrainConfig.lora_rank`); they are what ships
(`m3jax.convert.save_adapter`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from m3jax.config import ModelConfig
from m3jax.model.transformer import Params, param_shapes, stack_sizes

Array = jax.Array
TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _matrix(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(inputs, outputs) of a stacked weight viewed as one matrix per layer."""
    if name in ("wq", "wk", "wv", "w_gate", "w_up", "w_down"):
        return shape[1], math.prod(shape[2:])
    if name == "wo":
        return shape[1] * shape[2], shape[3]
    raise ValueError(f"LoRA cannot adapt parameter {name!r}; choose from {TARGETS}")


def selected(config: ModelConfig, targets: Sequence[str]) -> list[tuple[str, str]]:
    """The (stack, name) pairs that `targets` adapt. A target is a parameter name (`wq`: every
    stack) or `stack/name` (`mem_blocks/wq`: the memory layers only)."""
    shapes = param_shapes(config)
    out = []
    for t in targets:
        stack, _, name = t.rpartition("/")
        stacks = [stack] if stack else list(stack_sizes(config))
        if name not in TARGETS:
            raise ValueError(f"LoRA target {t!r}: {name!r} is not one of {TARGETS}")
        for s in stacks:
            if s not in shapes:
                if stack:
                    raise ValueError(f"LoRA target {t!r}: config {config.name!r} has no stack {s!r}")
                continue
            if (s, name) not in out:
                out.append((s, name))
    if not out:
        raise ValueError(f"LoRA targets {tuple(targets)} select no parameter of config {config.name!r}")
    return out


def shapes(config: ModelConfig, rank: int, targets: Sequence[str] = TARGETS) -> dict[str, Any]:
    """{stack: {name: {"a": (L, I, r), "b": (L, r, O)}}} of an adapter."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    full = param_shapes(config)
    out: dict[str, Any] = {}
    for stack, name in selected(config, targets):
        s = full[stack][name]
        i, o = _matrix(name, s)
        out.setdefault(stack, {})[name] = {"a": (s[0], i, rank), "b": (s[0], rank, o)}
    return out


def init(config: ModelConfig, rank: int, key: Array, targets: Sequence[str] = TARGETS,
         dtype: Any = jnp.float32) -> Params:
    """A fresh adapter: `a` ~ N(0, 1/I), `b` = 0 (the adapted model equals the base)."""
    tree = shapes(config, rank, targets)
    out: dict[str, Any] = {}
    for stack, names in tree.items():
        for name, s in names.items():
            key, sub = jax.random.split(key)
            a = jax.random.normal(sub, s["a"], jnp.float32) / math.sqrt(s["a"][1])
            out.setdefault(stack, {})[name] = {"a": a.astype(dtype), "b": jnp.zeros(s["b"], dtype)}
    return out


def rank_of(adapter: Params) -> int:
    leaf = next(iter(next(iter(adapter.values())).values()))
    return int(leaf["a"].shape[-1])


def merge(params: Params, adapter: Params, alpha: float) -> Params:
    """`params` with every adapted weight replaced by W + (alpha / r) a @ b (in W's dtype)."""
    scale = alpha / rank_of(adapter)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    for stack, names in adapter.items():
        for name, ab in names.items():
            w = params[stack][name]
            d = jnp.einsum("LIR,LRO->LIO", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
            out[stack][name] = (w.astype(jnp.float32) + scale * d.reshape(w.shape)).astype(w.dtype)
    return out


def axes(adapter_shapes: dict[str, Any]) -> dict[str, Any]:
    """Logical axes of an adapter (same tree): layers, then replicated factors (they are small)."""
    return jax.tree.map(lambda s: ("layers", None, None), adapter_shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
