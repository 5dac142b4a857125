"""The LLaDA2 attention layer: fused QKV → per-head QK RMSNorm → partial RoPE → GQA attention → dense.

Algorithm §1.2. Two call modes:
* sequence mode (training, full recompute): the mask comes from ``MaskSpec`` over the sequence;
* cached mode (block decoding): queries are one block (or the cross-block pair) at absolute
  ``positions``; keys are the valid cache slots plus the block itself, block-causal on positions.
  On a GPU / TPU target (``platform``) this runs the Pallas decode kernel, which reads only the
  valid cache slots (``attention_backends/decode.py``); on CPU the dense path (``xla_dense``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.model.attention_backends import attention
from dmax_jax.model.layers import RMSNorm, apply_rotary, param_with_axes, rotary_cos_sin
from dmax_jax.model.masks import MaskSpec
from dmax_jax.platforms import resolve as resolve_platform


class Attention(nn.Module):
    config: ModelConfig
    mask: MaskSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "xla_dense"
    platform: str | None = None  # the compile target's (dmax_jax.platforms); None = the host's

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple | None = None):
        """x ``[batch, length, hidden]``; positions ``[batch, length]``.

        ``cache = (k_cache, v_cache, cache_len)`` with k/v ``[batch, C, kv_heads, head_dim]`` and
        ``cache_len [batch]``. Returns ``(out, (k, v))`` — the block's own post-RoPE K/V so the caller
        can commit them to the cache.
        """
        cfg = self.config
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = nn.initializers.normal(0.02)
        w_qkv = param_with_axes(self, "qkv", init, (cfg.hidden_size, nq + 2 * nkv, d), self.param_dtype,
                                ("embed", "qkv_heads", "head_dim"))
        w_out = param_with_axes(self, "out", init, (nq, d, cfg.hidden_size), self.param_dtype,
                                ("heads", "head_dim", "embed"))
        x = x.astype(self.dtype)
        qkv = jnp.einsum("bth,hnd->btnd", x, w_qkv.astype(self.dtype))
        q, k, v = qkv[:, :, :nq], qkv[:, :, nq:nq + nkv], qkv[:, :, nq + nkv:]
        q = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, "head_dim", name="q_norm")(q)
        k = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, "head_dim", name="k_norm")(k)
        cos, sin = rotary_cos_sin(positions, cfg.rope_dim, cfg.rope_theta, self.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            o = attention(q, k, v, spec=self.mask, backend=self.backend)
        else:
            o = _cached_attention(q, k, v, positions, cache, self.mask, self.platform)
        out = jnp.einsum("btnd,ndh->bth", o, w_out.astype(self.dtype))
        return out, (k, v)


def _cached_attention(q, k, v, positions, cache, spec: MaskSpec, platform: str | None = None):
    """Block queries against ``cache slots < cache_len`` + the block's own keys (algorithm §5.3).
    GPU / TPU: the decode kernel (cost follows ``cache_len``, not the cache width) for block-sized
    calls (``decode.use_kernel``); CPU and prompt-sized calls: dense (on CPU the reference numerics
    every CPU test's tokens depend on)."""
    if spec.kind == "noisy_clean":
        raise ValueError("cached attention supports 'block_causal' or 'full' masks, not 'noisy_clean'")
    target = resolve_platform(platform)
    if target in ("gpu", "tpu"):  # imported here: CPU runs never load kernel code
        from dmax_jax.model.attention_backends import decode  # noqa: PLC0415

        if decode.use_kernel(q.shape[1], q.shape[2], k.shape[2]):
            return decode.decode_kernel_attention(q, k, v, positions, cache, spec, platform=target)
    k_cache, v_cache, cache_len = cache
    b, cap = k_cache.shape[0], k_cache.shape[1]
    bs = spec.block_length
    slots = jnp.arange(cap, dtype=jnp.int32)[None, :]
    keys_k = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
    keys_v = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
    blk_cache = jnp.broadcast_to(slots // bs, (b, cap))
    k_blk = jnp.concatenate([blk_cache, positions // bs], axis=1).astype(jnp.int32)
    k_valid = jnp.concatenate([slots < cache_len[:, None], jnp.ones(positions.shape, bool)], axis=1)
    q_blk = (positions // bs).astype(jnp.int32)
    if spec.kind == "full":  # everything visible except empty slots
        q_blk = jnp.zeros_like(q_blk)
        k_blk = jnp.zeros_like(k_blk)
    clean_q = jnp.ones(q_blk.shape, bool)
    clean_k = jnp.ones(k_blk.shape, bool)
    return attention(q, keys_k, keys_v, spec=MaskSpec("block_causal", bs), backend="xla_dense",
                     q_blk=q_blk, q_clean=clean_q, k_blk=k_blk, k_clean=clean_k, k_valid=k_valid)
