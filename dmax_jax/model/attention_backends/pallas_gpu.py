"""``pallas_gpu``: adapter from a ``MaskSpec`` to the Pallas/Triton flash kernel
(``kernels_pallas.flash_attention``, a leaf that only sees plain arrays).

The adapter pads each segment to the kernel tile (``tiles.padded_layout``), hands the kernel the
padded tokens' ``(blk, clean, valid)`` and the live-tile matrix (``tiles.tile_liveness``) as a
``FlashMask``, and cuts the padding off again. Needs an NVIDIA GPU; ``interpret=True`` runs the
kernels in the Pallas interpreter (tests)."""

from __future__ import annotations

import functools

from dmax_jax.model.attention_backends.tiles import check_qkv, padded_layout, tile_liveness
from dmax_jax.model.masks import MaskSpec
from kernels_pallas.flash_attention import FlashMask, flash_attention
from kernels_pallas.flash_attention.ops import DEFAULT_TILE


@functools.lru_cache(maxsize=64)
def flash_mask(spec: MaskSpec, length: int, tile: int) -> FlashMask:
    """The kernel's plain mask for ``length`` tokens in ``spec``'s layout (cached: the kernel
    caches its compiled tables per mask object)."""
    layout = padded_layout(spec, length, tile)
    return FlashMask(layout.blk, layout.clean, layout.valid, tile_liveness(layout, tile, tile), tile)


def pallas_gpu_attention(q, k, v, *, spec: MaskSpec, scale: float | None = None,
                         tile: int = DEFAULT_TILE, interpret: bool = False):
    """Masked self-attention via the Pallas GPU kernel; shapes as ``attention_backends`` documents.
    ``tile``: tokens per kernel tile (power of two >= 16)."""
    _, t, _, _, _ = check_qkv(q, k, v)
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16 (Triton dot tiles), got {tile}")
    layout = padded_layout(spec, t, tile)
    out = flash_attention(layout.pad(q), layout.pad(k), layout.pad(v), flash_mask(spec, t, tile),
                          scale=scale, interpret=interpret)
    return layout.unpad(out).astype(q.dtype)
