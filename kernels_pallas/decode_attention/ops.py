"""``decode_attention``: the one entry for block-decoding attention over a KV cache.

``impl="xla"`` is the dense plain-JAX reference; ``impl="pallas"`` runs the kernel of
``platform``'s formulation: Mosaic on ``tpu``, Triton on ``gpu`` (``cuda``/``rocm`` alias it),
either one in the Pallas interpreter with ``interpret=True`` (any host; ``platform="cpu"`` then
means the Mosaic formulation). ``impl="auto"`` = the kernel on TPU/GPU, the reference on CPU.
``platform=None`` = the host's default backend; pass the target's platform when compiling for
devices other than the host's (a deviceless H200 / TPU compile from a CPU host).

Inference only: the kernels define no gradient (decoding never differentiates through the
attention); ``impl="xla"`` differentiates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.decode_attention import kernel
from kernels_pallas.decode_attention.reference import check_inputs, decode_attention_reference

IMPLS = ("auto", "pallas", "xla")
GPU_BLOCK_KV = 64     # cache slots per Triton tile ([M, 64] f32 scores stay in registers)
TPU_BLOCK_KV = 256    # cache slots per Mosaic tile ([256, Nkv, 128] blocks; 512 triples Mosaic compile time)
MIN_BLOCK_KV = 16     # bf16 sublane tile on TPU, smallest Triton dot on GPU
GPU_ROW_TILE = 128    # query rows per Triton program (a [128, 128] f32 accumulator in registers)
GPU_PROGRAMS = 128    # split the cache until B * Nkv * S reaches about one program per H100/H200 SM
GPU_MIN_SPLIT = 512   # ...but give every split at least this many cache slots
_PAD_Q_BLK = 2 ** 30  # block id of padding query rows (they see every real key)
_PAD_K_BLK = 2 ** 31 - 1  # block id of padding own keys (seen by no real query)


def _resolve(impl: str, interpret: bool | None, platform: str | None) -> tuple[str, str, bool]:
    """``(impl, platform, interpret)`` actually used, or a ValueError for contradictory requests."""
    if impl not in IMPLS:
        raise ValueError(f"decode_attention impl {impl!r} is not one of {IMPLS}")
    platform = jax.default_backend() if platform is None else platform
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"no decode-attention kernel for platform {platform!r}; use impl='xla'")
    if impl == "xla" or (impl == "auto" and platform == "cpu" and not interpret):
        if impl == "xla" and interpret is not None:
            raise ValueError("interpret applies to impl='pallas' only; drop it for impl='xla'")
        return "xla", platform, False
    interpret = platform == "cpu" if interpret is None else bool(interpret)
    if platform == "cpu" and not interpret:
        raise ValueError("Pallas kernels cannot be compiled for CPU: pass interpret=True "
                         "(slow, for tests) or impl='xla'")
    return "pallas", platform, interpret


def _pow2(x: int, low: int = MIN_BLOCK_KV) -> int:
    return max(low, pl.next_power_of_2(x))


def _fit_cache(k_cache, v_cache, want: int):
    """``(k_cache, v_cache, bk)``: bk = the largest power of two <= want dividing C (>= 16). A C
    with no such divisor is padded to a multiple of 16 — a copy of the cache (slow path; model
    caches are multiples of the block length)."""
    cap = k_cache.shape[1]
    if cap == 0 or cap % MIN_BLOCK_KV:
        cap = max(1, pl.cdiv(cap, MIN_BLOCK_KV)) * MIN_BLOCK_KV
        k_cache, v_cache = _pad_to(k_cache, 1, cap), _pad_to(v_cache, 1, cap)
    bk = max(MIN_BLOCK_KV, min(pl.next_power_of_2(want), pl.next_power_of_2(cap)))
    while cap % bk:
        bk //= 2
    return k_cache, v_cache, bk


def _rows(q, nkv: int):
    """``[B, Tq, Nq, D]`` -> ``[B, Nkv, Tq * G, D]``: row t*G+g is token t, query head j*G+g."""
    b, tq, nq, d = q.shape
    return q.reshape(b, tq, nkv, nq // nkv, d).transpose(0, 2, 1, 3, 4).reshape(b, nkv, -1, d)


def _unrows(o, tq: int):
    """Inverse of ``_rows``."""
    b, nkv, _, d = o.shape
    return o.reshape(b, nkv, tq, -1, d).transpose(0, 2, 1, 3, 4).reshape(b, tq, -1, d)


def _pad_to(x, axis: int, size: int, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value) if size != x.shape[axis] else x


def merge_splits(o, lse, *, axis: int):
    """Log-sum-exp merge of per-split normalised outputs ``o`` (f32) with ``lse`` (same rank, last
    dim 1) along ``axis``; split 0 always saw its own keys, so the weights never all vanish."""
    w = jnp.exp(lse - jnp.max(lse, axis=axis, keepdims=True))
    return jnp.sum(o * w, axis=axis) / jnp.sum(w, axis=axis)


def auto_splits(programs: int, cache_slots: int, bk: int) -> int:
    """Cache splits of the Triton kernel (``programs`` = B x Nkv x row tiles without splitting):
    enough programs for the GPU, >= GPU_MIN_SPLIT slots each."""
    want = pl.cdiv(GPU_PROGRAMS, programs)
    return max(1, min(want, cache_slots // GPU_MIN_SPLIT, cache_slots // bk))


def _gpu(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk, *, scale, block_kv, splits,
         interpret):
    b, tq, nq, d = q.shape
    nkv = k_new.shape[2]
    g = nq // nkv
    dp, mp, tqp = _pow2(d), _pow2(tq * g), _pow2(tq)
    if dp != d:  # Triton tiles are powers of two; real models have D = 128 (no copy)
        k_cache, v_cache = _pad_to(k_cache, 3, dp), _pad_to(v_cache, 3, dp)
    k_cache, v_cache, bk = _fit_cache(k_cache, v_cache, block_kv or GPU_BLOCK_KV)
    cap, bm = k_cache.shape[1], min(mp, GPU_ROW_TILE)
    splits = (auto_splits(b * nkv * (mp // bm), cap, bk) if splits is None
              else max(1, min(int(splits), cap // bk)))
    q_rows = _pad_to(_pad_to(_rows(q, nkv), 2, mp), 3, dp)
    own = lambda x: _pad_to(_pad_to(x, 1, tqp), 3, dp)
    qb = _pad_to(jnp.repeat(q_blk.astype(jnp.int32), g, axis=1), 1, mp, _PAD_Q_BLK)
    kb = _pad_to(k_new_blk.astype(jnp.int32), 1, tqp, _PAD_K_BLK)
    o, lse = kernel.decode_attention_gpu(q_rows, k_cache, v_cache, cache_len, own(k_new), own(v_new),
                                         qb, kb, scale=scale, bk=bk, splits=splits, bm=bm,
                                         interpret=interpret)
    out = o[:, :, 0] if splits == 1 else merge_splits(o, lse[..., None], axis=2)
    return _unrows(out[:, :, :tq * g, :d], tq).astype(q.dtype)


def _tpu(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk, *, scale, block_kv, splits,
         interpret):
    b, nkv = q.shape[0], k_new.shape[2]
    g = q.shape[2] // nkv
    k_cache, v_cache, bk = _fit_cache(k_cache, v_cache, block_kv or TPU_BLOCK_KV)
    tiles = k_cache.shape[1] // bk
    splits = (2 if b == 1 else 1) if splits is None else int(splits)  # b == 1: feed both megacore TCs
    splits = max(1, min(splits, tiles))
    out = kernel.decode_attention_tpu(_rows(q, nkv), k_cache, v_cache, cache_len, k_new, v_new,
                                      jnp.repeat(q_blk, g, axis=1), k_new_blk, scale=scale, bk=bk,
                                      out_dtype=q.dtype, splits=splits, interpret=interpret)
    if splits > 1:
        out = merge_splits(*out, axis=1).astype(q.dtype)
    return _unrows(out, q.shape[1])


def decode_attention(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk, *,
                     scale: float | None = None, block_kv: int | None = None, splits: int | None = None,
                     impl: str = "auto", platform: str | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Attention of one decoding step -> ``[B, Tq, Nq, D]`` in q's dtype.

    q ``[B, Tq, Nq, D]``; k/v_cache ``[B, C, Nkv, D]`` (slots ``< cache_len[b]`` valid, all
    visible); cache_len ``[B]`` int; k/v_new ``[B, Tq, Nkv, D]`` (the step's own keys); q_blk /
    k_new_blk ``[B, Tq]`` int block ids (own key j visible to query i iff ``k_new_blk[j] <=
    q_blk[i]``; zeros = full attention). ``block_kv``: cache slots per kernel tile (rounded to a
    power of two dividing C; default 64 on GPU, 256 on TPU). ``splits``: cache splits merged by
    log-sum-exp (GPU default ``auto_splits``: enough programs for the SMs; TPU default 2 for a
    single row, so both TensorCores of a megacore chip work, else 1). Kernel cost scales with
    ``cache_len``, not C (``cache_len`` is clipped to ``[0, C]``: no read past the cache).
    """
    check_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk)
    impl, platform, interpret = _resolve(impl, interpret, platform)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    cache_len = jnp.clip(cache_len.astype(jnp.int32), 0, k_cache.shape[1])
    args = (q, k_cache, v_cache, cache_len, k_new, v_new, q_blk, k_new_blk)
    if impl == "xla":
        return decode_attention_reference(*args, scale=scale)
    if platform == "gpu":
        return _gpu(*args, scale=scale, block_kv=block_kv, splits=splits, interpret=interpret)
    return _tpu(*args, scale=scale, block_kv=block_kv, splits=splits, interpret=interpret)
