"""The training loop: config → mesh, model, data, state (fresh or resumed) → steps → metrics,
checkpoints → optional HF export.

Why it is shaped this way:
- Counting: ``state.step`` counts ``train_step`` calls (micro-batches); ``run.num_steps``,
  ``run.log_every`` and ``run.save_every`` count optimizer updates (= micro-batches /
  ``optim.grad_accum_steps``). Checkpoints are taken only at update boundaries.
- Exact resume: a checkpoint holds the state (params, optimizer state, step, rng) and the grain
  iterator position, captured after the step's batch was drawn and before the next one is, so
  ``k`` steps + resume to ``n`` replays exactly the same batches and updates as ``n`` straight.
- Host/device overlap: the metrics of step ``s`` are read back after step ``s + 1`` has been
  dispatched (one step of lag), except before a checkpoint, where the step being saved is checked
  first. A non-finite loss or gradient norm therefore never reaches a checkpoint: the run stops
  with ``NonFiniteLossError`` and the newest checkpoint on disk is the last good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dmax_jax.checkpoint.hf import load_hf_params
from dmax_jax.checkpoint.train_state import TrainCheckpointer, abstract_with_shardings, export_hf
from dmax_jax.config import PRESETS, ModelConfig
from dmax_jax.data.chat import load_tokenizer, resolve_special_ids
from dmax_jax.data.pipeline import make_dataset
from dmax_jax.model.llada2 import init_params
from dmax_jax.training.config import TrainConfig, TrainConfigError, dump_train_config
from dmax_jax.training.metrics import MetricsWriter
from dmax_jax.training.optim import make_optimizer
from dmax_jax.training.sharding import (
    batch_divisor,
    batch_shardings,
    jit_train_step,
    make_mesh,
    param_shardings,
    train_state_shardings,
)
from dmax_jax.training.state import init_train_state
from dmax_jax.training.step import REQUIRED_KEYS, make_train_step

GENERATE_PREFIX = "generate:"
# Config sections whose change makes a checkpoint's data position or params meaningless.
RESUME_SENSITIVE = ("model", "data")
RESUME_IGNORED_DATA_KEYS = ("read_threads", "prefetch_buffer")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the bad state was not saved."""


class ResumeMismatchError(ValueError):
    """The checkpoint in ``out_dir`` was written by a run with a different model or data config."""


@dataclasses.dataclass
class TrainSummary:
    """What ``train`` did. Steps count optimizer updates (``run.num_steps`` units)."""

    out_dir: str
    start_step: int
    final_step: int
    num_steps: int
    seconds: float
    final_metrics: dict[str, float]
    checkpoint_dir: str
    last_checkpoint_step: int | None
    hf_export_dir: str | None
    bad_rows: int
    config: TrainConfig
    state: Any = dataclasses.field(repr=False, default=None)  # the final TrainState (on device)


