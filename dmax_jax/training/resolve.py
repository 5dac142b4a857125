"""What a ``TrainConfig`` names, resolved against the files it points at: the model config, the
tokenizer directory and the run's length in optimizer updates.

Why apart from the loop: these are pure reads of the config + data (no device state), used by the loop
and by clients that rebuild a trained model (the demo, ``tools/build_demo.py``).
"""

from __future__ import annotations

import dataclasses

from dmax_jax.config import PRESETS, ModelConfig
from dmax_jax.data.pipeline import TrainData
from dmax_jax.training.config import TrainConfig, TrainConfigError


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The ``ModelConfig`` named by ``model.source`` with ``model.overrides`` applied."""
    m = cfg.model
    if m.kind == "preset":
        if m.location not in PRESETS:
            raise TrainConfigError(
                f"model.source: unknown preset {m.location!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[m.location]()
    else:
        try:
            base = ModelConfig.from_json(m.location)
        except (ValueError, OSError) as e:  # a missing or invalid config.json: name the config key
            raise TrainConfigError(f"model.source: {e}") from e
        if m.kind == "hf":
            return base
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"raw"}
    unknown = sorted(k for k in m.overrides if k not in fields)
    if unknown:
        raise TrainConfigError(f"model.overrides: unknown ModelConfig field(s) {unknown}")
    return base.replace(**m.overrides) if m.overrides else base


def check_data_paths(cfg: TrainConfig) -> None:
    """The loop reads files: a ``generate:`` entry (demo data not written yet) is a clear error."""
    generated = [p for p in cfg.data.paths if p.startswith("generate:")]
    if generated:
        raise TrainConfigError(
            f"data.paths: {generated[0]!r} is generated demo data, not a file; the training loop reads "
            "files only — `python train.py` writes them first (dmax_jax.demo.data.materialize(cfg))")


def tokenizer_dir(cfg: TrainConfig) -> str:
    """The tokenizer directory: ``model.tokenizer``, else the ``hf:`` model directory."""
    if cfg.model.tokenizer is not None:
        return cfg.model.tokenizer
    if cfg.model.kind != "hf":
        raise TrainConfigError("model.tokenizer: required for a preset:/config: model source")
    return cfg.model.location


def num_updates(cfg: TrainConfig, data: TrainData) -> int:
    """Optimizer updates of the run, checked against what the data can give."""
    accum = cfg.optim.grad_accum_steps
    if cfg.run.num_steps is None:
        if cfg.data.num_epochs is None:
            raise TrainConfigError("run.num_steps: required when data.num_epochs is null (endless data)")
        num_steps = data.steps_per_epoch * cfg.data.num_epochs // accum
    else:
        num_steps = cfg.run.num_steps
    available = None if cfg.data.num_epochs is None else data.steps_per_epoch * cfg.data.num_epochs
    if num_steps < 1 or (available is not None and num_steps * accum > available):
        raise TrainConfigError(f"run.num_steps: {num_steps} updates × {accum} micro-batches need "
                               f"{num_steps * accum} batches; the data gives {available} "
                               f"({data.steps_per_epoch}/epoch × {cfg.data.num_epochs} epochs)")
    return num_steps
