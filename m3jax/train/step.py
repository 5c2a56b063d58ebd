"""One training step, for both stages of Memory3 training (MEMORY3.md, "Training: two stages").

Stage "warmup": a plain LM step. Stage "continual": the batch also carries one reference per
`chunk_size`-token chunk of every sequence,

    ref_tokens int32 [B, C, R], ref_mask bool [B, C, R]    (C = ceil(T / chunk_size), R <= reference_len)

(a chunk without a reference has an all-False mask row), or, retrieval style, M references per chunk,

    ref_tokens int32 [B, C, M, R], ref_mask bool [B, C, M, R]

which chunk c reads itself (no lookback), as it reads its M retrieved memories at inference (the
continual recipe for pretrained models, `m3jax.train.recipe`). In the same step the references are
encoded into sparse memories by `m3jax.memory.encode` with the current weights, arranged by
`ChunkMemory.from_memories(mem, B, C, lookback=train_cfg.memory_lookback)` (chunk c reads the
memories of chunks c-lookback..c), and the forward pass reads them. The loss covers only the
training tokens. With `memory_grad=False` the memories are computed outside the differentiated
function (equivalent to `jax.lax.stop_gradient` on them), so the write path costs one forward pass
and no backward pass.

Loss: next-token cross-entropy of `tokens[:, 1:]`, weighted by `loss_mask[:, 1:]` (padding targets
excluded), averaged over the real targets of the (global) batch.

Optimizer (`make_optimizer`): AdamW (weight decay on every parameter except the RMSNorm scales),
warmup-stable-decay learning rate (linear warmup to `lr` over `warmup_steps`, constant `lr`, linear
decay over the last `decay_fraction` of `steps` to `min_lr_ratio * lr`), clipping by global norm.

Mixed precision policy (`ModelConfig.param_dtype`, `ModelConfig.dtype`):
  * `TrainState.params` are kept in `param_dtype` (e.g. bfloat16, the paper's setting); the model
    casts them to `dtype` for its matmuls. Logits, softmax, norms and the loss are float32.
  * When `param_dtype` is narrower than float32, the optimizer keeps an fp32 *master copy* of the
    params (`MasterState.master`) next to the fp32 Adam moments. Gradients (in `param_dtype`) are
    upcast to float32, clipped, and applied to the master copy; the new params are the master
    rounded to `param_dtype`. So small updates are never lost to bf16 rounding, and all optimizer
    state is fp32. With float32 params there is no extra copy (`opt_state` is optax's state).

Partial training (`TrainConfig.lora_rank` > 0): the trained params are a LoRA adapter
(`m3jax.model.lora`) over frozen base weights kept in `TrainState.frozen`; the step runs the
model on the merged weights and differentiates the adapter only (no weight gradients, optimizer
state or master copy for the base). Checkpoints hold the adapter and its optimizer state; the base
comes from the run's `init_params` again on resume.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from m3jax import sharding as S
from m3jax.config import ModelConfig, TrainConfig
from m3jax.memory.encode import encode
from m3jax.model.placement import param_shardings, shard_params
from m3jax.model import ChunkMemory, MemoryKV, check_params, forward, init
from m3jax.model import lora
from m3jax.model.transformer import Params, param_axes

Array = jax.Array

BATCH_KEYS = ("tokens", "loss_mask")
REF_KEYS = ("ref_tokens", "ref_mask")


# ---------------------------------------------------------------------------- state
@struct.dataclass
class MasterState:
    """Optimizer state with an fp32 master copy of low-precision params."""

    master: Params
    inner: Any


@struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer updates done); params: the trained params (the model in
    `param_dtype`, or a LoRA adapter); opt_state: optax's state, or `MasterState` when params are
    narrower than float32; frozen: the base weights under a LoRA adapter (None otherwise)."""

    step: Array
    params: Params
    opt_state: Any
    frozen: Params | None = None


def model_params(state: TrainState, train_cfg: TrainConfig) -> Params:
    """The weights the model runs with: the params, or the base merged with the LoRA adapter."""
    if state.frozen is None:
        return state.params
    return lora.merge(state.frozen, state.params, train_cfg.lora_scale_alpha)


