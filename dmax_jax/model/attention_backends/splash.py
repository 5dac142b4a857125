"""``splash``: JAX's TPU splash attention with a lazy block-diffusion mask.

The mask is a ``_ComputableMask`` whose function maps token ids of the padded sequence to
``(blk, is_clean, valid)`` (``PaddedLayout.indices_of``) and applies ``masks.allowed``: splash
evaluates it inside the kernel (no mask tensor in HBM) and, at build time on numpy, to find the
tiles it can skip. Splash does not scale the logits, so q is multiplied by ``scale`` first.

Runs on TPU; ``interpret=True`` runs the same kernel in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from dmax_jax.model.attention_backends.tiles import PaddedLayout, check_qkv, padded_layout
from dmax_jax.model.masks import MaskSpec, allowed

DEFAULT_BLOCK = 128  # splash tiles: multiples of 128 lanes


class BlockDiffusionMask(splash_mask._ComputableMask):
    """Lazy ``[padded, padded]`` mask of a ``PaddedLayout`` (padding keys are never allowed)."""

    def __init__(self, layout: PaddedLayout):
        self.layout = layout

        def mask_function(q_ids, kv_ids):
            xp = np if isinstance(q_ids, np.ndarray) else jnp
            q_blk, q_clean, _ = layout.indices_of(q_ids, xp)
            k_blk, k_clean, k_valid = layout.indices_of(kv_ids, xp)
            return allowed(q_blk, q_clean, k_blk, k_clean) & k_valid

        super().__init__((layout.padded, layout.padded), mask_function)

    def _key(self):
        lay = self.layout
        return (lay.spec, lay.length, lay.padded, lay.segment_padded)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockDiffusionMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((BlockDiffusionMask, self._key()))


@functools.lru_cache(maxsize=32)
def _kernel(spec: MaskSpec, length: int, num_heads: int, block: int, interpret: bool):
    layout = padded_layout(spec, length, block)
    mask = splash.MultiHeadMask([BlockDiffusionMask(layout)] * num_heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              use_fused_bwd_kernel=True)
    # The kernel is cached across traces: its mask-info arrays must be concrete, not tracers.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, *, spec: MaskSpec, scale: float | None = None,
                     block: int = DEFAULT_BLOCK, interpret: bool = False):
    """Masked self-attention via splash. Shapes/dtypes as ``attention_backends`` documents;
    ``block`` is the splash tile (multiple of 128), ``interpret`` runs the Pallas interpreter."""
    b, t, nq, nkv, d = check_qkv(q, k, v)
    if block <= 0 or block % 128:
        raise ValueError(f"splash block must be a positive multiple of 128, got {block}")
    scale = d ** -0.5 if scale is None else scale
    layout = padded_layout(spec, t, block)
    kernel = _kernel(spec, t, nq, block, interpret)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash does not scale logits

    def heads_major(x):  # [B, T, N, D] -> [B, N, Tp, D]
        return layout.pad(x).transpose(0, 2, 1, 3)

    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))
    return layout.unpad(out.transpose(0, 2, 1, 3)).astype(q.dtype)
