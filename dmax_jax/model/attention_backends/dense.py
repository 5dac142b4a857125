"""``xla_dense``: the reference attention — the boolean mask from ``masks.allowed``, softmax in f32.

Also the only backend for KV-cache decoding: explicit per-token index arrays (``[batch, len]``)
describe keys that are cache slots + the current block, and ``k_valid`` hides empty slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmax_jax.model.masks import NEG_INF, MaskSpec, allowed, layout_indices


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
    """q ``[B, Tq, Nq, D]``, k/v ``[B, Tk, Nkv, D]`` -> ``[B, Tq, Nq, D]`` (q dtype)."""
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
        s = jnp.where(m[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, nq, d).astype(q.dtype)
