"""Mesh, logical axis rules and sharded == unsharded numerics on 8 fake CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import m3jax.model as M
from m3jax import distributed as DI
from m3jax import sharding as S
from m3jax.config import ConfigError, MeshConfig, preset
from m3jax.model import placement as PL


def _mesh(*sizes):
    return S.make_mesh(MeshConfig(*sizes))


def _has_spec(x, *spec):
    """x (an array or a NamedSharding) is laid out as PartitionSpec(*spec) (trailing Nones ignored)."""
    s = x if isinstance(x, NamedSharding) else x.sharding
    return s.is_equivalent_to(NamedSharding(s.mesh, P(*spec)), len(spec))


# ------------------------------------------------------------------------------------ mesh
@pytest.mark.parametrize("sizes,want", [((1, -1, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2)),
                                        ((1, 4, 2), (1, 4, 2)), ((8, 1, 1), (8, 1, 1)),
                                        ((-1, 2, 2), (2, 2, 2)), ((2, 1, -1), (2, 1, 4))])
def test_make_mesh_fills(sizes, want):
    mesh = S.make_mesh(MeshConfig(*sizes))
    assert mesh.axis_names == S.MESH_AXES
    assert tuple(mesh.shape.values()) == want
    assert mesh.size == 8 and len(set(mesh.devices.flat)) == 8


def test_make_mesh_subset_and_tuple():
    mesh = S.make_mesh((1, -1, 2), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("sizes,msg", [((3, -1, 1), "not a multiple"), ((2, 2, 1), "needs data"),
                                       ((16, 1, 1), "needs data"), ((1, -1, 16), "not a multiple")])
def test_make_mesh_bad(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        S.make_mesh(MeshConfig(*sizes))


def test_mesh_config_rejects_two_fills():
    with pytest.raises(ConfigError):
        MeshConfig(-1, -1, 1)


# ---------------------------------------------------------------------------- logical rules
def test_logical_to_spec_rules_and_fallback(caplog):
    mesh = _mesh(2, 2, 2)
    assert S.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert S.logical_to_spec(("layers", "embed", "heads", "head_dim"), (4, 64, 4, 16), mesh) == \
        P(None, "fsdp", "tensor", None)
    assert S.logical_to_spec(("batch", "length", "vocab"), (8, 5, 256), mesh) == \
        P(("data", "fsdp"), None, "tensor")
    # batch 2 cannot take data x fsdp = 4: it keeps data, and embed then gets fsdp
    report = []
    assert S.logical_to_spec(("batch", "length", "embed"), (2, 5, 64), mesh, report=report) == \
        P("data", None, "fsdp")
    assert report == [{"label": "", "axis": "batch", "dim": 2, "mesh_axis": "fsdp", "mesh_size": 2}]
    # 9 heads / 3 kv heads on tensor=2: replicated and reported
    report = []
    with caplog.at_level("WARNING", logger="m3jax.sharding"):
        spec = S.logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh, label="wq", report=report)
    assert spec == P("fsdp", None, None)
    assert report[0]["axis"] == "heads" and report[0]["mesh_axis"] == "tensor"
    assert "not divisible" in caplog.text and "wq" in caplog.text
    # unknown shape entries skip the check; rule axes absent from a mesh are ignored
    assert S.logical_to_spec(("batch", "kv_heads"), (None, 3), mesh) == P(("data", "fsdp"), None)
    small = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    assert S.logical_to_spec(("batch", "heads"), (8, 4), small) == P("fsdp", None)
    with pytest.raises(ValueError, match="unknown logical axis"):
        S.logical_to_spec(("batch", "hidden"))
    with pytest.raises(ValueError, match="rank"):
        S.logical_to_spec(("batch",), (2, 3), mesh)


def test_constrain_inside_and_outside_mesh():
    mesh = _mesh(2, 2, 2)
    x = jnp.ones((8, 4, 64))
    assert S.constrain(x, ("batch", "length", "embed")) is x  # no mesh: no-op

    def f(x):
        y = S.constrain(x * 2, ("batch", "length", "embed"))
        q = S.constrain(y.reshape(8, 4, 4, 16), ("batch", "length", "heads", "head_dim"))
        return y, q, S.constrain(q[:, :, :3], ("batch", "length", "heads", "head_dim"))

    with jax.set_mesh(mesh):
        y, q, q3 = jax.jit(f)(x)
    assert _has_spec(y, ("data", "fsdp"), None, None)
    assert _has_spec(q, ("data", "fsdp"), None, "tensor", None)
    assert _has_spec(q3, ("data", "fsdp"), None, None, None)  # 3 heads on tensor=2: replicated
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    # an explicit mesh argument works without a context
    z = S.constrain(x, ("batch", None, "embed"), mesh)
    assert _has_spec(z, ("data", "fsdp"), None, None)


# ---------------------------------------------------------------------------- params
def _abstract(cfg):
    return jax.eval_shape(lambda k: M.init(cfg, k), jax.random.key(0))


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "memory3-2b"])
@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 4, 2), (1, 8, 1)])
def test_param_shardings_valid(name, sizes):
    cfg = preset(name)
    mesh = _mesh(*sizes)
    shardings = PL.param_shardings(cfg, mesh)
    abstract = _abstract(cfg)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    for path, (a, s) in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                            zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))):
        assert isinstance(s, NamedSharding) and s.mesh == mesh, path
        assert len(s.spec) == a.ndim, path
        shard = s.shard_shape(a.shape)  # raises if a sharded dim does not divide
        factor = math.prod(a.shape) // math.prod(shard)
        assert factor == math.prod(mesh.shape[ax] for ax in S._spec_axes(s.spec)), path
        assert "data" not in S._spec_axes(s.spec), path  # params never sharded over data


def test_check_sharded_memory3_2b():
    cfg = preset("memory3-2b")
    mesh = _mesh(1, 4, 2)
    shardings = PL.param_shardings(cfg, mesh)
    sds = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _abstract(cfg), shardings)
    rep = S.check_sharded(sds)
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert rep["fraction"] > 0.999 and not rep["unsharded"]
    assert rep["total_bytes"] == 2 * M.num_params(sds)  # bf16
    assert rep["per_device_bytes"] < rep["total_bytes"] / 7.99
    assert S.sharding_report(PL.abstract_params(cfg, mesh))["per_device_bytes"] == rep["per_device_bytes"]

    replicated = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
                              sds)
    with pytest.raises(S.ShardingError, match=r"\['mem_blocks'\]\['wq'\]") as err:
        S.check_sharded(replicated)
    assert "fraction 0.125" in str(err.value) and "['embed']" in str(err.value)


def test_check_sharded_reports_head_fallback():
    cfg = preset("smollm2-135m")  # 9 heads, 3 kv heads: not divisible by tensor=2
    report = []
    PL.param_shardings(cfg, _mesh(1, 4, 2), report=report)
    assert {(r["axis"], r["dim"]) for r in report} == {("heads", 9), ("kv_heads", 3)}
    assert {r["label"] for r in report} >= {"['blocks']['wq']", "['mem_blocks']['wk']"}
    with pytest.raises(S.ShardingError, match="fraction 0.8"):  # attention replicated over tensor
        S.check_sharded(PL.abstract_params(cfg, _mesh(1, 4, 2)))
    assert S.check_sharded(PL.abstract_params(cfg, _mesh(1, 8, 1)))["fraction"] > 0.99


def test_shard_params_real_tiny(tiny_setup):
    cfg, mesh, params, sparams = tiny_setup
    assert len(params["embed"].sharding.device_set) == 1
    placed = PL.shard_params(params, cfg, mesh)
    S.check_sharded(placed, min_size=0)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(sparams)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(S.ShardingError, match="not sharded over"):
        S.check_sharded(params, mesh=mesh, min_size=0)  # single-device arrays count as replicated
    with pytest.raises(ValueError, match="do not match config"):
        PL.shard_params({"embed": params["embed"]}, cfg, mesh)


# ----------------------------------------------------------------- sharded == unsharded
def _inputs(cfg, B=4, T=40, seed=0):
    """Random tokens [B, T] and a random ChunkMemory with ceil(T / chunk_size) chunks."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T)), jnp.int32)
    C = -(-T // cfg.chunk_size)
    shape = (cfg.memory_layers, B, C, cfg.memory_block_len, cfg.num_kv_heads, cfg.head_dim)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    return tokens, M.ChunkMemory(k, v, jnp.asarray(rng.random(shape[1:4]) < 0.6))


_forward = jax.jit(M.forward, static_argnums=2)


def _place(memory, cfg, mesh):
    return jax.device_put(memory, PL.memory_sharding(cfg, mesh, memory=memory))


@pytest.fixture(scope="module")
def tiny_setup():
    """tiny params initialized straight into shards over (2 data, 2 fsdp, 2 tensor), and the same
    values as plain single-device arrays (one compile of `init` for the whole module)."""
    cfg = preset("tiny")
    mesh = _mesh(2, 2, 2)
    sparams = PL.init_sharded(cfg, jax.random.key(1), mesh)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), sparams)
    return cfg, mesh, params, sparams


