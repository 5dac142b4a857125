"""Training checkpoints (dmax_jax/checkpoint/train_state.py): atomic saves under SIGKILL, keep_last,
async saves with donated buffers, sharded restore, data iterator position, HF export round trip."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dmax_jax.checkpoint.hf import load_hf_params, param_shapes
from dmax_jax.checkpoint.train_state import (
    CheckpointRestoreError,
    TrainCheckpointer,
    abstract_with_shardings,
    export_hf,
)
from dmax_jax.config import tiny_config
from dmax_jax.training.optim import OptimConfig, make_optimizer
from dmax_jax.training.sharding import train_state_shardings
from dmax_jax.training.state import TrainState, init_train_state

REPO = Path(__file__).resolve().parents[1]


def _iterator() -> grain.DatasetIterator:
    return iter(grain.MapDataset.range(1000).batch(4).to_iter_dataset())


def _state(mesh, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sh = NamedSharding(mesh, P("x"))
    return {"w": jax.device_put(rng.standard_normal((16, 6)).astype(np.float32), sh),
            "b": jax.device_put(rng.standard_normal((8,)).astype(np.float32), NamedSharding(mesh, P())),
            "step": jnp.int32(seed), "rng": jax.random.key_data(jax.random.key(seed))}


def _host(tree) -> dict:
    return jax.tree.map(np.asarray, tree)


def _assert_tree_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_async_save_survives_donation_and_restores_sharded(tmp_path, mesh):
    """save() returns before the write ends; the caller may donate/delete the arrays right away."""
    state = _state(mesh, seed=3)
    expected = _host(state)
    it = _iterator()
    for _ in range(3):
        next(it)
    with TrainCheckpointer(tmp_path, keep_last=None, async_save=True) as ck:
        ck.save(7, state, it, {"note": "x", "n": 1})
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # what a donated train_step does to the state's buffers
        assert next(it).tolist() == [12, 13, 14, 15]  # the saved position was taken before this
        ck.wait()
        assert ck.latest_step() == 7

    # Restore into a different layout: "w" split over a 2x4 mesh's second axis.
    mesh2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    target_sh = {"w": NamedSharding(mesh2, P("b", "a")), "b": NamedSharding(mesh2, P("b")),
                 "step": NamedSharding(mesh2, P()), "rng": NamedSharding(mesh2, P())}
    abstract = abstract_with_shardings(jax.eval_shape(lambda: _state(mesh, 3)), target_sh)
    it2 = _iterator()
    with TrainCheckpointer(tmp_path) as ck:
        restored, meta = ck.restore(7, abstract, it2)
    _assert_tree_equal(restored, expected)
    assert restored["w"].sharding == target_sh["w"]
    assert restored["rng"].dtype == jnp.uint32
    assert meta == {"note": "x", "n": 1}
    assert next(it2).tolist() == [12, 13, 14, 15]  # the iterator resumes at the saved position


def test_keep_last_deletes_older_steps(tmp_path, mesh):
    with TrainCheckpointer(tmp_path, keep_last=2, async_save=True) as ck:
        for step in range(1, 5):
            ck.save(step, _state(mesh, step), _iterator(), {"step": step})
        ck.wait()
        assert ck.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4"]
    with TrainCheckpointer(tmp_path) as ck:
        assert ck.read_metadata(4) == {"step": 4}


@flax.struct.dataclass
class _LegacyTrainState:
    """``TrainState`` as older versions saved it: an extra (never used) ``rng`` leaf of uint32 key data."""

    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array


def test_legacy_checkpoint_with_rng_leaf_resumes_into_todays_state(tmp_path, mesh):
    """A checkpoint whose state still has the old top-level ``rng`` leaf restores into the current
    ``TrainState`` (no such field): params, optimizer state, step and the data position as saved."""
    opt = make_optimizer(OptimConfig(total_steps=10, lr=1e-2))
    params = {"w": jnp.arange(96, dtype=jnp.float32).reshape(16, 6) / 7, "b": jnp.linspace(-1, 1, 8)}
    state = init_train_state(params, opt)
    updates, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), state.opt_state, params)
    state = TrainState(step=jnp.int32(3), params=jax.tree.map(jnp.add, params, updates), opt_state=opt_state)
    p_shard = {"w": NamedSharding(mesh, P("x")), "b": NamedSharding(mesh, P())}
    shardings = train_state_shardings(jax.eval_shape(lambda: state), p_shard, mesh)
    state = jax.device_put(state, shardings)
    legacy = _LegacyTrainState(step=state.step, params=state.params, opt_state=state.opt_state,
                               rng=jax.random.key_data(jax.random.key(5)))
    it = _iterator()
    for _ in range(2):
        next(it)
    with TrainCheckpointer(tmp_path, async_save=False) as ck:
        ck.save(3, legacy, it, {"step": 3, "rng": np.asarray(legacy.rng).tolist()})

    it2 = _iterator()
    with TrainCheckpointer(tmp_path) as ck:
        restored, meta = ck.restore(3, abstract_with_shardings(jax.eval_shape(lambda: state), shardings), it2)
    assert type(restored) is TrainState and not hasattr(restored, "rng") and meta["step"] == 3
    assert int(restored.step) == 3
    _assert_tree_equal(restored.params, state.params)
    _assert_tree_equal(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored.params["w"].sharding == p_shard["w"]
    assert next(it2).tolist() == [8, 9, 10, 11]  # the data position too


# orbax leaves its read coroutines unfinished when a restore fails on a shape mismatch (its internals).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_errors_name_the_problem(tmp_path, mesh):
    state = _state(mesh)
    with TrainCheckpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, None, {})
        abstract = jax.eval_shape(lambda: state)
        with pytest.raises(CheckpointRestoreError, match="no checkpoint for step 5"):
            ck.restore(5, abstract, None)
        with pytest.raises(CheckpointRestoreError, match="no data iterator state"):
            ck.restore(1, abstract, _iterator())
        wrong = dict(abstract, w=jax.ShapeDtypeStruct((3, 3), jnp.float32))
        with pytest.raises(CheckpointRestoreError, match="cannot restore"):
            ck.restore(1, wrong, None)
        gc.collect()  # collect orbax's abandoned coroutines here, under this test's warning filter
    with pytest.raises(ValueError, match="keep_last"):
        TrainCheckpointer(tmp_path / "x", keep_last=0)


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import grain, jax, jax.numpy as jnp, numpy as np
    from grain._src.python.checkpoint import handler
    from dmax_jax.checkpoint.train_state import TrainCheckpointer

    out, marker = sys.argv[1], sys.argv[2]
    big = {{"w": jnp.arange(200_000, dtype=jnp.float32), "step": jnp.int32(0)}}
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    ck = TrainCheckpointer(out, keep_last=3, async_save=True)
    next(it)
    ck.save(1, big, it, {{"step": 1}})
    ck.wait()
    real_save = handler.CheckpointHandler.save

    def slow_save(self, directory, *a, **k):  # step 2 hangs mid-write: the kill lands here
        real_save(self, directory, *a, **k)
        open(marker, "w").write(str(directory))
        time.sleep(120)

    handler.CheckpointHandler.save = slow_save
    next(it)
    ck.save(2, {{"w": big["w"] * 2, "step": jnp.int32(2)}}, it, {{"step": 2}})
    time.sleep(120)
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """A process killed while writing step 2 leaves step 1 as the latest, fully readable checkpoint."""
    script, marker, out = tmp_path / "kill.py", tmp_path / "saving", tmp_path / "ckpt"
    script.write_text(_KILL_SCRIPT.format(repo=str(REPO)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    log = tmp_path / "helper.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(marker)], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"helper exited early:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("helper never reached the step-2 save")
            time.sleep(0.2)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith("2")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # The save of step 2 was really in flight (a temporary directory), and never became "2".
    assert leftovers and all(name != "2" for name in leftovers), leftovers

    ck = TrainCheckpointer(out, keep_last=3)
    assert ck.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((200_000,), jnp.float32),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    state, meta = ck.restore(1, abstract, it)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(200_000, dtype=np.float32))
    assert meta == {"step": 1} and next(it) == 1
    # The directory stays usable: step 2 can be written again and the partial one is gone.
    ck.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)}, it, {"step": 2})
    ck.close()
    assert sorted(p.name for p in out.iterdir()) == ["1", "2"]


def test_export_hf_round_trip(tmp_path):
    config = tiny_config()
    rng = np.random.default_rng(1)  # host arrays of the model's shapes (no init compile needed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), param_shapes(config))
    out = export_hf(params, config, tmp_path / "hf")
    assert out == tmp_path / "hf" and (out / "config.json").exists()
    _assert_tree_equal(load_hf_params(out, config), params)
    export_hf(jax.tree.map(lambda x: x + 1, params), config, out, overwrite=True)  # replaces
    np.testing.assert_array_equal(np.asarray(load_hf_params(out)["embedding"]),
                                  np.asarray(params["embedding"]) + 1)
