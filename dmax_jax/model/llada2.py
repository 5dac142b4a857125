"""The LLaDA2-MoE stack: embed (ids or embeddings) → scanned decoder layers → final norm → lm_head.

Algorithm §1. The first ``first_k_dense_replace`` layers (dense FFN) and the remaining MoE layers are two
``nn.scan`` stacks with stacked parameters, so compile time stays flat in depth. The model is pure:
params in, float32 logits out; an optional ``KVCache`` turns it into the block-decoding forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmax_jax import platforms
from dmax_jax.config import ModelConfig
from dmax_jax.model import attention_backends
from dmax_jax.model.attention_layer import Attention
from dmax_jax.model.kv_cache import KVCache
from dmax_jax.model.layers import GatedMLP, RMSNorm, param_with_axes
from dmax_jax.model.masks import MaskSpec, default_positions
from dmax_jax.model.moe import MoE

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nn.Module):
    config: ModelConfig
    mask: MaskSpec
    moe: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "xla_dense"
    moe_impl: str = "auto"
    return_kv: bool = False
    platform: str | None = None

    @nn.compact
    def __call__(self, h, positions, layer_cache, cache_len):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        cache = None if layer_cache is None else (*layer_cache, cache_len)
        a, kv = Attention(cfg, self.mask, dt, pdt, self.attention_backend, self.platform, name="attention")(
            RMSNorm(cfg.rms_norm_eps, dt, pdt, "norm", name="input_norm")(h), positions, cache)
        h = h + a
        u = RMSNorm(cfg.rms_norm_eps, dt, pdt, "norm", name="post_norm")(h)
        if self.moe:
            f = MoE(cfg, dt, pdt, self.moe_impl, self.platform, name="moe")(u)
        else:
            f = GatedMLP(cfg.intermediate_size, dt, pdt, name="mlp")(u)
        return h + f, (kv if self.return_kv else None)


class LLaDA2MoeModel(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_backend: str = "xla_dense"
    moe_impl: str = "auto"
    remat: str | None = None  # None | "full" | "dots"
    cache_window: int | None = None  # attention reads cache slots [0, cache_window) only
    platform: str | None = None  # the target's platform (dmax_jax.platforms); None = the host's

    @nn.compact
    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None,
                 mask: MaskSpec = MaskSpec("full"), cache: KVCache | None = None, commit: bool = False,
                 commit_length: int | None = None, logits_prefix: int | None = None):
        """Returns ``(logits f32 [batch, length, vocab], cache)``; with ``commit`` the call's K/V are
        written to the returned cache and its first ``commit_length`` tokens (default all) become
        valid; otherwise the cache comes back unchanged. ``logits_prefix`` computes logits for the
        first N positions only (training needs only the noisy half: saves the lm_head on L tokens
        and an f32 ``[batch, L, vocab]`` buffer)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        emb = param_with_axes(self, "embedding", nn.initializers.normal(0.02),
                              (cfg.vocab_size, cfg.hidden_size), self.param_dtype, ("vocab", "embed"))
        if inputs_embeds is None:
            h = jnp.take(emb, input_ids, axis=0).astype(self.dtype)
        else:
            if inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds hidden size {inputs_embeds.shape[-1]} != {cfg.hidden_size}")
            h = inputs_embeds.astype(self.dtype)
        b, t = h.shape[:2]
        if positions is None:
            positions = default_positions(mask, t)
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, t))
        if commit and cache is None:
            raise ValueError("commit=True needs a cache")

        new_k, new_v = {}, {}
        for name, n, is_moe in (("dense_layers", cfg.num_dense_layers, False),
                                ("moe_layers", cfg.num_moe_layers, True)):
            if n == 0:
                continue
            layer_cls = DecoderLayer
            if self.remat is not None:
                if self.remat not in REMAT_POLICIES:
                    raise ValueError(f"remat {self.remat!r} is not one of {tuple(REMAT_POLICIES)} or None")
                layer_cls = nn.remat(layer_cls, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast), length=n,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            layer_cache = None if cache is None else cache.stack(name)
            if layer_cache is not None and self.cache_window is not None:  # slots past it are never valid
                layer_cache = tuple(a[:, :, :self.cache_window] for a in layer_cache)
            cache_len = None if cache is None else cache.length
            layers = stack(cfg, mask, is_moe, self.dtype, self.param_dtype,
                           attention_backends.resolve(self.attention_backend, self.platform),
                           self.moe_impl, commit, self.platform, name=name)
            h, kv = layers(h, positions, layer_cache, cache_len)
            if commit:
                new_k[name], new_v[name] = kv
        if logits_prefix is not None:
            h = h[:, :logits_prefix]
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, "norm", name="final_norm")(h)
        if cfg.tie_word_embeddings:
            head = emb.T
        else:
            head = param_with_axes(self, "lm_head", nn.initializers.normal(0.02),
                                   (cfg.hidden_size, cfg.vocab_size), self.param_dtype, ("embed", "vocab"))
        logits = (h @ head.astype(self.dtype)).astype(jnp.float32)
        if commit:
            cache = cache.write(new_k, new_v, positions, commit_length,
                                rowwise=platforms.resolve(self.platform) == "gpu")
        return logits, cache


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32, *, boxed: bool = False):
    """Random parameters (std 0.02 normal, norms = 1, expert_bias = 0). ``boxed`` keeps the
    ``nn.LogicallyPartitioned`` metadata (for deriving shardings)."""
    model = LLaDA2MoeModel(config, param_dtype=dtype)
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = model.init(rng, ids)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def forward(params, config: ModelConfig, input_ids=None, *, inputs_embeds=None, positions=None,
            mask: MaskSpec = MaskSpec("full"), cache: KVCache | None = None, commit: bool = False,
            commit_length: int | None = None, dtype=jnp.float32, attention_backend: str = "xla_dense",
            moe_impl: str = "auto", remat: str | None = None, logits_prefix: int | None = None,
            cache_window: int | None = None, platform: str | None = None, lora=None):
    """Functional forward: ``(logits f32, cache)``. Wrap in ``jax.jit`` with the static arguments.
    ``cache_window``: attend to cache slots ``[0, cache_window)`` only — for a cache wider than any
    row's valid length (the serving engine's scratch columns), so attention skips what it would mask.
    ``platform``: the platform the program is compiled for (``dmax_jax.platforms.platform_of`` the
    params); it picks the MoE kernel of ``moe_impl="auto"``. None = the host's default backend.
    ``lora``: a ``model.lora.LoraConfig`` — ``params`` is then ``lora.combine(base, adapters)``."""
    model = LLaDA2MoeModel(config, dtype=dtype, param_dtype=jnp.float32, attention_backend=attention_backend,
                           moe_impl=moe_impl, remat=remat, cache_window=cache_window,
                           platform=platform)
    if lora is not None and lora.enabled:
        from dmax_jax.model.lora import adapt_model  # noqa: PLC0415  (qwix only when adapters are on)

        model = adapt_model(model, lora)
    return model.apply({"params": params}, input_ids, inputs_embeds=inputs_embeds, positions=positions,
                       mask=mask, cache=cache, commit=commit, commit_length=commit_length,
                       logits_prefix=logits_prefix)


forward_jit = jax.jit(forward, static_argnames=("config", "mask", "commit", "commit_length", "dtype",
                                               "attention_backend", "moe_impl", "remat", "logits_prefix",
                                               "cache_window", "platform", "lora"))
forward_jit.__doc__ = "``forward`` under ``jax.jit`` (config, mask and flags static)."


def embedding_table(params) -> jax.Array:
    return params["embedding"]
