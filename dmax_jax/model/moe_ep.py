"""Expert-parallel MoE compute: tokens travel to the shard that owns their expert (``all_to_all``).

Why: under plain GSPMD the ragged-dot MoE (``moe.experts_ragged``) with the expert axis sharded
all-gathers the expert weights or the tokens; with hundreds of experts the weights dominate memory,
so each ``expert`` shard should keep only its ``E / X`` experts and receive the tokens routed there.

How (inside ``jax.shard_map`` over the mesh in context; X = size of the ``expert`` axis):
1. every device takes its local tokens ``[n, H]`` and their K assignments, sorts the ``n·K``
   assignments by destination shard (``expert // (E/X)``) and packs them into a send buffer
   ``[X, C, H]`` (C slots per destination, plus the local expert id, −1 = empty slot);
2. ``all_to_all`` over ``expert`` swaps the buffers, each device runs its local experts on what it
   received with one ``ragged_dot`` per projection (rows sorted by local expert, empty slots last —
   ragged_dot leaves rows past the group sizes at zero; they are also masked);
3. a second ``all_to_all`` brings the expert outputs home, where they are combined with the routing
   weights (float32) exactly as ``experts_ragged`` does.

Dropless by default: C = n·K (a destination may receive every assignment), so the result equals
``experts_ragged`` up to float rounding, at the price of a buffer X times larger than the average
traffic. ``capacity_factor`` caps C at ``ceil(capacity_factor · n·K / X)``; assignments past the cap
are dropped (they contribute 0) — not exact, for memory-bound runs only.
``jax.lax.all_to_all`` (not ``ragged_all_to_all``) keeps this path runnable on CPU, where the tests
live. Tokens are expected sharded over ``TOKEN_AXES`` (the batch axes of ``training/sharding.py``);
expert weights enter as ``P("expert", None, None)`` (GSPMD gathers any fsdp/tensor shards first).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dmax_jax.model.moe import experts_ragged

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")  # = training.sharding.BATCH_AXES (the model must not import training)


def experts_ep(x, idx, w, w_gate, w_up, w_down, *, capacity_factor: float | None = None):
    """Drop-in for ``experts_ragged(x, idx, w, w_gate, w_up, w_down)`` (x ``[N, H]``, idx/w ``[N, K]``,
    weights ``[E, H, Im]``/``[E, Im, H]``) that runs expert-parallel over the mesh in context. With no
    mesh in context, or an ``expert`` axis of size 1, there is nothing to distribute and it is
    ``experts_ragged`` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
        return experts_ragged(x, idx, w, w_gate, w_up, w_down)
    n_shards, n_experts = mesh.shape[EXPERT_AXIS], w_gate.shape[0]
    if n_experts % n_shards:
        raise ValueError(f"expert parallelism: {n_experts} experts not divisible by the '{EXPERT_AXIS}' "
                         f"mesh axis of size {n_shards}")
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    n_token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if x.shape[0] % n_token_shards:
        raise ValueError(f"expert parallelism: {x.shape[0]} tokens not divisible by the {n_token_shards} "
                         f"devices of mesh axes {token_axes}")
    local = x.shape[0] // n_token_shards
    assignments = local * idx.shape[1]
    cap = assignments if capacity_factor is None else min(
        assignments, max(1, math.ceil(capacity_factor * assignments / n_shards)))
    tok, wspec = P(token_axes, None), P(EXPERT_AXIS, None, None)
    fn = jax.shard_map(functools.partial(_local_experts, n_shards=n_shards, capacity=cap), mesh=mesh,
                       in_specs=(tok, tok, tok, wspec, wspec, wspec), out_specs=tok)
    return fn(x, idx, w, w_gate, w_up, w_down)


def _local_experts(x, idx, w, w_gate, w_up, w_down, *, n_shards: int, capacity: int):
    """Per-device body: x ``[n, H]`` local tokens, weights ``[E/X, ...]`` local experts."""
    n, k = idx.shape
    hdim = x.shape[1]
    e_local = w_gate.shape[0]
    slots = n_shards * capacity

    # 1. pack assignments by destination shard
    flat = idx.reshape(-1)
    dest, local_id = flat // e_local, flat % e_local
    order = jnp.argsort(dest, stable=True)
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=n_shards)
    rank = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest_sorted]
    keep = rank < capacity
    slot = jnp.where(keep, dest_sorted * capacity + rank, slots)  # out of range = dropped
    send_x = jnp.zeros((slots, hdim), x.dtype).at[slot].set(jnp.take(x, order // k, axis=0), mode="drop")
    send_e = jnp.full((slots,), -1, jnp.int32).at[slot].set(local_id[order].astype(jnp.int32), mode="drop")

    # 2. exchange, run the local experts on what arrived
    recv_x = _swap(send_x.reshape(n_shards, capacity, hdim)).reshape(slots, hdim)
    recv_e = _swap(send_e.reshape(n_shards, capacity)).reshape(slots)
    valid = recv_e >= 0
    key = jnp.where(valid, recv_e, e_local)  # empty slots sort last, outside every group
    by_expert = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    rows = jnp.take(recv_x, by_expert, axis=0)
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up, sizes)
    out = jax.lax.ragged_dot(h.astype(x.dtype), w_down, sizes)
    out = jnp.zeros_like(out).at[by_expert].set(out) * valid[:, None].astype(out.dtype)

    # 3. bring results home and combine with the routing weights
    back = _swap(out.reshape(n_shards, capacity, hdim)).reshape(slots, hdim)
    got = jnp.take(back, jnp.minimum(slot, slots - 1), axis=0) * keep[:, None].astype(back.dtype)
    per_assignment = jnp.zeros_like(got).at[order].set(got).reshape(n, k, hdim)
    return jnp.einsum("nkh,nk->nh", per_assignment.astype(jnp.float32), w).astype(x.dtype)


def _swap(buf):
    """``buf[s]`` goes to expert shard s; returns ``[X, ...]`` with row s from shard s."""
    return jax.lax.all_to_all(buf, EXPERT_AXIS, split_axis=0, concat_axis=0, tiled=False)
