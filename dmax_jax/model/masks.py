"""Block-diffusion attention masks as functions of token indices (spec §2).

Every token carries two facts: its block id ``blk = position // block_size`` and whether it is a
*clean* token (``is_clean``). One rule then covers both layouts:

* training ``[noisy | clean]`` (spec §2.1): noisy half has ``is_clean=False``, clean half ``True``,
  and both halves share position ids ``0..L-1`` so ``blk`` is the same formula on both halves;
* inference ``block_causal`` (spec §2.2): every token is clean, and the rule reduces to
  ``blk(k) <= blk(q)``.

A query q may attend a key k iff
    (blk_q == blk_k and clean_q == clean_k)          # M_BD, block diagonal
 or (blk_q >  blk_k and not clean_q and clean_k)     # M_OBC, noisy sees earlier clean blocks
 or (blk_q >= blk_k and clean_q and clean_k)         # M_BC, clean block-causal

``MaskSpec`` is the static description every attention backend receives; blockwise/Pallas backends
read its structure to skip dead blocks, the dense backend materialises ``allowed`` directly.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

MaskKind = Literal["full", "block_causal", "noisy_clean"]
MASK_KINDS = ("full", "block_causal", "noisy_clean")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static attention-mask description. For ``noisy_clean`` the sequence is ``[noisy | clean]`` of
    total length 2L and the half length is the sequence length // 2."""

    kind: MaskKind = "full"
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind {self.kind!r} is not one of {MASK_KINDS}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


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
        return (idx // spec.block_size).astype(np.int32), xp.ones(length, dtype=bool)
    if length % 2:
        raise ValueError(f"noisy_clean layout needs an even length [noisy | clean], got {length}")
    half = length // 2
    is_clean = idx >= half
    return ((idx - half * is_clean) // spec.block_size).astype(np.int32), is_clean


def default_positions(spec: MaskSpec, length: int, xp=jnp):
    """Position ids: ``0..T-1``, or ``[0..L-1, 0..L-1]`` for the training layout (spec §2.1)."""
    if spec.kind == "noisy_clean":
        half = length // 2
        return xp.concatenate([xp.arange(half), xp.arange(half)]).astype(np.int32)
    return xp.arange(length, dtype=np.int32)


def dense_mask(spec: MaskSpec, length: int, xp=np):
    """The dense ``[length, length]`` boolean twin of ``spec`` (reference/XLA path and tests)."""
    blk, clean = layout_indices(spec, length, xp)
    return allowed(blk[:, None], clean[:, None], blk[None, :], clean[None, :])


def live_block_fraction(spec: MaskSpec, length: int, tile: int | None = None) -> float:
    """Share of ``tile x tile`` score tiles that contain at least one allowed entry."""
    tile = tile or spec.block_size
    m = dense_mask(spec, length)
    n = -(-length // tile)
    pad = n * tile - length
    m = np.pad(m, ((0, pad), (0, pad)))
    return float(m.reshape(n, tile, n, tile).any(axis=(1, 3)).mean())
