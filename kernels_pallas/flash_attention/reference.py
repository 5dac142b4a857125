"""The flash kernel's mask description (plain arrays) and its plain-JAX dense twin.

``FlashMask`` is everything the kernel knows about the mask, as plain per-token arrays over the
padded sequence of ``Tp`` tokens plus a tile table — nothing model-specific, the way splash takes
a mask object. ``allowed`` is the block-diffusion rule the kernel evaluates on those arrays (a
private copy of the model's rule: kernels import nothing from ``dmax_jax``; the model's tests check
the two agree). ``flash_attention_reference`` materialises the same mask densely, so kernel tests
need no model code.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # finite "-inf": masked scores; exp() of them underflows to exactly 0


def allowed(q_blk, q_clean, k_blk, k_clean):
    """q may see k iff same block and same half, or q is noisy and k a clean earlier block, or
    both are clean and k's block is not later (broadcasts; numpy, jax and inside kernels)."""
    same = (q_blk == k_blk) & (q_clean == k_clean)
    offset = (q_blk > k_blk) & ~q_clean & k_clean
    causal = (q_blk >= k_blk) & q_clean & k_clean
    return same | offset | causal


@dataclasses.dataclass(frozen=True, eq=False)
class FlashMask:
    """Static mask over ``Tp`` padded tokens: ``blk`` int block id, ``clean`` (clean half, or every
    token at inference), ``valid`` (a real token; padding keys are never seen), and ``live``
    ``[Tp/tile, Tp/tile]`` bool: query tile i may need key tile j. Tiles not live are never loaded,
    so ``live`` must cover every allowed valid pair (the reference ignores it; tests compare)."""

    blk: np.ndarray
    clean: np.ndarray
    valid: np.ndarray
    live: np.ndarray
    tile: int

    def __post_init__(self) -> None:
        tp = self.blk.shape[0]
        if self.tile < 16 or self.tile & (self.tile - 1):
            raise ValueError(f"tile must be a power of two >= 16 (Triton dot tiles), got {self.tile}")
        if tp % self.tile or self.clean.shape != (tp,) or self.valid.shape != (tp,):
            raise ValueError(f"blk/clean/valid must be [Tp] with Tp a multiple of {self.tile}; got "
                             f"{self.blk.shape}, {self.clean.shape}, {self.valid.shape}")
        if self.live.shape != (tp // self.tile,) * 2:
            raise ValueError(f"live must be [{tp // self.tile}, {tp // self.tile}], got {self.live.shape}")

    @property
    def length(self) -> int:
        return self.blk.shape[0]

    def dense(self) -> np.ndarray:
        """``[Tp, Tp]`` bool: query i may attend key j."""
        blk, clean = np.asarray(self.blk), np.asarray(self.clean, bool)
        ok = allowed(blk[:, None], clean[:, None], blk[None, :], clean[None, :])
        return ok & np.asarray(self.valid, bool)[None, :]


def flash_attention_reference(q, k, v, mask: FlashMask, *, scale: float | None = None):
    """q ``[B, Tp, Nq, D]``, k/v ``[B, Tp, Nkv, D]`` -> ``[B, Tp, Nq, D]`` (q dtype, f32 softmax);
    rows that see no key (padding queries) are 0, as in the kernel."""
    b, tp, nq, d = q.shape
    nkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    m = jnp.asarray(mask.dense())
    qg = q.reshape(b, tp, nkv, nq // nkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(jnp.where(m, s, NEG), axis=-1) * m.any(axis=1)[:, None]
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tp, nq, d).astype(q.dtype)
