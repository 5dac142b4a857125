"""Device mesh ``(data, fsdp, expert, tensor)``, the logical-axis rules, and sharded jit of the step.

Every parameter carries logical axis names (``nn.with_logical_partitioning`` in the model); this file
is the only place that maps them to mesh axes (``LOGICAL_RULES``). Rules are applied in priority order
by flax's ``logical_to_mesh_axes``: a mesh axis already taken by an earlier dimension of the same array
is skipped, so one mesh axis is never used twice in an array (e.g. activations ``[batch, length,
embed]``: batch takes ``fsdp``, embed then stays replicated). A dimension whose size does not divide
its mesh axes falls back to the longest dividing prefix of them (usually replicated) with a logged
warning — tiny test models on 8 devices hit this; real models should not.

Batch rows are sharded over ``(data, fsdp, expert)``: the expert axis also splits the batch so that
expert parallelism moves tokens (all-to-all) instead of computing every token on every expert shard.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dmax_jax.training.state import TrainState

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axes, in priority order (earlier rules win a contested mesh axis).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("exp", "expert"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("qkv_heads", "tensor"),
    ("mlp", "tensor"),
    ("exp_mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

BATCH_KEYS_2D = ("input_ids", "noisy_input_ids", "labels")
BATCH_KEYS_1D = ("flag", "example_index")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (= fill with the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        fill = [i for i, s in enumerate(sizes) if s == -1]
        bad = [f"{MESH_AXES[i]}={s}" for i, s in enumerate(sizes) if s == 0 or s < -1]
        if bad or len(fill) > 1:
            raise ValueError(f"MeshConfig {self}: sizes must be positive with at most one -1 "
                             f"(got {bad or sizes})")
        known = math.prod(s for s in sizes if s != -1)
        if fill:
            if num_devices % known:
                raise ValueError(f"MeshConfig {self}: {num_devices} devices not divisible by {known}")
            sizes[fill[0]] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"MeshConfig {self}: mesh {tuple(sizes)} needs {math.prod(sizes)} devices, "
                             f"have {num_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 4-axis mesh over ``devices`` (default: all global devices, every process).

    Axis types are given explicitly as ``Auto`` (GSPMD/Shardy propagation from ``in_shardings`` and
    constraints): JAX 0.10 defaults ``make_mesh`` to ``Explicit`` sharding-in-types, which this code
    (and the model) is not written for.
    """
    devs = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devs))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def _axis_size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh, *, what: str = "array") -> P:
    """PartitionSpec of an array with logical dim ``names`` and ``shape`` on ``mesh`` (rules + the
    divisibility fallback). ``mesh`` may be a ``Mesh`` or an ``AbstractMesh``."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
    unknown = [n for n in names if n is not None and n not in dict(LOGICAL_RULES)]
    if unknown:
        raise ValueError(f"{what}: logical axis names {unknown} have no rule in LOGICAL_RULES")
    axes = nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES)
    out = []
    for name, size, ax in zip(names, shape, axes):
        if ax is None:
            out.append(None)
            continue
        tup = (ax,) if isinstance(ax, str) else tuple(ax)
        tup = tuple(a for a in tup if mesh.shape[a] > 1)  # size-1 axes add nothing
        keep = tup
        while keep and size % _axis_size(mesh, keep):
            keep = keep[:-1]
        if keep != tup:
            log.warning("%s: dim %r of size %d does not divide mesh axes %s (size %d); sharding it over %s",
                        what, name, size, tup, _axis_size(mesh, tup), keep or "nothing (replicated)")
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def _is_boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_shardings(boxed_params, mesh: Mesh):
    """NamedShardings for the *unboxed* params tree, from a boxed tree (``init_params(boxed=True)``,
    or its ``jax.eval_shape``). Leaves without logical names are replicated."""
    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if _is_boxed(leaf):
            spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, what=what)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=_is_boxed)


def model_param_shardings(config, mesh: Mesh):
    """``param_shardings`` of the model described by ``config`` (abstract init, nothing allocated)."""
    from dmax_jax.model.llada2 import init_params  # noqa: PLC0415  (keep this module model-agnostic)

    abstract = jax.eval_shape(lambda k: init_params(config, k, boxed=True), jax.random.key(0))
    return param_shardings(abstract, mesh)


def batch_shardings(mesh: Mesh, keys: Sequence[str] = BATCH_KEYS_2D + BATCH_KEYS_1D
                    ) -> dict[str, NamedSharding]:
    """Shardings of a training batch dict with ``keys`` (default: every key the data pipeline
    yields; jit needs the exact dict structure). Rows go over ``BATCH_AXES`` (module docstring)."""
    rows = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    out = {}
    for k in keys:
        if k not in BATCH_KEYS_2D + BATCH_KEYS_1D:
            raise ValueError(f"batch key {k!r} is not one of {BATCH_KEYS_2D + BATCH_KEYS_1D}")
        out[k] = NamedSharding(mesh, P(rows, None) if k in BATCH_KEYS_2D else P(rows))
    return out


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (devices along the batch axes)."""
    return _axis_size(mesh, BATCH_AXES)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation, by logical names, against the mesh in context
    (``jit_train_step`` puts it there). Without a mesh in context (single-device use, tests of the
    model alone) it returns ``x`` unchanged — there is nothing to constrain."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, what="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def train_state_shardings(state: TrainState, params_shardings, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of ``state`` (concrete or ``jax.eval_shape``'d). Optimizer leaves that
    mirror a parameter (Adam moments, MultiSteps accumulators: same trailing dict path and shape) take
    that parameter's sharding; counters, hyper-parameters and ``step`` are replicated."""
    replicated = NamedSharding(mesh, P())
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    flat_sh = jax.tree_util.tree_leaves(params_shardings)
    if len(flat_params) != len(flat_sh):
        raise ValueError(f"params_shardings has {len(flat_sh)} leaves, params have {len(flat_params)}")
    for (path, leaf), sh in zip(flat_params, flat_sh):
        by_path[_dict_keys(path)] = (tuple(leaf.shape), sh)

    def one(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    opt = jax.tree_util.tree_map_with_path(one, state.opt_state)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt)


def _dict_keys(path) -> tuple:
    """The trailing run of dict keys of a pytree path (the part that names a parameter)."""
    out = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(k.key)
    return tuple(reversed(out))


def make_global_batch(local_batch: dict, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Global batch arrays from this process's rows (``local_batch``: numpy ``[rows_here, ...]``, the
    data pipeline's per-process batch; process-major along the batch axis). One array per key of
    ``shardings``; extra keys of ``local_batch`` (e.g. ``example_index``) stay on the host."""
    missing = sorted(set(shardings) - set(local_batch))
    if missing:
        raise ValueError(f"batch lacks {missing} (has {sorted(local_batch)}; "
                         f"shardings for {sorted(shardings)})")
    return {k: jax.make_array_from_process_local_data(s, np.asarray(local_batch[k]))
            for k, s in shardings.items()}


def jit_train_step(train_step: Callable, state_shardings: TrainState, batch_shardings_: dict, mesh: Mesh,
                   *, compiler_options: dict[str, Any] | None = None):
    """``jax.jit`` of ``train_step(state, batch) -> (state, metrics)`` with explicit in/out shardings,
    the state donated (updated in place), metrics replicated, and ``mesh`` in context while tracing
    (for ``constrain``). ``compiler_options`` go to XLA unchanged (backend-specific)."""
    def step(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch)

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings_),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options)
