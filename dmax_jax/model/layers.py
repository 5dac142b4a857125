"""Small building blocks of LLaDA2-MoE: RMSNorm, partial neox RoPE, the gated SiLU MLP.

Dtype policy (algorithm §1.2, §7.11): RMSNorm normalises in float32, casts back to the activation dtype
and only *then* multiplies by the weight (dFactory/HF order); RoPE angles are float32, cos/sin are
cast to the activation dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from qwix import QArray

from dmax_jax.model.quant import SCALE_SUFFIX, dequantize

Dtype = jnp.dtype


def round_up(x, multiple):
    """Smallest multiple of ``multiple`` >= ``x``: the project's one ceil-division helper (Python ints
    for static shapes, integer arrays — traced ones too — for per-row geometry in decoding)."""
    return -(-x // multiple) * multiple


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: tuple):
    """Declare a parameter carrying logical axis names (the sharding rules map them to mesh axes).
    An int8 weight-only parameter (``model/quant.py``: a ``<name>_qscale`` sibling) comes back
    dequantized (float32), so no module needs to know."""
    w = quantized_param(module, name, init, shape, dtype, axes)
    return dequantize(w.qvalue, w.scale) if isinstance(w, QArray) else w


def quantized_param(module: nn.Module, name: str, init, shape, dtype, axes: tuple) -> jax.Array | QArray:
    """``param_with_axes`` without the dequantize: an int8 weight comes back as ``QArray(q, scale)``
    (int8 ``q``, float32 ``scale``) for consumers that read int8 themselves (the routed experts'
    grouped-matmul kernels); a native weight as itself."""
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    if module.has_variable("params", name + SCALE_SUFFIX):
        return QArray(w, module.get_variable("params", name + SCALE_SUFFIX))
    return w


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype,
                                (self.axis_name,))
        return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Dtype) -> jax.Array:
    x = x.astype(dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * y.astype(dtype)


def rotary_cos_sin(positions: jax.Array, rope_dim: int, theta: float, dtype: Dtype):
    """cos/sin ``[batch, length, rope_dim]`` for the neox (rotate_half) convention: angles cat(θ, θ)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``rope_dim`` dims of each head of ``x [batch, length, heads, head_dim]``."""
    r = cos.shape[-1]
    rot, keep = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), keep], axis=-1)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` — the dense FFN and the shared expert."""

    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mlp_axis: str = "mlp"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.shape[-1]
        init = nn.initializers.normal(0.02)
        wg = param_with_axes(self, "gate", init, (h, self.width), self.param_dtype, ("embed", self.mlp_axis))
        wu = param_with_axes(self, "up", init, (h, self.width), self.param_dtype, ("embed", self.mlp_axis))
        wd = param_with_axes(self, "down", init, (self.width, h), self.param_dtype, (self.mlp_axis, "embed"))
        x = x.astype(self.dtype)
        # jnp.dot (= ``@``) because qwix's LoRA intercepts jnp.dot / einsum, not the ``@`` operator.
        a = jax.nn.silu(jnp.dot(x, wg.astype(self.dtype))) * jnp.dot(x, wu.astype(self.dtype))
        return jnp.dot(a, wd.astype(self.dtype))
