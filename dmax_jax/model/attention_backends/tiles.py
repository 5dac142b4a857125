"""Tiles for the structured attention backends: the padded token layout and tile liveness.

Kernels work on tiles, so the sequence is padded. For ``noisy_clean`` each half is padded on its
own (``[noisy | pad | clean | pad]``) so that the clean half still starts on a tile boundary and
the padded sequence is itself a ``noisy_clean`` layout of half length ``segment_padded``: every
real token keeps the ``(blk, is_clean)`` that ``masks.layout_indices`` gives it, padding tokens
are marked invalid and are never attended to.

Tile liveness is computed from ``masks.allowed`` on block ids (one entry per distinct
``(blk, is_clean)`` group), never from a hand-written per-layout rule.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model.layers import round_up
from dmax_jax.model.masks import MaskSpec, allowed, layout_indices


@dataclasses.dataclass(frozen=True, eq=False)
class PaddedLayout:
    """Token facts of the padded sequence. Arrays are numpy ``[padded]`` (static)."""

    spec: MaskSpec
    length: int  # T given by the caller
    padded: int  # padded length (multiple of the tile)
    segment: int  # real tokens per segment: L (half) for noisy_clean, T otherwise
    segment_padded: int
    blk: np.ndarray  # int32
    clean: np.ndarray  # bool
    valid: np.ndarray  # bool: a real (non-padding) token

    @property
    def num_segments(self) -> int:
        return 2 if self.spec.kind == "noisy_clean" else 1

    def pad(self, x, axis: int = 1):
        """Pad the sequence axis of ``x`` (``length`` long) to ``padded`` with zeros."""
        pad_n = self.segment_padded - self.segment
        if pad_n == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad_n)
        parts = jnp.split(x, self.num_segments, axis=axis)
        return jnp.concatenate([jnp.pad(p, widths) for p in parts], axis=axis)

    def unpad(self, x, axis: int = 1):
        """Inverse of ``pad``: drop padding tokens along ``axis``."""
        if self.segment_padded == self.segment:
            return x
        starts = [s * self.segment_padded for s in range(self.num_segments)]
        parts = [jax.lax.slice_in_dim(x, a, a + self.segment, axis=axis) for a in starts]
        return jnp.concatenate(parts, axis=axis)

    def indices_of(self, ids, xp=jnp):
        """``(blk, is_clean, valid)`` of padded-sequence token ids, computed arithmetically so that
        in-kernel lazy masks (splash) need no table. Tests check it equals ``blk/clean/valid``."""
        bs = self.spec.block_length

        def blk_of(pos):  # ids are >= 0: truncating lax.div == floor, and Mosaic lowers it
            return pos // bs if xp is np else jax.lax.div(pos, jnp.asarray(bs, pos.dtype))

        if self.spec.kind == "full":
            return xp.zeros_like(ids), ids >= 0, ids < self.length
        if self.spec.kind == "block_causal":
            return blk_of(ids), ids >= 0, ids < self.length
        clean = ids >= self.segment_padded
        pos = xp.where(clean, ids - self.segment_padded, ids)
        return blk_of(pos), clean, pos < self.segment


@functools.lru_cache(maxsize=256)
def padded_layout(spec: MaskSpec, length: int, multiple: int) -> PaddedLayout:
    """Layout of ``length`` tokens in ``spec``'s layout padded so each segment is a multiple of
    ``multiple`` tokens."""
    if length <= 0:
        raise ValueError(f"sequence length must be positive, got {length}")
    if spec.kind == "noisy_clean":
        if length % 2:
            raise ValueError(f"noisy_clean layout needs an even length [noisy | clean], got {length}")
        seg = length // 2
    else:
        seg = length
    seg_p = round_up(seg, multiple)
    n_seg = 2 if spec.kind == "noisy_clean" else 1
    padded = seg_p * n_seg
    blk, clean = layout_indices(spec, padded, np)
    pos = np.arange(padded) % seg_p
    valid = pos < seg
    return PaddedLayout(spec, length, padded, seg, seg_p, np.asarray(blk, np.int32),
                        np.asarray(clean, bool), valid)


def tile_liveness(layout: PaddedLayout, tile_q: int, tile_k: int) -> np.ndarray:
    """``live[i, j]``: some valid query of tile i may attend some valid key of tile j.
    Tiles holding only padding queries are dead (their outputs are discarded)."""
    codes = layout.blk.astype(np.int64) * 2 + layout.clean
    uniq, inv = np.unique(codes, return_inverse=True)
    g_blk, g_clean = (uniq // 2).astype(np.int32), (uniq % 2).astype(bool)
    group_ok = allowed(g_blk[:, None], g_clean[:, None], g_blk[None, :], g_clean[None, :])
    n = layout.padded
    if n % tile_q or n % tile_k:
        raise ValueError(f"tiles ({tile_q}, {tile_k}) must divide the padded length {n}")

    def incidence(tile: int) -> np.ndarray:
        inc = np.zeros((n // tile, len(uniq)), np.int64)
        rows = np.arange(n) // tile
        np.add.at(inc, (rows[layout.valid], inv[layout.valid]), 1)
        return (inc > 0).astype(np.int64)

    return (incidence(tile_q) @ group_ok.astype(np.int64) @ incidence(tile_k).T) > 0


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, T, Nq, D]``, ``k/v [B, T, Nkv, D]``; return ``(B, T, Nq, Nkv, D)``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be [batch, len, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape} (self-attention layout)")
    nkv = k.shape[2]
    if nq % nkv:
        raise ValueError(f"query heads {nq} not divisible by kv heads {nkv}")
    return b, t, nq, nkv, d
