"""Training checkpoints: orbax ``CheckpointManager`` over (train state, grain iterator, metadata JSON).

Why this shape: one step directory holds everything a resume needs — the sharded ``TrainState``
(params, optimizer state, step) written by orbax's array handlers, the grain iterator
position (one small JSON file per process) and a JSON of the run config for humans and for
compatibility checks. Orbax writes every step into a temporary directory and renames it only once
all items are complete, so a process killed mid-save leaves the previous checkpoint as the latest
readable one; ``cleanup_tmp_directories`` removes such leftovers when the next run opens the
directory.

Restoring goes into an *abstract* state (``ShapeDtypeStruct``s carrying their shardings), so every
process reads only its own shards and a resume works on a mesh without ever materialising the
unsharded tree. Checkpoints of older versions, whose state also held an unused ``rng`` leaf, restore
into today's state: ``restore`` reads that leaf too (orbax wants the saved tree's keys) and drops it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from dmax_jax.checkpoint.hf import save_hf_params
from dmax_jax.config import ModelConfig

STATE, DATA_ITER, META = "state", "data_iter", "meta"
# Top-level state leaves older versions saved and the current ``TrainState`` no longer has.
LEGACY_STATE_LEAVES = ("rng",)


class CheckpointRestoreError(RuntimeError):
    """A checkpoint that exists but cannot be restored into the requested state."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree (from ``jax.eval_shape``) with each leaf's sharding attached."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _replicated_like(abstract: Any) -> jax.sharding.Sharding | None:
    """A fully replicated sharding on the mesh (or device) of ``abstract``'s first sharded leaf."""
    for leaf in jax.tree.leaves(abstract):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if sharding is not None:
            return sharding
    return None


