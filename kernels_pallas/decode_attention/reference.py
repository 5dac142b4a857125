"""Block-decoding attention against a KV cache: the contract and its plain-JAX dense twin.

One decoding step attends ``Tq`` query tokens (one block, or two for the cross-block forward) to

* the cache: slots ``< cache_len[b]`` of ``k_cache/v_cache [B, C, Nkv, D]`` — every valid slot is
  visible (the cache only holds committed blocks at earlier positions than any query), slots
  ``>= cache_len`` are never seen;
* the step's own keys ``k_new/v_new [B, Tq, Nkv, D]``: query i sees own key j iff
  ``k_new_blk[b, j] <= q_blk[b, i]`` (block-causal on block ids; all-zero ids = "full").

GQA: kv head j serves query heads ``j*G .. j*G+G-1``. Scores and softmax in float32 (default
scale ``1/sqrt(D)``), probabilities cast to v's dtype for the PV product, output in q's dtype.
Nothing model-specific: the caller turns positions into block ids. The kernels are tested
against :func:`decode_attention_reference`; it materialises ``[B, Nq, Tq, C + Tq]`` scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "-inf": masked scores; exp() of them underflows to exactly 0


def check_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk) -> None:
    """Shape/dtype checks shared by every implementation (errors name the offending input)."""
    if q.ndim != 4 or k_cache.ndim != 4 or k_new.ndim != 4:
        raise ValueError(f"q [B, Tq, Nq, D], k_cache [B, C, Nkv, D], k_new [B, Tq, Nkv, D] expected; "
                         f"got {q.shape}, {k_cache.shape}, {k_new.shape}")
    b, tq, nq, d = q.shape
    _, _, nkv, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache/v_cache must both be [{b}, C, Nkv, {d}]; got {k_cache.shape}, "
                         f"{v_cache.shape}")
    if k_new.shape != (b, tq, nkv, d) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new must be {(b, tq, nkv, d)}; got {k_new.shape}, {v_new.shape}")
    if nq % nkv:
        raise ValueError(f"query heads {nq} not divisible by kv heads {nkv}")
    if cache_len.shape != (b,) or not jnp.issubdtype(cache_len.dtype, jnp.integer):
        raise ValueError(f"cache_len must be int [{b}], got {cache_len.dtype}{list(cache_len.shape)}")
    for name, x in (("q_blk", q_blk), ("k_new_blk", k_new_blk)):
        if x.shape != (b, tq) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [{b}, {tq}], got {x.dtype}{list(x.shape)}")


def decode_attention_reference(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk, *,
                               scale: float | None = None) -> jax.Array:
    """-> ``[B, Tq, Nq, D]`` in q's dtype (see the module docstring for the contract)."""
    check_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk)
    b, tq, nq, d = q.shape
    cap, nkv = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    keys = jnp.concatenate([k_cache.astype(k_new.dtype), k_new], axis=1)
    vals = jnp.concatenate([v_cache.astype(v_new.dtype), v_new], axis=1)
    cache_ok = jnp.arange(cap)[None, None, :] < cache_len[:, None, None]           # [B, 1, C]
    own_ok = k_new_blk[:, None, :] <= q_blk[:, :, None]                            # [B, Tq, Tq]
    ok = jnp.concatenate([jnp.broadcast_to(cache_ok, (b, tq, cap)), own_ok], axis=2)
    qg = q.reshape(b, tq, nkv, nq // nkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(ok[:, None, None], s, NEG), axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, nq, d).astype(q.dtype)
