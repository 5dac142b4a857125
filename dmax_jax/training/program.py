"""The compiled pieces of a training run: mesh, shardings, and the jitted init and OPUT step.

One builder for ``train`` (``training/loop.py``) and for the ahead-of-time compiler
(``dmax_jax.aot``), so the program checked for a TPU pod or an 8 x H200 node from a CPU host is the
program ``train.py`` runs there. ``devices`` picks the devices (default: every global device); the
step's per-platform choices (MoE kernel, attention kernel) are made for *those* devices'
platform, never the host's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from dmax_jax.config import ModelConfig
from dmax_jax.model.llada2 import init_params
from dmax_jax.platforms import platform_of
from dmax_jax.training.config import TrainConfig
from dmax_jax.training.optim import make_optimizer
from dmax_jax.training.sharding import (
    batch_shardings,
    jit_train_step,
    make_mesh,
    param_shardings,
    train_state_shardings,
)
from dmax_jax.training.state import init_train_state
from dmax_jax.training.step import REQUIRED_KEYS, StepConfig, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Args:
    mesh: the ``(data, fsdp, expert, tensor)`` mesh over the run's devices.
    param_shardings / state_shardings / batch_shardings: NamedShardings of params, TrainState, batch.
    abstract_state: the TrainState's ``ShapeDtypeStruct`` tree (nothing allocated).
    step_config: the StepConfig with ``platform`` set to the mesh's platform.
    init_params / init_state / step_fn: the jitted functions (``step_fn(state, batch)``).
    """

    mesh: Mesh
    param_shardings: Any
    state_shardings: Any
    batch_shardings: dict[str, Any]
    abstract_state: Any
    step_config: StepConfig
    init_params: Callable[[jax.Array], Any]
    init_state: Callable[[Any], Any]
    step_fn: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]

    def abstract_args(self, global_batch: int, length: int) -> tuple:
        """``(state, batch)`` as sharded ShapeDtypeStructs: what ``step_fn.lower`` needs."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_shardings)
        batch = {k: jax.ShapeDtypeStruct((global_batch, length) if k != "flag" else (global_batch,),
                                         jax.numpy.int32, sharding=s)
                 for k, s in self.batch_shardings.items()}
        return state, batch


def build_train_program(model_config: ModelConfig, cfg: TrainConfig,
                        devices: Sequence[jax.Device] | None = None) -> TrainProgram:
    """Mesh, shardings and the jitted init / train-step functions for a (model, step, optim, mesh,
    seed, devices) combination. Not cached: each call builds (and its first step compiles) anew, so a
    caller that runs the same program twice keeps the ``TrainProgram`` it got."""
    mesh = make_mesh(cfg.mesh, None if devices is None else tuple(devices))
    step_cfg = dataclasses.replace(cfg.step, platform=platform_of(mesh))
    optimizer = make_optimizer(cfg.optim)
    seed = cfg.run.seed
    # The abstract parameter tree, built once: its boxes give the shardings, its values the state's shapes.
    boxed = jax.eval_shape(lambda k: init_params(model_config, k, boxed=True), jax.random.key(seed))
    p_shard = param_shardings(boxed, mesh)
    if step_cfg.lora.enabled:  # LoRA OPUT: state params {"base", "adapters"}, optimizer on adapters only
        init_fn, state_p_shard, make_step = _lora_pieces(model_config, step_cfg, optimizer, seed, p_shard,
                                                         mesh)
    else:
        init_fn, state_p_shard = (lambda p: init_train_state(p, optimizer)), p_shard
        make_step = make_train_step
    abstract_state = jax.eval_shape(init_fn, nn.meta.unbox(boxed))
    s_shard = train_state_shardings(abstract_state, state_p_shard, mesh)
    b_shard = batch_shardings(mesh, REQUIRED_KEYS)
    return TrainProgram(
        mesh=mesh, param_shardings=p_shard, state_shardings=s_shard, batch_shardings=b_shard,
        abstract_state=abstract_state, step_config=step_cfg,
        init_params=jax.jit(lambda k: init_params(model_config, jax.random.fold_in(k, 1)),
                            out_shardings=p_shard),
        init_state=jax.jit(init_fn, out_shardings=s_shard, donate_argnums=0),
        step_fn=jit_train_step(make_step(model_config, step_cfg, optimizer), s_shard, b_shard, mesh))


def _lora_pieces(model_config: ModelConfig, step_cfg: StepConfig, optimizer, seed: int, p_shard, mesh):
    """LoRA OPUT's state init, state-params shardings (base as the full model's, adapters from their
    logical names) and step builder (``training/lora.py``)."""
    from dmax_jax.model.lora import init_adapters  # noqa: PLC0415
    from dmax_jax.training.lora import init_lora_state, make_lora_train_step  # noqa: PLC0415

    boxed = jax.eval_shape(lambda k: init_adapters(model_config, step_cfg.lora, k, boxed=True),
                           jax.random.key(seed))
    state_p_shard = {"base": p_shard, "adapters": param_shardings(boxed, mesh)}
    init_fn = lambda p: init_lora_state(p, model_config, step_cfg.lora, optimizer, seed)  # noqa: E731
    return init_fn, state_p_shard, make_lora_train_step
