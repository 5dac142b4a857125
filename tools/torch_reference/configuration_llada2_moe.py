"""LLaDA2-MoE configuration for the PyTorch reference model (HF remote-code style).

Why it exists: the real checkpoint's remote code cannot be downloaded here, so the parity tests
place this file (and ``modeling_llada2_moe.py``) into a temporary HF directory with an ``auto_map``
and load it through ``transformers`` exactly as a real checkpoint would be loaded. Field names and
defaults follow the LLaDA2.0-mini ``config.json`` (algorithm §1.1). These defaults are NOT those of
inclusionAI's own remote-code class (there e.g. ``rope_theta=10000``, ``rms_norm_eps=1e-5``,
``use_bias=True``); the tests always write complete config.json files, and ``dmax_jax.config`` reads
a config.json strictly (required fields, ``HF_DEFAULTS`` = inclusionAI's defaults only).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    """Hyper-parameters of LLaDA2-MoE (defaults = LLaDA2.0-mini, algorithm §1.1)."""

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        max_position_embeddings: int = 16384,
        rope_theta: float = 600000.0,
        rope_scaling: dict | None = None,
        partial_rotary_factor: float = 0.5,
        rotary_dim: int | None = None,
        first_k_dense_replace: int = 1,
        moe_intermediate_size: int = 512,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        score_function: str = "sigmoid",
        router_dtype: str = "fp32",
        moe_router_enable_expert_bias: bool = True,
        norm_topk_prob: bool = True,
        pad_token_id: int | None = 156892,
        eos_token_id: int | None = 156892,
        mask_token_id: int | None = 156895,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        # Stored under private names as well: transformers 5 may fold rope_theta/rope_scaling into
        # ``rope_parameters``; the model reads ``llada2_rope_theta`` so it never depends on that.
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # assigning None only triggers a transformers-5 deprecation warning
            self.rope_scaling = rope_scaling
        self.llada2_rope_theta = float(rope_theta)
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = rotary_dim
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.router_dtype = router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.norm_topk_prob = norm_topk_prob
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set again after the base class: some transformers versions reset these from kwargs.
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
