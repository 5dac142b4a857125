"""LLaDA2 mixture of experts: route, then the routed experts (``experts.py``), plus the shared expert.

Router (algorithm §1.2 "MoE FFN"): float32 sigmoid scores; ``expert_bias`` only changes *which* experts
are chosen (group-limited top-k on biased scores), the combine weights use the unbiased scores,
normalised over the chosen K and scaled by ``routed_scaling_factor``. ``impl`` is the MoE switch
``moe_impl`` (``experts.MOE_IMPLS``), resolved for ``platform`` (the compile target's; None = the
host's default backend). int8 weight-only expert weights reach ``routed_experts`` as
``QArray(q, scale)`` (``layers.quantized_param``): the GPU / TPU kernels read the int8 tiles.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from qwix import QArray

from dmax_jax.config import ModelConfig
from dmax_jax.model.experts import routed_experts
from dmax_jax.model.layers import GatedMLP, param_with_axes, quantized_param


def route(logits: jax.Array, expert_bias: jax.Array, cfg: ModelConfig):
    """Group-limited top-k routing. logits ``[tokens, E]`` (f32) → (expert ids ``[tokens, K]``,
    combine weights ``[tokens, K]`` f32)."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    biased = scores + jax.lax.stop_gradient(expert_bias.astype(jnp.float32))
    n, e = biased.shape
    g = cfg.n_group
    if g > 1:
        grouped = biased.reshape(n, g, e // g)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [n, g]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], keep].set(True)
        expert_mask = jnp.repeat(group_mask, e // g, axis=1)
        biased = jnp.where(expert_mask, biased, -jnp.inf)
    _, idx = jax.lax.top_k(biased, cfg.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


class MoE(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    platform: str | None = None  # the compile target's (dmax_jax.platforms); None = the host's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        hdim, e, im = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        router = param_with_axes(self, "router", init, (hdim, e), self.param_dtype, ("embed", None))
        if cfg.moe_router_enable_expert_bias:
            bias = param_with_axes(self, "expert_bias", nn.initializers.zeros, (e,), jnp.float32, (None,))
        else:  # checkpoints without the buffer: selection uses the plain sigmoid scores
            bias = jnp.zeros((e,), jnp.float32)
        wg = quantized_param(self, "experts_gate", init, (e, hdim, im), self.param_dtype,
                             ("exp", "embed", "exp_mlp"))
        wu = quantized_param(self, "experts_up", init, (e, hdim, im), self.param_dtype,
                             ("exp", "embed", "exp_mlp"))
        wd = quantized_param(self, "experts_down", init, (e, im, hdim), self.param_dtype,
                             ("exp", "exp_mlp", "embed"))
        wg, wu, wd = (w if isinstance(w, QArray) else w.astype(self.dtype) for w in (wg, wu, wd))
        shape = x.shape
        u = x.reshape(-1, hdim).astype(self.dtype)
        logits = u.astype(jnp.float32) @ router.astype(jnp.float32)
        idx, w = route(logits, bias, cfg)
        y = routed_experts(u, idx, w, wg, wu, wd, impl=self.impl, platform=self.platform)
        if cfg.num_shared_experts > 0:
            y = y + GatedMLP(im * cfg.num_shared_experts, self.dtype, self.param_dtype, name="shared")(u)
        return y.reshape(shape).astype(self.dtype)