def _needs_master(params: Params) -> bool:
    return any(jnp.dtype(x.dtype) != jnp.float32 for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------ optimizer
def lr_schedule(train_cfg: TrainConfig) -> optax.Schedule:
    """Warmup-stable-decay learning rate of update `s` (0-based):
    `lr * (s + 1) / warmup_steps` during the first `warmup_steps` updates (no wasted update at 0),
    then `lr`, then over the last `round(decay_fraction * steps)` updates a linear decay that
    reaches `min_lr_ratio * lr` at the last update (`s = steps - 1`)."""
    tc = train_cfg
    warm = tc.warmup_steps
    decay = min(int(round(tc.decay_fraction * tc.steps)), tc.steps - warm)
    peak, low = tc.lr, tc.lr * tc.min_lr_ratio
    decay_start = tc.steps - decay

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        lr = jnp.asarray(peak, jnp.float32)
        if warm:
            lr = jnp.where(s < warm, peak * (s + 1) / warm, lr)
        if decay:
            frac = jnp.clip((s - decay_start + 1) / decay, 0.0, 1.0)
            lr = jnp.where(s >= decay_start, peak + (low - peak) * frac, lr)
        return lr

    return schedule


def decay_mask(params: Params) -> Any:
    """True for parameters that get weight decay: every matrix (embeddings, projections, lm head),
    not the RMSNorm scales (names ending in `norm`, also when stacked over layers)."""
    def keep(path, _):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return not str(name).endswith("norm")
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm (`grad_clip`, off when <= 0), then AdamW with the WSD schedule and
    weight decay `weight_decay` on matrices only. Its moments take the dtype of the params it is
    initialized with (fp32: see the module's mixed precision policy)."""
    tc = train_cfg
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=1e-8, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw


def init_state(params: Params, train_cfg: TrainConfig, tx: optax.GradientTransformation | None = None, *,
               model_cfg: ModelConfig | None = None) -> TrainState:
    """A fresh `TrainState` (step 0) around `params` (jittable). With `train_cfg.lora_rank` the
    params become the frozen base of a fresh adapter (keyed by `train_cfg.seed`; needs
    `model_cfg`)."""
    tx = tx or make_optimizer(train_cfg)
    if train_cfg.lora_rank:
        if model_cfg is None:
            raise ValueError("init_state with TrainConfig.lora_rank needs the model_cfg")
        adapter = lora.init(model_cfg, train_cfg.lora_rank, jax.random.key(train_cfg.seed),
                            train_cfg.lora_targets)
        return TrainState(jnp.zeros((), jnp.int32), adapter, tx.init(adapter), params)
    if _needs_master(params):
        master = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        opt_state = MasterState(master, tx.init(master))
    else:
        opt_state = tx.init(params)
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update (see the mixed precision policy)."""
    if isinstance(state.opt_state, MasterState):
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        master = state.opt_state.master
        updates, inner = tx.update(g32, state.opt_state.inner, master)
        master = optax.apply_updates(master, updates)
        params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, state.params)
        opt_state = MasterState(master, inner)
    else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, state.frozen)


# ----------------------------------------------------------------------------- loss
def lm_loss(logits_BTV: Array, tokens_BT: Array, loss_mask_BT: Array) -> tuple[Array, Array]:
    """(mean next-token cross-entropy over real targets, number of real targets). logits are
    those of `forward(tokens)`: position t predicts token t+1."""
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    targets = tokens_BT[:, 1:]
    w = loss_mask_BT[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    n = jnp.sum(w)
    return jnp.sum(ce * w) / jnp.maximum(n, 1.0), n


def encode_references(params: Params, model_cfg: ModelConfig, ref_tokens: Array, ref_mask: Array,
                      lookback: int) -> ChunkMemory:
    """Encode the batch's references with the model's own write path (`m3jax.memory.encode`) and
    arrange them for reading: one per chunk, [B, C, R], chunk c seeing the memories of chunks
    c-lookback..c; or M per chunk, [B, C, M, R], chunk c seeing its own M."""
    B, C = ref_tokens.shape[:2]
    R = ref_tokens.shape[-1]
    mem: MemoryKV = encode(params, model_cfg, ref_tokens.reshape(-1, R), ref_mask.reshape(-1, R))
    return ChunkMemory.from_memories(mem, B, C, lookback=lookback if ref_tokens.ndim == 3 else 0)


def loss_fn(params: Params, batch: Mapping[str, Array], model_cfg: ModelConfig, *,
            memory: ChunkMemory | None = None, lookback: int = 4) -> tuple[Array, dict[str, Array]]:
    """Loss of one batch and aux metrics. With `ref_tokens` in the batch (and no `memory`), the
    references are encoded here from `params`, so gradients flow through the write path. A
    precomputed `memory` is read as is (the step passes one to train without `memory_grad`)."""
    tokens = batch["tokens"]
    if memory is None and "ref_tokens" in batch:
        memory = encode_references(params, model_cfg, batch["ref_tokens"], batch["ref_mask"], lookback)
    logits = forward(params, tokens, model_cfg, memory=memory)  # constrained by the model
    loss, n = lm_loss(logits, tokens, batch["loss_mask"])
    return loss, {"tokens": n}


# ------------------------------------------------------------------------ shardings
def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig) -> TrainState:
    """`ShapeDtypeStruct`s of a fresh `TrainState` (no memory used)."""
    return jax.eval_shape(lambda k: init_state(init(model_cfg, k), train_cfg, model_cfg=model_cfg),
                          jax.random.key(0))


def state_shardings(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh) -> TrainState:
    """NamedShardings of every `TrainState` leaf on `mesh`: params by the logical rules
    (`model.placement.param_shardings`); every optimizer leaf shaped like a param (Adam moments, fp32
    master) like that param; the rest (counters, step) replicated."""
    pshard = param_shardings(model_cfg, mesh)
    abstract = abstract_state(model_cfg, train_cfg)
    frozen = None
    if train_cfg.lora_rank:  # the base is placed like the model's params; the adapter's factors
        frozen = pshard      # are small: sharded over layers only by the same rules
        ashapes = lora.shapes(model_cfg, train_cfg.lora_rank, train_cfg.lora_targets)
        pshard = jax.tree.map(lambda s, ax: NamedSharding(mesh, S.logical_to_spec(ax, s, mesh)), ashapes,
                              lora.axes(ashapes), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))
    by_path = {tuple(_key_names(p)): (s, a.shape) for (p, s), a in
               zip(jax.tree_util.tree_flatten_with_path(pshard)[0], jax.tree.leaves(abstract.params))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        names = _key_names(path)
        for start in range(len(names)):
            hit = by_path.get(tuple(names[start:]))
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    opt = jax.tree_util.tree_map_with_path(pick, abstract.opt_state)
    return TrainState(replicated, pshard, opt, frozen)


def _key_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def abstract_state_on(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh) -> TrainState:
    """`abstract_state` with the shardings of `state_shardings` attached: an Orbax restore target
    that places the restored state on `mesh` (any mesh shape)."""
    shard = state_shardings(model_cfg, train_cfg, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state(model_cfg, train_cfg), shard)


@functools.lru_cache(maxsize=16)
def _state_initializer(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, from_params: bool):
    tx = make_optimizer(train_cfg)
    if from_params:
        make = lambda p: init_state(p, train_cfg, tx, model_cfg=model_cfg)  # noqa: E731
    else:
        make = lambda k: init_state(init(model_cfg, k), train_cfg, tx, model_cfg=model_cfg)  # noqa: E731
    if mesh is None:
        return jax.jit(make)
    return jax.jit(make, out_shardings=state_shardings(model_cfg, train_cfg, mesh))


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig, params: Params | None = None, *,
                 mesh=None, key: Array | None = None) -> TrainState:
    """A fresh `TrainState`: from `params` (placed on `mesh`) or from `init(model_cfg, key)`
    (default key: `train_cfg.seed`), computed directly into its shards when a mesh is given.
    With `train_cfg.lora_rank`, `params` are the frozen base of a fresh adapter (required)."""
    if train_cfg.lora_rank and params is None:
        raise ValueError("LoRA training (TrainConfig.lora_rank > 0) adapts existing weights: give the base "
                         "params (init_params)")
    if params is not None:
        if mesh is not None:
            params = shard_params(params, model_cfg, mesh)  # checks them too
        else:
            check_params(params, model_cfg)
        return _state_initializer(model_cfg, train_cfg, mesh, True)(params)
    key = jax.random.key(train_cfg.seed) if key is None else key
    return _state_initializer(model_cfg, train_cfg, mesh, False)(key)


# ----------------------------------------------------------------------------- step
def check_batch(batch: Mapping[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Raise a clear error when the batch does not fit the stage and the model."""
    for k in BATCH_KEYS:
        if k not in batch:
            raise KeyError(f"training batch has no {k!r} (keys: {sorted(batch)})")
    B, T = batch["tokens"].shape
    if tuple(batch["loss_mask"].shape) != (B, T):
        raise ValueError(f"loss_mask {tuple(batch['loss_mask'].shape)} does not match tokens {(B, T)}")
    if train_cfg.stage != "continual":
        return
    if not model_cfg.memory_enabled:
        raise ValueError(f"stage 'continual' needs a model with memory; config {model_cfg.name!r} has "
                         "reference_prefix=None or memory_layers=0")
    missing = [k for k in REF_KEYS if k not in batch]
    if missing:
        raise KeyError(f"stage 'continual' needs {list(REF_KEYS)} in the batch (one reference per "
                       f"{model_cfg.chunk_size}-token chunk); missing {missing}. Pass a reference_fn to "
                       "the training loop.")
    C = -(-T // model_cfg.chunk_size)
    rs = tuple(batch["ref_tokens"].shape)
    if len(rs) not in (3, 4) or rs[:2] != (B, C) or rs[-1] > model_cfg.reference_len:
        raise ValueError(f"ref_tokens of shape {rs}: expected [{B}, {C}, R<={model_cfg.reference_len}] "
                         f"(batch, chunks of {model_cfg.chunk_size} tokens, reference length) or "
                         f"[{B}, {C}, M, R] (M references per chunk)")
    if tuple(batch["ref_mask"].shape) != rs:
        raise ValueError(f"ref_mask {tuple(batch['ref_mask'].shape)} does not match ref_tokens {rs}")


def step_keys(train_cfg: TrainConfig) -> tuple[str, ...]:
    return BATCH_KEYS + (REF_KEYS if train_cfg.stage == "continual" else ())


def _batch_grads(params: Params, batch: Mapping[str, Array], model_cfg: ModelConfig,
                 train_cfg: TrainConfig, denom: Array, frozen: Params | None = None) -> tuple[Array, Array, Params]:
    """(loss, number of targets, gradient of the loss) of one (micro)batch, its mean target loss
    weighted by its share of the `denom` targets of the whole batch (weight 1 for one pass).
    With `frozen` base weights, `params` is a LoRA adapter over them (its gradient is returned)."""
    tc = train_cfg
    weights = ((lambda p: p) if frozen is None else
               (lambda p: lora.merge(frozen, p, tc.lora_scale_alpha)))
    memory = None
    if tc.stage == "continual" and not tc.memory_grad:
        # The one place `memory_grad` acts: without it the memories are encoded outside the
        # differentiated function (no residuals kept, no backward pass through the write path).
        memory = jax.lax.stop_gradient(
            encode_references(weights(params), model_cfg, batch["ref_tokens"], batch["ref_mask"],
                              tc.memory_lookback))
    inputs = {k: batch[k] for k in BATCH_KEYS}
    if tc.stage == "continual" and memory is None:
        inputs.update({k: batch[k] for k in REF_KEYS})

    def weighted(p):
        loss, aux = loss_fn(weights(p), inputs, model_cfg, memory=memory, lookback=tc.memory_lookback)
        return loss * (aux["tokens"] / denom), aux["tokens"]

    (loss, n), grads = jax.value_and_grad(weighted, has_aux=True)(params)
    return loss, n, grads


def _train_step(state: TrainState, batch: Mapping[str, Array], *, model_cfg: ModelConfig,
                train_cfg: TrainConfig, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """One update on the mean target loss of the whole batch. With `grad_accum` = A > 1 the batch
    is cut into A microbatches (rows a, a + A, a + 2A, ...: every device keeps its own rows); each
    microbatch's loss is weighted by its share of the batch's targets and the gradients are added
    up in float32 in a `lax.scan` (the accumulator sharded like the params): the same update as
    one pass over the batch, with the activations of one microbatch."""
    A = train_cfg.grad_accum
    denom = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32)), 1.0)
    if A == 1:
        loss, n, grads = _batch_grads(state.params, batch, model_cfg, train_cfg, denom, state.frozen)
    else:
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // A, A) + x.shape[1:]), 0, 1), batch)

        def body(carry, mb):
            l, m, g = carry
            l_i, n_i, g_i = _batch_grads(state.params, mb, model_cfg, train_cfg, denom, state.frozen)
            return (l + l_i, m + n_i, jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, g_i)), None

        grad_axes = (param_axes(model_cfg) if state.frozen is None else
                     lora.axes(lora.shapes(model_cfg, train_cfg.lora_rank, train_cfg.lora_targets)))
        zeros = jax.tree.map(lambda p, ax: S.constrain(jnp.zeros(p.shape, jnp.float32), ax),
                             state.params, grad_axes)
        (loss, n, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), micro)
    grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    lr = schedule(state.step)
    new_state = apply_gradients(state, grads, tx)
    metrics = {"loss": loss, "tokens": n, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32)}
    return new_state, metrics


