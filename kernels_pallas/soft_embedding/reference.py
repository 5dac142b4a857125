"""Plain-JAX soft input embeddings for Soft Parallel Decoding (spec §5.2 step 5, §7 item 8).

For every position the model's top-k guesses ``token_ids[..., k]`` with probabilities
``probs[..., k]`` are mixed with the MASK embedding, which absorbs the left-over mass::

    r  = max(0, 1 - Σ_k p_k)
    h~ = Σ_k p_k e_k + r e_m                 (e_k = table[token_k], e_m = table[mask_id])
    n* = Σ_k p_k ||e_k|| + r ||e_m||         (the norm a "hard" embedding would have had)
    h  = h~ · n* / (||h~||_2 + 1e-6)

The rescale keeps the input on the embedding norm shell: mixing two directions shrinks the vector
and the model was never trained on short inputs. All arithmetic is float32 (rows upcast); the result
is cast to ``out_dtype`` (dInfer casts to bf16, its compute dtype). DMax only ever uses K = 1.

This is the numerical reference the Pallas kernels are tested against and the ``impl="xla"``
path of :func:`kernels_pallas.soft_embedding.soft_embeddings`.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

NORM_EPS = 1e-6  # added to ||h~|| before dividing (dInfer's constant)


def check_inputs(table: jax.Array, token_ids: jax.Array, probs: jax.Array, mask_id: int,
                 out_dtype: DTypeLike | None) -> tuple[int, jnp.dtype]:
    """Validate shapes/dtypes shared by every implementation.

    Returns ``(mask_id as a Python int, resolved out dtype)``; ``out_dtype=None`` means the
    table's dtype (the table is normally stored in the compute dtype).
    """
    if getattr(table, "ndim", None) != 2:
        raise ValueError(f"table must be [vocab, hidden], got shape {getattr(table, 'shape', None)}")
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(f"table must be a floating dtype, got {table.dtype}")
    if getattr(token_ids, "ndim", None) != 3:
        raise ValueError("token_ids must be [batch, length, top_k], got shape "
                         f"{getattr(token_ids, 'shape', None)}")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise TypeError(f"token_ids must be an integer dtype, got {token_ids.dtype}")
    if token_ids.shape[-1] < 1:
        raise ValueError(f"token_ids needs top_k >= 1 candidates, got shape {token_ids.shape}")
    if getattr(probs, "shape", None) != token_ids.shape:
        raise ValueError(f"probs shape {getattr(probs, 'shape', None)} must equal token_ids shape "
                         f"{token_ids.shape}")
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"probs must be a floating dtype, got {probs.dtype}")
    try:
        mask_id = operator.index(mask_id)
    except TypeError:  # includes tracers: the MASK row is fixed per model, so it must be static
        raise TypeError("mask_id must be a static Python int, got "
                        f"{type(mask_id).__name__}") from None
    vocab = table.shape[0]
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id {mask_id} is outside the table's vocab range [0, {vocab})")
    out = jnp.dtype(table.dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"out_dtype must be a floating dtype, got {out}")
    return mask_id, out


def soft_embeddings_reference(table: jax.Array, token_ids: jax.Array, probs: jax.Array, mask_id: int,
                              *, out_dtype: DTypeLike | None = None) -> jax.Array:
    """Soft embeddings ``[batch, length, hidden]`` from ``table [vocab, hidden]``,
    ``token_ids [batch, length, top_k]`` and ``probs [batch, length, top_k]``.

    Token ids outside ``[0, vocab)`` are clipped (the kernels clip too, so they never DMA out of
    bounds). ``out_dtype=None`` keeps the table's dtype.
    """
    mask_id, out_dtype = check_inputs(table, token_ids, probs, mask_id, out_dtype)
    ids = jnp.clip(token_ids.astype(jnp.int32), 0, table.shape[0] - 1)
    p = probs.astype(jnp.float32)                                        # [B, T, K]
    e = jnp.take(table, ids, axis=0).astype(jnp.float32)                 # [B, T, K, H]
    e_m = table[mask_id].astype(jnp.float32)                             # [H]
    r = jnp.maximum(0.0, 1.0 - jnp.sum(p, axis=-1, keepdims=True))       # [B, T, 1]
    mix = jnp.sum(p[..., None] * e, axis=-2) + r * e_m                   # [B, T, H]
    target = (jnp.sum(p * jnp.linalg.norm(e, axis=-1), axis=-1, keepdims=True)
              + r * jnp.linalg.norm(e_m))
    h = mix * (target / (jnp.linalg.norm(mix, axis=-1, keepdims=True) + NORM_EPS))
    return h.astype(out_dtype)

