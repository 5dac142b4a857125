"""Bad model configs and model directories: each gives one typed, one-line error naming the culprit.

Property-based: random deletions and corruptions of a complete config.json never load silently with
a value that config.json did not state (only inclusionAI's own HF defaults may fill a gap), and
never fail with anything but a ``ModelConfigError`` that names a field that was deleted or broken.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmax_jax.checkpoint.hf import CheckpointError, CheckpointNotFoundError, save_hf_params
from dmax_jax.config import (
    DTYPE_NAMES,
    HF_DEFAULTS,
    DtypeError,
    ModelConfig,
    ModelConfigError,
    ModelConfigNotFoundError,
    parse_dtype,
    required_fields,
    tiny_config,
)
from dmax_jax.pretrained import load_pretrained

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
COMPLETE = tiny_config().to_hf_dict()  # every typed field stated, as save_pretrained writes it
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "first_k_dense_replace",
              "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_shared_experts",
              "n_group", "topk_group")
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "routed_scaling_factor")
BOOL_FIELDS = ("use_qkv_bias", "use_bias", "tie_word_embeddings", "moe_router_enable_expert_bias",
               "norm_topk_prob")
STR_FIELDS = ("hidden_act", "score_function", "router_dtype", "model_type", "torch_dtype")


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


# ---- missing fields -------------------------------------------------------------------------------
@pytest.mark.parametrize("field", required_fields(COMPLETE))
def test_each_required_field_missing_is_named(field):
    d = {k: v for k, v in COMPLETE.items() if k != field}
    with pytest.raises(ModelConfigError) as ei:
        ModelConfig.from_hf_dict(d)
    assert one_line(ei.value).startswith(f"config.json has no `{field}`") and ei.value.field == field


def test_the_issue_cases_rope_theta_hidden_size_num_experts(tmp_path):
    for field in ("rope_theta", "hidden_size", "num_experts"):
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in COMPLETE.items() if k != field}))
        with pytest.raises(ModelConfigError, match=f"config.json has no `{field}`") as ei:
            ModelConfig.from_json(tmp_path)
        assert str(tmp_path) in one_line(ei.value)  # names the file


def test_all_missing_fields_in_one_line_and_typo_hint():
    d = {k: v for k, v in COMPLETE.items() if k not in ("rope_theta", "num_experts")}
    d["num_expert"] = 8
    msg = one_line(pytest.raises(ModelConfigError, ModelConfig.from_hf_dict, d).value)
    assert "`rope_theta`" in msg and "`num_experts`" in msg and "`num_expert`: a typo?" in msg


def test_moe_and_dense_requirements_follow_the_layer_kinds():
    moe_keys = ("moe_intermediate_size", "num_experts_per_tok", "num_shared_experts", "first_k_dense_replace")
    dense_only = {k: v for k, v in COMPLETE.items() if k not in moe_keys}
    cfg = ModelConfig.from_hf_dict({**dense_only, "num_experts": 0})  # no MoE layer: MoE shapes not needed
    assert cfg.num_moe_layers == 0
    all_moe = {k: v for k, v in COMPLETE.items() if k != "intermediate_size"}
    assert ModelConfig.from_hf_dict({**all_moe, "first_k_dense_replace": 0}).num_dense_layers == 0
    with pytest.raises(ModelConfigError, match="no `intermediate_size`"):
        ModelConfig.from_hf_dict(all_moe)  # first_k_dense_replace = 1: one dense layer needs it


def test_hf_default_is_used_and_named_when_it_breaks_the_model():
    d = {k: v for k, v in COMPLETE.items() if k not in ("n_group", "topk_group")}
    msg = one_line(pytest.raises(ModelConfigError, ModelConfig.from_hf_dict, d).value)
    # HF's n_group default 8 cannot split 8 experts into groups of >= 2: the error says it was defaulted
    assert "`n_group`" in msg and "not in config.json: the HF default 8 was used" in msg
    no_bias_key = {k: v for k, v in COMPLETE.items() if k != "use_bias"}
    msg = one_line(pytest.raises(ModelConfigError, ModelConfig.from_hf_dict, no_bias_key).value)
    assert "`use_bias`" in msg and "HF default True" in msg


@SETTINGS
@given(st.sets(st.sampled_from(sorted(COMPLETE)), min_size=1))
def test_random_deletions_load_only_with_real_hf_defaults(deleted):
    d = {k: v for k, v in COMPLETE.items() if k not in deleted}
    try:
        cfg = ModelConfig.from_hf_dict(d)
    except ModelConfigError as e:
        msg = one_line(e)
        assert e.field in deleted, msg  # the culprit is a key that was taken out
        assert f"`{e.field}`" in msg
        return
    for key in deleted:  # it loaded: every gap was filled with inclusionAI's default (or is not a field)
        if key == "head_dim":
            assert cfg.head_dim == COMPLETE["hidden_size"] // COMPLETE["num_attention_heads"]
        elif key in HF_DEFAULTS:
            assert getattr(cfg, key) == HF_DEFAULTS[key]
        else:
            assert key == "architectures" or not hasattr(cfg, key) or getattr(cfg, key) == COMPLETE[key]


# ---- wrong types and ranges --------------------------------------------------------------------
def _wrong_value(field: str) -> st.SearchStrategy:
    junk = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
    if field in INT_FIELDS:
        fractional = st.floats().filter(lambda x: not float(x).is_integer())
        return st.one_of(junk, st.booleans(), st.none(), fractional, st.just(8.0))
    if field in FLOAT_FIELDS:
        return st.one_of(junk, st.booleans(), st.none(), st.sampled_from([math.nan, math.inf, -math.inf]))
    if field in BOOL_FIELDS:
        return st.one_of(junk, st.integers(), st.none())
    return st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2), st.none())


@SETTINGS
@given(st.sampled_from(INT_FIELDS + FLOAT_FIELDS + BOOL_FIELDS + STR_FIELDS).flatmap(
    lambda f: st.tuples(st.just(f), _wrong_value(f))))
def test_random_wrong_types_name_the_field(case):
    field, value = case
    with pytest.raises(ModelConfigError) as ei:
        ModelConfig.from_hf_dict({**COMPLETE, field: value})
    assert f"`{field}`" in one_line(ei.value)


POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "moe_intermediate_size", "intermediate_size", "n_group",
            "topk_group", "num_experts_per_tok")


@SETTINGS
@given(st.sampled_from(POSITIVE), st.integers(max_value=0))
def test_random_non_positive_sizes_name_the_field(field, value):
    with pytest.raises(ModelConfigError) as ei:
        ModelConfig.from_hf_dict({**COMPLETE, field: value})
    assert f"`{field}`" in one_line(ei.value)


@SETTINGS
@given(st.sampled_from(("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor")),
       st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_random_non_positive_scalars_name_the_field(field, value):
    with pytest.raises(ModelConfigError) as ei:
        ModelConfig.from_hf_dict({**COMPLETE, field: value})
    assert f"`{field}`" in one_line(ei.value)


@pytest.mark.parametrize("override,field", [
    ({"num_experts": -8}, "num_experts"), ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"), ({"router_dtype": "bf16"}, "router_dtype"),
    ({"score_function": "softmax"}, "score_function"), ({"eos_token_id": 384}, "eos_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"), ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 2}}, "rope_scaling"), ({"partial_rotary_factor": 2.0},
                                                                       "partial_rotary_factor"),
])
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ModelConfigError, match=f"`{field}`") as ei:
        ModelConfig.from_hf_dict({**COMPLETE, **override})
    one_line(ei.value)


# ---- config.json files -----------------------------------------------------------------------------
@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object, got list"),
    ('"text"', "must hold a JSON object, got str"), (b"\xff\xfe\x00garbage", "not valid JSON"),
    ("", "not valid JSON"),
])
def test_unreadable_config_files(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelConfigError, match=expected) as ei:
        ModelConfig.from_json(tmp_path)
    assert str(path) in one_line(ei.value)


def test_config_json_missing_or_a_directory(tmp_path):
    with pytest.raises(ModelConfigNotFoundError, match="no config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "sub" / "config.json").mkdir(parents=True)
    with pytest.raises(ModelConfigNotFoundError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "sub")


# ---- model directories -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import jax

    from dmax_jax.model.llada2 import init_params

    cfg = tiny_config(max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_params(init_params(cfg, jax.random.key(0)), cfg, path)
    return path


def test_load_pretrained_directory_problems_are_one_line(tmp_path, tiny_dir):
    cases = {"absent": (tmp_path / "nowhere", "does not exist")}
    (tmp_path / "file").write_text("x")
    cases["a file"] = (tmp_path / "file", "is not a directory")
    (tmp_path / "empty").mkdir()
    cases["empty"] = (tmp_path / "empty", "is empty")
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    cases["no config.json"] = (no_config, "has no config.json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_dir / "config.json", no_weights)
    cases["no safetensors"] = (no_weights, "no \\*.safetensors")
    for name, (path, expected) in cases.items():
        with pytest.raises(CheckpointNotFoundError, match=expected) as ei:
            load_pretrained(path)
        assert str(path) in one_line(ei.value), name


def test_load_pretrained_missing_rope_theta_and_bad_dtype(tmp_path, tiny_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    raw = json.loads((model / "config.json").read_text())
    del raw["rope_theta"]
    (model / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match="config.json has no `rope_theta`"):
        load_pretrained(model)
    with pytest.raises(DtypeError, match="dtype: 'float8' is not one of float32, bfloat16, float16"):
        load_pretrained(tiny_dir, dtype="float8")
    with pytest.raises(DtypeError, match="compute_dtype: 'int8'"):
        load_pretrained(tiny_dir, compute_dtype="int8")


def test_checkpoint_for_another_size_is_a_short_error(tmp_path, tiny_dir):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "hidden_size": 32}))  # every tensor misshapen
    with pytest.raises(CheckpointError) as ei:
        load_pretrained(model)
    lines = str(ei.value).splitlines()
    assert len(lines) <= 1 + 4 * (CheckpointError.SHOWN_PER_KIND + 1) and "more misshapen" in str(ei.value)
    assert len(ei.value.misshapen) > CheckpointError.SHOWN_PER_KIND  # the attribute keeps every tensor
    assert "problems)" in lines[0]


# ---- dtype names --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None)
@given(st.one_of(st.text(max_size=12), st.sampled_from(DTYPE_NAMES + ("float64", "int8", "bf16", "float8"))))
def test_parse_dtype_accepts_exactly_the_three_names(name):
    if name in DTYPE_NAMES:
        assert parse_dtype(name) == np.dtype(parse_dtype(name)) and parse_dtype(name).name == name
    else:
        with pytest.raises(DtypeError) as ei:
            parse_dtype(name, "--dtype")
        assert one_line(ei.value).startswith("--dtype: ") and "float32, bfloat16, float16" in str(ei.value)
