"""dmax_decode.json: the shipped files are valid and carry the demo's settings; a malformed file is
one error naming the file and the key; the layering defaults < file < per-strategy < flags."""

from __future__ import annotations

import json

import pytest

from dmax_jax.decoding import DecodeConfig
from dmax_jax.decoding.model_defaults import ModelDefaultsError, load_model_defaults
from dmax_jax.demo import DEMO_DECODE, default_model_dir

GOOD = {"format": "dmax_decode/1", "prompt_template": "Q: {prompt}\nA:", "chat": False,
        "decode": {"strategy": "spd", "gen_length": 64, "dtype": "float32"},
        "strategies": {"threshold": {"threshold": 0.95}}}


@pytest.mark.parametrize("name,strategy", [("base", "threshold"), ("dmax", "spd")])
def test_shipped_models_carry_the_demo_settings(name, strategy):
    d = load_model_defaults(default_model_dir(name))
    cfg = d.config(DecodeConfig(dtype="bfloat16"), {})
    assert cfg.strategy == strategy and cfg.gen_length == DEMO_DECODE.gen_length
    assert cfg.block_length == DEMO_DECODE.block_length and cfg.prompt_bucket == DEMO_DECODE.prompt_bucket
    assert cfg.dtype == "float32" and cfg.threshold == DEMO_DECODE.default_threshold(strategy)
    assert d.chat and d.wrap("What?") == "Question: What?\nLet's think step by step\nAnswer:"
    from dmax_jax.eval.benchmarks import get_benchmark

    assert d.wrap("What?") == get_benchmark("gsm8k").prompt({"question": "What?"})   # the demo's wrapping


def test_layering(tmp_path):
    (tmp_path / "dmax_decode.json").write_text(json.dumps(GOOD))
    d = load_model_defaults(tmp_path)
    base = DecodeConfig(dtype="bfloat16")
    assert d.config(base, {}).threshold == 0.5 and d.config(base, {}).gen_length == 64
    assert d.config(base, {"strategy": "threshold"}).threshold == 0.95       # per-strategy entry
    assert d.config(base, {"strategy": "threshold", "threshold": 0.7}).threshold == 0.7   # flag wins
    assert d.config(base, {"dtype": "bfloat16"}).dtype == "bfloat16"
    assert load_model_defaults(tmp_path / "missing") is None


@pytest.mark.parametrize("change,message", [
    ({"format": "v2"}, "'format' must be 'dmax_decode/1'"),
    ({"prompt_template": "no placeholder"}, "holding {prompt} exactly once"),
    ({"prompt_template": "{prompt} {prompt}"}, "holding {prompt} exactly once"),
    ({"chat": "yes"}, "'chat' must be true or false"),
    ({"decode": {"gen_lenght": 64}}, "decode.gen_lenght: unknown field"),
    ({"decode": {"threshold": 1.5}}, r"decode.threshold: must be in \[0, 1\]"),
    ({"strategies": {"greedy": {}}}, "'strategies' must map strategy names"),
    ({"strategies": {"threshold": {"steps": 4}}}, "strategies.threshold.steps"),
    ({"strategies": {"spd": {"strategy": "llada2"}}}, "must not set 'strategy'"),
    ({"extra": 1}, "unknown key 'extra'"),
])
def test_malformed_files_name_file_and_key(tmp_path, change, message):
    (tmp_path / "dmax_decode.json").write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ModelDefaultsError, match=message) as e:
        load_model_defaults(tmp_path)
    assert str(tmp_path / "dmax_decode.json") in str(e.value)


def test_invalid_json_is_one_error(tmp_path):
    (tmp_path / "dmax_decode.json").write_text("{not json")
    with pytest.raises(ModelDefaultsError, match="not readable as JSON"):
        load_model_defaults(tmp_path)
