"""LLaDA2 mixture of experts: route → permute → grouped matmul → unpermute (spec §1.2 "MoE FFN").

Router: float32 sigmoid scores; ``expert_bias`` only changes *which* experts are chosen (group-limited
top-k on biased scores), the combine weights use the unbiased scores, normalised over the chosen K
and scaled by ``routed_scaling_factor``. Expert compute is dropless: tokens are sorted by expert and
``jax.lax.ragged_dot`` runs one grouped matmul per projection. ``impl="dense"`` evaluates every
expert on every token — slow, used as the test reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.model.layers import GatedMLP, param_with_axes

MOE_IMPLS = ("ragged", "dense", "ep")  # ep: expert-parallel all_to_all (moe_ep.py)


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


def experts_ragged(x, idx, w, w_gate, w_up, w_down):
    """Dropless expert compute on expert-sorted tokens. x ``[N, H]``, idx/w ``[N, K]``."""
    n, k = idx.shape
    e = w_gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tokens = jnp.take(x, order // k, axis=0)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(tokens, w_gate, sizes)) * jax.lax.ragged_dot(tokens, w_up, sizes)
    out = jax.lax.ragged_dot(h.astype(x.dtype), w_down, sizes)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", unsorted.astype(jnp.float32), w).astype(x.dtype)


def experts_dense(x, idx, w, w_gate, w_up, w_down):
    """Every expert on every token, then combine; the reference for ``experts_ragged``."""
    e = w_gate.shape[0]
    h = jax.nn.silu(jnp.einsum("nh,ehi->nei", x, w_gate)) * jnp.einsum("nh,ehi->nei", x, w_up)
    out = jnp.einsum("nei,eih->neh", h, w_down)
    comb = jnp.zeros((x.shape[0], e), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    return jnp.einsum("neh,ne->nh", out.astype(jnp.float32), comb).astype(x.dtype)


class MoE(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "ragged"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if self.impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl {self.impl!r} is not one of {MOE_IMPLS}")
        hdim, e, im = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        router = param_with_axes(self, "router", init, (hdim, e), self.param_dtype, ("embed", None))
        if cfg.moe_router_enable_expert_bias:
            bias = param_with_axes(self, "expert_bias", nn.initializers.zeros, (e,), jnp.float32, (None,))
        else:  # checkpoints without the buffer: selection uses the plain sigmoid scores
            bias = jnp.zeros((e,), jnp.float32)
        wg = param_with_axes(self, "experts_gate", init, (e, hdim, im), self.param_dtype,
                             ("exp", "embed", "exp_mlp"))
        wu = param_with_axes(self, "experts_up", init, (e, hdim, im), self.param_dtype,
                             ("exp", "embed", "exp_mlp"))
        wd = param_with_axes(self, "experts_down", init, (e, im, hdim), self.param_dtype,
                             ("exp", "exp_mlp", "embed"))
        shape = x.shape
        u = x.reshape(-1, hdim).astype(self.dtype)
        logits = u.astype(jnp.float32) @ router.astype(jnp.float32)
        idx, w = route(logits, bias, cfg)
        if self.impl == "ep":
            from dmax_jax.model.moe_ep import experts_ep as fn  # local: moe_ep imports this module
        else:
            fn = experts_ragged if self.impl == "ragged" else experts_dense
        y = fn(u, idx, w, wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype))
        if cfg.num_shared_experts > 0:
            y = y + GatedMLP(im * cfg.num_shared_experts, self.dtype, self.param_dtype, name="shared")(u)
        return y.reshape(shape).astype(self.dtype)
