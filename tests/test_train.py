"""Training: sharded == unsharded steps, both stages, memory_grad, checkpoints and resume.

Compiles are the cost here (2 shared CPU cores): every test reuses the few cached steps built from
the two configs below (`make_train_step` is cached per (configs, mesh)).
"""

import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import model as M
from m3jax import sharding as S
from m3jax.config import ConfigError, MeshConfig, TrainConfig, preset
from m3jax.memory.encode import encode
from m3jax.model import placement as PL
from m3jax.train import checkpoint as CK
from m3jax.train import loop as L
from m3jax.train import metrics as MT
from m3jax.train import step as ST

CFG = preset("tiny")
B, T = 8, 64
C, R = T // CFG.chunk_size, CFG.reference_len
WARM = TrainConfig(stage="warmup", seq_len=T, batch_size=B, steps=30, lr=1e-2, warmup_steps=3, decay_fraction=0.2,
                   checkpoint_every=10, keep_checkpoints=2, log_every=5, mesh=MeshConfig(1, 1, 1))
CONT = dataclasses.replace(WARM, stage="continual", lr=5e-3)


def _one_device_mesh():
    return S.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


# ------------------------------------------------------------------------------- data
POOL = np.random.default_rng(0).integers(7, CFG.vocab_size, (16, T)).astype(np.int32)


ROWS = {"tokens": POOL.copy(), "loss_mask": np.ones(POOL.shape, bool), "doc_ids": np.zeros(POOL.shape, np.int32)}
ROWS["tokens"][:, 0] = CFG.bos_id
for _r, _n in ((3, 9), (11, 20)):  # two rows end in padding
    ROWS["tokens"][_r, T - _n:] = CFG.pad_id
    ROWS["loss_mask"][_r, T - _n:] = False
    ROWS["doc_ids"][_r, T - _n:] = -1


class Batches:
    """The iterator `m3jax.train.data.make_iterator` builds (grain, checkpointable state), over a
    small pool of rows (memorizable: the loss must fall), reshuffled every epoch. `fail_at=i`
    raises instead of yielding batch i (a crash)."""

    def __init__(self, seed=0, fail_at=None):
        import grain

        from m3jax.train.data import rows_dataset

        ds = rows_dataset(ROWS, batch_size=B, shuffle=True, seed=seed)
        self.it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
        self.n, self.fail_at = 0, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == self.fail_at:
            raise RuntimeError("simulated crash")
        self.n += 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def add_references(batch, empty=False):
    """One reference per chunk: the text of the *next* chunk of the same row (none for the last
    chunk, and every reference shorter than R); all-empty with `empty`."""
    tokens = np.asarray(batch["tokens"])
    ref = np.full((B, C, R), CFG.pad_id, np.int32)
    mask = np.zeros((B, C, R), bool)
    if not empty:
        cs = CFG.chunk_size
        for c in range(C - 1):
            ref[:, c, :cs] = tokens[:, (c + 1) * cs:(c + 2) * cs]
            mask[:, c, :cs] = True
    return {**batch, "ref_tokens": ref, "ref_mask": mask}


def _fresh(tc, mesh=None):
    return ST.create_state(CFG, tc, mesh=mesh, key=jax.random.key(7))


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _mu(state):
    """Adam's first moment after one update: (1 - b1) * the (clipped) gradient."""
    return _np(state.opt_state[1][0].mu)


def _close(a, b, atol=1e-6, rtol=1e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------ optimizer
def test_schedule_and_decay_mask():
    f = ST.lr_schedule(TrainConfig(steps=20, warmup_steps=4, decay_fraction=0.25, lr=1.0, min_lr_ratio=0.1))
    lrs = [float(f(i)) for i in range(20)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0])
    assert lrs[4:15] == [1.0] * 11
    np.testing.assert_allclose(lrs[15:], [0.82, 0.64, 0.46, 0.28, 0.1], atol=1e-6)
    mask = ST.decay_mask(jax.eval_shape(lambda k: M.init(CFG, k), jax.random.key(0)))
    assert mask["embed"] and mask["lm_head"] and mask["blocks"]["wq"] and mask["mem_blocks"]["w_down"]
    assert not mask["final_norm"] and not mask["blocks"]["attn_norm"] and not mask["mem_blocks"]["mlp_norm"]


