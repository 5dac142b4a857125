"""Plain-JAX twin of the flash kernel: dense softmax over the kernel's *padded* layout.

Same padding (``PaddedLayout``) and mask (``masks.allowed`` on per-token block ids, padding keys
excluded) as the kernel, materialised densely, so tests can separate "padding/layout is wrong"
(reference disagrees with ``xla_dense``) from "kernel is wrong" (kernel disagrees with this)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmax_jax.model.attention_backends.layout import check_qkv, padded_layout
from dmax_jax.model.masks import MaskSpec, allowed


def flash_attention_reference(q, k, v, *, spec: MaskSpec, scale: float | None = None, tile: int = 16):
    """q ``[B, T, Nq, D]``, k/v ``[B, T, Nkv, D]`` -> ``[B, T, Nq, D]`` (q dtype, f32 softmax)."""
    b, t, nq, nkv, d = check_qkv(q, k, v)
    scale = d ** -0.5 if scale is None else scale
    lay = padded_layout(spec, t, tile)
    blk, clean, valid = (jnp.asarray(a) for a in (lay.blk, lay.clean, lay.valid))
    mask = allowed(blk[:, None], clean[:, None], blk[None, :], clean[None, :]) & valid[None, :]
    qp = lay.pad(q).reshape(b, lay.padded, nkv, nq // nkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qp, lay.pad(k), preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), lay.pad(v), preferred_element_type=jnp.float32)
    return lay.unpad(o.reshape(b, lay.padded, nq, d)).astype(q.dtype)
