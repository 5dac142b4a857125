"""bench/fullsize.py, h200.py, engine.py and moe.py on small inputs: the scripts run, and what
they compute is right."""

from __future__ import annotations

import json

import pytest

from dmax_jax.config import tiny_config
from dmax_jax.perf import roofline as rf
from tests.scripts import load_script


@pytest.fixture(scope="module")
def fullsize():
    return load_script("bench/fullsize.py")


@pytest.mark.parametrize("layers", [3, 5])
def test_depth_corrected_cost_counts_every_scanned_layer(fullsize, layers):
    """XLA counts a scan body once; the corrected FLOPs of the dense-MoE forward equal the hand count
    of its matmuls (every expert on every token) up to the few % of elementwise work, at any depth."""
    cfg = tiny_config(num_hidden_layers=layers)
    got = fullsize.depth_corrected_cost(cfg, 2, 8, 64, "float32", "dense")
    f = rf.forward_flops(cfg, 2, 8, 64)
    every_expert = 2 * 16 * cfg.num_moe_layers * cfg.num_experts * rf.expert_params(cfg)
    hand = sum(f.values()) - f["routed_experts"] + every_expert
    assert 1.0 <= got["flops"] / hand < 1.1
    as_counted = fullsize.block_forward_cost(cfg, 2, 8, 64, "float32", "dense")["flops"]
    assert as_counted / hand < 0.75  # what the correction is for


def test_fullsize_main_on_tiny(fullsize, capsys):
    out = fullsize.main(["--preset", "tiny", "--batch", "1", "--train-moe-impls", "dense",
                         "--decode-variants", "float32:default"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["train_bytes_per_device"]["dense"] == out["train"][0]["peak_bytes"]
    train = out["train"][0]
    assert train["mesh"] == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    assert train["global_batch"] == 8 and train["tokens_per_row"] == 4096
    assert train["argument_bytes"] >= train["state_bytes_even_split"] * 0.99
    assert train["fits_h200_with_headroom"]
    row = out["decode"][0]
    assert set(line["decode_bytes_per_forward"]) == {"1"} and set(line["roofline_bytes_per_forward"]) == {"1"}
    floor = rf.floor(tiny_config(), 1, 32, 2048, weight_dtype="float32")
    assert row["roofline_bytes"] == pytest.approx(floor.bytes)
    assert row["xla_bytes"] > row["roofline_bytes"]  # XLA:CPU reads at least what the floor says


def test_fullsize_bad_input(fullsize):
    with pytest.raises(SystemExit, match="--mesh"):
        fullsize.main(["--preset", "tiny", "--skip-decode", "--mesh", "fsdp=two"])
    with pytest.raises(SystemExit, match="DTYPE:IMPL"):
        fullsize.main(["--preset", "tiny", "--skip-train", "--decode-variants", "int4:dense"])


def test_h200_refuses_to_run_without_a_gpu(tmp_path):
    h200 = load_script("bench/h200.py")
    with pytest.raises(SystemExit, match="no GPU"):
        h200.main(["--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no GPU"):
        h200.main(["--out", str(tmp_path / "x.json"), "--allow-cpu"])  # full size on CPU: no
    with pytest.raises(SystemExit, match="unknown moe_impl"):
        h200.main(["--out", str(tmp_path / "x.json"), "--allow-cpu", "--tiny", "--backends", "cublas"])


def test_h200_smoke_on_cpu(tmp_path):
    h200 = load_script("bench/h200.py")
    path = tmp_path / "h200.json"
    h200.main(["--out", str(path), "--allow-cpu", "--tiny", "--backends", "ragged,dense,megablox",
               "--batch", "1,2", "--repeats", "1", "--cache", "64", "--gen-length", "64",
               "--prompt-length", "32"])
    got = json.loads(path.read_text())
    assert got["platform"] == "cpu" and got["config"] == "tiny" and got["complete"]
    want = {(b, n) for b in ("ragged", "dense") for n in (1, 2)}
    assert {(r["backend"], r["batch"]) for r in got["decode"]} == want
    assert "TPU kernel" in got["unavailable_backends"]["megablox"]  # recorded, not replaced
    for r in got["decode"]:
        assert r["ms"] > 0 and r["floor_ms"] == pytest.approx(rf.floor(tiny_config(), r["batch"], 32, 64).ms)
    spd = got["spd"]
    assert spd["nfe"] == 1 + 2 * 32  # prefill + one token per forward (threshold 1.0) in 2 blocks
    assert spd["ms_per_forward"] == pytest.approx(1e3 * spd["seconds"] / spd["nfe"])


def test_engine_bench_settings_side_by_side(capsys):
    """bench/engine.py: compacted and full-width forwards give the same tokens (exit status 0) and the
    table has one row per setting; bad --settings are refused by argparse."""
    eng = load_script("bench/engine.py")
    with pytest.raises(SystemExit):
        eng.parse_args(["--settings", "c4,x2"])
    with pytest.raises(SystemExit):
        eng.parse_args(["--settings", "c0"])
    assert eng.main(["--requests", "3", "--max-batch", "2", "--reps", "1", "--max-tokens", "32",
                     "--settings", "c4,f4"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| compacted")
            or line.startswith("| full width")]
    assert len(rows) == 2 and all(line.rstrip().endswith("| True |") for line in rows)


def test_moe_bench_backends_side_by_side(capsys):
    """bench/moe.py times each backend on a layer and the demo forward and checks it against dense;
    a backend that is not a moe_impl is a usage error."""
    moe = load_script("bench/moe.py")
    assert moe.main(["--backends", "ragged,tiled", "--layers", "demo b1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for what in ("MoE layer, demo b1", "demo block forward, batch 1", "demo block forward, batch 16"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {what} |"))
        assert row.count(" ms") == 2 and "x faster" in row
    with pytest.raises(SystemExit):
        moe.main(["--backends", "ragged,grouped"])
