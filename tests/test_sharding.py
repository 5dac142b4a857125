"""Mesh, logical-axis rules, and the sharded OPUT step (8 fake CPU devices, see conftest.py)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from mp_worker import CPU_FAST_COMPILE, problem_config, reference_run, run_steps

from dmax_jax.model import experts
from dmax_jax.model import moe as moe_module
from dmax_jax.model.llada2 import init_params
from dmax_jax.training import sharding as S


def test_mesh_fill_axis_types_and_errors():
    mesh = S.make_mesh(S.MeshConfig(data=2, expert=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert S.MeshConfig(fsdp=2, tensor=4).shape(8) == (1, 2, 1, 4)
    with pytest.raises(ValueError, match="not divisible"):
        S.MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match="at most one -1"):
        S.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        S.MeshConfig(data=2, fsdp=2).shape(8)
    devs = jax.devices()[:4]
    assert S.make_mesh(S.MeshConfig(fsdp=2, tensor=2), devs).devices.size == 4


def test_rules_never_reuse_a_mesh_axis_and_fall_back_when_not_divisible(caplog):
    mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=2, expert=2))
    # activations: batch takes fsdp, so embed must stay replicated (one mesh axis per array)
    assert S.logical_to_spec(("batch", "length", "embed"), (8, 4, 64), mesh) == P(("data", "fsdp", "expert"),
                                                                                   None, None)
    assert S.logical_to_spec(("exp", "embed", "exp_mlp"), (8, 64, 32), mesh) == P("expert", "fsdp", None)
    with caplog.at_level(logging.WARNING, logger="dmax_jax.training.sharding"):
        spec = S.logical_to_spec(("batch", "embed"), (2, 3), mesh, what="odd")
    assert spec == P("data", None)  # 2 rows: only the 'data' prefix divides; 3 divides nothing
    assert "odd" in caplog.text and "does not divide" in caplog.text
    with pytest.raises(ValueError, match="no rule"):
        S.logical_to_spec(("nonsense",), (4,), mesh)
    for name, _ in S.LOGICAL_RULES:  # every logical name the model uses has a rule
        assert S.logical_to_spec((name,), (8,), mesh) is not None


def test_param_shardings_follow_rules():
    cfg = problem_config()
    mesh = S.make_mesh(S.MeshConfig(fsdp=2, expert=2, tensor=2))
    abstract = jax.eval_shape(lambda k: init_params(cfg, k, boxed=True), jax.random.key(0))
    sh = S.param_shardings(abstract, mesh)
    assert sh["embedding"].spec == P("tensor", "fsdp")  # (vocab, embed)
    assert sh["moe_layers"]["moe"]["experts_gate"].spec == P(None, "expert", "fsdp", "tensor")
    assert sh["moe_layers"]["attention"]["qkv"].spec == P(None, "fsdp", "tensor", None)
    assert sh["moe_layers"]["moe"]["expert_bias"].spec == P(None, None)
    assert S.model_param_shardings(cfg, mesh) == sh
    b = S.batch_shardings(mesh)
    assert b["input_ids"].spec == P(("fsdp", "expert"), None) and b["flag"].spec == P(("fsdp", "expert"))
    with pytest.raises(ValueError, match="batch key"):
        S.batch_shardings(mesh, keys=("input_ids", "attention_mask"))


def _assert_params_close(params, ref_params):
    ref = jax.tree_util.tree_leaves_with_path(ref_params)
    for (path, want), got in zip(ref, jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


# two shapes cover all four axes by default; the pure-FSDP shapes (the multi-process test runs 2x4) are slow


MESHES = [(2, 2, 2, 1), (1, 2, 1, 4), pytest.param((1, 8, 1, 1), marks=pytest.mark.slow),
          pytest.param((2, 4, 1, 1), marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=["2x2x2x1", "1x2x1x4", "1x8x1x1", "2x4x1x1"])
def test_sharded_step_matches_one_device(mesh_shape):
    ref_losses, ref_params = reference_run()
    losses, params, state = run_steps(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    _assert_params_close(params, ref_params)
    # the state really is distributed: big weights are split, the updated state keeps its sharding
    d, f, e, t = mesh_shape
    emb = state.params["embedding"]
    assert emb.sharding.spec == P("tensor" if t > 1 else None, "fsdp" if f > 1 else None)
    shard = emb.addressable_shards[0].data.shape
    assert shard == (emb.shape[0] // t, emb.shape[1] // f)
    mu = state.opt_state[1].inner_state[0].mu["embedding"]
    assert mu.sharding == emb.sharding
    if e > 1:
        assert state.params["moe_layers"]["moe"]["experts_up"].sharding.spec[1] == "expert"


# ---- expert-parallel MoE (dmax_jax/model/experts.py) ---------------------------------------------
def _ep_problem(n=64, h=16, e=8, im=8, k=2):
    ks = jax.random.split(jax.random.key(0), 6)
    idx = jnp.stack([jax.random.permutation(r, e)[:k] for r in jax.random.split(ks[1], n)])
    return (jax.random.normal(ks[0], (n, h)), idx, jax.random.uniform(ks[2], (n, k)),
            0.3 * jax.random.normal(ks[3], (e, h, im)), 0.3 * jax.random.normal(ks[4], (e, h, im)),
            0.3 * jax.random.normal(ks[5], (e, im, h)))


def _ep_value_and_grad(fn, mesh, args):
    x, idx, w, wg, wu, wd = args

    def loss(x, w, wg, wu, wd):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            y = fn(x, idx, w, wg, wu, wd)
        return jnp.sum(y * jnp.cos(y)), y

    tok = NamedSharding(mesh, P(S.BATCH_AXES))
    wsh = NamedSharding(mesh, P("expert", "fsdp"))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True),
                in_shardings=(tok, tok, wsh, wsh, wsh), compiler_options=CPU_FAST_COMPILE)
    lowered = f.lower(x, w, wg, wu, wd)
    return lowered.compile()(x, w, wg, wu, wd), lowered.as_text()


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2, 1), (1, 2, 2, 2)], ids=str)
def test_expert_parallel_moe_matches_grouped(mesh_shape):
    assert experts.TOKEN_AXES == S.BATCH_AXES
    args = _ep_problem()
    mesh = S.make_mesh(S.MeshConfig(*mesh_shape))
    ((_, want), want_grads), _ = _ep_value_and_grad(experts.experts_grouped, mesh, args)
    ((_, got), grads), text = _ep_value_and_grad(experts.experts_ep, mesh, args)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for g, r in zip(grads, want_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4)
    assert "all_to_all" in text


def test_expert_parallel_capacity_drops_overflow_in_order():
    """C = 1 slot per destination shard: each device keeps, per destination, only its first assignment
    (token-major order); the dropped ones contribute 0."""
    x, idx, w, wg, wu, wd = args = _ep_problem(n=16)
    mesh = S.make_mesh(S.MeshConfig(1, 1, 8, 1))
    fn = lambda *a: experts.experts_ep(*a, capacity_factor=1e-6)
    (_, got), _ = _ep_value_and_grad(fn, mesh, args)[0]
    xs, ids, ws = (np.asarray(a, np.float64) for a in (x, idx, w))
    g, u, d = (np.asarray(a, np.float64) for a in (wg, wu, wd))
    want = np.zeros_like(xs)
    per_dev, e_local = 16 // 8, 1
    for dev in range(8):
        seen = set()
        for t in range(dev * per_dev, (dev + 1) * per_dev):
            for j in range(idx.shape[1]):
                e = int(ids[t, j])
                if e // e_local in seen:
                    continue
                seen.add(e // e_local)
                a = xs[t] @ g[e]
                want[t] += ws[t, j] * (((a / (1 + np.exp(-a))) * (xs[t] @ u[e])) @ d[e])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).sum() > 0


def test_sharded_step_with_expert_parallel_moe(monkeypatch):
    """The whole OPUT step with the model's MoE routed through ``experts_ep`` (what
    ``moe_impl="ep"`` will select) on data=2, fsdp=2, expert=2 equals the one-device step."""
    ref_losses, ref_params = reference_run()
    calls = []

    def spy(*args, impl, platform=None):
        calls.append(dict(jax.sharding.get_abstract_mesh().shape).get("expert", 1))
        return experts.routed_experts(*args, impl="ep", platform=platform)

    monkeypatch.setattr(moe_module, "routed_experts", spy)
    losses, params, _ = run_steps((2, 2, 2, 1))
    assert 2 in calls  # traced through the EP path with the 2-way expert mesh in context
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    _assert_params_close(params, ref_params)
