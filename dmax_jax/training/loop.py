"""The training loop: config → mesh, model, data, state (fresh or resumed) → steps → metrics,
checkpoints → optional HF export. ``train`` = ``_setup`` → ``_step_loop`` → ``_finish``.

Why it is shaped this way:
- Counting: ``state.step`` counts ``train_step`` calls (micro-batches); ``run.num_steps``,
  ``run.log_every`` and ``run.save_every`` count optimizer updates (= micro-batches /
  ``optim.grad_accum_steps``). Checkpoints are taken only at update boundaries.
- Exact resume: a checkpoint holds the state (params, optimizer state, step) and the grain
  iterator position, captured after the step's batch was drawn and before the next one is, so
  ``k`` steps + resume to ``n`` replays exactly the same batches and updates as ``n`` straight.
  Metric rows past the restored step (written before a ``kill -9``) are dropped on resume.
- Host/device overlap: the metrics of step ``s`` are read back after step ``s + 1`` has been
  dispatched (one step of lag), except before a checkpoint, where the step being saved is checked
  first. A non-finite loss or gradient norm therefore never reaches a checkpoint: the run stops
  with ``NonFiniteLossError`` and the newest checkpoint on disk is the last good one.
- Files only: ``data.paths`` name files (jsonl / parquet); generated demo data is written by the
  demo's data step (``dmax_jax.demo.data``) before ``train`` is called, never from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dmax_jax.checkpoint.hf import load_hf_params
from dmax_jax.checkpoint.train_state import ResumeMismatchError, TrainCheckpointer, export_hf
from dmax_jax.cli import OutputPathError, check_writable
from dmax_jax.config import ModelConfig
from dmax_jax.data.chat import check_tokenizer_fits, load_tokenizer, resolve_special_ids
from dmax_jax.data.pipeline import TrainData, make_dataset
from dmax_jax.training.config import TrainConfig, TrainConfigError, dump_train_config
from dmax_jax.training.lora import export_params, save_adapters
from dmax_jax.training.metrics import MetricsWindow, MetricsWriter
from dmax_jax.training.program import TrainProgram, build_train_program
from dmax_jax.training.resolve import check_data_paths, num_updates, resolve_model_config, tokenizer_dir
from dmax_jax.training.resume import resume_from_checkpoint
from dmax_jax.training.sharding import (
    batch_divisor,
    make_global_batch,
)
from dmax_jax.training.signals import EXIT_CODES, StopRequest

__all__ = ["NonFiniteLossError", "ResumeMismatchError", "TrainInterrupted", "TrainSummary", "train"]


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the bad state was not saved."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during ``train``: pending checkpoint writes were finished first; says where
    to resume. ``exit_code``: 130 (SIGINT) or 143 (SIGTERM), what a command line should exit with."""

    def __init__(self, out_dir: str, update: int | None, last_checkpoint_step: int | None,
                 checkpoint_dir: str | None, signum: int | None = None):
        super().__init__(f"interrupted at update {update}; last checkpoint {last_checkpoint_step}")
        self.out_dir, self.update = out_dir, update
        self.last_checkpoint_step, self.checkpoint_dir = last_checkpoint_step, checkpoint_dir
        self.signum, self.exit_code = signum, EXIT_CODES.get(signum, 130)


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
    bad_row_messages: list[str] = dataclasses.field(default_factory=list)
    no_answer_rows: int = 0   # rows whose prompt fills data.max_length: no answer token to learn from
    state: Any = dataclasses.field(repr=False, default=None)  # the final TrainState (on device)


def _local(x: jax.Array) -> np.ndarray:
    """A replicated array's value from this process's first shard (``device_get`` would need every
    shard to be addressable, which a replicated array on a multi-host mesh is not)."""
    return np.asarray(x.addressable_data(0))


# ---- setup ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _TrainRun:
    """Everything one ``train`` call holds (config, compiled program, data, checkpointer) and its
    mutable progress, passed between ``_setup``, ``_step_loop`` and ``_finish`` instead of closures."""

    cfg: TrainConfig
    out: Path
    model_config: ModelConfig
    tokenizer: Any
    data: TrainData
    built: TrainProgram
    ckpt: TrainCheckpointer
    iterator: Any
    num_steps: int
    start_step: int
    state: Any
    t_start: float
    writer: MetricsWriter | None = None
    window: MetricsWindow = dataclasses.field(default_factory=MetricsWindow)
    last_logged: dict[str, float] = dataclasses.field(default_factory=dict)
    last_saved: int | None = None
    done: int = 0  # micro-steps finished

    @property
    def accum(self) -> int:
        return self.cfg.optim.grad_accum_steps

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()