def test_lm_loss_excludes_padding():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    tokens = jnp.array([[1, 2, 3, 4, 5], [1, 6, 7, 0, 0]])
    mask = tokens != 0
    loss, n = ST.lm_loss(logits, tokens, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    want = (nll[0].sum() + nll[1, :2].sum()) / 6
    assert float(n) == 6
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_bf16_params_keep_fp32_master_and_moments():
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")
    st = jax.eval_shape(lambda k: ST.init_state(M.init(cfg, k), WARM), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(st.params)} == {jnp.dtype(jnp.bfloat16)}
    assert isinstance(st.opt_state, ST.MasterState)
    float_leaves = [x for x in jax.tree.leaves(st.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in float_leaves} == {jnp.dtype(jnp.float32)}
    mesh = S.make_mesh(MeshConfig(2, 2, 2))
    shard = ST.state_shardings(cfg, WARM, mesh)
    want = PL.param_shardings(cfg, mesh)["blocks"]["wq"].spec
    assert shard.opt_state.master["blocks"]["wq"].spec == want
    assert shard.opt_state.inner[1][0].nu["blocks"]["wq"].spec == want


# ------------------------------------------------------------------------ steps
def test_sharded_step_matches_unsharded():
    """Continual step (LM + in-step memory writing) on (2 data x 2 fsdp x 2 tensor) == one device:
    loss, grad norm, gradients (Adam's first moment) and updated params."""
    mesh = S.make_mesh(MeshConfig(2, 2, 2))
    batch = add_references(Batches(seed=1).__next__())
    s1, m1 = ST.make_train_step(CFG, CONT, _one_device_mesh())(_fresh(CONT, _one_device_mesh()), batch)
    s8, m8 = ST.make_train_step(CFG, CONT, mesh)(_fresh(CONT, mesh), batch)
    assert len(s8.params["mem_blocks"]["wq"].sharding.device_set) == 8
    assert s8.params["mem_blocks"]["wq"].sharding.spec == PL.param_shardings(CFG, mesh)["mem_blocks"]["wq"].spec
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert float(m8["tokens"]) == float(m1["tokens"]) == batch["loss_mask"][:, 1:].sum()
    _close(_mu(s8), _mu(s1), atol=1e-7, rtol=1e-4)
    # Adam's first update is ~lr * sign(g): entries with |g| near eps amplify ~1e-7 differences.
    _close(_np(s8.params), _np(s1.params), atol=5e-5)


def test_empty_references_give_masked_memories_and_warmup_step():
    """All reference masks False: the encoder returns all-masked memories, and the continual step
    equals the warmup step (same loss, same gradients)."""
    params = _fresh(WARM).params
    refs = add_references(Batches().__next__(), empty=True)
    mem = jax.jit(encode, static_argnums=1)(params, CFG, refs["ref_tokens"].reshape(B * C, R),
                                            refs["ref_mask"].reshape(B * C, R))
    assert not np.asarray(mem.mask_IE).any()
    mesh = _one_device_mesh()
    sw, mw = ST.make_train_step(CFG, WARM, mesh)(_fresh(WARM, mesh), refs)
    sc, mc = ST.make_train_step(CFG, CONT, mesh)(_fresh(CONT, mesh), refs)
    np.testing.assert_allclose(float(mc["loss"]), float(mw["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(mc["grad_norm"]), float(mw["grad_norm"]), rtol=1e-6)
    _close(_mu(sc), _mu(sw), atol=1e-8, rtol=1e-5)


def test_memory_grad_flows_only_through_the_write_path():
    """memory_grad on vs off (the latter also runs the step without any mesh): same loss; gradients
    differ only in the write path (embeddings, memory layers), and not at all when every memory
    is masked."""
    mesh = _one_device_mesh()
    off = dataclasses.replace(CONT, memory_grad=False)
    results = {}
    for empty in (False, True):
        batch = add_references(Batches(seed=2).__next__(), empty=empty)
        s_on, m_on = ST.make_train_step(CFG, CONT, mesh)(_fresh(CONT, mesh), batch)
        s_off, m_off = ST.make_train_step(CFG, off)(_fresh(off), batch)
        np.testing.assert_allclose(float(m_on["loss"]), float(m_off["loss"]), rtol=1e-6)
        results[empty] = (_mu(s_on), _mu(s_off), float(m_on["grad_norm"]), float(m_off["grad_norm"]))
    g_on, g_off, n_on, n_off = results[False]
    # Layers above the memory layers, the head and the final norm: same gradients either way.
    _close(g_on["blocks"], g_off["blocks"], atol=1e-8, rtol=1e-4)
    _close(g_on["lm_head"], g_off["lm_head"], atol=1e-8, rtol=1e-4)
    # The write path runs through the embeddings and the memory layers: extra gradient there.
    for name in ("wq", "wk", "wv", "w_up"):
        d = np.abs(g_on["mem_blocks"][name] - g_off["mem_blocks"][name]).max()
        assert d > 1e-3 * np.abs(g_off["mem_blocks"][name]).max(), name
    assert np.abs(g_on["embed"] - g_off["embed"]).max() > 0
    assert n_on != n_off
    g_on, g_off, n_on, n_off = results[True]  # all memories masked: nothing flows back
    _close(g_on, g_off, atol=1e-9, rtol=1e-6)


def test_gradient_accumulation_equals_one_pass():
    """grad_accum = 2 (on 2 x 2 x 2 devices, memory written in the step) and 4 (one device,
    memory_grad off) give the update of one pass over the batch; the microbatches hold different
    numbers of real targets (row 3 is padded), so a plain mean of microbatch losses would differ."""
    batch = add_references({k: v[:B] for k, v in ROWS.items()})
    mesh = S.make_mesh(MeshConfig(2, 2, 2))
    for tc, m in ((CONT, mesh), (dataclasses.replace(CONT, memory_grad=False), None)):
        s1, m1 = ST.make_train_step(CFG, tc, m)(_fresh(tc, m), batch)
        for A in ((2,) if m is not None else (4,)):
            acc = dataclasses.replace(tc, grad_accum=A)
            sa, ma = ST.make_train_step(CFG, acc, m)(_fresh(acc, m), batch)
            np.testing.assert_allclose(float(ma["loss"]), float(m1["loss"]), rtol=2e-6)
            assert float(ma["tokens"]) == float(m1["tokens"]) == batch["loss_mask"][:, 1:].sum()
            np.testing.assert_allclose(float(ma["grad_norm"]), float(m1["grad_norm"]), rtol=2e-5)
            _close(_mu(sa), _mu(s1), atol=1e-7, rtol=1e-4)
            _close(_np(sa.params), _np(s1.params), atol=5e-5)
    # bf16 params (fp32 master): accumulation in float32 matches one pass to bf16 precision
    cfg16 = dataclasses.replace(CFG, param_dtype="bfloat16")
    s1, m1 = ST.make_train_step(cfg16, WARM)(ST.create_state(cfg16, WARM, key=jax.random.key(7)), batch)
    acc = dataclasses.replace(WARM, grad_accum=2)
    sa, ma = ST.make_train_step(cfg16, acc)(ST.create_state(cfg16, acc, key=jax.random.key(7)), batch)
    np.testing.assert_allclose(float(ma["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(m1["grad_norm"]), rtol=1e-2)
    assert jax.tree.leaves(sa.params)[0].dtype == jnp.bfloat16
    _close(_np(jax.tree.map(lambda x: x.astype(jnp.float32), sa.params)),
           _np(jax.tree.map(lambda x: x.astype(jnp.float32), s1.params)), atol=2e-2, rtol=2e-2)
    # the per-microbatch mean would weight row 3's few targets like the full rows: not equal
    n = batch["loss_mask"][:, 1:].reshape(B // 2, 2, T - 1).sum(axis=(0, 2))
    assert n[0] != n[1]
    with pytest.raises(ConfigError, match="grad_accum"):
        dataclasses.replace(CONT, grad_accum=3)
    with pytest.raises(ValueError, match="microbatch"):
        ST.make_train_step(CFG, dataclasses.replace(WARM, grad_accum=4), mesh).prepare(batch)


def test_batch_errors():
    step = ST.make_train_step(CFG, CONT, _one_device_mesh())
    batch = Batches().__next__()
    with pytest.raises(KeyError, match="reference_fn"):
        step.prepare(batch)
    bad = add_references(batch)
    bad["ref_tokens"] = bad["ref_tokens"][:, :2]
    with pytest.raises(ValueError, match="ref_tokens"):
        step.prepare(bad)
    mesh = S.make_mesh(MeshConfig(2, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        ST.make_train_step(CFG, WARM, mesh).prepare({k: v[:6] for k, v in batch.items()})


# --------------------------------------------------------------------------- the loop
def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _mean_loss(recs, lo, hi):
    return np.mean([r["loss"] for r in recs if lo <= r["step"] <= hi])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    params = L.train(CFG, WARM, Batches(), out, progress=False, mesh=_one_device_mesh())
    return out, _np(params)


def test_warmup_run_learns_and_writes_outputs(stage1):
    out, _ = stage1
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert _mean_loss(recs, 26, 30) < _mean_loss(recs, 1, 5) - 0.5
    assert "compile_s" in recs[0] and "tokens_per_s" in recs[-1] and "mfu" not in recs[-1]
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["20", "30"]  # keep 2
    assert CK.read_meta(out)["step"] == 30


def test_killed_run_resumes_exactly(stage1, tmp_path):
    out1, want = stage1
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.train(CFG, WARM, Batches(fail_at=15), out, progress=False, mesh=_one_device_mesh())
    assert CK.read_meta(out)["step"] == 10
    # resumes at step 10 with the data iterator's state of step 10
    got = L.train(CFG, WARM, Batches(), out, progress=False, mesh=_one_device_mesh())
    _close(_np(got), want, atol=0, rtol=0)
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, 31))  # steps 11..15 of the crash were dropped
    np.testing.assert_allclose([r["loss"] for r in recs], [r["loss"] for r in _records(out1)], rtol=1e-6)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 8, 1)])
def test_restore_onto_another_mesh(stage1, sizes):
    out, want = stage1
    mesh = S.make_mesh(MeshConfig(*sizes))
    with contextlib.closing(CK.manager(os.path.join(out, "checkpoints"), read_only=True)) as mngr:
        state, data_state, meta = CK.restore(mngr, 30, CFG, WARM, mesh, out)
    assert meta["step"] == 30 and int(state.step) == 30
    it, fresh = Batches(), Batches()
    it.set_state(data_state)
    for _ in range(30):
        next(fresh)
    np.testing.assert_array_equal(next(it)["tokens"], next(fresh)["tokens"])  # the data resumes too
    _close(_np(state.params), want, atol=0, rtol=0)
    S.check_sharded(state.params, min_size=1 << 12, mesh=mesh)
    mu = state.opt_state[1][0].mu["blocks"]["w_up"]
    assert mu.sharding.spec == PL.param_shardings(CFG, mesh)["blocks"]["w_up"].spec
    params = CK.load_params(out, CFG, mesh, step=20)
    assert params["embed"].sharding.mesh.shape == mesh.shape


def test_continual_stage_from_stage1_checkpoint(stage1, tmp_path):
    out1, p1 = stage1
    out = str(tmp_path / "stage2")
    params = L.train(CFG, CONT, Batches(seed=5), out, init_params=out1, reference_fn=add_references, progress=False,
                     mesh=_one_device_mesh())
    recs = _records(out)
    assert _mean_loss(recs, 26, 30) < _mean_loss(recs, 1, 5) - 0.3
    # it started from the stage-1 weights: its first loss is far below a fresh model's (~ln 256)
    assert recs[0]["loss"] < _records(out1)[0]["loss"] - 1.0
    assert not np.allclose(_np(params)["embed"], p1["embed"])
    # a warmup out_dir cannot be resumed as the continual stage
    with pytest.raises(ConfigError, match="stage 'warmup'"):
        L.train(CFG, CONT, Batches(), out1, reference_fn=add_references, progress=False, mesh=_one_device_mesh())
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        L.train(CFG, WARM, Batches(), out1, resume=False, progress=False, mesh=_one_device_mesh())


def test_stage2_from_checkpoint_of_another_model(stage1, tmp_path):
    out1, _ = stage1
    other = dataclasses.replace(CFG, name="tiny-wide", hidden=96)
    with pytest.raises(ConfigError, match="hidden: checkpoint 64 vs 96"):
        L.train(other, CONT, Batches(), str(tmp_path / "x"), init_params=out1, progress=False,
                mesh=_one_device_mesh())


def test_flops_per_token():
    warm = MT.flops_per_token(CFG, T)
    assert warm > 6 * CFG.num_params()
    on = MT.flops_per_token(CFG, T, stage="continual", memory_grad=True)
    off = MT.flops_per_token(CFG, T, stage="continual", memory_grad=False)
    assert warm < off < on
    assert MT.peak_flops(jax.devices()[0]) is None  # CPU: no MFU
