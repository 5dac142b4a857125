"""The embedded demo: the shipped models load and decode, dmax + SPD solves held-out problems, and the
paper-style table / plot are built from the evaluation records."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from scripts import load_script
from test_decoding_cli import _cli

from dmax_jax import demo
from dmax_jax.demo.task import chat_row, write_jsonl

# decode batches of 8, not the demo's 50, for a handful of problems: decoded tokens do not depend on
# the batch they share, and the tests below compile one set of programs for it
SMALL = dataclasses.replace(demo.DEMO_DECODE, batch_size=8)


@pytest.fixture(scope="module")
def shipped():
    missing = [n for n in demo.MODEL_NAMES if not (demo.ASSET_DIR / n / "config.json").is_file()]
    if missing:  # reported by -ra; the models are built by tools/build_demo.py (issue 5, in progress)
        pytest.skip(f"shipped demo models {missing} not built yet: run tools/build_demo.py")
    return {name: demo.load_demo_model(name) for name in demo.MODEL_NAMES}


def test_shipped_models_are_small_hf_folders(shipped):
    total = 0
    for name in demo.MODEL_NAMES:
        path = demo.default_model_dir(name)
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == "llada2_moe"
        assert cfg["num_experts"] > 1 and cfg["num_hidden_layers"] > cfg["first_k_dense_replace"]
        total += sum(f.stat().st_size for f in path.iterdir())
        model = shipped[name]
        assert model.config.vocab_size >= len(model.tokenizer)
        assert model.config.resolved_mask_token_id == model.tokenizer.convert_tokens_to_ids("<|mask|>")
    assert total < 30 * 2**20, f"shipped demo models take {total / 2**20:.1f} MiB (budget 30)"
    # base and dmax are different weights of the same architecture (dmax = fine-tune of base)
    a, b = shipped["base"].params["embedding"], shipped["dmax"].params["embedding"]
    assert a.shape == b.shape and not np.allclose(np.asarray(a), np.asarray(b))


def test_unknown_or_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        demo.default_model_dir("llada")
    with pytest.raises(FileNotFoundError, match="model directory"):
        demo.load_demo_model(tmp_path / "nowhere")


def test_dmax_spd_solves_held_out_problems(shipped):
    # The shipped 0.67M-parameter model solves ~77 % of held-out problems (README). A broken model,
    # decoder or extraction solves ~none of them.
    results = demo.decode_examples(shipped["dmax"], n=50, strategy="spd")
    assert len(results) == 50
    assert sum(r["correct"] for r in results) >= 30, demo.format_examples(results)
    for r in results:
        assert "####" in r["response"]
        assert r["nfe"] >= 2 and r["tpf"] == pytest.approx(r["tokens"] / r["nfe"])
    # SPD decodes several tokens per forward on average (the point of the demo)
    assert np.mean([r["tpf"] for r in results]) > 2.0
    text = demo.format_examples(results)
    assert results[0]["question"] in text and "TPF" in text


README_QUESTION = ("Ella is 8 years old. Liam is 4 times as old as Ella. Ava is 8 years younger than Liam. "
                   "How old is Ava?")
README_ANSWER = "So Liam is 8*4=32.\nBeing younger, Ava is 32-8=24.\n#### 24"


def test_readme_serving_example_is_what_the_shipped_model_answers(shipped):
    """The README's serving example asks README_QUESTION and shows README_ANSWER: the served text
    (= generate's with the demo decoding, tests/test_server_cli.py) must be exactly that."""
    from pathlib import Path

    from dmax_jax.data.chat import apply_chat_template
    from dmax_jax.decoding import generate
    from dmax_jax.demo.task import gsm8k_prompt
    from dmax_jax.serving.detok import detokenize

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f'"{README_QUESTION[:-len("How old is Ava?")]}"' in readme
    assert all(f"`{line}`" in readme for line in README_ANSWER.splitlines())
    model = shipped["dmax"]
    ids = apply_chat_template(model.tokenizer, [{"role": "user", "content": gsm8k_prompt(README_QUESTION)}],
                              add_generation_prompt=True)
    res = generate(model, [ids], **demo.DEMO_DECODE.generate_kwargs("spd", demo.DEMO_DECODE.spd_threshold))
    assert detokenize(model.tokenizer, res.token_ids[0]) == README_ANSWER


def test_dmax_spd_at_validated_accept_threshold_keeps_the_speedup(shipped):
    # README headline (results/demo_tau_acc_0.5): dmax + SPD at τ_acc 0.5, τ 0.5 decodes ~3x the
    # tokens per forward of base + threshold (τ 0.95) at about its accuracy. On 50 problems: ≥ 2.5x
    # the TPF (mean of per-problem TPF, as the table) and at most 6 fewer problems right.
    fast = dataclasses.replace(demo.DEMO_DECODE, accept_threshold=0.5)
    spd = demo.decode_examples(shipped["dmax"], n=50, strategy="spd", threshold=0.5, decode=fast)
    base = demo.decode_examples(shipped["base"], n=50, strategy="threshold", threshold=0.95)
    ratio = np.mean([r["tpf"] for r in spd]) / np.mean([r["tpf"] for r in base])
    assert ratio >= 2.5, ratio
    assert sum(r["correct"] for r in spd) >= sum(r["correct"] for r in base) - 6


def test_evaluate_grid_writes_cells_and_results(shipped, tmp_path):
    rows = demo.test_problems(6)
    records = demo.evaluate_grid(shipped, rows, out_dir=tmp_path, strategies=("threshold", "spd"),
                                 thresholds=(0.95,), limit=4, decode=SMALL, log=lambda *_: None)
    assert [(r["model"], r["strategy"]) for r in records] == [
        ("base", "threshold"), ("base", "spd"), ("dmax", "threshold"), ("dmax", "spd")]
    for r in records:
        assert r["samples"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["tpf"] > 0
        cell = tmp_path / "runs" / f"{r['model']}_{r['strategy']}_0.95"
        assert len((cell / "samples.jsonl").read_text().splitlines()) == 4
    paths = demo.write_results(records, tmp_path)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved["cells"] == json.loads(json.dumps(records))


def test_results_markdown_and_headline():
    rec = [
        {"model": "base", "strategy": "threshold", "threshold": 0.95, "accuracy": 0.8, "tpf": 2.0,
         "mean_nfe": 20.0, "samples": 500, "tps": None},
        {"model": "dmax", "strategy": "spd", "threshold": 0.5, "accuracy": 0.79, "tpf": 6.0,
         "mean_nfe": 7.0, "samples": 500, "tps": None},
    ]
    h = demo.headline(rec)
    assert h["tpf_ratio"] == pytest.approx(3.0)
    assert h["accuracy_delta_points"] == pytest.approx(-1.0)
    md = demo.results_markdown(rec)
    assert "| base | threshold | 80.0 / 2.00 | — |" in md
    assert "| dmax | spd | — | 79.0 / 6.00 |" in md
    assert "3.00× tokens per forward" in md
    assert demo.headline(rec[:1]) is None


def test_criterion_picks_fastest_dmax_spd_cell_at_kept_accuracy():
    def cell(model, strategy, tau, acc, tpf):
        return {"model": model, "strategy": strategy, "threshold": tau, "accuracy": acc, "tpf": tpf,
                "mean_nfe": 1.0, "samples": 500, "tps": None}

    rec = [cell("base", "threshold", 0.95, 0.80, 2.0), cell("base", "spd", 0.0, 0.40, 9.0),
           cell("dmax", "spd", 0.5, 0.79, 5.2), cell("dmax", "spd", 0.3, 0.785, 5.6),
           cell("dmax", "spd", 0.0, 0.70, 8.0)]
    c = demo.criterion(rec)
    # τ=0 is faster but 10 points down; τ=0.3 is the fastest within 2 points (78.5 vs 80)
    assert c["best_kept_dmax_spd"]["threshold"] == 0.3
    assert c["tpf_ratio"] == pytest.approx(2.8) and c["met_tpf_target"] is True
    assert c["aggressive_tau"] == 0.0 and c["aggressive_accuracy_gap_points"] == pytest.approx(30.0)
    md = demo.results_markdown(rec)
    assert "τ=0.3, 78.5% at TPF 5.60 = 2.80× base's TPF (meets the ≥ 2.5× target)" in md
    # the claim carries its 95 % interval (Newcombe, 500 problems per cell): -1.5 points [-6.6, +3.4]
    assert "accuracy -1.5 points [-6.6, +3.4]" in md and "no difference this sample can resolve" in md
    slow = [cell("base", "threshold", 0.95, 0.80, 2.0), cell("dmax", "spd", 0.5, 0.79, 3.0)]
    assert demo.criterion(slow)["met_tpf_target"] is False
    assert "(short of the ≥ 2.5× target)" in demo.results_markdown(slow)
    assert demo.criterion([cell("dmax", "spd", 0.5, 0.79, 3.0)]) is None


def test_self_distill_answers_with_the_base_models_own_decoding(shipped):
    rows = [chat_row(p) for p in demo.test_problems(3)]
    out, stats = demo.self_distill(shipped["base"], rows, progress=False)
    expected = demo.decode_examples(shipped["base"], n=3, strategy="threshold")  # τ = 0.95 too
    assert [r["messages"][0] for r in out] == [r["messages"][0] for r in rows]
    assert [r["messages"][1]["content"] for r in out] == [e["response"].strip() for e in expected]
    assert stats["rows"] == 3 and stats["answer_agrees_with_gold"] == sum(e["correct"] for e in expected)
    with pytest.raises(ValueError, match="row 0 is not one user"):
        demo.self_distill(shipped["base"], [{"messages": rows[0]["messages"][:1]}], progress=False)


def test_generate_kwargs_follow_the_demo_geometry():
    kw = demo.DEMO_DECODE.generate_kwargs("spd", 0.3)
    assert kw["strategy"] == "spd" and kw["threshold"] == 0.3 and kw["accept_threshold"] == 0.9
    assert kw["block_length"] == 32 and kw["gen_length"] == 64
    assert "accept_threshold" not in demo.DEMO_DECODE.generate_kwargs("threshold", 0.95)
    with pytest.raises(ValueError, match="not one of"):
        demo.DEMO_DECODE.generate_kwargs("llada2", 0.9)


def test_decode_py_without_arguments_decodes_demo_problems(shipped, capsys):
    assert _cli().main([]) == 0  # decode.py loaded as a module
    out = capsys.readouterr().out
    assert out.count("####") >= 4 and "NFE" in out and "TPF" in out
    for q in demo.example_questions(4):
        assert q in out


def test_quick_demo_fine_tunes_base_and_tabulates(shipped, tmp_path):
    """`python train.py` without arguments, shortened: OPUT steps on the shipped base with the project
    loop, then the base/fine-tune x threshold/spd table from the evaluation records."""
    # train batch 8 (one row per fake device), not the demo's 16: the same code path in less time
    res = demo.run_quick_demo(tmp_path, limit=3, distill_rows=8, decode=SMALL, log=lambda *_: None,
                              overrides=["run.num_steps=2", "run.log_every=1", "data.batch_size=8"])
    assert res["summary"].final_step == 2
    # trained on base's own answers (self-distilled OPUT data), not on the generated gold rows
    distilled = [json.loads(line) for line in (tmp_path / "distill" / "train.jsonl").read_text().splitlines()]
    assert len(distilled) == 8
    trained_on = yaml.safe_load((tmp_path / "train" / "train_config.yaml").read_text())["data"]["paths"]
    assert trained_on == [str(tmp_path / "distill" / "train.jsonl")]
    gold = [json.loads(line) for line in open(tmp_path / "train" / "task_data" / "train.jsonl")][:8]
    assert [r["messages"][0] for r in distilled] == [r["messages"][0] for r in gold]
    spd_tau = demo.DEMO_DECODE.spd_threshold
    assert [(r["model"], r["strategy"], r["threshold"]) for r in res["records"]] == [
        ("base", "threshold", 0.95), ("dmax", "threshold", 0.95),
        ("base", "spd", spd_tau), ("base", "spd", 0.0), ("dmax", "spd", spd_tau), ("dmax", "spd", 0.0)]
    assert all(r["samples"] == 3 for r in res["records"])
    assert res["headline"] is not None and res["paths"]["markdown"].is_file()
    # the fine-tune is an HF folder named apart from the shipped dmax, with the demo's decode settings
    written = {p.name for p in (tmp_path / "dmax_quick").iterdir()}
    assert {"config.json", "tokenizer.json", "dmax_decode.json"} <= written
    # the fine-tune moved away from base (two OPUT updates at lr > 0)
    tuned = np.asarray(res["summary"].state.params["embedding"])
    assert not np.allclose(tuned, np.asarray(shipped["base"].params["embedding"]))


def test_distill_file_writes_base_trajectories(shipped, tmp_path):
    """The OPUT data of build_demo and of the quick demo: base's own threshold-decoded answers."""
    train = write_jsonl(tmp_path / "train.jsonl", [chat_row(p) for p in demo.test_problems(3)])
    out = demo.distill_file(demo.default_model_dir("base"), train, tmp_path / "distill", 2, log=None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = demo.decode_examples(shipped["base"], n=2, strategy="threshold")
    assert [r["messages"][1]["content"] for r in rows] == [e["response"].strip() for e in expected]
    assert json.loads((tmp_path / "distill" / "stats.json").read_text())["rows"] == 2
    with pytest.raises(ValueError, match="has only 3 rows"):
        demo.distill_file("base", train, tmp_path / "d2", 5, log=None)


def test_accept_threshold_validation_split_is_disjoint_from_the_reported_problems():
    sweep = load_script("tools/sweep_accept_threshold.py")
    val = sweep.validation_rows(200)
    reported = {r["question"] for r in demo.test_problems(1000, seed=0)}
    assert len(val) == 200 and len({r["question"] for r in val}) == 200
    assert not reported & {r["question"] for r in val}


def test_eval_demo_takes_one_accept_threshold(capsys, tmp_path):
    eval_demo = load_script("tools/eval_demo.py")
    assert eval_demo.main(["--out", str(tmp_path), "--accept-threshold", "0.5,0.7"]) == 2
    assert "--accept-threshold takes one value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_demo.main(["--out", str(tmp_path), "--accept-threshold", "1.5"])