class TrainCheckpointer:
    """Save / restore ``(state, data iterator, metadata)`` under ``directory/<step>/``.

    ``keep_last``: the newest k steps are kept, older ones deleted after a newer save completes.
    ``async_save``: arrays are copied to host and written in a background thread; ``save`` returns
    once the device buffers may be reused (so a donated state is safe to pass on). Call ``wait()``
    before reading a checkpoint back and ``close()`` at the end.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = 3, async_save: bool = True):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest *complete* step (temporary directories of unfinished saves never count)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ---- save --------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None,
             metadata: Mapping[str, Any]) -> None:
        """Start saving ``step`` (asynchronously when configured; waits for a previous save first).

        The iterator's position is captured before this returns, so the caller may keep iterating.
        ``metadata`` must be JSON-serialisable. Saving a step that already exists raises.
        """
        items: dict[str, Any] = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(metadata))}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until pending saves are finalised (renamed into place) and raise their errors."""
        self._manager.wait_until_finished()

    # ---- restore -----------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any,
                data_iter: grain.DatasetIterator | None) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into ``abstract_state`` (a tree of sharded ``ShapeDtypeStruct``s) and set
        ``data_iter``'s position in place. Returns ``(state, metadata)``."""
        names = self._item_names(step)
        if STATE not in names:
            raise CheckpointRestoreError(
                f"{self.directory}/{step} has no '{STATE}' item (found {sorted(names)})")
        target, rebuild = self._restore_target(step, abstract_state)
        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(target)}
        if META in names:
            items[META] = ocp.args.JsonRestore()
        if data_iter is not None:
            if DATA_ITER not in names:
                raise CheckpointRestoreError(
                    f"{self.directory}/{step} holds no data iterator state; cannot resume the data position")
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointRestoreError(
                f"cannot restore {self.directory}/{step} into the current train state "
                f"(model, optimizer or mesh changed since it was written?): {e}") from e
        return rebuild(restored[STATE]), dict(restored[META]) if META in names else {}

    def _restore_target(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """``(restore target, rebuild)``: ``abstract_state`` and the identity, or — for a checkpoint
        whose saved state has a top-level legacy leaf (``LEGACY_STATE_LEAVES``) that ``abstract_state``
        lacks — a dict of ``abstract_state``'s fields plus that leaf (replicated, like ``step``) and a
        function that drops it and rebuilds ``abstract_state``'s type."""
        children, treedef = jax.tree_util.tree_flatten_with_path(abstract_state,
                                                                 is_leaf=lambda x: x is not abstract_state)
        names = [getattr(path[0], "name", getattr(path[0], "key", None)) if len(path) == 1 else None
                 for path, _ in children]
        if not all(isinstance(n, str) for n in names):
            return abstract_state, lambda state: state
        handler = ocp.StandardCheckpointHandler()
        try:
            saved = handler.metadata(self.directory / str(int(step)) / STATE).tree
        except Exception:  # noqa: BLE001 — unreadable metadata: the restore itself reports what is wrong
            saved = None
        finally:
            handler.close()
        saved = saved if isinstance(saved, Mapping) else {}
        extra = [k for k in LEGACY_STATE_LEAVES if k in saved and k not in names]
        if not extra:
            return abstract_state, lambda state: state
        target = dict(zip(names, (child for _, child in children)))
        replicated = _replicated_like(abstract_state)
        for k in extra:
            target[k] = jax.ShapeDtypeStruct(tuple(saved[k].shape), saved[k].dtype, sharding=replicated)
        return target, lambda state: treedef.unflatten([state[n] for n in names])

    def read_metadata(self, step: int) -> dict[str, Any]:
        """Only the metadata JSON of ``step`` (no arrays are read)."""
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    def _item_names(self, step: int) -> set[str]:
        step_dir = self.directory / str(int(step))
        if not step_dir.is_dir():
            raise CheckpointRestoreError(f"no checkpoint for step {step} in {self.directory} "
                                         f"(complete steps: {self.all_steps()})")
        return {p.name for p in step_dir.iterdir() if p.is_dir()}

    def set_aside(self, step: int, dest_root: str | os.PathLike) -> Path:
        """Move step ``step``'s directory into ``dest_root`` (never deleted: a numbered name if one is
        already there) so that orbax no longer sees it; returns where it went. Process 0 moves it,
        every process then re-reads the step list."""
        dest_root = Path(dest_root)
        dest = dest_root / str(int(step))
        if jax.process_index() == 0:
            dest_root.mkdir(parents=True, exist_ok=True)
            n = 1
            while dest.exists():
                dest, n = dest_root / f"{int(step)}.{n}", n + 1
            os.replace(self.directory / str(int(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dmax_jax set_aside {step}")
        self._manager.reload()
        return dest

    # ---- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for pending saves, then release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def host_params(params: Any) -> Any:
    """Params as host numpy arrays, gathering shards held by other processes when needed.

    Every process must call this (the gather is collective). It holds the full tree in host memory,
    which an HF export needs anyway (safetensors files are written by one process).
    """
    if jax.process_count() == 1:
        return params  # save_hf_params copies one (leaf, layer) slice to host at a time
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)


def export_hf(params: Any, config: ModelConfig, path: str | os.PathLike, *, dtype: Any = None,
              overwrite: bool = True) -> Path | None:
    """Write ``params`` as an HF checkpoint directory (``save_hf_params``) from process 0.

    Collective across processes (see ``host_params``); returns the directory on process 0, else None.
    """
    gathered = host_params(params)
    if jax.process_index() != 0:
        return None
    out = Path(path)
    save_hf_params(gathered, config, out, dtype=dtype, overwrite=overwrite)
    return out


# ---- resume checks -------------------------------------------------------------------------------------
class ResumeMismatchError(ValueError):
    """The checkpoint in ``out_dir`` was written by a run with a different config."""


# Sections whose change makes a checkpoint's data position or params meaningless: never resumable.
RESUME_SENSITIVE = ("model", "data")
# Sections and run keys whose change alters the numbers of the continued run (its records would
# describe a run that never happened): resumable only when the run explicitly allows it.
RESUME_RECORDED = ("step", "optim")
RESUME_RECORDED_RUN_KEYS = ("seed",)
RESUME_IGNORED_DATA_KEYS = ("read_threads", "prefetch_buffer")


def _comparable(section: str, key: str, value: Any) -> Any:
    """Data files compare by resolved path: the same file named relatively or absolutely is no change."""
    if section == "data" and key == "paths" and isinstance(value, list):
        return [os.path.realpath(v) for v in value]
    return value


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any], section: str,
                   keys: tuple[str, ...] | None = None) -> list[str]:
    """``"section.key: checkpoint A vs now B"`` for every key of ``section`` that differs."""
    a, b = saved.get(section, {}) or {}, now.get(section, {}) or {}
    out = []
    for key in sorted(set(a) | set(b)) if keys is None else keys:
        if section == "data" and key in RESUME_IGNORED_DATA_KEYS:
            continue
        if _comparable(section, key, a.get(key)) != _comparable(section, key, b.get(key)):
            out.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    return out


def check_resume_compatible(meta: Mapping[str, Any], now: Mapping[str, Any], step_dir: str, *,
                            allow_changes: bool = False) -> list[str]:
    """Refuse to resume ``step_dir`` (its ``meta``) with the config dict ``now`` when they differ.

    Model and data changes always raise; step / optim / run.seed changes raise unless
    ``allow_changes`` (then they are returned, for the run's records). Mesh, logging, checkpointing
    and ``run.num_steps`` may change freely (a longer run, another topology).
    """
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        raise ResumeMismatchError(f"{step_dir}: metadata has no run config; cannot check it matches")
    fatal = [d for s in RESUME_SENSITIVE for d in config_changes(saved, now, s)]
    if fatal:
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: the config changed:\n  " + "\n  ".join(fatal)
            + "\n(use a new run.out_dir, or set run.resume=false with an empty out_dir)")
    recorded = [d for s in RESUME_RECORDED for d in config_changes(saved, now, s)]
    recorded += config_changes(saved, now, "run", RESUME_RECORDED_RUN_KEYS)
    if recorded and not allow_changes:
        raise ResumeMismatchError(
            f"cannot resume from {step_dir}: the config changed:\n  " + "\n  ".join(recorded)
            + "\n(a resumed run with these changes is not the run its records describe: use a new "
              "run.out_dir, or set run.allow_config_change=true to resume with them anyway)")
    return recorded


def check_restored_step(micro_steps: int, update: int, grad_accum_steps: int) -> None:
    """A restored state's micro-step counter must match the checkpoint's update number."""
    if micro_steps != update * grad_accum_steps:
        raise ResumeMismatchError(f"checkpoint {update} holds {micro_steps} micro-steps, "
                                  f"expected {update} updates × grad_accum_steps {grad_accum_steps}")
