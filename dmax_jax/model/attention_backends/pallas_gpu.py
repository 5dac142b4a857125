"""``pallas_gpu``: the block-skipping Pallas/Triton flash kernel (``kernels_pallas.flash_attention``).

Needs an NVIDIA GPU; on other platforms Pallas raises unless ``interpret=True`` (tests)."""

from __future__ import annotations

from dmax_jax.model.masks import MaskSpec
from kernels_pallas.flash_attention import ops


def pallas_gpu_attention(q, k, v, *, spec: MaskSpec, scale: float | None = None,
                         tile: int = ops.DEFAULT_TILE, interpret: bool = False):
    """Masked self-attention via the Pallas GPU kernel; shapes as ``attention_backends`` documents.
    ``tile``: tokens per kernel tile (power of two >= 16)."""
    return ops.flash_attention(q, k, v, spec=spec, scale=scale, tile=tile, interpret=interpret)