@pytest.mark.parametrize("with_memory", [False, True])
def test_sharded_forward_matches_unsharded(tiny_setup, with_memory):
    cfg, mesh, params, sparams = tiny_setup
    tokens, mem = _inputs(cfg)
    fwd = _forward
    kw = {"memory": mem} if with_memory else {}
    want = fwd(params, tokens, cfg, **kw)
    stokens = S.shard_batch(tokens, mesh)
    assert _has_spec(stokens, ("data", "fsdp"), None)
    skw = {"memory": _place(mem, cfg, mesh)} if with_memory else {}
    if with_memory:
        assert _has_spec(skw["memory"].k_LBCMKH, None, ("data", "fsdp"), None, None, "tensor", None)
    got = fwd(sparams, stokens, cfg, **skw)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    if with_memory:  # the memory must matter, or this test proves nothing about it
        assert np.abs(np.asarray(want) - np.asarray(fwd(params, tokens, cfg))).max() > 1e-3


def test_sharded_grad_matches_unsharded(tiny_setup):
    cfg, mesh, params, sparams = tiny_setup
    tokens, mem = _inputs(cfg, T=32, seed=3)
    mem = M.ChunkMemory(mem.k_LBCMKH, mem.v_LBCMKH, mem.mask_BCM, lookback=1)

    def loss(p, mem_k, tokens, memory):
        memory = M.ChunkMemory(mem_k, memory.v_LBCMKH, memory.mask_BCM, memory.lookback)
        logits = M.forward(p, tokens, cfg, memory=memory)[:, :-1]
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    (l0, (g0, gk0)) = vg(params, mem.k_LBCMKH, tokens, mem)
    smem = _place(mem, cfg, mesh)
    with jax.set_mesh(mesh):
        (l1, (g1, gk1)) = vg(sparams, smem.k_LBCMKH, S.shard_batch(tokens, mesh), smem)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4, err_msg=str(path[0]))
    np.testing.assert_allclose(np.asarray(gk1), np.asarray(gk0), atol=1e-6, rtol=1e-4)
    assert np.abs(np.asarray(gk0)).max() > 0  # memory keys get gradients (memory_grad path)


