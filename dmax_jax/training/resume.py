"""Which checkpoint a resumed run starts from, and what happens to one that cannot be read.

Why: a VM killed while the file system was flushing can leave the newest checkpoint truncated even
though orbax finalised its directory. Dying on it with a reader's traceback leaves the user no way
forward; silently deleting it hides the loss. So a resume tries the checkpoints newest first, says in
one line which step could not be read and why, resumes from the newest readable one (saying so) and
moves the unreadable ones into ``<out_dir>/checkpoints_unreadable`` — kept, out of orbax's way (the
run will write those step numbers again). ``run.resume_step=N`` picks a checkpoint explicitly; newer
ones move to ``<out_dir>/checkpoints_set_aside``. A config mismatch is never "unreadable": it stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dmax_jax.checkpoint.train_state import (
    CheckpointRestoreError,
    ResumeMismatchError,
    TrainCheckpointer,
    abstract_with_shardings,
    check_restored_step,
    check_resume_compatible,
)
from dmax_jax.training.config import TrainConfig, TrainConfigError

UNREADABLE_DIR, SET_ASIDE_DIR = "checkpoints_unreadable", "checkpoints_set_aside"


def _why(e: BaseException) -> str:
    """One line: the error's type and its first line, cut short (readers' messages run long); the
    reader's own error rather than ``restore``'s wrapper, whose guess (a changed model) misleads here."""
    if isinstance(e, CheckpointRestoreError) and e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _restore(cfg: TrainConfig, built: Any, ckpt: TrainCheckpointer, iterator: Any, step: int):
    """``(state, allowed changes)`` of checkpoint ``step``, or the reader's exception."""
    changes = check_resume_compatible(ckpt.read_metadata(step), cfg.to_dict(), f"{ckpt.directory}/{step}",
                                      allow_changes=cfg.run.allow_config_change)
    state, _ = ckpt.restore(step, abstract_with_shardings(built.abstract_state, built.state_shardings),
                            iterator)
    check_restored_step(int(np.asarray(state.step.addressable_data(0))), step, cfg.optim.grad_accum_steps)
    return state, changes


def _try(cfg: TrainConfig, built: Any, ckpt: TrainCheckpointer, iterator: Any, step: int):
    """``_restore`` with every reader failure turned into ``(None, reason)``; mismatches propagate."""
    try:
        return _restore(cfg, built, ckpt, iterator, step), None
    except (ResumeMismatchError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 — whatever the reader raises, this checkpoint is unreadable
        return None, _why(e)


def resume_from_checkpoint(cfg: TrainConfig, built: Any, ckpt: TrainCheckpointer, iterator: Any,
                           note: Callable[[str], None]) -> tuple[Any, int, list[str]]:
    """``(state, step, allowed config changes)`` restored from the checkpoint the module doc picks;
    ``note`` gets each one-line report. Raises when no checkpoint can be read (none is moved then)."""
    steps, where, out = ckpt.all_steps(), ckpt.directory, ckpt.directory.parent
    want = cfg.run.resume_step
    if want is not None:
        if want not in steps:
            raise TrainConfigError(f"run.resume_step: no checkpoint {want} in {where} (complete: {steps})")
        restored, why = _try(cfg, built, ckpt, iterator, want)
        if restored is None:
            raise CheckpointRestoreError(f"run.resume_step={want}: checkpoint {want} in {where} cannot be "
                                         f"read ({why})")
        for s in (s for s in steps if s > want):
            note(f"run.resume_step={want}: checkpoint {s} moved to {ckpt.set_aside(s, out / SET_ASIDE_DIR)}")
        return restored[0], want, restored[1]
    failed = []
    for step in reversed(steps):
        restored, why = _try(cfg, built, ckpt, iterator, step)
        if restored is None:
            note(f"checkpoint {step} in {where} cannot be read ({why})")
            failed.append(step)
            continue
        for s in failed:
            note(f"moved unreadable checkpoint {s} to {ckpt.set_aside(s, out / UNREADABLE_DIR)} (kept for "
                 "inspection)")
        if failed:
            note(f"resuming from checkpoint {step}, the newest readable one")
        return restored[0], step, restored[1]
    raise CheckpointRestoreError(f"no checkpoint in {where} can be read (steps {steps}; each is reported "
                                 "above and left in place): move them away to start afresh")
