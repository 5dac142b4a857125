"""``xla_blockwise``: flash attention in plain JAX that only touches live tiles.

Why: the ``[noisy | clean]`` training layout (T = 2L) lets a query see about a quarter of the keys
(noisy block i: itself + clean blocks < i; clean block i: clean blocks <= i). The dense backend
pays for all T^2 scores and keeps them for the backward pass; this backend runs everywhere (CPU
included) and does neither.

How: the padded sequence (see ``tiles.py``) is cut into tiles of ``tile`` tokens. A static table
lists, for every query tile, the key tiles that hold at least one allowed entry (from
``masks.allowed`` on block ids). The forward pass scans over query tiles and runs a dynamic-length
loop over that tile's live key tiles with an online softmax, masking inside a tile with
``masks.allowed`` on the tokens' block ids; scores exist only one ``[tile, tile]`` tile at a time.
The backward pass is an explicit flash backward (``jax.custom_vjp``): residuals are q, k, v, the
output and the row log-sum-exp; one pass per query tile recomputes the probabilities of each live
tile and accumulates dq locally and dk/dv into tile-indexed buffers (5 matmuls per live tile).

Tile size trades skipped work against loop trips: smaller tiles skip more dead work, larger tiles
make fewer, bigger matmuls. On CPU with block 32, tiles of 64 and 128 were within noise of each
other and 256 slower; 128 is the default (half the loop trips of 64, better for accelerators).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.model.attention_backends.tiles import PaddedLayout, check_qkv, padded_layout, tile_liveness
from dmax_jax.model.layers import round_up
from dmax_jax.model.masks import NEG_INF, MaskSpec, allowed
from kernels_pallas.flash_attention.ops import live_lists

DEFAULT_TILE = 128
_F32 = jnp.float32


def default_tile(spec: MaskSpec, length: int) -> int:
    """``DEFAULT_TILE``, or less for short sequences (a segment rounded up to 8 tokens)."""
    seg = length // 2 if spec.kind == "noisy_clean" else length
    return min(DEFAULT_TILE, round_up(seg, 8))


@dataclasses.dataclass(frozen=True, eq=False)
class _Tiles:
    """Static per-tile tables (numpy; turned into constants inside the traced code)."""

    tile: int
    counts: np.ndarray  # [nt] live key tiles per query tile
    idx: np.ndarray  # [nt, max_live] live key tile ids
    blk: np.ndarray  # [nt, tile] int32
    clean: np.ndarray  # [nt, tile] bool
    valid: np.ndarray  # [nt, tile] bool

    @classmethod
    def build(cls, layout: PaddedLayout, tile: int) -> _Tiles:
        counts, idx = live_lists(tile_liveness(layout, tile, tile))
        nt = layout.padded // tile
        return cls(tile, counts, idx, layout.blk.reshape(nt, tile), layout.clean.reshape(nt, tile),
                   layout.valid.reshape(nt, tile))

    def consts(self):
        return tuple(jnp.asarray(a) for a in (self.counts, self.idx, self.blk, self.clean, self.valid))


def _tile_mask(consts, qi, kj):
    """``[tile, tile]`` allowed mask of query tile ``qi`` against key tile ``kj`` (traced ids)."""
    _, _, blk, clean, valid = consts
    ok = allowed(blk[qi][:, None], clean[qi][:, None], blk[kj][None, :], clean[kj][None, :])
    return ok & valid[kj][None, :]


def _scores(q_tile, k_tile, scale: float):
    # q_tile [B, Nkv, G, t, D], k_tile [B, Nkv, t, D] -> [B, Nkv, G, t, t] f32
    return jnp.einsum("bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=_F32) * scale


def _forward(tiles: _Tiles, scale: float, qt, kt, vt):
    """qt ``[nt, B, Nkv, G, t, D]``, kt/vt ``[nt, B, Nkv, t, D]`` -> out (q dtype), lse f32."""
    consts = tiles.consts()
    counts, idx = consts[0], consts[1]

    def q_tile(args):
        i, qi = args
        row = qi.shape[:-1]

        def body(j, carry):
            o, m, denom = carry
            c = idx[i, j]
            mask = _tile_mask(consts, i, c)
            s = jnp.where(mask, _scores(qi, kt[c], scale), NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            corr = jnp.exp(m - m_new)
            # where(): a row whose keys so far are all masked has m_new = NEG_INF and exp(0) = 1.
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vt.dtype), vt[c], preferred_element_type=_F32)
            return o * corr[..., None] + pv, m_new, denom * corr + p.sum(-1)

        init = (jnp.zeros(qi.shape, _F32), jnp.full(row, NEG_INF, _F32), jnp.zeros(row, _F32))
        o, m, denom = jax.lax.fori_loop(0, counts[i], body, init)
        l_safe = jnp.where(denom > 0, denom, 1.0)  # rows with nothing to see: padding queries only
        return (o / l_safe[..., None]).astype(qt.dtype), m + jnp.log(l_safe)

    return jax.lax.map(q_tile, (jnp.arange(qt.shape[0]), qt))


def _backward(tiles: _Tiles, scale: float, res, dout):
    qt, kt, vt, out, lse = res
    consts = tiles.consts()
    counts, idx = consts[0], consts[1]
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1)  # [nt, B, Nkv, G, t]

    def q_tile(carry, xs):
        i, qi, doi, lse_i, delta_i = xs

        def body(j, c_):
            dq, dk, dv = c_
            c = idx[i, j]
            kj, vj = kt[c], vt[c]
            mask = _tile_mask(consts, i, c)
            p = jnp.where(mask, jnp.exp(_scores(qi, kj, scale) - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=_F32)
            ds = p * (dp - delta_i[..., None])
            dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(kj.dtype), kj, preferred_element_type=_F32)
            dk_c = jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(qi.dtype), qi, preferred_element_type=_F32)
            dv_c = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=_F32)
            dk = jax.lax.dynamic_update_index_in_dim(dk, dk[c] + dk_c, c, 0)
            dv = jax.lax.dynamic_update_index_in_dim(dv, dv[c] + dv_c, c, 0)
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(0, counts[i], body, (jnp.zeros(qi.shape, _F32), *carry))
        return (dk, dv), dq * scale

    zeros_kv = jnp.zeros(kt.shape, _F32)
    (dk, dv), dq = jax.lax.scan(q_tile, (zeros_kv, zeros_kv),
                                (jnp.arange(qt.shape[0]), qt, dout, lse, delta))
    return dq.astype(qt.dtype), (dk * scale).astype(kt.dtype), dv.astype(vt.dtype)


@functools.lru_cache(maxsize=64)
def _flash_fn(spec: MaskSpec, length: int, tile: int, scale: float):
    """A ``custom_vjp`` flash function for one static (layout, tile, scale)."""
    tiles = _Tiles.build(padded_layout(spec, length, tile), tile)

    @jax.custom_vjp
    def flash(qt, kt, vt):
        return _forward(tiles, scale, qt, kt, vt)[0]

    def fwd(qt, kt, vt):
        out, lse = _forward(tiles, scale, qt, kt, vt)
        return out, (qt, kt, vt, out, lse)

    flash.defvjp(fwd, functools.partial(_backward, tiles, scale))
    return flash


def blockwise_attention(q, k, v, *, spec: MaskSpec, scale: float | None = None,
                        tile: int | None = None):
    """Masked self-attention over ``spec``'s layout touching only live tiles.

    q ``[B, T, Nq, D]``, k/v ``[B, T, Nkv, D]`` -> ``[B, T, Nq, D]`` in q's dtype (softmax in
    f32, default scale ``1/sqrt(D)``). ``tile``: tokens per tile (default ``default_tile``)."""
    b, t, nq, nkv, d = check_qkv(q, k, v)
    tile = default_tile(spec, t) if tile is None else int(tile)
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    scale = float(d ** -0.5 if scale is None else scale)
    layout = padded_layout(spec, t, tile)
    g, nt = nq // nkv, layout.padded // tile
    qt = layout.pad(q).reshape(b, nt, tile, nkv, g, d).transpose(1, 0, 3, 4, 2, 5)
    kt, vt = (layout.pad(x).reshape(b, nt, tile, nkv, d).transpose(1, 0, 3, 2, 4) for x in (k, v))
    out = _flash_fn(spec, t, tile, scale)(qt, kt, vt)  # [nt, B, Nkv, G, t, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, layout.padded, nq, d)
    return layout.unpad(out).astype(q.dtype)
