"""Dispatcher for the block-diffusion flash kernel: tile tables, head-dim padding, ``custom_vjp``.

``flash_attention(q, k, v, mask, *, scale, interpret)`` takes q ``[B, Tp, Nq, D]``, k/v
``[B, Tp, Nkv, D]`` already laid out on the ``FlashMask``'s ``Tp`` tokens (the caller pads the
sequence; padding tokens are ``valid = False``), pads the head dim to a power of two and runs the
Triton kernels of ``kernel.py`` (GPU) or the same kernels in the Pallas interpreter
(``interpret=True``, any platform). Self-contained: imports nothing from ``dmax_jax``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash_attention import kernel
from kernels_pallas.flash_attention.reference import FlashMask

DEFAULT_TILE = 64


def _pow2_at_least(x: int, low: int = 16) -> int:
    return max(low, 1 << (x - 1).bit_length())


def live_lists(live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise live column lists: ``counts [rows]`` and ``idx [rows, max(1, max count)]`` (int32,
    unused slots repeat the last live column so a prefetching kernel never reads a new tile)."""
    counts = live.sum(axis=1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    idx = np.zeros((live.shape[0], width), np.int32)
    for r in range(live.shape[0]):
        cols = np.flatnonzero(live[r])
        if cols.size:
            idx[r, : cols.size] = cols
            idx[r, cols.size:] = cols[-1]
    return counts, idx


def _tables(mask: FlashMask) -> tuple[np.ndarray, ...]:
    """(blk, clean, valid, counts, idx, counts_T, idx_T) as flat int32 numpy."""
    live = np.asarray(mask.live, bool)
    counts, idx = live_lists(live)
    counts_t, idx_t = live_lists(live.T)
    return tuple(np.ascontiguousarray(a, np.int32).reshape(-1)
                 for a in (mask.blk, mask.clean, mask.valid, counts, idx, counts_t, idx_t))


@functools.lru_cache(maxsize=64)
def _flash_fn(mask: FlashMask, scale: float, interpret: bool):
    """``custom_vjp`` over ``[B, Tp, N, Dp]`` inputs for one static mask (cached by identity)."""
    tables_np = _tables(mask)
    kw = dict(scale=scale, tile=mask.tile, interpret=interpret)

    def tables():
        return tuple(jnp.asarray(t) for t in tables_np)

    @jax.custom_vjp
    def flash(q, k, v):
        return kernel.flash_forward(q, k, v, tables(), **kw)[0]

    def fwd(q, k, v):
        out, lse = kernel.flash_forward(q, k, v, tables(), **kw)
        return out, (q, k, v, out, lse)

    def bwd(res, do):
        q, k, v, out, lse = res
        delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), do.astype(jnp.float32))
        return kernel.flash_backward(q, k, v, do, lse, delta, tables(), **kw)

    flash.defvjp(fwd, bwd)
    return flash


def flash_attention(q, k, v, mask: FlashMask, *, scale: float | None = None, interpret: bool = False):
    """Block-skipping flash attention (Pallas/Triton) over ``mask``'s padded tokens -> ``[B, Tp,
    Nq, D]`` in q's dtype (f32 softmax, default scale 1/sqrt(D); rows seeing no key are 0)."""
    if q.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q [B, Tp, Nq, D] and k/v [B, Tp, Nkv, D] expected; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if q.shape[1] != mask.length:
        raise ValueError(f"inputs have {q.shape[1]} tokens, the mask {mask.length}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not divisible by kv heads {k.shape[2]}")
    d = q.shape[3]
    scale = float(d ** -0.5 if scale is None else scale)
    dp = _pow2_at_least(d)

    def prep(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d)))

    out = _flash_fn(mask, scale, bool(interpret))(prep(q), prep(k), prep(v))
    return out[..., :d].astype(q.dtype)