# ---- model, tokenizer and data ----------------------------------------------------------------------
def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The ``ModelConfig`` named by ``model.source`` with ``model.overrides`` applied."""
    m = cfg.model
    if m.kind == "hf":
        return ModelConfig.from_json(m.location)
    if m.kind == "preset":
        if m.location not in PRESETS:
            raise TrainConfigError(
                f"model.source: unknown preset {m.location!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[m.location]()
    else:
        base = ModelConfig.from_json(m.location)
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"raw"}
    unknown = sorted(k for k in m.overrides if k not in fields)
    if unknown:
        raise TrainConfigError(f"model.overrides: unknown ModelConfig field(s) {unknown}")
    return base.replace(**m.overrides) if m.overrides else base


# generate:<task> names → the arithmetic task's solution phrasing (dmax_jax.tasks.arith.PHRASINGS).
GENERATED_TASKS = {"arith": "fixed", "arith_varied": "varied"}


def generate_task_data(spec: str, out: Path) -> tuple[str, str]:
    """``generate:arith[:N]`` (or ``generate:arith_varied[:N]``, several wordings per solution step)
    → ``(train.jsonl, tokenizer dir)`` under ``out`` (default N = 2000).

    Rows are chat messages whose user turn is the spec §5.4 GSM8K prompt, as the demo evaluates.
    Deterministic; reused when a previous run wrote the same spec (``stamp.json``).
    """
    from dmax_jax.tasks.arith import chat_row, generate_problems, write_jsonl
    from dmax_jax.tasks.tokenizer import build_task_tokenizer

    parts = spec[len(GENERATE_PREFIX):].split(":")
    if parts[0] not in GENERATED_TASKS or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise TrainConfigError(f"data.paths: {spec!r} is not 'generate:TASK' or 'generate:TASK:N' with TASK "
                               f"one of {sorted(GENERATED_TASKS)}")
    phrasing = GENERATED_TASKS[parts[0]]
    n = int(parts[1]) if len(parts) == 2 else 2000
    if n < 1:
        raise TrainConfigError(f"data.paths: {spec!r} asks for {n} problems")
    train_file, tok_dir, stamp = out / "train.jsonl", out / "tokenizer", out / "stamp.json"
    if jax.process_index() == 0 and not (stamp.is_file() and json.loads(stamp.read_text()) == {"spec": spec}):
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(train_file, (chat_row(p) for p in generate_problems(n, seed=0, split="train",
                                                                        phrasing=phrasing)))
        build_task_tokenizer(tok_dir, n_problems=min(n, 5000), seed=0, phrasing=phrasing)
        stamp.write_text(json.dumps({"spec": spec}))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dmax_jax.generate_task_data")
    return str(train_file), str(tok_dir)


def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """Replace ``generate:`` data paths by generated files; returns ``(cfg, tokenizer dir)``."""
    paths, tok_dir = list(cfg.data.paths), cfg.model.tokenizer
    generated = [i for i, p in enumerate(paths) if p.startswith(GENERATE_PREFIX)]
    if len(generated) > 1:
        raise TrainConfigError("data.paths: at most one generate: entry")
    if generated:
        i = generated[0]
        paths[i], gen_tok = generate_task_data(paths[i], Path(cfg.run.out_dir) / "task_data")
        tok_dir = tok_dir or gen_tok
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=tuple(paths)))
    if tok_dir is None:
        if cfg.model.kind != "hf":
            raise TrainConfigError("model.tokenizer: required for a preset:/config: model source "
                                   "(or use data.paths=[generate:arith])")
        tok_dir = cfg.model.location
    return cfg, tok_dir


def _to_global(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows → global arrays (process-major along the batch axis)."""
    return {k: jax.make_array_from_process_local_data(s, np.asarray(local[k])) for k, s in shardings.items()}


def _local(x: jax.Array) -> np.ndarray:
    """A replicated array's value from this process's first shard (``device_get`` would need every
    shard to be addressable, which a replicated array on a multi-host mesh is not)."""
    return np.asarray(x.addressable_data(0))


def _comparable(section: str, key: str, value: Any) -> Any:
    """Data files compare by resolved path: the same file named relatively or absolutely is no change."""
    if section == "data" and key == "paths" and isinstance(value, list):
        return [v if str(v).startswith(GENERATE_PREFIX) else os.path.realpath(v) for v in value]
    return value


def _check_resume_compatible(meta: dict[str, Any], cfg: TrainConfig, step_dir: str) -> None:
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ResumeMismatchError(f"{step_dir}: metadata has no run config; cannot check it matches")
    now = cfg.to_dict()
    diffs = []
    for section in RESUME_SENSITIVE:
        a, b = saved.get(section, {}), now[section]
        for key in sorted(set(a) | set(b)):
            if section == "data" and key in RESUME_IGNORED_DATA_KEYS:
                continue
            if _comparable(section, key, a.get(key)) != _comparable(section, key, b.get(key)):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: the config changed:\n  " + "\n  ".join(diffs)
            + "\n(use a new run.out_dir, or set run.resume=false with an empty out_dir)")


# ---- compiled pieces, reused across train() calls ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Built:
    mesh: Mesh
    param_shardings: Any
    state_shardings: Any
    batch_shardings: dict[str, Any]
    abstract_state: Any
    init_params: Callable[[jax.Array], Any]
    init_state: Callable[[Any], Any]
    step_fn: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]


_BUILT: dict[tuple, _Built] = {}
_BUILT_MAX = 2


