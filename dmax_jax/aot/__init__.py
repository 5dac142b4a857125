"""Ahead-of-time compilation for named chips from a host without one (``python -m dmax_jax.aot``).

What a deviceless compile proves: the program the chip would run (its kernels, its sharding and
collectives), built by the chip's own compiler, and that compiler's memory plan (per-device
argument / output / temp / peak bytes). What it does not: speed, or numerics on the chip.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from dmax_jax.aot.targets import TARGETS, Target, TargetError, get_target, normalize_topology, num_hosts

__all__ = ["TARGETS", "Target", "TargetError", "compile_program"]

PLACEHOLDER = "CHANGE_ME"
RECIPE_MODEL = "preset:llada2_mini"  # the recipes' architecture (LLaDA2.0-mini = DMax-16B shapes)
DECODE_MODEL = "preset:dmax_16b"


def _model_source(model: str | None) -> str | None:
    if model is None or model.startswith(("preset:", "hf:", "config:")):
        return model
    return f"hf:{model}"


def _train_config(config: str, overrides: Sequence[str], model: str | None) -> tuple[Any, str]:
    """The train config with its model resolved; a recipe's placeholder source means its architecture."""
    from dmax_jax.training.config import load_train_config  # noqa: PLC0415

    cfg = load_train_config(config, overrides)
    source = _model_source(model)
    note = "from the config"
    if source is None and PLACEHOLDER in cfg.model.source:
        source, note = RECIPE_MODEL, f"the config's model.source is the placeholder {cfg.model.source}"
    if source is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source=source, overrides={}))
        note = note if note != "from the config" else "from --model"
    return cfg, f"{cfg.model.source} ({note})"


def _model_config(source: str):
    """The ModelConfig of ``preset:NAME`` / ``hf:DIR`` / ``config:PATH`` (shapes only, no weights)."""
    from dmax_jax.config import PRESETS, ModelConfig  # noqa: PLC0415

    kind, _, location = source.partition(":")
    if kind == "preset":
        if location not in PRESETS:
            raise ValueError(f"--model {source}: unknown preset (known: {', '.join(PRESETS)})")
        return PRESETS[location]()
    return ModelConfig.from_json(location)


def compile_program(*, target: str, program: str, topology: str | None = None, config: str | None = None,
                    overrides: Sequence[str] = (), model: str | None = None, global_batch: int | None = None,
                    mesh: str | None = None, batch: int = 1, prompt_len: int = 256, gen_length: int = 256,
                    block_length: int = 32, strategy: str = "spd", dtype: str = "bfloat16",
                    max_batch: int = 16, capacity: int | None = None,
                    weights: str = "native") -> dict[str, Any]:
    """Compile ``program`` for ``target`` / ``topology`` from shapes alone and report it (see
    ``aot.report.compile_and_report`` for the fields)."""
    from dmax_jax.aot import programs  # noqa: PLC0415
    from dmax_jax.aot.report import compile_and_report  # noqa: PLC0415
    from dmax_jax.aot.targets import topology_devices  # noqa: PLC0415
    from dmax_jax.training.resolve import resolve_model_config  # noqa: PLC0415

    tgt = get_target(target)
    topo = normalize_topology(tgt, topology)
    devices = topology_devices(tgt.name, topo)
    facts: dict[str, Any] = {"target": tgt.name, "device_kind": devices[0].device_kind, "topology": topo,
                             "devices": len(devices), "hosts": num_hosts(tgt, topo), "program": program,
                             "hbm_source": tgt.source}
    if program == "train":
        cfg, facts["model"] = _train_config(config, overrides, model)
        mcfg = resolve_model_config(cfg)
        rows = global_batch or cfg.data.batch_size * num_hosts(tgt, topo)
        lower, more = programs.train_lowering(mcfg, cfg, devices, rows)
    else:
        if config is not None and model is None:
            cfg, facts["model"] = _train_config(config, overrides, None)
            source = cfg.model.source
        else:
            source = _model_source(model) or DECODE_MODEL
            facts["model"] = f"{source} ({'from --model' if model else 'default for decode programs'})"
        mcfg = _model_config(source)
        lower, more = programs.decode_lowering(
            program, mcfg, devices, mesh=mesh, batch=batch, prompt_len=prompt_len, gen_length=gen_length,
            block_length=block_length, strategy=strategy, dtype=dtype, max_batch=max_batch, capacity=capacity,
            weights=weights)
    facts.update(more)
    print(f"compiling {program} for {tgt.name} {topo} ({len(devices)} devices) ...", file=sys.stderr)
    report = compile_and_report(lower, tgt, default_device=devices[0], **facts)
    backends = {"MoE grouped matmul": f"moe_impl={facts.get('moe_impl')}",
                "attention": f"attention_backend={facts.get('attention_backend')}"}
    programs.check_kernels(program, tgt.platform, report["kernels"], backends, mcfg.num_moe_layers > 0)
    return report
