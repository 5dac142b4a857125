"""Block-diffusion attention masks as functions of token indices (algorithm §2).

Every token carries two facts: its block id ``blk = position // block_length`` and whether it is a
*clean* token (``is_clean``). One rule then covers both layouts:

* training ``[noisy | clean]`` (algorithm §2.1): noisy half has ``is_clean=False``, clean half ``True``,
  and both halves share position ids ``0..L-1`` so ``blk`` is the same formula on both halves;
* inference ``block_causal`` (algorithm §2.2): every token is clean, and the rule reduces to
  ``blk(k) <= blk(q)``.

A query q may attend a key k iff
    (blk_q == blk_k and clean_q == clean_k)          # M_BD, block diagonal
 or (blk_q >  blk_k and not clean_q and clean_k)     # M_OBC, noisy sees earlier clean blocks
 or (blk_q >= blk_k and clean_q and clean_k)         # M_BC, clean block-causal

``MaskSpec`` is the static description every attention backend receives; the tiled backends
(``attention_backends/tiles.py``) derive per-tile liveness from it to skip dead tiles, the dense
backend materialises ``allowed`` directly.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

MaskKind = Literal["full", "block_causal", "noisy_clean"]
MASK_KINDS = ("full", "block_causal", "noisy_clean")
NEG_INF = -1e30  # finite "-inf" for masked scores: exp() underflows to exactly 0, never NaN


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static attention-mask description. For ``noisy_clean`` the sequence is ``[noisy | clean]`` of
    total length 2L and the half length is the sequence length // 2."""

    kind: MaskKind = "full"
    block_length: int = 32

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind {self.kind!r} is not one of {MASK_KINDS}")
        if self.block_length <= 0:
            raise ValueError(f"block_length must be positive, got {self.block_length}")


def allowed(q_blk, q_clean, k_blk, k_clean):
    """The one block-diffusion rule (broadcasting over any shapes; works for numpy and jax)."""
    same = (q_blk == k_blk) & (q_clean == k_clean)
    offset = (q_blk > k_blk) & ~q_clean & k_clean
    causal = (q_blk >= k_blk) & q_clean & k_clean
    return same | offset | causal


def layout_indices(spec: MaskSpec, length: int, xp=np):
    """Per-token ``(blk, is_clean)`` for a self-attention sequence of ``length`` tokens in ``spec``'s
    layout. For ``full`` every token is in block 0 and clean (so everything is allowed)."""
    idx = xp.arange(length)
    if spec.kind == "full":
        return xp.zeros(length, dtype=np.int32), xp.ones(length, dtype=bool)
    if spec.kind == "block_causal":
        return (idx // spec.block_length).astype(np.int32), xp.ones(length, dtype=bool)
    if length % 2:
        raise ValueError(f"noisy_clean layout needs an even length [noisy | clean], got {length}")
    half = length // 2
    is_clean = idx >= half
    return ((idx - half * is_clean) // spec.block_length).astype(np.int32), is_clean


def default_positions(spec: MaskSpec, length: int, xp=jnp):
    """Position ids: ``0..T-1``, or ``[0..L-1, 0..L-1]`` for the training layout (algorithm §2.1)."""
    if spec.kind == "noisy_clean":
        half = length // 2
        return xp.concatenate([xp.arange(half), xp.arange(half)]).astype(np.int32)
    return xp.arange(length, dtype=np.int32)