def _initial_state(cfg: TrainConfig, model_config: ModelConfig, built: TrainProgram, ckpt: TrainCheckpointer,
                   iterator: Any) -> tuple[Any, int, list[str]]:
    """``(state, update, allowed config changes)``: restored from the newest checkpoint (iterator
    position included), or fresh at update 0 (HF weights loaded straight into their shardings, or a
    random init)."""
    latest = ckpt.latest_step()
    if latest is not None and not cfg.run.resume:
        raise TrainConfigError(f"run.resume is false but {ckpt.directory} holds checkpoints "
                               f"(steps {ckpt.all_steps()}); use another run.out_dir or remove them")
    if latest is None:
        if cfg.run.resume_step is not None:
            raise TrainConfigError(f"run.resume_step: {ckpt.directory} holds no checkpoint")
        if cfg.model.kind == "hf":
            params = load_hf_params(cfg.model.location, model_config, shardings=built.param_shardings)
        else:
            params = built.init_params(jax.random.key(cfg.run.seed))
        return built.init_state(params), 0, []
    return resume_from_checkpoint(cfg, built, ckpt, iterator,
                                  note=lambda line: print(f"train: {line}", file=sys.stderr, flush=True))


def _write_config(cfg: TrainConfig, out: Path, start_step: int, changes: list[str]) -> None:
    """``train_config.yaml``; a resume with allowed changes keeps the previous one beside it."""
    path = out / "train_config.yaml"
    if changes and path.is_file():
        os.replace(path, out / f"train_config.before_{start_step}.yaml")
    dump_train_config(cfg, path)


def _setup(cfg: TrainConfig) -> _TrainRun:
    """Everything before the first step: data, model config, compiled step, state, records."""
    t_start = time.time()
    try:
        out = check_writable("run.out_dir", cfg.run.out_dir, directory=True)
    except OutputPathError as e:
        raise TrainConfigError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    check_data_paths(cfg)
    model_config = resolve_model_config(cfg)
    tok_dir = tokenizer_dir(cfg)
    key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.source"
    try:
        tokenizer = load_tokenizer(tok_dir)
        check_tokenizer_fits(model_config, tokenizer, f"{key} {tok_dir}")
        special = resolve_special_ids(model_config, tokenizer)
    except (ValueError, OSError) as e:
        raise TrainConfigError(f"{key}: {e}" if not str(e).startswith(key) else str(e)) from e
    data = make_dataset(cfg.data, tokenizer, process_index=jax.process_index(),
                        process_count=jax.process_count(), special_ids=special)
    num_steps = num_updates(cfg, data)
    cfg = cfg.resolve(total_steps=num_steps, mask_id=special.mask_id)
    built = build_train_program(model_config, cfg)
    global_batch = cfg.data.batch_size * jax.process_count()
    if global_batch % batch_divisor(built.mesh):
        raise TrainConfigError(f"data.batch_size: the global batch {global_batch} must be a multiple of "
                               f"the {batch_divisor(built.mesh)} devices on the batch mesh axes "
                               "(data×fsdp×expert)")
    ckpt = TrainCheckpointer(out / "checkpoints", keep_last=cfg.run.keep_last, async_save=cfg.run.async_save)
    iterator = iter(data)
    try:
        state, start_step, changes = _initial_state(cfg, model_config, built, ckpt, iterator)
        if start_step > num_steps:
            raise TrainConfigError(f"run.num_steps: {num_steps} but the checkpoint is already at step "
                                   f"{start_step}")
    except BaseException:
        ckpt.close()
        raise
    run = _TrainRun(cfg=cfg, out=out, model_config=model_config, tokenizer=tokenizer, data=data,
                    built=built, ckpt=ckpt, iterator=iterator, num_steps=num_steps, start_step=start_step,
                    state=state, t_start=t_start, last_saved=start_step or None,
                    done=start_step * cfg.optim.grad_accum_steps)
    is_main = jax.process_index() == 0
    if is_main:
        _write_config(cfg, out, start_step, changes)
    run.writer = MetricsWriter(out, enabled=is_main, jsonl=cfg.run.metrics_jsonl,
                               tensorboard=cfg.run.tensorboard, progress_bar=cfg.run.progress_bar,
                               total_steps=num_steps, initial_step=start_step)
    run.writer.message(
        f"training {model_config.num_hidden_layers}-layer model from {cfg.model.source} on mesh "
        f"{dict(built.mesh.shape)}: updates {start_step} → {num_steps}, global batch {global_batch}×"
        f"{run.accum}, {data.steps_per_epoch} batches/epoch, out {out}"
        + (f" (resumed from checkpoint {start_step})" if start_step else "")
        + (f"; config changes allowed on resume: {'; '.join(changes)}" if changes else ""))
    if start_step == num_steps:
        run.writer.message(f"the run in {out} is already at update {num_steps} of {num_steps}: nothing to "
                           "train (raise run.num_steps to continue it, or use a new run.out_dir)")
    return run