class TrainStep:
    """A jitted training step `step(state, batch) -> (state, metrics)`; the state is donated.

    metrics: loss (mean over real targets), tokens (number of real targets), grad_norm (before
    clipping), lr (the rate used by this update). Host batches (NumPy) are placed on the mesh
    (`sharding.shard_batch`, multi-process aware); keys the stage does not use are dropped.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh=None):
        self.model_cfg, self.train_cfg, self.mesh = model_cfg, train_cfg, mesh
        self.keys = step_keys(train_cfg)
        fn = functools.partial(_train_step, model_cfg=model_cfg, train_cfg=train_cfg,
                               tx=make_optimizer(train_cfg), schedule=lr_schedule(train_cfg))
        if mesh is None:
            self.jitted = jax.jit(fn, donate_argnums=(0,))
            self.batch_divisor = 1
        else:
            self.state_sharding = state_shardings(model_cfg, train_cfg, mesh)
            bsh = S.batch_sharding(mesh)
            replicated = NamedSharding(mesh, PartitionSpec())
            self.jitted = jax.jit(fn, in_shardings=(self.state_sharding, bsh),
                                  out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
            self.batch_divisor = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))

    def prepare(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Check the batch, keep the keys of the stage, and place host arrays on the mesh."""
        check_batch(batch, self.model_cfg, self.train_cfg)
        batch = {k: batch[k] for k in self.keys}
        host = any(not isinstance(v, (jax.Array, jax.ShapeDtypeStruct)) for v in batch.values())
        B = batch["tokens"].shape[0] * (jax.process_count() if host else 1)  # the global batch
        A = self.train_cfg.grad_accum
        if B % A:
            raise ValueError(f"global batch {B} is not divisible by TrainConfig.grad_accum = {A}")
        if (B // A) % self.batch_divisor:
            raise ValueError(f"microbatch {B // A} (global batch {B} / grad_accum {A}) is not divisible by "
                             f"data x fsdp = {self.batch_divisor} of the mesh {dict(self.mesh.shape)}")
        if self.mesh is not None and host:
            batch = S.shard_batch(batch, self.mesh)
        return batch

    def _ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Array]]:
        batch = self.prepare(batch)
        with self._ctx():
            return self.jitted(state, batch)

    def lower(self, state: TrainState, batch: Mapping[str, Any]):
        """`jax.jit(...).lower` of the step (AOT compile, cost analysis)."""
        batch = self.prepare(batch)
        with self._ctx():
            return self.jitted.lower(state, batch)


@functools.lru_cache(maxsize=16)
def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh=None) -> TrainStep:
    """The jitted step of `train_cfg.stage`. With `mesh`: explicit in/out shardings (state by
    `state_shardings`, batch over ("data", "fsdp")); without: one device. State is donated.
    Cached per (configs, mesh), so a resumed or repeated run in one process does not recompile."""
    return TrainStep(model_cfg, train_cfg, mesh)

