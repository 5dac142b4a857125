"""ModelConfig: HF config.json round trip, presets, and validation errors naming the field."""

import json

import pytest

from dmax_jax.config import ModelConfig, ModelConfigError, llada2_mini_config, tiny_config

# LLaDA2.0-mini's config.json as dFactory ships it (spec §1.1), including keys we do not model.
MINI = {
    "architectures": ["LLaDA2MoeModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "model_type": "llada2_moe_veomni", "vocab_size": 157184, "hidden_size": 2048, "intermediate_size": 5120,
    "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
    "first_k_dense_replace": 1, "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
    "num_shared_experts": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "score_function": "sigmoid", "router_dtype": "fp32", "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True, "rotary_dim": 64, "partial_rotary_factor": 0.5, "rope_theta": 600000,
    "rope_scaling": None, "rms_norm_eps": 1e-6, "max_position_embeddings": 16384, "hidden_act": "silu",
    "tie_word_embeddings": False, "norm_head": False, "use_bias": False, "use_qkv_bias": False,
    "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0, "torch_dtype": "bfloat16",
    "pad_token_id": 156892, "eos_token_id": 156892, "max_window_layers": 28, "use_sliding_window": False,
    "initializer_range": 0.02, "output_router_logits": False, "use_cache": True,
}


def test_mini_config_round_trip_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MINI))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.rope_dim == 64 and cfg.num_moe_layers == 19 and cfg.num_dense_layers == 1
    assert cfg.resolved_mask_token_id == 156895
    cfg.to_json(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {**MINI}  # every key back, unchanged
    assert cfg == llada2_mini_config().replace(model_type="llada2_moe_veomni", rotary_dim=64)


def test_model_types_accepted_and_rejected():
    for mt in ("llada2_moe", "llada2_moe_veomni"):
        assert ModelConfig.from_hf_dict({**MINI, "model_type": mt}).model_type == mt
    with pytest.raises(ModelConfigError, match="model_type"):
        ModelConfig.from_hf_dict({**MINI, "model_type": "llama"})
    with pytest.raises(ModelConfigError, match="model_type"):
        ModelConfig.from_hf_dict({k: v for k, v in MINI.items() if k != "model_type"})


@pytest.mark.parametrize("override,field", [
    (dict(num_experts=10, n_group=4), "num_experts"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(rotary_dim=20), "rotary_dim"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # 2 kept groups x 2 experts = 4 < 5
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mask_token_id=10_000), "mask_token_id"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_validation_names_the_field(override, field):
    with pytest.raises(ModelConfigError, match=field):
        tiny_config(**override)


def test_missing_token_ids_are_unknown_not_llada2_defaults():
    d = {"model_type": "llada2_moe", "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 0,
         "intermediate_size": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "use_bias": False}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.pad_token_id is None and cfg.eos_token_id is None
    assert cfg.num_moe_layers == 0
    with pytest.raises(ModelConfigError, match="no `mask_token_id`.*outside its vocabulary"):
        _ = cfg.resolved_mask_token_id  # the LLaDA2 mask id 156895 cannot be a token of a 100-token model


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nowhere")
