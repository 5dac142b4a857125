"""Pallas kernels for SPD soft embeddings: gather K token rows + the MASK row, mix, norm-rescale.

The XLA reference materialises ``[N, K, H]`` gathered rows in float32 before reducing them; the
kernels keep each position's rows on chip and write only ``[N, H]`` in the output dtype.
Positions are flattened: ``N = batch * length``. Two formulations, one per compiler:

* **TPU (Mosaic)** — ``soft_embeddings_tpu``. Token ids (and probabilities) are scalar-prefetched
  into SMEM so each table ``BlockSpec``'s ``index_map`` can name the HBM block holding the wanted
  row; the Pallas pipeline then DMAs (double-buffered) just that block into VMEM. Mosaic requires
  a block's second-minor dim to be a multiple of 8 (or the full vocab), so a block is one native
  sublane tile of ``R`` rows (8 for 32-bit, 16 for 16-bit tables) and the row is picked out with an
  iota select. Grid ``(N / TILE, TILE)``: the outer axis is parallel (megacore), the inner one walks
  the TILE positions of one output block, which is assembled in a float32 VMEM scratch and
  written once (TILE = 16 rows is a whole native tile for f32 and bf16 outputs). The hidden dim
  is always a full-extent block, so any H is legal (no padding copy of a 150k-row table).
* **GPU (Triton)** — ``soft_embeddings_gpu``. The table stays in global memory (``pl.ANY``); each
  program handles ``block_rows`` positions and loads the rows with pointer gathers
  ``table[ids[:, None], cols[None, :]]``. Triton blocks must be powers of two, so the hidden dim
  is padded to ``next_pow2(H)`` inside the kernel with masked loads/stores.

All arithmetic is float32; ids are clipped to ``[0, vocab)`` by the wrapper (an out-of-range id
must never become an out-of-bounds DMA). Inputs are assumed already validated by ``ops.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.typing import DTypeLike

from kernels_pallas.soft_embedding.reference import NORM_EPS

TPU_TILE = 16  # output positions per grid block: one (16, 128) bf16 tile / two (8, 128) f32 tiles
# Scalar-prefetched ids + probs live in SMEM (tens of KiB); longer inputs are split into calls.
TPU_MAX_PREFETCH = 4096
GPU_TILE_ELEMS = 4096  # float32 elements per [block_rows, H_pad] tile (≈ 16 registers/thread at 8 warps)


def _flatten(token_ids: jax.Array, probs: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """``[B, T, K]`` → clipped int32 ids and float32 probs of shape ``[B*T, K]``."""
    k = token_ids.shape[-1]
    ids = jnp.clip(token_ids.reshape(-1, k).astype(jnp.int32), 0, vocab - 1)
    return ids, probs.reshape(-1, k).astype(jnp.float32)


def _rescale(mix: jax.Array, target: jax.Array) -> jax.Array:
    """``mix · n* / (||mix|| + eps)`` over the last axis; ``target`` broadcasts like a keepdims norm."""
    norm = jnp.sqrt(jnp.sum(mix * mix, axis=-1, keepdims=True))
    return mix * (target / (norm + NORM_EPS))


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)


def _tpu_kernel(ids_ref, p_ref, *refs, top_k: int, rows: int, mask_id: int):
    """One grid step = one position. ``refs`` = K token-row blocks, the MASK-row block
    (each ``[rows, H]``), the output block ``[TILE, H]`` and the f32 scratch ``[TILE, H]``."""
    tok_refs, mask_ref, o_ref, acc_ref = refs[:top_k], refs[top_k], refs[top_k + 1], refs[top_k + 2]
    j = pl.program_id(1)
    pos = pl.program_id(0) * TPU_TILE + j

    def pick(ref, row):
        blk = ref[...].astype(jnp.float32)                                 # [rows, H]
        hit = lax.broadcasted_iota(jnp.int32, blk.shape, 0) == row
        # select (not multiply): rows past the vocab end of an edge block are undefined memory
        return jnp.sum(jnp.where(hit, blk, 0.0), axis=0, keepdims=True)   # [1, H]

    def row_norm(e):
        return jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))            # [1, 1]

    mix = jnp.zeros((1, acc_ref.shape[1]), jnp.float32)
    target = jnp.zeros((1, 1), jnp.float32)
    total = jnp.zeros((1, 1), jnp.float32)  # vector side: keeps f32 max/sub off the scalar unit
    for k in range(top_k):
        p = p_ref[pos * top_k + k]
        e = pick(tok_refs[k], lax.rem(ids_ref[pos * top_k + k], rows))
        mix = mix + p * e
        target = target + p * row_norm(e)
        total = total + p
    rest = jnp.maximum(0.0, 1.0 - total)                                   # [1, 1]
    e_m = pick(mask_ref, mask_id % rows)
    h = _rescale(mix + rest * e_m, target + rest * row_norm(e_m))          # [1, H]
    # Every row of the scratch is written by its own step before the last step reads it.
    sel = lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0) == j
    acc_ref[...] = jnp.where(sel, h, acc_ref[...])

    @pl.when(j == TPU_TILE - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_call(table: jax.Array, ids: jax.Array, probs: jax.Array, mask_id: int, out_dtype: DTypeLike,
              interpret: bool) -> jax.Array:
    """One pallas_call over ``ids/probs [n, K]`` with ``n`` a multiple of TPU_TILE."""
    n, top_k = ids.shape
    vocab, hidden = table.shape
    rows = min(vocab, 8 * max(1, 4 // table.dtype.itemsize))  # one native sublane tile of rows

    def token_spec(k):
        def index_map(i, j, ids_ref, p_ref):  # the block of `rows` table rows holding token k
            return lax.div(ids_ref[(i * TPU_TILE + j) * top_k + k], rows), 0
        return pl.BlockSpec((rows, hidden), index_map)

    mask_spec = pl.BlockSpec((rows, hidden), lambda i, j, ids_ref, p_ref: (mask_id // rows, 0))
    out_spec = pl.BlockSpec((TPU_TILE, hidden), lambda i, j, ids_ref, p_ref: (i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n // TPU_TILE, TPU_TILE),
        in_specs=[token_spec(k) for k in range(top_k)] + [mask_spec],
        out_specs=out_spec,
        scratch_shapes=[pltpu.VMEM((TPU_TILE, hidden), jnp.float32)],
    )
    itemsize = table.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(n * hidden * (top_k + 1) * (2 * rows + 4)),
        transcendentals=int(n * (top_k + 2)),
        bytes_accessed=int(n * (top_k * rows * hidden * itemsize + hidden * jnp.dtype(out_dtype).itemsize)),
    )
    kernel = functools.partial(_tpu_kernel, top_k=top_k, rows=rows, mask_id=mask_id)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((n, hidden), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="soft_embeddings_tpu",
    )(ids.reshape(-1), probs.reshape(-1), *([table] * (top_k + 1)))


def soft_embeddings_tpu(table: jax.Array, token_ids: jax.Array, probs: jax.Array, mask_id: int, *,
                        out_dtype: DTypeLike, interpret: bool = False) -> jax.Array:
    """Mosaic formulation: ``table [V, H]``, ``token_ids/probs [B, T, K]`` → ``[B, T, H]``."""
    b, t, top_k = token_ids.shape
    vocab, hidden = table.shape
    ids, p = _flatten(token_ids, probs, vocab)
    n = b * t
    n_pad = pl.cdiv(n, TPU_TILE) * TPU_TILE
    # Padding positions gather row 0 with p = 0 (pure MASK rows); they are sliced off below.
    ids = jnp.pad(ids, ((0, n_pad - n), (0, 0)))
    p = jnp.pad(p, ((0, n_pad - n), (0, 0)))
    chunk = max(TPU_TILE, TPU_MAX_PREFETCH // top_k // TPU_TILE * TPU_TILE)
    outs = [_tpu_call(table, ids[s:s + chunk], p[s:s + chunk], mask_id, out_dtype, interpret)
            for s in range(0, n_pad, chunk)]
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return out[:n].reshape(b, t, hidden)


# ---------------------------------------------------------------------------------------------
# GPU (Triton)


def _gpu_kernel(ids_ref, p_ref, table_ref, o_ref, *, n: int, top_k: int, hidden: int,
                block_rows: int, block_h: int, mask_id: int):
    """One program = ``block_rows`` positions × the padded hidden dim ``block_h``."""
    pos = pl.program_id(0) * block_rows + jnp.arange(block_rows)           # [R]
    pos_ok = pos < n
    cols = jnp.arange(block_h)                                             # [Hp]
    col_ok = cols < hidden
    tile_ok = pos_ok[:, None] & col_ok[None, :]

    mix = jnp.zeros((block_rows, block_h), jnp.float32)
    target = jnp.zeros((block_rows, 1), jnp.float32)
    total = jnp.zeros((block_rows, 1), jnp.float32)
    for k in range(top_k):
        tok = plgpu.load(ids_ref.at[pos * top_k + k], mask=pos_ok, other=0)
        p = plgpu.load(p_ref.at[pos * top_k + k], mask=pos_ok, other=0.0)[:, None]
        e = plgpu.load(table_ref.at[tok[:, None], cols[None, :]], mask=tile_ok,
                       other=0.0).astype(jnp.float32)                      # [R, Hp], pad cols = 0
        mix = mix + p * e
        target = target + p * jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
        total = total + p
    rest = jnp.maximum(0.0, 1.0 - total)
    e_m = plgpu.load(table_ref.at[mask_id, cols], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
    h = _rescale(mix + rest * e_m, target + rest * jnp.sqrt(jnp.sum(e_m * e_m, axis=-1, keepdims=True)))
    plgpu.store(o_ref.at[pos[:, None], cols[None, :]], h.astype(o_ref.dtype), mask=tile_ok)


def soft_embeddings_gpu(table: jax.Array, token_ids: jax.Array, probs: jax.Array, mask_id: int, *,
                        out_dtype: DTypeLike, interpret: bool = False) -> jax.Array:
    """Triton formulation: ``table [V, H]``, ``token_ids/probs [B, T, K]`` → ``[B, T, H]``."""
    b, t, top_k = token_ids.shape
    vocab, hidden = table.shape
    ids, p = _flatten(token_ids, probs, vocab)
    n = b * t
    block_h = pl.next_power_of_2(hidden)
    block_rows = max(1, min(16, GPU_TILE_ELEMS // block_h, pl.next_power_of_2(n)))
    num_warps = max(1, min(8, block_rows * block_h // 512))
    kernel = functools.partial(_gpu_kernel, n=n, top_k=top_k, hidden=hidden, block_rows=block_rows,
                               block_h=block_h, mask_id=mask_id)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_rows),),
        in_specs=[any_spec, any_spec, any_spec],
        out_specs=any_spec,
        out_shape=jax.ShapeDtypeStruct((n, hidden), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="soft_embeddings_gpu",
    )(ids.reshape(-1), p.reshape(-1), table)
    return out.reshape(b, t, hidden)
