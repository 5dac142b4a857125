"""Kernel calls under a mesh: every Pallas kernel (Mosaic on TPU, Triton on GPU) runs per shard.

XLA cannot partition a kernel's custom call: a Mosaic call under GSPMD is an error ("Mosaic kernels
cannot be automatically partitioned"), and a Triton call is silently replicated (every device
gathers the whole batch). So inside a mesh (the abstract mesh in context: ``jit_train_step`` puts
the training mesh there, decoding programs theirs) each kernel call goes through ``jax.shard_map``
over the axes its rows are split over — the batch axes ``TOKEN_AXES`` for token rows, plus
``tensor`` for attention heads — with everything else replicated into the call (an FSDP gather,
as GSPMD would do for a plain matmul). Without a mesh, or on one device, the call is made as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TOKEN_AXES = ("data", "fsdp", "expert")  # = training.sharding.BATCH_AXES (the model must not import training)
HEAD_AXIS = "tensor"


def kernel_mesh():
    """The abstract mesh in context if it spans more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def row_axes(mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that split rows: the batch axes."""
    return tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def _size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def rows_per_shard(fn: Callable, rows: tuple[jax.Array, ...], whole: tuple[jax.Array, ...]) -> jax.Array:
    """``fn(*rows, *whole)`` with the leading dim of every ``rows`` array split over the batch axes
    and ``whole`` replicated; rows are padded to a multiple of the shard count (and cut after), so
    any row count works (a 32-token decode block over 64 devices included). Output: ``[rows, ...]``."""
    mesh = kernel_mesh()
    if mesh is None or not row_axes(mesh):
        return fn(*rows, *whole)
    axes = row_axes(mesh)
    n, shards = rows[0].shape[0], _size(mesh, axes)
    pad = -n % shards
    if pad:
        rows = tuple(jnp.pad(r, [(0, pad)] + [(0, 0)] * (r.ndim - 1)) for r in rows)
    spec = P(axes)
    call = jax.shard_map(fn, mesh=mesh, in_specs=(*(spec,) * len(rows), *(P(),) * len(whole)),
                         out_specs=spec, check_vma=False)
    out = call(*rows, *whole)
    return out[:n] if pad else out


def heads_per_shard(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``fn(q, k, v)`` for attention ``[B, T, N, D]`` per shard: batch over the batch axes, heads over
    ``tensor`` when both head counts divide it. The batch must divide its axes (training batches
    do: ``training.sharding.batch_divisor``)."""
    mesh = kernel_mesh()
    if mesh is None:
        return fn(q, k, v)
    axes = row_axes(mesh)
    if axes and q.shape[0] % _size(mesh, axes):
        raise ValueError(f"attention kernel: batch {q.shape[0]} not divisible by mesh axes {axes} "
                         f"({_size(mesh, axes)} devices)")
    t = mesh.shape.get(HEAD_AXIS, 1) if HEAD_AXIS in mesh.axis_names else 1
    heads = HEAD_AXIS if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    if not axes and heads is None:
        return fn(q, k, v)
    spec = P(axes or None, None, heads, None)
    call = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return call(q, k, v)
