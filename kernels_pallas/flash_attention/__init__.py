"""Block-diffusion flash attention for GPU (Pallas/Triton): ``flash_attention(q, k, v, FlashMask)``.

A leaf: the mask arrives as plain arrays (``FlashMask``); the model's adapter builds them."""

from kernels_pallas.flash_attention.ops import flash_attention
from kernels_pallas.flash_attention.reference import FlashMask, flash_attention_reference

__all__ = ["FlashMask", "flash_attention", "flash_attention_reference"]
