"""LoRA OPUT: the OPUT step (algorithm §4) with the base frozen and only the adapters trained.

State layout: ``TrainState.params = {"base": frozen weights in step.lora.base_dtype, "adapters": float32}``;
the optimizer state covers the adapters only (AdamW moments of a rank-r model, not of 16 B params). The
rollout and the loss are ``training.step``'s, on the adapted model (``step._logits`` combines the two
parts); the gradient is taken with respect to the adapters alone, so the base never gets a gradient
buffer. Checkpoints save this state as is (adapters, optimizer, step; the frozen base rides along,
so a resume is bit-exact and self-contained). ``export_params`` merges the adapters for the HF export;
``save_adapters`` writes them alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmax_jax.config import ModelConfig
from dmax_jax.model.lora import LoraConfig, adapter_part, init_adapters, merge
from dmax_jax.training.state import TrainState
from dmax_jax.training.step import StepConfig, apply_rollout, loss_fn, step_metrics

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def base_dtype(lora: LoraConfig):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[lora.base_dtype]


def init_lora_state(params, model_config: ModelConfig, lora: LoraConfig,
                    optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh LoRA state at step 0 from the float32 base ``params`` (cast to ``lora.base_dtype``)."""
    base = jax.tree.map(lambda x: x.astype(base_dtype(lora)), params)
    adapters = init_adapters(model_config, lora, jax.random.fold_in(jax.random.key(seed), 29))
    return TrainState(step=jnp.zeros((), jnp.int32), params={"base": base, "adapters": adapters},
                      opt_state=optimizer.init(adapters))


def make_lora_train_step(model_config: ModelConfig, step_cfg: StepConfig,
                         optimizer: optax.GradientTransformation
                         ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` like ``step.make_train_step`` (same metrics);
    gradients, clipping, ``grad_norm`` and the update cover the adapters only."""
    if not step_cfg.lora.enabled:
        raise ValueError("make_lora_train_step needs step.lora.rank > 0")

    def adapter_loss(adapters, base, batch):
        return loss_fn({"base": base, "adapters": adapters}, model_config, step_cfg, batch)

    grad_fn = jax.value_and_grad(adapter_loss, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        base, adapters = state.params["base"], state.params["adapters"]
        batch, changed_fraction = apply_rollout(state.params, model_config, step_cfg, batch)
        (loss, aux), grads = grad_fn(adapters, base, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        metrics = step_metrics(loss, aux, grads, opt_state, changed_fraction)
        params = {"base": base, "adapters": adapters}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def is_lora_params(params) -> bool:
    return isinstance(params, Mapping) and set(params) == {"base", "adapters"}


def export_params(params, lora: LoraConfig):
    """The plain float32 params tree an HF export writes: adapters merged into the base (identity for
    a full fine-tune's params)."""
    if not is_lora_params(params):
        return params
    return jax.jit(lambda p: merge(p["base"], p["adapters"], lora))(params)


def save_adapters(params, lora: LoraConfig, out_dir: str | Path) -> Path:
    """The adapters alone: ``adapters.safetensors`` (keys = param paths, e.g.
    ``moe_layers.attention.qkv_lora_a``) + ``adapter_config.json`` (rank, alpha, targets, base dtype)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters = adapter_part(params["adapters"] if is_lora_params(params) else params)
    flat = {".".join(str(k.key) for k in path): np.asarray(jax.device_get(v), np.float32)
            for path, v in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    save_file(flat, str(out / ADAPTER_FILE))
    meta = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
            "base_dtype": lora.base_dtype}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out / ADAPTER_FILE


def load_adapters(path: str | Path) -> tuple[dict, LoraConfig]:
    """``save_adapters``' folder → ``(adapter tree, LoraConfig)``."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    lora = LoraConfig(rank=cfg["rank"], alpha=cfg["alpha"], targets=tuple(cfg["targets"]),
                      base_dtype=cfg["base_dtype"])
    tree: dict = {}
    for key, value in load_file(str(path / ADAPTER_FILE)).items():
        *mods, leaf = key.split(".")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(value)
    return tree, lora
