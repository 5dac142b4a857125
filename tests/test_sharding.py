"""Mesh, logical-axis rules, and the sharded OPUT step (8 fake CPU devices, see conftest.py)."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from mp_worker import problem_config, reference_run, run_steps

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


# two shapes cover all four axes by default; the pure-FSDP shapes (the multi-process test runs 2x4) are slow
MESHES = [(2, 2, 2, 1), (1, 2, 1, 4), pytest.param((1, 8, 1, 1), marks=pytest.mark.slow),
          pytest.param((2, 4, 1, 1), marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=["2x2x2x1", "1x2x1x4", "1x8x1x1", "2x4x1x1"])
def test_sharded_step_matches_one_device(mesh_shape):
    ref_losses, ref_params = reference_run()
    losses, params, state = run_steps(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    ref_flat = jax.tree_util.tree_leaves_with_path(ref_params)
    for (path, a), b in zip(ref_flat, jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
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
