"""The programs ``dmax_jax.aot`` compiles, built exactly as the library builds them to run.

* ``train``: ``training.program.build_train_program`` (what ``train.py`` runs) on the target's
  devices; state and batch as sharded ``ShapeDtypeStruct``s.
* ``generate``: ``decoding.api.lower_generate`` (what ``dmax_jax.generate`` compiles).
* ``engine``: ``serving.program.lower_engine`` (what the serving ``Engine`` compiles).

Parameters are never allocated: shapes come from the model config, shardings from the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from dmax_jax.config import ModelConfig
from dmax_jax.training.config import TrainConfig
from dmax_jax.training.program import build_train_program
from dmax_jax.training.sharding import MESH_AXES, MeshConfig, logical_to_spec

PROGRAMS = ("train", "generate", "engine")


def train_lowering(model_config: ModelConfig, cfg: TrainConfig, devices: Sequence[jax.Device],
                   global_batch: int) -> tuple[Callable[[], jax.stages.Lowered], dict[str, Any]]:
    """``(lower, facts)`` for the OPUT step of ``cfg`` on ``devices``."""
    prog = build_train_program(model_config, cfg, devices)
    state, batch = prog.abstract_args(global_batch, cfg.data.max_length)
    facts = {"mesh": dict(prog.mesh.shape), "global_batch": global_batch,
             "tokens_per_row": 2 * cfg.data.max_length, "moe_impl": cfg.step.moe_impl,
             "attention_backend": cfg.step.attention_backend, "remat": cfg.step.remat,
             "compute_dtype": cfg.step.compute_dtype, "platform": prog.step_config.platform}
    return (lambda: prog.step_fn.lower(state, batch)), facts


def decode_mesh(devices: Sequence[jax.Device], mesh_cfg: MeshConfig) -> Mesh:
    """The decode mesh over ``devices`` (same four axes as training; Auto axis types)."""
    shape = mesh_cfg.shape(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_params(model_config: ModelConfig, mesh: Mesh, dtype: str) -> Any:
    """Parameter ``ShapeDtypeStruct``s in ``dtype`` sharded by the model's logical axis rules."""
    import flax.linen as nn  # noqa: PLC0415

    from dmax_jax.model.llada2 import init_params  # noqa: PLC0415

    boxed = jax.eval_shape(lambda k: init_params(model_config, k, boxed=True), jax.random.key(0))
    dt = jnp.dtype(dtype)

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_spec(leaf.names, leaf.value.shape, mesh)
            value = leaf.value
        else:
            spec, value = jax.sharding.PartitionSpec(), leaf
        # the router's expert_bias stays f32 (as loaded): routing ties are decided in f32
        keep_f32 = value.ndim == 1 and value.shape[0] == model_config.num_experts
        return jax.ShapeDtypeStruct(value.shape, value.dtype if keep_f32 else dt,
                                    sharding=NamedSharding(mesh, spec))

    return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """Args:
    batch: rows decoded together (``generate``) or slots (``engine``).
    prompt_len: prompt tokens per row.
    """

    batch: int
    prompt_len: int
