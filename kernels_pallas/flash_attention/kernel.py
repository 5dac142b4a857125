"""Pallas (Triton) flash-attention kernels with block skipping for block-diffusion masks.

Inputs come from ``ops.py``: q ``[B, Tp, Nq, Dp]``, k/v ``[B, Tp, Nkv, Dp]`` with Tp a multiple of
the tile and Dp a power of two >= 16 (Triton tiles must be powers of two). Per-token facts
``blk``, ``clean``, ``valid`` (int32 ``[Tp]``, from a ``FlashMask``) feed ``reference.allowed``
inside the kernel, and a static live-tile list (``counts [n]``, flattened ``idx [n * width]``)
bounds every inner loop, so dead tiles are never loaded. Three kernels:

* forward: grid (q tile, batch, q head); loop over live key tiles; online softmax; writes the
  output and the row log-sum-exp;
* dq: same grid and loop, recomputes probabilities from the log-sum-exp;
* dk/dv: grid (key tile, batch, kv head); loops over the G query heads of that kv head and the
  live query tiles of the transposed list, so GQA gradients are summed inside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.flash_attention.reference import NEG as _NEG
from kernels_pallas.flash_attention.reference import allowed


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    # f32 inputs: full precision (no TF32) so results match the XLA reference.
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = jax.lax.Precision.HIGHEST if exact else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _mask(blk_ref, clean_ref, valid_ref, q_rows, k_rows):
    q_blk, q_clean = blk_ref[q_rows], clean_ref[q_rows] != 0
    k_blk, k_clean, k_valid = blk_ref[k_rows], clean_ref[k_rows] != 0, valid_ref[k_rows] != 0
    ok = allowed(q_blk[:, None], q_clean[:, None], k_blk[None, :], k_clean[None, :])
    return ok & k_valid[None, :]


def _fwd_kernel(q_ref, k_ref, v_ref, blk_ref, clean_ref, valid_ref, cnt_ref, idx_ref, o_ref, lse_ref,
                *, scale: float, tile: int, width: int):
    i = pl.program_id(0)
    q_rows = pl.ds(i * tile, tile)
    q = q_ref[...]

    def body(j, carry):
        o, m, denom = carry
        c = idx_ref[i * width + j]
        k_rows = pl.ds(c * tile, tile)
        mask = _mask(blk_ref, clean_ref, valid_ref, q_rows, k_rows)
        s = jnp.where(mask, _dot(q, k_ref[k_rows, :], trans_b=True) * scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        v = v_ref[k_rows, :]
        o = o * corr[:, None] + _dot(p.astype(v.dtype), v)
        return o, m_new, denom * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((tile,), _NEG, jnp.float32),
            jnp.zeros((tile,), jnp.float32))
    o, m, denom = jax.lax.fori_loop(0, cnt_ref[i], body, init)
    l_safe = jnp.where(denom > 0, denom, 1.0)  # padding-only rows see nothing
    o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, blk_ref, clean_ref, valid_ref, cnt_ref,
               idx_ref, dq_ref, *, scale: float, tile: int, width: int):
    i = pl.program_id(0)
    q_rows = pl.ds(i * tile, tile)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        c = idx_ref[i * width + j]
        k_rows = pl.ds(c * tile, tile)
        k, v = k_ref[k_rows, :], v_ref[k_rows, :]
        mask = _mask(blk_ref, clean_ref, valid_ref, q_rows, k_rows)
        p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, blk_ref, clean_ref, valid_ref, cnt_ref,
                idx_ref, dk_ref, dv_ref, *, scale: float, tile: int, width: int, groups: int):
    c = pl.program_id(0)
    k_rows = pl.ds(c * tile, tile)
    k, v = k_ref[...], v_ref[...]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):  # query heads served by this kv head (static, small)

        def body(j, carry, g=g):
            dk, dv = carry
            r = idx_ref[c * width + j]
            q_rows = pl.ds(r * tile, tile)
            q, do = q_ref[q_rows, g, :], do_ref[q_rows, g, :]
            lse, delta = lse_ref[g, q_rows], delta_ref[g, q_rows]
            mask = _mask(blk_ref, clean_ref, valid_ref, q_rows, k_rows)
            p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
            ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        dk, dv = jax.lax.fori_loop(0, cnt_ref[c], body, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(tile: int, dp: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=4 if tile * dp <= 64 * 64 else 8, num_stages=2)


def _whole(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((n,), lambda *_: (0,))


def flash_forward(q, k, v, tables, *, scale: float, tile: int, interpret: bool):
    """-> out ``[B, Tp, Nq, Dp]`` (q dtype), lse ``[B, Nq, Tp]`` f32."""
    b, tp, nq, dp = q.shape
    groups = nq // k.shape[2]
    blk, clean, valid, cnt, idx, _, _ = tables
    width = idx.shape[0] // cnt.shape[0]
    seq_spec = pl.BlockSpec((None, tp, None, dp), lambda i, bi, h: (bi, 0, h // groups, 0))
    tile_spec = pl.BlockSpec((None, tile, None, dp), lambda i, bi, h: (bi, i, h, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, tile=tile, width=width),
        grid=(tp // tile, b, nq),
        in_specs=[tile_spec, seq_spec, seq_spec, _whole(tp), _whole(tp), _whole(tp),
                  _whole(cnt.shape[0]), _whole(idx.shape[0])],
        out_specs=[tile_spec, pl.BlockSpec((None, None, tile), lambda i, bi, h: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, tp), jnp.float32)],
        compiler_params=_params(tile, dp),
        interpret=interpret,
        name="block_diffusion_flash_fwd",
    )(q, k, v, blk, clean, valid, cnt, idx)


def flash_backward(q, k, v, do, lse, delta, tables, *, scale: float, tile: int, interpret: bool):
    """-> dq ``[B, Tp, Nq, Dp]``, dk/dv ``[B, Tp, Nkv, Dp]`` (input dtypes)."""
    b, tp, nq, dp = q.shape
    nkv = k.shape[2]
    groups = nq // nkv
    blk, clean, valid, cnt, idx, cnt_t, idx_t = tables
    tok = [_whole(tp)] * 3

    seq_kv = pl.BlockSpec((None, tp, None, dp), lambda i, bi, h: (bi, 0, h // groups, 0))
    tile_q = pl.BlockSpec((None, tile, None, dp), lambda i, bi, h: (bi, i, h, 0))
    row_q = pl.BlockSpec((None, None, tile), lambda i, bi, h: (bi, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, tile=tile, width=idx.shape[0] // cnt.shape[0]),
        grid=(tp // tile, b, nq),
        in_specs=[tile_q, seq_kv, seq_kv, tile_q, row_q, row_q, *tok, _whole(cnt.shape[0]),
                  _whole(idx.shape[0])],
        out_specs=tile_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(tile, dp),
        interpret=interpret,
        name="block_diffusion_flash_dq",
    )(q, k, v, do, lse, delta, blk, clean, valid, cnt, idx)

    seq_q = pl.BlockSpec((None, tp, groups, dp), lambda c, bi, h: (bi, 0, h, 0))
    seq_row = pl.BlockSpec((None, groups, tp), lambda c, bi, h: (bi, h, 0))
    tile_kv = pl.BlockSpec((None, tile, None, dp), lambda c, bi, h: (bi, c, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, tile=tile, width=idx_t.shape[0] // cnt_t.shape[0],
                          groups=groups),
        grid=(tp // tile, b, nkv),
        in_specs=[seq_q, tile_kv, tile_kv, seq_q, seq_row, seq_row, *tok, _whole(cnt_t.shape[0]),
                  _whole(idx_t.shape[0])],
        out_specs=[tile_kv, tile_kv],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(tile, dp),
        interpret=interpret,
        name="block_diffusion_flash_dkv",
    )(q, k, v, do, lse, delta, blk, clean, valid, cnt_t, idx_t)
    return dq, dk, dv
