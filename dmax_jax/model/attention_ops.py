"""The one scaled-dot-product attention entry, with backends chosen by name.

``xla_dense`` is the reference: it materialises the boolean mask from ``masks.allowed`` and runs
softmax in float32 (spec §1.2). The other backends (``xla_blockwise``, ``splash``, ``pallas_gpu``)
live in ``attention_backends`` and are looked up lazily so CPU-only installs never import them.

Shapes: q ``[batch, q_len, heads, head_dim]``; k, v ``[batch, k_len, kv_heads, head_dim]``;
GQA maps kv head j to query heads ``j*G .. j*G+G-1`` (repeat_interleave, G = heads / kv_heads).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dmax_jax.model.masks import MaskSpec, allowed, layout_indices

BACKENDS = ("xla_dense", "xla_blockwise", "splash", "pallas_gpu")
_NEG = -1e30  # finite "−inf": rows that see nothing stay NaN-free (never happens for valid layouts)


def _resolve_indices(spec: MaskSpec, q_len: int, k_len: int, q_blk, q_clean, k_blk, k_clean):
    if q_blk is None:
        if q_len != k_len:
            raise ValueError(f"self-attention layout needs q_len == k_len, got {q_len} vs {k_len}; "
                             "pass explicit block ids for cached attention")
        blk, clean = layout_indices(spec, q_len, jnp)
        return blk[None], clean[None], blk[None], clean[None]
    return q_blk, q_clean, k_blk, k_clean


def dense_attention(q, k, v, *, spec: MaskSpec, q_blk=None, q_clean=None, k_blk=None, k_clean=None,
                    k_valid=None, scale: float | None = None):
    """Reference attention. Explicit index arrays (``[batch, len]``) are used for KV-cache decoding,
    where keys are cache slots + the current block; ``k_valid`` hides empty cache slots."""
    b, tq, nq, d = q.shape
    nkv = k.shape[2]
    if nq % nkv:
        raise ValueError(f"query heads {nq} not divisible by kv heads {nkv}")
    g = nq // nkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, tq, nkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if spec.kind != "full" or k_valid is not None:
        qb, qc, kb, kc = _resolve_indices(spec, tq, k.shape[1], q_blk, q_clean, k_blk, k_clean)
        if spec.kind == "full":
            m = jnp.ones((1, tq, k.shape[1]), bool)
        else:
            m = allowed(qb[:, :, None], qc[:, :, None], kb[:, None, :], kc[:, None, :])
        if k_valid is not None:
            m = m & k_valid[:, None, :]
        s = jnp.where(m[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, nq, d).astype(q.dtype)


def _backend(name: str) -> Callable:
    if name == "xla_dense":
        return dense_attention
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    from dmax_jax.model import attention_backends  # noqa: PLC0415  (optional heavy imports)

    return attention_backends.get(name)


def attention(q, k, v, *, spec: MaskSpec, backend: str = "xla_dense", q_blk=None, q_clean=None,
              k_blk=None, k_clean=None, k_valid=None, scale: float | None = None):
    """Dispatch to ``backend``. Structured backends only take self-attention over ``spec``'s layout
    (no explicit index arrays); cached decoding always uses ``xla_dense``."""
    if backend != "xla_dense" and (q_blk is not None or k_valid is not None):
        raise ValueError(f"backend {backend!r} supports only self-attention layouts; "
                         "KV-cache attention uses 'xla_dense'")
    fn = _backend(backend)
    if backend == "xla_dense":
        return fn(q, k, v, spec=spec, q_blk=q_blk, q_clean=q_clean, k_blk=k_blk, k_clean=k_clean,
                  k_valid=k_valid, scale=scale)
    return fn(q, k, v, spec=spec, scale=scale)
