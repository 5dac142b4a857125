"""Shared fixtures for the training-step tests, and the worker of the two-process test.

As a module: ``problem_config``/``make_batch``/``run_steps`` build one small OPUT problem and run a
few train steps on one device or on a mesh (the sharding tests compare the two).
As a script (``python tests/mp_worker.py --process-id i ...``): one process of a
``jax.distributed`` job that runs the same steps on the global mesh and (process 0) writes the
losses and the gathered params to an ``.npz`` file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys

import numpy as np

# XLA:CPU options that cut compile time ~3x for these tiny programs (tests only; numerics unchanged
# up to float rounding). Benchmarks use the defaults.
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
BLOCK, LENGTH, BATCH, MASK_ID = 16, 32, 8, 2


def problem_config():
    from dmax_jax.config import tiny_config

    return tiny_config(num_hidden_layers=2)  # 1 dense + 1 MoE layer: both stacks, quick to compile


def make_batch(vocab: int, batch: int = BATCH, length: int = LENGTH, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch shaped like the data pipeline's: prompts of 3..10 tokens (labels −100), the rest
    masked with probability 0.6, flags alternating True/False."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    prompt = rng.integers(3, 11, batch)
    pos = np.arange(length)[None, :]
    response = pos >= prompt[:, None]
    noisy = np.where(response & (rng.random((batch, length)) < 0.6), MASK_ID, clean).astype(np.int32)
    labels = np.where(response, clean, -100).astype(np.int32)
    return {"input_ids": clean, "noisy_input_ids": noisy, "labels": labels,
            "flag": np.arange(batch) % 2 == 0, "example_index": np.arange(batch, dtype=np.int64)}


def make_params(config, seed: int = 0):
    """Random params with a non-zero ``expert_bias`` (so weight decay *would* move it if not frozen)."""
    import jax

    from dmax_jax.model.llada2 import init_params

    params = init_params(config, jax.random.key(seed))
    moe = params["moe_layers"]["moe"]
    bias = 0.1 * jax.random.normal(jax.random.key(seed + 1), moe["expert_bias"].shape)
    moe = {**moe, "expert_bias": bias}
    return {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}


def optim_config(**kw):
    from dmax_jax.training.optim import OptimConfig

    # eps 1e-5 (not 1e-8): Adam's g/(|g|+eps) flips between ±lr for grads near 0, so summation-order
    # noise between meshes would show up as lr-sized param differences.
    return OptimConfig(**{"total_steps": 10, "lr": 1e-2, "warmup_ratio": 0.0, "eps": 1e-5, **kw})


def step_config(**kw):
    from dmax_jax.training.step import StepConfig

    return StepConfig(**{"mask_id": MASK_ID, "block_length": BLOCK, **kw})


@functools.cache
def host_params(seed: int = 0):
    """``make_params`` as numpy (computed once per process; every process gets the same values)."""
    import jax

    fn = jax.jit(make_params, static_argnums=(0, 1), compiler_options=CPU_FAST_COMPILE)
    return jax.tree.map(np.asarray, fn(problem_config(), seed))


def run_steps(mesh_shape: tuple[int, int, int, int] | None, n_steps: int = 2, *, gather: bool = False):
    """Run ``n_steps`` OPUT train steps from the same start. ``mesh_shape`` = (data, fsdp, expert,
    tensor) over all global devices, or None for one device. Returns ``(losses, params, state)``:
    ``params`` as numpy (``gather`` uses ``process_allgather``, needed with several processes)."""
    import jax
    from jax.experimental import multihost_utils

    from dmax_jax.training import sharding as S
    from dmax_jax.training.optim import make_optimizer
    from dmax_jax.training.state import init_train_state
    from dmax_jax.training.step import make_train_step

    cfg = problem_config()
    opt = make_optimizer(optim_config())
    step = make_train_step(cfg, step_config(), opt)
    batch = make_batch(cfg.vocab_size)
    params = host_params()
    init = lambda p: init_train_state(p, opt)
    if mesh_shape is None:
        state = jax.jit(init, compiler_options=CPU_FAST_COMPILE)(params)
        fn = jax.jit(step, compiler_options=CPU_FAST_COMPILE)
        feed = batch
    else:
        mesh = S.make_mesh(S.MeshConfig(*mesh_shape))
        p_sh = S.model_param_shardings(cfg, mesh)
        state_sh = S.train_state_shardings(jax.eval_shape(init, params), p_sh, mesh)
        # host values -> global arrays without a device round trip (works with several processes)
        params = jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: x[i]),
                              params, p_sh)
        state = jax.jit(init, out_shardings=state_sh, compiler_options=CPU_FAST_COMPILE)(params)
        b_sh = S.batch_shardings(mesh)
        feed = S.make_global_batch(_local_rows(batch, b_sh["input_ids"]), b_sh)
        fn = S.jit_train_step(step, state_sh, b_sh, mesh, compiler_options=CPU_FAST_COMPILE)
    losses = []
    for _ in range(n_steps):
        state, metrics = fn(state, feed)
        losses.append(float(metrics["loss"].addressable_data(0)))  # replicated: any local copy
    get = (lambda x: multihost_utils.process_allgather(x, tiled=True)) if gather else np.asarray
    params = jax.tree.map(lambda x: np.asarray(get(x)), state.params)
    return losses, params, state


@contextlib.contextmanager
def reuse_train_programs():
    """Within the block, ``training.loop.build_train_program`` hands every ``train`` call with the same
    (model, step, optim, mesh, seed, devices) the program built first. The library caches nothing (a
    caller that runs one program twice keeps it); these tests run one program many times, and a
    fresh compile per ``train`` call would double their time."""
    import json

    import pytest

    from dmax_jax.training import loop

    real, built = loop.build_train_program, {}

    def build(model_config, cfg, devices=None):
        key = (json.dumps(model_config.to_hf_dict(), sort_keys=True, default=str), cfg.step, cfg.optim,
               cfg.mesh, cfg.run.seed, None if devices is None else tuple(devices))
        if key not in built:
            built[key] = real(model_config, cfg, devices)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "build_train_program", build)
        yield


def _local_rows(batch: dict[str, np.ndarray], sharding) -> dict[str, np.ndarray]:
    """This process's contiguous slice of batch rows under ``sharding``."""
    rows = sorted({(s[0].start or 0, s[0].stop or batch["input_ids"].shape[0])
                   for s in sharding.addressable_devices_indices_map(batch["input_ids"].shape).values()})
    lo, hi = rows[0][0], rows[-1][1]
    return {k: v[lo:hi] for k, v in batch.items()}


@functools.cache
def reference_run(n_steps: int = 2):
    """The one-device run (cached: several test modules compare against it in one session)."""
    losses, params, _ = run_steps(None, n_steps)
    return losses, params


def _worker() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mesh", type=str, default="2,4,1,1", help="data,fsdp,expert,tensor")
    ap.add_argument("--out", type=str, required=True)
    args = ap.parse_args()
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
    mesh = tuple(int(x) for x in args.mesh.split(","))
    losses, params, _ = run_steps(mesh, 2, gather=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(args.out, losses=np.asarray(losses), devices=jax.device_count(),
                 local_devices=jax.local_device_count(), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker()
