"""Dispatcher for the block-diffusion flash kernel: padding, static tile tables, ``custom_vjp``.

``flash_attention(q, k, v, *, spec, scale, tile, interpret)`` takes the model's shapes (q
``[B, T, Nq, D]``, k/v ``[B, T, Nkv, D]``), pads the sequence per segment (``PaddedLayout``) and
the head dim to a power of two, and runs the Triton kernels of ``kernel.py`` (GPU) or the same
kernels in the Pallas interpreter (``interpret=True``, CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model.attention_backends.layout import (
    check_qkv,
    live_lists,
    padded_layout,
    tile_liveness,
)
from dmax_jax.model.masks import MaskSpec
from kernels_pallas.flash_attention import kernel

DEFAULT_TILE = 64


def _pow2_at_least(x: int, low: int = 16) -> int:
    return max(low, 1 << (x - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _tables(spec: MaskSpec, length: int, tile: int) -> tuple[np.ndarray, ...]:
    """(blk, clean, valid, counts, idx, counts_T, idx_T) as int32 numpy (idx lists flattened)."""
    layout = padded_layout(spec, length, tile)
    live = tile_liveness(layout, tile, tile)
    counts, idx = live_lists(live)
    counts_t, idx_t = live_lists(live.T)
    tok = [layout.blk, layout.clean, layout.valid]
    return tuple(np.ascontiguousarray(a, np.int32).reshape(-1)
                 for a in (*tok, counts, idx, counts_t, idx_t))


@functools.lru_cache(maxsize=64)
def _flash_fn(spec: MaskSpec, length: int, tile: int, scale: float, interpret: bool):
    """``custom_vjp`` over padded ``[B, Tp, N, Dp]`` inputs for one static configuration."""
    tables_np = _tables(spec, length, tile)
    kw = dict(scale=scale, tile=tile, interpret=interpret)

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


def flash_attention(q, k, v, *, spec: MaskSpec, scale: float | None = None, tile: int = DEFAULT_TILE,
                    interpret: bool = False):
    """Block-skipping flash attention (Pallas/Triton). ``tile``: a power of two >= 16 tokens;
    ``interpret=True`` runs the kernels in the Pallas interpreter (any platform)."""
    b, t, nq, nkv, d = check_qkv(q, k, v)
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16 (Triton dot tiles), got {tile}")
    scale = float(d ** -0.5 if scale is None else scale)
    layout = padded_layout(spec, t, tile)
    dp = _pow2_at_least(d)

    def prep(x):
        return jnp.pad(layout.pad(x), ((0, 0), (0, 0), (0, 0), (0, dp - d)))

    out = _flash_fn(spec, t, tile, scale, bool(interpret))(prep(q), prep(k), prep(v))
    return layout.unpad(out[..., :d]).astype(q.dtype)
