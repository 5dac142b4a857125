"""The programs ``dmax_jax.aot`` compiles, built exactly as the library builds them to run.

* ``train``: ``training.program.build_train_program`` (what ``train.py`` runs) on the target's
  devices; state and batch as sharded ``ShapeDtypeStruct``s.
* ``generate``: ``decoding.api.lower_generate`` (what ``dmax_jax.generate`` compiles).
* ``engine``: ``serving.program.lower_engine`` (what the serving ``Engine`` compiles).

Parameters are never allocated: shapes come from the model config, shardings from the mesh.
"""

from __future__ import annotations

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


def parse_mesh(text: str | None) -> MeshConfig:
    """``expert=4,tensor=2`` -> MeshConfig (unnamed axes 1); None = expert parallel over all devices."""
    if not text:
        return MeshConfig(data=1, fsdp=1, expert=-1, tensor=1)
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: items are AXIS=SIZE with AXIS one of {', '.join(sizes)}")
        sizes[name.strip()] = int(value)
    return MeshConfig(**sizes)


def decode_lowering(program: str, model_config: ModelConfig, devices: Sequence[jax.Device], *,
                    mesh: str | None, batch: int, prompt_len: int, gen_length: int, block_length: int,
                    strategy: str, dtype: str, max_batch: int, capacity: int | None, weights: str = "native"
                    ) -> tuple[Callable[[], Any], dict[str, Any]]:
    """``(lower, facts)`` for ``generate`` (``batch`` rows) or the serving engine (``max_batch``
    slots of ``capacity`` positions) with ``dtype`` weights sharded over the decode mesh."""
    from dmax_jax.decoding import DecodeConfig  # noqa: PLC0415

    m = decode_mesh(devices, parse_mesh(mesh))
    from dmax_jax.model.quant import params_for  # noqa: PLC0415

    params = params_for(abstract_params(model_config, m, dtype), weights)  # int8: weight + per-channel scale
    cfg = DecodeConfig(strategy=strategy, block_length=block_length, gen_length=gen_length, dtype=dtype,
                       weights=weights)
    facts = {"mesh": dict(m.shape), "weights_dtype": dtype, "weights": weights, "strategy": strategy,
             "block_length": block_length, "prompt_len": prompt_len, "gen_length": gen_length,
             "moe_impl": "auto",
             "attention_backend": "auto (decode kernel)", "platform": devices[0].platform}
    if program == "generate":
        from dmax_jax.decoding.api import lower_generate  # noqa: PLC0415

        facts["batch"] = batch
        lower = lambda: lower_generate(params, model_config, cfg, batch=batch, prompt_len=prompt_len)  # noqa: E731
    else:
        from dmax_jax.serving.program import lower_engine  # noqa: PLC0415

        cap = capacity or prompt_len + gen_length
        facts.update(max_batch=max_batch, capacity=cap)
        facts["beside"] = engine_residents(params, model_config, cfg, max_batch, cap)
        lower = lambda: lower_engine(params, model_config, cfg, max_batch=max_batch, capacity=cap)  # noqa: E731
    return lower, facts


def engine_residents(params, model_config, cfg, max_batch: int, capacity: int) -> Callable[[str], int]:
    """Per-device bytes resident beside each engine program: the prefix cache's pool (default size,
    replicated like the slot state) beside the round / prefill programs, which do not take it; the
    parameters beside the pool's load / save programs, which do not take them."""
    from dmax_jax.serving.prefix_cache import block_bytes  # noqa: PLC0415

    B = cfg.block_length
    pool = (max_batch * (capacity // B) + 1) * block_bytes(model_config, B, cfg.dtype)

    def shard_bytes(a) -> int:
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        return int(np.prod(shape)) * a.dtype.itemsize

    weights = sum(shard_bytes(a) for a in jax.tree.leaves(params))
    return lambda name: weights if name.startswith("prefix") else pool


class KernelFallbackError(RuntimeError):
    """A program compiled for a GPU / TPU whose MoE or attention is not that chip's kernel."""


# Kernel names (substrings of ``report.kernels`` keys) each program must contain on each platform.
EXPECTED_KERNELS = {
    ("train", "gpu"): {"MoE grouped matmul": ("PallasTritonRaggedDot",),
                       "attention": ("block_diffusion_flash",)},
    ("train", "tpu"): {"MoE grouped matmul": (":gmm",), "attention": ("splash_mha",)},
    ("decode", "gpu"): {"MoE grouped matmul": ("PallasTritonRaggedDot",), "attention": ("decode_attention",)},
    ("decode", "tpu"): {"MoE grouped matmul": (":gmm",), "attention": ("decode_attention",)},
}


def check_kernels(program: str, platform: str, kernels: dict[str, int], backends: dict[str, str],
                  has_experts: bool) -> None:
    """Raise ``KernelFallbackError`` naming the backend when a required kernel is missing."""
    kind = "train" if program == "train" else "decode"
    need = EXPECTED_KERNELS.get((kind, platform), {})
    for what, names in need.items():
        if what.startswith("MoE") and not has_experts:
            continue
        if not any(n in k for k in kernels for n in names):
            raise KernelFallbackError(
                f"the {program} program compiled for {platform} has no {what} kernel ({' / '.join(names)}); "
                f"backend {backends.get(what, '?')} fell back to XLA — choose the chip's kernel (auto)")
