"""Block-decoding attention over a KV cache (flash-decoding): plain-JAX reference + Pallas kernels
(Mosaic on TPU, Triton on GPU) that read only the valid cache slots."""

from kernels_pallas.decode_attention.ops import decode_attention
from kernels_pallas.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
