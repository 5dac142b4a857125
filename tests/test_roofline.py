"""The roofline's counts against hand arithmetic, the model's own parameter tree and Monte Carlo routing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.checkpoint.hf import param_shapes
from dmax_jax.config import llada2_mini_config, tiny_config
from dmax_jax.model.moe import route
from dmax_jax.perf import roofline as rf
from tests.scripts import load_script

DEMO = Path(__file__).resolve().parents[1] / "dmax_jax" / "assets" / "demo" / "dmax"


def _tree_size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("make", [tiny_config, llada2_mini_config])
def test_param_counts_sum_to_the_model_tree(make):
    cfg = make()
    shapes = param_shapes(cfg)
    counts = rf.param_counts(cfg)
    assert sum(counts.values()) == _tree_size(shapes)
    assert counts["routed_experts"] == sum(math.prod(shapes["moe_layers"]["moe"][k].shape)
                                           for k in ("experts_gate", "experts_up", "experts_down"))
    assert counts["lm_head"] == math.prod(shapes["lm_head"].shape)


def test_dmax_16b_sizes():
    """The figures quoted in the field notes: 16.26 B parameters, 1.43 B active per token (with the
    embedding row), 6.3 MB per bf16 expert."""
    cfg = llada2_mini_config()
    assert sum(rf.param_counts(cfg).values()) == 16_255_643_392
    active = rf.active_params_per_token(cfg) + cfg.vocab_size * cfg.hidden_size
    assert active == pytest.approx(1.433e9, rel=1e-3)
    assert 2 * rf.expert_params(cfg) == 6_291_456


def test_tiny_bytes_by_hand():
    """tiny: V 384, H 64, I 96, 3 layers (1 dense), 4 q / 2 kv heads of 16, experts 8 x (3·64·32)."""
    b = rf.forward_bytes(tiny_config(), 2, 8, 64, weight_dtype="bfloat16", distinct_experts=5.0)
    attention = 3 * (64 * 8 * 16 + 4 * 16 * 64 + 2 * 16 + 2 * 64)  # 37,344 parameters
    want = {
        "attention": attention * 2,
        "dense_mlp": 3 * 64 * 96 * 2,
        "shared_experts": 2 * 3 * 64 * 32 * 2,
        "router": 2 * 64 * 8 * 2 + 2 * 8 * 4,  # bf16 router + f32 expert_bias
        "routed_experts": 2 * 5 * 3 * 64 * 32 * 2,
        "embedding_rows": 16 * 64 * 2,
        "lm_head": 64 * 384 * 2,
        "final_norm": 64 * 2,
        "kv_cache": 3 * 2 * 64 * 2 * 2 * 16 * 2,
    }
    assert b == want
    assert sum(b.values()) == 361_600


def test_weight_bytes():
    assert rf.weight_bytes(tiny_config(), "bfloat16") == (216_624 - 16) * 2 + 16 * 4  # f32 expert_bias
    assert rf.weight_bytes(llada2_mini_config()) / 1e9 == pytest.approx(32.51, abs=0.01)


def test_tiny_flops_by_hand():
    f = rf.forward_flops(tiny_config(), 2, 8, 64)
    t = 16
    want = {
        "projections": 2 * t * 3 * (64 * 8 * 16 + 4 * 16 * 64),
        "dense_mlp": 2 * t * 3 * 64 * 96,
        "shared_experts": 2 * t * 2 * 3 * 64 * 32,
        "router": 2 * t * 2 * 64 * 8,
        "routed_experts": 2 * t * 2 * 2 * 3 * 64 * 32,  # K = 2 experts per token
        "lm_head": 2 * t * 64 * 384,
        "attention_scores": 3 * 2 * 2 * t * 4 * 16 * (64 + 8),
    }
    assert f == want
    assert sum(f.values()) == 4_653_056


def test_floor_is_the_slower_of_memory_and_compute():
    cfg = llada2_mini_config()
    fl = rf.floor(cfg, 1, 32, 2048, "h200")
    assert fl.bound == "memory"
    assert fl.memory_ms == pytest.approx(1e3 * fl.bytes / 4.8e12)
    assert fl.ms == fl.memory_ms
    two = rf.floor(cfg, 1, 32, 2048, "h200", chips=2)
    assert two.ms == pytest.approx(fl.ms / 2)
    # a compute-bound case: huge batch, tiny bandwidth demand per FLOP
    big = rf.floor(cfg, 512, 32, 0, "v5p")
    assert big.bound == "compute" and big.ms == pytest.approx(1e3 * big.flops / 459e12)


def test_dmax_16b_batch1_floor_matches_the_corrected_estimate():
    fl = rf.floor(llada2_mini_config(), 1, 32, 2048, "h200")
    assert fl.bytes / 1e9 == pytest.approx(20.87, abs=0.01)
    assert fl.ms == pytest.approx(4.35, abs=0.01)
    cross = rf.floor(llada2_mini_config(), 1, 64, 2048, "h200")
    assert cross.ms == pytest.approx(5.82, abs=0.01)
    mean = rf.spd_mean_floor_ms(llada2_mini_config(), 6.2, 32, 2048)
    assert fl.ms < mean < cross.ms


def test_expected_distinct_edge_cases():
    assert rf.expected_distinct_experts(256, 8, 0) == 0
    assert rf.expected_distinct_experts(256, 8, 1) == pytest.approx(8)
    assert rf.expected_distinct_experts(8, 8, 3) == pytest.approx(8)
    assert rf.expected_distinct_experts(256, 8, 32) == pytest.approx(163.31, abs=0.01)
    with pytest.raises(rf.RooflineError, match="K <= E"):
        rf.expected_distinct_experts(4, 8, 1)


def _monte_carlo_distinct(cfg, tokens: int, trials: int, bias: jax.Array, seed: int) -> np.ndarray:
    logits = jax.random.normal(jax.random.key(seed), (trials * tokens, cfg.num_experts), jnp.float32)
    idx = np.asarray(route(logits, bias, cfg)[0]).reshape(trials, tokens * cfg.num_experts_per_tok)
    return np.array([len(np.unique(r)) for r in idx])


@pytest.mark.parametrize("tokens", [32, 64])
def test_distinct_experts_match_monte_carlo_with_group_limited_routing(tokens):
    """The model's own router (8 groups keep 4, top-8 of 256) on i.i.d. scores: the sample mean of
    distinct experts is within 4 standard errors of E·(1 − (1 − K/E)^T)."""
    cfg = llada2_mini_config()
    d = _monte_carlo_distinct(cfg, tokens, 400, jnp.zeros((cfg.num_experts,)), seed=tokens)
    want = rf.expected_distinct_experts(cfg.num_experts, cfg.num_experts_per_tok, tokens)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert abs(d.mean() - want) < 4 * se, (d.mean(), want, se)
    assert se < 0.5  # the test has power: a 2-expert error would be caught


def test_skewed_routing_touches_fewer_experts_than_uniform():
    """A biased router (a few favoured experts) on independent tokens touches fewer experts on
    average: the uniform expectation is an upper estimate (concavity)."""
    cfg = llada2_mini_config()
    bias = jnp.zeros((cfg.num_experts,)).at[:64].set(0.3)
    d = _monte_carlo_distinct(cfg, 32, 200, bias, seed=7)
    uniform = rf.expected_distinct_experts(cfg.num_experts, cfg.num_experts_per_tok, 32)
    assert d.mean() < uniform - 10


def test_measured_routing_on_the_demo_model_counts_every_layer_call():
    script = load_script("bench/roofline.py")
    model, ids = script.load_model(str(DEMO), "What is 3 plus 4?")
    got = script.measure_routing(model, ids, block=32, gen_length=64)
    cfg = model.config
    assert got["layer_calls"] == got["nfe"] * cfg.num_moe_layers  # one router call per MoE layer per forward
    assert got["block_forward_calls"] % cfg.num_moe_layers == 0 and got["block_forward_calls"] > 0
    assert 1 <= got["block_forward"] <= cfg.num_experts


def test_script_json_and_bad_input(capsys):
    script = load_script("bench/roofline.py")
    out = script.main(["--json", "--batch", "1,8"])
    line = json.loads(capsys.readouterr().out)
    assert line["rows"][0]["bytes"] == pytest.approx(out["rows"][0]["bytes"])
    assert [r["batch"] for r in line["rows"]] == [1, 8]
    assert line["rows"][1]["distinct_experts"] == pytest.approx(255.92, abs=0.01)
    with pytest.raises(SystemExit, match="comma-separated"):
        script.main(["--batch", "one"])
    with pytest.raises(SystemExit):
        script.main(["--chip", "a100"])
