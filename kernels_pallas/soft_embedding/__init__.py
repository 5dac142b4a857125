"""SPD soft input embeddings (spec §5.2 step 5): plain-JAX reference + fused Pallas kernels."""

from kernels_pallas.soft_embedding.ops import soft_embeddings
from kernels_pallas.soft_embedding.reference import soft_embeddings_reference

__all__ = ["soft_embeddings", "soft_embeddings_reference"]
