"""Structured attention backends (looked up by name from ``attention_ops.attention``).

Every backend has the signature ``fn(q, k, v, *, spec: MaskSpec, scale: float | None) -> out``
with q ``[B, T, Nq, D]``, k/v ``[B, T, Nkv, D]`` (GQA: kv head j serves query heads
``j*G .. j*G+G-1``), out ``[B, T, Nq, D]`` in q's dtype, softmax in f32, default scale
``1/sqrt(D)``. All of them take the mask from ``masks.allowed`` / ``masks.layout_indices``:

* ``xla_blockwise`` — plain JAX flash attention over live tiles (CPU, GPU, TPU);
* ``splash`` — JAX's TPU splash attention with a lazy block-diffusion mask;
* ``pallas_gpu`` — a Pallas (Triton) flash kernel with block skipping.

Modules are imported on first use so CPU installs never load TPU/GPU kernel code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

STRUCTURED_BACKENDS = ("xla_blockwise", "splash", "pallas_gpu")
_ENTRY = {
    "xla_blockwise": ("dmax_jax.model.attention_backends.blockwise", "blockwise_attention"),
    "splash": ("dmax_jax.model.attention_backends.splash", "splash_attention"),
    "pallas_gpu": ("dmax_jax.model.attention_backends.pallas_gpu", "pallas_gpu_attention"),
}


def get(name: str) -> Callable:
    """The attention function of backend ``name`` (one of ``STRUCTURED_BACKENDS``)."""
    if name not in _ENTRY:
        raise ValueError(f"attention backend {name!r} is not one of {STRUCTURED_BACKENDS}")
    module, fn = _ENTRY[name]
    return getattr(importlib.import_module(module), fn)
