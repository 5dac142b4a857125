"""``soft_embeddings``: the one entry for SPD soft input embeddings, implementation chosen by name.

``impl="xla"`` is the plain-JAX reference; ``impl="pallas"`` runs the fused kernel compiled for the
default backend (Mosaic on TPU, Triton on GPU) or, on CPU, interpreted (the Mosaic formulation);
``impl="auto"`` picks the kernel on TPU/GPU and the reference on CPU, where interpreting a kernel
is only useful for tests. Inference only: neither kernel defines a gradient (SPD never
differentiates through its inputs); use ``impl="xla"`` under ``jax.grad``.
"""

from __future__ import annotations

import jax
from jax.typing import DTypeLike

from kernels_pallas.soft_embedding.kernel import soft_embeddings_gpu, soft_embeddings_tpu
from kernels_pallas.soft_embedding.reference import check_inputs, soft_embeddings_reference

IMPLS = ("pallas", "xla", "auto")


def _resolve(impl: str, interpret: bool | None, platform: str) -> tuple[str, bool]:
    """``(impl, interpret)`` actually used, or a ValueError for contradictory requests."""
    if impl not in IMPLS:
        raise ValueError(f"soft_embeddings impl {impl!r} is not one of {IMPLS}")
    if impl == "xla":
        if interpret is not None:
            raise ValueError("interpret applies to impl='pallas' only; drop it for impl='xla'")
        return "xla", False
    if impl == "auto":
        if platform == "cpu" and not interpret:
            return "xla", False
        impl = "pallas"
    if interpret is None:
        interpret = platform == "cpu"
    if platform == "cpu" and not interpret:
        raise ValueError("Pallas kernels cannot be compiled for CPU: pass interpret=True "
                         "(slow, for tests) or impl='xla'")
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"no soft-embedding kernel for backend {platform!r}; use impl='xla'")
    return impl, interpret


def soft_embeddings(table: jax.Array, token_ids: jax.Array, probs: jax.Array, mask_id: int, *,
                    impl: str = "auto", out_dtype: DTypeLike | None = None,
                    interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """Soft embeddings ``[batch, length, hidden]`` (spec §5.2 step 5).

    ``table [vocab, hidden]`` float; ``token_ids [batch, length, top_k]`` int (clipped to the vocab);
    ``probs [batch, length, top_k]`` float (the top-k probabilities; the mass they leave goes to
    ``table[mask_id]``); ``mask_id`` a static int. ``out_dtype=None`` keeps the table's dtype.
    ``interpret=None`` interprets the kernel only on CPU. ``platform`` (``cpu``/``gpu``/``tpu``, or
    ``cuda``): the platform the program is compiled for — pass the target's when compiling for
    devices other than the host's default backend (a deviceless GPU/TPU compile from a CPU host).
    """
    mask_id, out = check_inputs(table, token_ids, probs, mask_id, out_dtype)
    platform = jax.default_backend() if platform is None else platform
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    impl, interpret = _resolve(impl, interpret, platform)
    if impl == "xla":
        return soft_embeddings_reference(table, token_ids, probs, mask_id, out_dtype=out)
    kernel = soft_embeddings_gpu if platform == "gpu" else soft_embeddings_tpu
    return kernel(table, token_ids, probs, mask_id, out_dtype=out, interpret=interpret)
