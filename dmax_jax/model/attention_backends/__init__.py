"""The scaled-dot-product attention op: one entry ``attention(...)``, backends chosen by name.

Shapes: q ``[B, Tq, Nq, D]``; k, v ``[B, Tk, Nkv, D]``; out ``[B, Tq, Nq, D]`` in q's dtype,
softmax in f32, default scale ``1/sqrt(D)``. GQA maps kv head j to query heads
``j*G .. j*G+G-1`` (repeat_interleave, G = Nq / Nkv). Backends:

* ``xla_dense`` (``dense.py``) — the reference, and the KV-cache path (explicit index arrays);
* ``xla_blockwise`` (``blockwise.py``) — plain JAX flash attention over live tiles (CPU, GPU, TPU);
* ``splash`` (``splash.py``) — JAX's TPU splash attention with a lazy block-diffusion mask;
* ``pallas_gpu`` (``pallas_gpu.py``) — adapter to the Pallas (Triton) flash kernel.

The structured backends take self-attention over ``spec``'s layout only, as
``fn(q, k, v, *, spec, scale=None, **opts)``; their tiles come from ``tiles.py``. They are
imported on first use so CPU installs never load TPU/GPU kernel code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dmax_jax.model.attention_backends.dense import dense_attention
from dmax_jax.model.masks import MaskSpec
from dmax_jax.model.partitioned import heads_per_shard

BACKENDS = ("xla_dense", "xla_blockwise", "splash", "pallas_gpu")
STRUCTURED_BACKENDS = BACKENDS[1:]
KERNEL_BACKENDS = ("splash", "pallas_gpu")  # Pallas kernels: run per shard under a mesh
# ``auto``: the platform's block-sparse kernel (the compile target's platform, never the host's).
AUTO_BACKEND = {"cpu": "xla_blockwise", "gpu": "pallas_gpu", "tpu": "splash"}


def resolve(name: str, platform: str | None) -> str:
    """The concrete backend ``name`` means on ``platform`` (``auto`` -> ``AUTO_BACKEND``)."""
    if name == "auto":
        from dmax_jax.platforms import resolve as resolve_platform  # noqa: PLC0415

        return AUTO_BACKEND[resolve_platform(platform)]
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {('auto', *BACKENDS)}")
    return name
_ENTRY = {
    "xla_blockwise": ("dmax_jax.model.attention_backends.blockwise", "blockwise_attention"),
    "splash": ("dmax_jax.model.attention_backends.splash", "splash_attention"),
    "pallas_gpu": ("dmax_jax.model.attention_backends.pallas_gpu", "pallas_gpu_attention"),
}


def get(name: str) -> Callable:
    """The attention function of backend ``name`` (one of ``BACKENDS``)."""
    if name == "xla_dense":
        return dense_attention
    if name not in _ENTRY:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    module, fn = _ENTRY[name]
    return getattr(importlib.import_module(module), fn)


def attention(q, k, v, *, spec: MaskSpec, backend: str = "xla_dense", q_blk=None, q_clean=None,
              k_blk=None, k_clean=None, k_valid=None, scale: float | None = None):
    """Dispatch to ``backend``. Explicit index arrays (cached decoding) need ``xla_dense``."""
    fn = get(backend)
    if backend == "xla_dense":
        return fn(q, k, v, spec=spec, q_blk=q_blk, q_clean=q_clean, k_blk=k_blk, k_clean=k_clean,
                  k_valid=k_valid, scale=scale)
    if q_blk is not None or k_valid is not None:
        raise ValueError(f"backend {backend!r} supports only self-attention layouts; "
                         "KV-cache attention uses 'xla_dense'")
    if backend in KERNEL_BACKENDS:
        return heads_per_shard(lambda q_, k_, v_: fn(q_, k_, v_, spec=spec, scale=scale), q, k, v)
    return fn(q, k, v, spec=spec, scale=scale)