def _build(model_config: ModelConfig, cfg: TrainConfig) -> _Built:
    """Mesh, shardings and the jitted init / train-step functions for a (model, step, optim, mesh,
    seed) combination. Cached so that calling ``train`` again in one process (resume, sweeps, tests)
    does not retrace and recompile; the key includes ``make_train_step`` itself so a patched step
    is never served a stale compilation."""
    key = (json.dumps(model_config.to_hf_dict(), sort_keys=True, default=str), cfg.step, cfg.optim,
           cfg.mesh, cfg.run.seed, make_train_step, jax.device_count())
    if key in _BUILT:
        return _BUILT[key]
    mesh = make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optim)
    seed = cfg.run.seed
    boxed = jax.eval_shape(lambda k: init_params(model_config, k, boxed=True), jax.random.key(seed))
    p_shard = param_shardings(boxed, mesh)
    abstract_state = jax.eval_shape(
        lambda k: init_train_state(init_params(model_config, k), optimizer, seed), jax.random.key(seed))
    s_shard = train_state_shardings(abstract_state, p_shard, mesh)
    b_shard = batch_shardings(mesh, REQUIRED_KEYS)
    built = _Built(
        mesh=mesh, param_shardings=p_shard, state_shardings=s_shard, batch_shardings=b_shard,
        abstract_state=abstract_state,
        init_params=jax.jit(lambda k: init_params(model_config, jax.random.fold_in(k, 1)),
                            out_shardings=p_shard),
        init_state=jax.jit(lambda p: init_train_state(p, optimizer, seed), out_shardings=s_shard,
                           donate_argnums=0),
        step_fn=jit_train_step(make_train_step(model_config, cfg.step, optimizer), s_shard, b_shard, mesh))
    while len(_BUILT) >= _BUILT_MAX:
        _BUILT.pop(next(iter(_BUILT)))
    _BUILT[key] = built
    return built


def _initial_state(cfg: TrainConfig, model_config: ModelConfig, built: _Built, ckpt: TrainCheckpointer,
                   iterator: Any) -> tuple[Any, int]:
    """``(state, update)``: restored from the newest checkpoint (iterator position included), or
    fresh at update 0 (HF weights loaded straight into their shardings, or a random init)."""
    latest = ckpt.latest_step()
    if latest is not None and not cfg.run.resume:
        raise TrainConfigError(f"run.resume is false but {ckpt.directory} holds checkpoints "
                               f"(steps {ckpt.all_steps()}); use another run.out_dir or remove them")
    if latest is None:
        if cfg.model.kind == "hf":
            params = load_hf_params(cfg.model.location, model_config, shardings=built.param_shardings)
        else:
            params = built.init_params(jax.random.key(cfg.run.seed))
        return built.init_state(params), 0
    _check_resume_compatible(ckpt.read_metadata(latest), cfg, f"{ckpt.directory}/{latest}")
    state, _ = ckpt.restore(latest, abstract_with_shardings(built.abstract_state, built.state_shardings),
                            iterator)
    accum = cfg.optim.grad_accum_steps
    if int(_local(state.step)) != latest * accum:
        raise ResumeMismatchError(f"checkpoint {latest} holds {int(_local(state.step))} micro-steps, "
                                  f"expected {latest} updates × grad_accum_steps {accum}")
    return state, latest