# ---- the step loop ----------------------------------------------------------------------------------------
def _record_step_metrics(run: _TrainRun, done: int, metrics: Any) -> None:
    """Read back micro-step ``done``'s metrics, stop on non-finite values, add them to the logging
    window and write its row at log updates: the one place metrics reach the host, so the non-finite
    check guards every checkpoint."""
    m = {k: _local(v).item() for k, v in metrics.items()}
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        run.ckpt.wait()
        raise NonFiniteLossError(
            f"non-finite loss {m['loss']} / grad_norm {m['grad_norm']} at micro-step {done} "
            f"(update {-(-done // run.accum)}); stopping without saving this state. Last good checkpoint: "
            f"step {run.ckpt.latest_step()} in {run.ckpt.directory}")
    run.window.add(m)
    if done % run.accum:
        return
    update = done // run.accum
    run.writer.advance()
    if update % run.cfg.run.log_every and update != run.num_steps:
        return
    row = run.window.row(bad_rows=run.data.bad_rows)
    run.writer.write(update, row)
    run.last_logged = row


def _save(run: _TrainRun, update: int) -> None:
    """Checkpoint update ``update``: the state, the data position and the metadata JSON a resume checks."""
    meta = {"config": run.cfg.to_dict(), "step": update, "micro_step": update * run.accum,
            "metrics": run.last_logged, "bad_rows": run.data.bad_rows, "time": time.time()}
    run.ckpt.save(update, run.state, run.iterator, meta)
    run.last_saved = update


def _step_loop(run: _TrainRun, stop: StopRequest) -> None:
    """Micro-steps ``start_step * accum + 1 … num_steps * accum``, saving at the configured updates
    (and at the update a Ctrl-C or SIGTERM arrived in)."""
    step_fn, b_shard, save_every = run.built.step_fn, run.built.batch_shardings, run.cfg.run.save_every
    pending = None
    for done in range(run.start_step * run.accum + 1, run.num_steps * run.accum + 1):
        try:
            local = next(run.iterator)
        except StopIteration:
            raise RuntimeError(f"the data ran out before micro-step {done}") from None
        run.state, metrics = step_fn(run.state, make_global_batch(local, b_shard))
        if pending is not None:
            _record_step_metrics(run, *pending)
            run.done = pending[0]
        pending = (done, metrics)
        update, boundary = done // run.accum, done % run.accum == 0
        if boundary and (update == run.num_steps or (save_every and update % save_every == 0)
                         or stop.requested):
            _record_step_metrics(run, *pending)
            run.done, pending = done, None
            _save(run, update)
            if stop.requested:
                raise KeyboardInterrupt
    if pending is not None:
        _record_step_metrics(run, *pending)
        run.done = pending[0]


def _finish(run: _TrainRun) -> TrainSummary:
    """Final checkpoint (if the last update was not saved yet), HF export, summary."""
    if run.last_saved != run.num_steps:
        _save(run, run.num_steps)
    run.ckpt.wait()
    export_dir = None
    if run.cfg.run.export_hf_at_end:
        export_dir = run.out / "hf_final"
        export_hf(export_params(run.state.params, run.cfg.step.lora), run.model_config, export_dir,
                  dtype=run.cfg.run.export_dtype, overwrite=True)
        if run.cfg.step.lora.enabled and jax.process_index() == 0:  # LoRA: the adapters alone too
            save_adapters(run.state.params, run.cfg.step.lora, run.out / "adapters")
        if jax.process_index() == 0:
            run.tokenizer.save_pretrained(os.fspath(export_dir))
            run.writer.message(f"exported HF checkpoint to {export_dir}")
    return TrainSummary(out_dir=str(run.out), start_step=run.start_step, final_step=run.num_steps,
                        num_steps=run.num_steps, seconds=time.time() - run.t_start,
                        final_metrics=dict(run.last_logged), checkpoint_dir=str(run.ckpt.directory),
                        last_checkpoint_step=run.ckpt.latest_step(),
                        hf_export_dir=None if export_dir is None else str(export_dir),
                        bad_rows=run.data.bad_rows, bad_row_messages=list(run.data.store.bad_row_messages),
                        config=run.cfg, state=run.state, no_answer_rows=run.data.no_answer_rows)


def train(cfg: TrainConfig) -> TrainSummary:
    """Run (or resume) the training described by ``cfg``; see the module docstring. Ctrl-C or SIGTERM
    raises ``TrainInterrupted`` (a ``KeyboardInterrupt``) after pending checkpoint writes have finished.
    The signals are taken over for the step loop only: during setup nothing is worth saving yet, so
    Ctrl-C stops at once and SIGTERM keeps its default (the process ends, exit 143)."""
    run, stop = None, StopRequest()
    try:
        run = _setup(cfg)
        with stop:
            _step_loop(run, stop)
        return _finish(run)
    except KeyboardInterrupt:
        if run is None:
            raise TrainInterrupted(str(Path(cfg.run.out_dir).absolute()), None, None, None,
                                   stop.signum) from None
        run.ckpt.wait()
        raise TrainInterrupted(str(run.out), run.done // run.accum, run.ckpt.latest_step(),
                               str(run.ckpt.directory), stop.signum) from None
    finally:
        if run is not None:
            run.close()