# ------------------------------------------------------------------------ memory and cache
def test_memory_and_cache_shardings():
    cfg = preset("tiny")
    mesh = _mesh(2, 2, 2)
    mem = M.ChunkMemory.empty(cfg, 4, 3)
    mem = M.ChunkMemory(mem.k_LBCMKH, mem.v_LBCMKH, mem.mask_BCM, lookback=2)
    smem = _place(mem, cfg, mesh)
    assert smem.lookback == 2 and _has_spec(smem.mask_BCM, ("data", "fsdp"), None, None)
    # batch 2 on data x fsdp = 4: falls back to data only
    assert _has_spec(PL.memory_sharding(cfg, mesh, batch=2).k_LBCMKH, None, "data", None, None, "tensor", None)
    cache = jax.device_put(M.init_cache(cfg, 4, 32), PL.cache_sharding(cfg, mesh, batch=4))
    assert _has_spec(cache.kv["blocks"][0][0], ("data", "fsdp"), "tensor", None, None)
    assert _has_spec(cache.lengths, ("data", "fsdp"))
    assert _has_spec(S.batch_sharding(mesh), ("data", "fsdp"))


# ------------------------------------------------------------------------------ distributed
def test_detect_multihost():
    assert DI.detect_multihost({}) is None
    assert DI.detect_multihost({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert DI.detect_multihost({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1"}) is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert DI.detect_multihost(slurm) == "SLURM"
    assert DI.detect_multihost({**slurm, "SLURM_NTASKS": "1"}) is None
    assert DI.detect_multihost({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "TPU_WORKER_HOSTNAMES"
    assert DI.detect_multihost({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert DI.detect_multihost({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"


def test_maybe_initialize_distributed_single_host(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
              "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "M3JAX_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert DI.maybe_initialize_distributed() is False
    assert DI.maybe_initialize_distributed() is False  # idempotent
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("M3JAX_DISTRIBUTED", "0")  # the override wins over detection
    assert DI.maybe_initialize_distributed() is False
