"""KV-cache attention through the decode kernel (``kernels_pallas.decode_attention``) on GPU / TPU.

The model's cached attention (``attention_layer._cached_attention``) sees valid cache slots plus
the block's own keys, block-causal on absolute positions; the kernel takes that as plain block ids
(``positions // block_length``; all zeros for the "full" mask). Cache slots hold committed blocks
at positions before every query (``KVCache``: a cached call starts at ``length``), so "every slot
``< cache_len`` is visible" is the same rule the dense path evaluates per slot.

The kernel holds one row's queries of a kv head (``Tq * G`` rows) on chip, so calls with more than
``MAX_KERNEL_ROWS`` rows — the prompt prefill and the first block, which run with an empty cache
and the whole prompt as queries — keep the dense path (``use_kernel``).

Under a multi-device mesh the kernel runs per shard (``jax.shard_map``; XLA cannot partition a
Mosaic call and would replicate a Triton one): rows over the batch axes when the batch divides
them, kv heads over ``tensor`` when both head counts divide it, anything else replicated into the
call — never padded, so the cache is never copied to fit a shard count.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dmax_jax.model.masks import MaskSpec
from dmax_jax.model.partitioned import HEAD_AXIS, kernel_mesh, row_axes
from kernels_pallas.decode_attention import decode_attention

MAX_KERNEL_ROWS = 512  # Tq * G: DMax-16B (G = 4) decodes blocks of 32 / cross-blocks of 64 -> 128 / 256


def use_kernel(q_len: int, q_heads: int, kv_heads: int) -> bool:
    """Whether a cached call of ``q_len`` tokens runs the decode kernel (else dense attention)."""
    return q_len * (q_heads // kv_heads) <= MAX_KERNEL_ROWS


def _shard_specs(mesh, batch: int, q_heads: int, kv_heads: int) -> tuple[P, P, P]:
    """(4-D, 2-D, 1-D) PartitionSpecs for ``[B, T, N, D]``, ``[B, T]`` and ``[B]`` operands."""
    axes = row_axes(mesh)
    if axes and batch % math.prod(mesh.shape[a] for a in axes):
        axes = ()  # a batch the shards do not divide runs whole on every device
    t = mesh.shape[HEAD_AXIS] if HEAD_AXIS in mesh.axis_names else 1
    heads = HEAD_AXIS if t > 1 and q_heads % t == 0 and kv_heads % t == 0 else None
    rows = axes or None
    return P(rows, None, heads, None), P(rows, None), P(rows)


def decode_kernel_attention(q, k, v, positions, cache, spec: MaskSpec, *, platform: str,
                            interpret: bool | None = None):
    """``_cached_attention`` via the Pallas decode kernel of ``platform`` (``gpu`` / ``tpu``; with
    ``interpret=True`` either runs on CPU, for tests). Shapes as ``attention_layer.Attention``."""
    k_cache, v_cache, cache_len = cache
    if spec.kind == "full":  # everything valid is visible
        blk = jnp.zeros(positions.shape, jnp.int32)
    else:
        blk = (positions // spec.block_length).astype(jnp.int32)

    def call(q_, kc, vc, n, kn, vn, b_):
        return decode_attention(q_, kc, vc, n, kn, vn, b_, b_, impl="pallas", platform=platform,
                                interpret=interpret)

    args = (q, k_cache, v_cache, cache_len.astype(jnp.int32), k, v, blk)
    mesh = kernel_mesh()
    if mesh is None:
        return call(*args)
    s4, s2, s1 = _shard_specs(mesh, q.shape[0], q.shape[2], k.shape[2])
    fn = jax.shard_map(call, mesh=mesh, in_specs=(s4, s4, s4, s1, s4, s4, s2), out_specs=s4,
                       check_vma=False)
    return fn(*args)