# ---- the loop -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainSummary:
    """Run (or resume) the training described by ``cfg``; see the module docstring."""
    t_start = time.time()
    out = Path(cfg.run.out_dir).absolute()
    is_main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    cfg, tok_dir = prepare_data(cfg)
    model_config = resolve_model_config(cfg)
    tokenizer = load_tokenizer(tok_dir)
    special = resolve_special_ids(model_config, tokenizer)
    data = make_dataset(cfg.data, tokenizer, process_index=jax.process_index(),
                        process_count=jax.process_count(), special_ids=special)

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
    cfg = cfg.resolve(total_steps=num_steps, mask_id=special.mask_id)

    built = _build(model_config, cfg)
    mesh, b_shard = built.mesh, built.batch_shardings
    global_batch = cfg.data.batch_size * jax.process_count()
    if global_batch % batch_divisor(mesh):
        raise TrainConfigError(f"data.batch_size: the global batch {global_batch} must be a multiple of "
                               f"the {batch_divisor(mesh)} devices on the batch mesh axes (data×fsdp×expert)")

    ckpt = TrainCheckpointer(out / "checkpoints", keep_last=cfg.run.keep_last, async_save=cfg.run.async_save)
    iterator = iter(data)
    try:
        state, start_step = _initial_state(cfg, model_config, built, ckpt, iterator)
    except BaseException:
        ckpt.close()
        raise
    if start_step > num_steps:
        ckpt.close()
        raise TrainConfigError(
            f"run.num_steps: {num_steps} but the checkpoint is already at step {start_step}")

    if is_main:
        dump_train_config(cfg, out / "train_config.yaml")
    writer = MetricsWriter(out, enabled=is_main, jsonl=cfg.run.metrics_jsonl, tensorboard=cfg.run.tensorboard,
                           progress_bar=cfg.run.progress_bar, total_steps=num_steps, initial_step=start_step)
    writer.message(f"training {model_config.num_hidden_layers}-layer model from {cfg.model.source} on "
                   f"mesh {dict(mesh.shape)}: updates {start_step} → {num_steps}, global batch "
                   f"{global_batch}×{accum}, {data.steps_per_epoch} batches/epoch, out {out}"
                   + (f" (resumed from checkpoint {start_step})" if start_step else ""))
    step_fn = built.step_fn
    window: dict[str, list[float]] = {}
    last_logged: dict[str, float] = {}
    # Throughput is timed from the end of this run's first step, so compilation is not counted.
    rate: dict[str, float] = {"t0": math.nan, "tokens": 0}
    last_saved = start_step if start_step else None

    def absorb(done: int, metrics: Any) -> None:
        """Read back one step's metrics, stop on non-finite values, log at log steps."""
        nonlocal last_logged
        m = {k: _local(v).item() for k, v in metrics.items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss {m['loss']} / grad_norm {m['grad_norm']} at micro-step {done} "
                f"(update {-(-done // accum)}); stopping without saving this state. Last good checkpoint: "
                f"step {ckpt.latest_step()} in {ckpt.directory}")
        for k, v in m.items():
            window.setdefault(k, []).append(v)
        now = time.time()
        if math.isnan(rate["t0"]):
            rate["t0"] = now
        else:
            rate["tokens"] += m["tokens"]
        if done % accum:
            return
        update = done // accum
        writer.advance()
        if update % cfg.run.log_every and update != num_steps:
            return
        tokens = int(sum(window["tokens"]))
        row = {k: float(np.mean(v)) for k, v in window.items() if k not in ("tokens", "valid_sequences")}
        row.update(grad_norm=window["grad_norm"][-1], lr=window["lr"][-1], tokens=tokens,
                   valid_sequences=int(sum(window["valid_sequences"])), bad_rows=data.bad_rows)
        if rate["tokens"]:
            row["tokens_per_sec"] = rate["tokens"] / max(now - rate["t0"], 1e-9)
            rate.update(t0=now, tokens=0)
        writer.write(update, row)
        last_logged = row
        window.clear()

    def save(update: int) -> None:
        nonlocal last_saved
        meta = {"config": cfg.to_dict(), "step": update, "micro_step": update * accum,
                "rng": _local(state.rng).tolist(), "metrics": last_logged,
                "bad_rows": data.bad_rows, "time": time.time()}
        ckpt.save(update, state, iterator, meta)
        last_saved = update

    pending = None
    try:
        for done in range(start_step * accum + 1, num_steps * accum + 1):
            try:
                local = next(iterator)
            except StopIteration:
                raise RuntimeError(f"the data ran out before micro-step {done}") from None
            state, metrics = step_fn(state, _to_global(local, b_shard))
            if pending is not None:
                absorb(*pending)
            pending = (done, metrics)
            update, boundary = done // accum, done % accum == 0
            periodic = cfg.run.save_every and update % cfg.run.save_every == 0
            if boundary and (update == num_steps or periodic):
                absorb(*pending)
                pending = None
                save(update)
        if pending is not None:
            absorb(*pending)
        if last_saved != num_steps:
            save(num_steps)
        ckpt.wait()
        last_checkpoint = ckpt.latest_step()
        export_dir = None
        if cfg.run.export_hf_at_end:
            export_dir = out / "hf_final"
            export_hf(state.params, model_config, export_dir, dtype=cfg.run.export_dtype, overwrite=True)
            if is_main:
                tokenizer.save_pretrained(os.fspath(export_dir))
                writer.message(f"exported HF checkpoint to {export_dir}")
    finally:
        writer.close()
        ckpt.close()
    return TrainSummary(out_dir=str(out), start_step=start_step, final_step=num_steps, num_steps=num_steps,
                        seconds=time.time() - t_start, final_metrics=dict(last_logged),
                        checkpoint_dir=str(ckpt.directory), last_checkpoint_step=last_checkpoint,
                        hf_export_dir=None if export_dir is None else str(export_dir),
                        bad_rows=data.bad_rows, config=cfg, state=state)
