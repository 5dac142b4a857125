"""DecodeConfig: validation at construction (typed error naming field and range), the static/traced
split, the gen_length rule (never more tokens than asked for) and generate's keyword compatibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from dmax_jax.config import tiny_config
from dmax_jax.decoding import DecodeConfig, DecodeConfigError, compile_count, generate
from dmax_jax.decoding.config import RowParams

CFG = tiny_config()


@pytest.mark.parametrize("field,value,pattern", [
    ("threshold", 1.5, r"threshold: must be in \[0, 1\], got 1.5"),
    ("threshold", -0.1, r"threshold: must be in \[0, 1\]"),
    ("threshold", float("nan"), r"threshold: must be in \[0, 1\]"),
    ("accept_threshold", 2, r"accept_threshold: must be in \[0, 1\], got 2"),
    ("gen_length", 0, r"gen_length: must be in \[1, "),
    ("block_length", -4, r"block_length: must be in \[1, "),
    ("gen_length", 3.5, r"gen_length: must be an integer"),
    ("strategy", "greedy", r"strategy: must be one of spd, threshold, llada2"),
    ("dtype", "float8", r"dtype: must be one of float32, bfloat16, float16"),
    ("soft_impl", "cuda", r"soft_impl: must be one of auto, pallas, xla"),
    ("temperature", -1.0, r"temperature: must be a finite number >= 0"),
    ("temperature", math.inf, r"temperature: must be a finite number >= 0"),
    ("steps", 0, r"steps: must be in \[1, "),
    ("top_k", 0, r"top_k: must be in \[1, "),
    ("seed", 2**40, r"seed: must be in \["),
    ("prompt_bucket", 20, r"prompt_bucket: must be a positive multiple of block_length 32"),
])
def test_bad_values_raise_a_typed_error_naming_the_field(field, value, pattern):
    with pytest.raises(DecodeConfigError, match=pattern) as e:
        DecodeConfig(**{field: value})
    assert e.value.field == field and isinstance(e.value, ValueError)


def test_strategy_specific_rules():
    with pytest.raises(DecodeConfigError, match="takes no steps"):
        DecodeConfig(strategy="threshold", steps=4)
    with pytest.raises(DecodeConfigError, match="top_k"):
        DecodeConfig(strategy="llada2", top_k=2)
    assert DecodeConfig(strategy="llada2", steps=64, gen_length=16).step_count() == 16  # capped at gen
    assert DecodeConfig(strategy="threshold", block_length=8).step_count() == 9       # worst case
    assert DecodeConfig(strategy="spd", block_length=8).step_count() == 8


@settings(max_examples=60, deadline=None)
@given(hs.floats(allow_nan=True, allow_infinity=True), hs.sampled_from(["threshold", "accept_threshold"]))
def test_thresholds_outside_unit_interval_always_rejected(x, field):
    if not math.isnan(x) and 0.0 <= x <= 1.0:
        assert getattr(DecodeConfig(**{field: x}), field) == x
    else:
        with pytest.raises(DecodeConfigError, match=field):
            DecodeConfig(**{field: x})


@settings(max_examples=60, deadline=None)
@given(hs.integers(-10**6, 10**6), hs.integers(-10**3, 10**3))
def test_lengths_must_be_positive(gen, block):
    if gen >= 1 and block >= 1:
        DecodeConfig(gen_length=gen, block_length=block)
    else:
        with pytest.raises(DecodeConfigError, match="block_length|gen_length"):
            DecodeConfig(gen_length=gen, block_length=block)


def test_split_static_part_and_traced_rows():
    cfg = DecodeConfig(strategy="spd", block_length=8, gen_length=20, threshold=0.3, temperature=0.0,
                       seed=5).resolve(CFG)
    rows = cfg.row_params([3, 11], [0, 7])
    static = cfg.program_spec("cpu", capacity=48, prompt_len=16)
    assert isinstance(rows, RowParams) and rows.threshold.tolist() == pytest.approx([0.3, 0.3])
    assert rows.request_ids.tolist() == [0, 7] and rows.gen_length.tolist() == [20, 20]
    assert rows.eos_id.tolist() == [CFG.eos_token_id] * 2 and rows.temperature.tolist() == [0.0, 0.0]
    # traced knobs do not change the compile key; static ones do
    spec = lambda c: c.program_spec("cpu", capacity=48, prompt_len=16)  # noqa: E731
    assert spec(cfg.replace(threshold=0.9, seed=1, gen_length=24)) == static
    assert spec(cfg.replace(temperature=0.5)) != static       # greedy vs sampling
    assert spec(cfg.replace(block_length=16)) != static
    assert cfg.program_spec("gpu", capacity=48, prompt_len=16) != static   # the target platform
    with pytest.raises(ValueError, match="resolve"):
        DecodeConfig().program_spec("cpu", capacity=48)
    hash(static)


def test_from_dict_rejects_unknown_keys_and_replace_unknown_options():
    assert DecodeConfig.from_dict({"gen_length": 64}).gen_length == 64
    with pytest.raises(DecodeConfigError, match="gen_lenght: unknown field in x.json"):
        DecodeConfig.from_dict({"gen_lenght": 64}, where="x.json")
    with pytest.raises(TypeError, match="unknown decode option"):
        DecodeConfig().replace(block_size=8)
    assert DecodeConfig().replace(soft_embedding_impl="xla").soft_impl == "xla"   # the old keyword


@pytest.fixture(scope="module")
def params():
    from test_decoding_oracle import random_params

    return random_params(CFG, seed=0, lm_head_scale=10.0)


@pytest.mark.parametrize("strategy", ["spd", "threshold", "llada2"])
def test_never_more_tokens_than_gen_length(params, strategy):
    """gen 5 with block 8: the last block reaches past P + 5 but only 5 tokens come back, and they are
    the first 5 of what gen 8 decodes (same blocks, same program)."""
    prompts = [[5, 6, 7], list(range(10, 21))]
    kw = dict(strategy=strategy, block_length=8, prompt_bucket=16, threshold=0.05)
    short = generate((params, CFG), prompts, gen_length=5, **kw)
    full = generate((params, CFG), prompts, gen_length=8, **kw)
    for i in range(2):
        assert len(short.token_ids[i]) <= 5 and short.tokens_ref[i] <= 5
        assert short.token_ids[i] == full.token_ids[i][:5]


def test_generate_takes_a_config_and_keyword_overrides(params):
    cfg = DecodeConfig(strategy="spd", block_length=8, gen_length=16, prompt_bucket=16, threshold=0.05)
    a = generate((params, CFG), [[5, 6, 7]], cfg)
    before = compile_count()
    b = generate((params, CFG), [[5, 6, 7]], cfg, threshold=0.05)
    c = generate((params, CFG), [[5, 6, 7]], **{k: getattr(cfg, k) for k in
                                                ("strategy", "block_length", "gen_length", "prompt_bucket",
                                                 "threshold")})
    assert a.token_ids == b.token_ids == c.token_ids and compile_count() == before
    with pytest.raises(DecodeConfigError, match="threshold"):
        generate((params, CFG), [[5]], cfg, threshold=1.5)
    with pytest.raises(TypeError, match="unknown decode option"):
        generate((params, CFG), [[5]], cfg, block=8)
    assert np.isfinite(a.tpf[0])


def test_top_level_export():
    import dmax_jax

    assert dmax_jax.DecodeConfig is DecodeConfig and dmax_jax.DecodeConfigError is DecodeConfigError


@pytest.mark.parametrize("strategy", ["spd", "threshold", "llada2"])
def test_per_row_knobs_in_one_batch_equal_each_row_alone(params, strategy):
    """RowParams are per row: one compiled batch whose rows carry different τ / seeds / temperatures
    (greedy rows among sampled ones) / gen lengths gives each row exactly the tokens and NFE it gets
    alone (what a slot engine needs)."""

    import jax

    from dmax_jax.decoding import buckets
    from dmax_jax.decoding.api import _program

    prompts = [[5, 6, 7], list(range(10, 21)), [40, 41]]
    knobs = [dict(threshold=0.05, gen_length=16, seed=0), dict(threshold=0.3, gen_length=13, seed=3,
                                                                temperature=0.7),
             dict(threshold=0.9, gen_length=16, seed=1)]
    if strategy == "spd":
        knobs[1]["accept_threshold"] = 0.5
    base = DecodeConfig(strategy=strategy, block_length=8, gen_length=16, prompt_bucket=16).resolve(CFG)
    alone = [generate((params, CFG), [p], base, request_ids=[i], **k)
             for i, (p, k) in enumerate(zip(prompts, knobs))]
    rows = [base.replace(**k).row_params([len(p)], [i]) for i, (p, k) in enumerate(zip(prompts, knobs))]
    row_params = jax.tree.map(lambda *a: np.concatenate(a), *rows)
    padded, capacity = buckets.shapes([len(p) for p in prompts], 16, 8, 16)
    ids, _ = buckets.pack_prompts(prompts, padded, base.mask_id)
    sampling = base.replace(temperature=0.7)     # greedy rows run inside a sampling program
    spec = sampling.program_spec("cpu", prompt_len=padded, capacity=capacity)
    exe, _ = _program(spec, CFG, params, ids, row_params)
    out = jax.device_get(exe(params, ids, row_params))
    from dmax_jax.decoding.stats import build_result

    res = build_result(out, [len(p) for p in prompts], eos_id=base.eos_id, seconds=1.0, compile_seconds=0.0,
                       strategy=strategy, trace_meta=None)
    for i in range(3):
        assert res.token_ids[i] == alone[i].token_ids[0] and res.nfe[i] == alone[i].nfe[0], f"row {i}"
    assert len(res.token_ids[1]) <= 13
    assert len({tuple(t) for t in res.token_ids}) == 3          # the knobs made the rows differ
