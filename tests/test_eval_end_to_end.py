"""GSM8K pipeline end to end on CPU with a real (tiny, random) model: HF directory → load_pretrained →
chat template → generate (SPD and threshold) → extraction → per-sample jsonl + summary, then resume."""

import json
from pathlib import Path

import jax
import pytest

from dmax_jax.config import tiny_config
from dmax_jax.data.tokenizer_build import build_tokenizer
from dmax_jax.eval.__main__ import main as eval_main
from dmax_jax.model.llada2 import init_params
from dmax_jax.pretrained import Pretrained

GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k" / "test.jsonl"  # 6 rows, MIT (see README there)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("e2e")
    tok = AutoTokenizer.from_pretrained(build_tokenizer(root / "tok"))
    cfg = tiny_config(max_position_embeddings=512)
    Pretrained(cfg, init_params(cfg, jax.random.key(0)), tok).save_pretrained(root / "model")
    return root / "model"


@pytest.mark.parametrize("strategy", ["spd", "threshold"])
def test_gsm8k_eval_runs_and_resumes(model_dir, tmp_path, strategy):
    out = tmp_path / strategy
    args = ["--model", str(model_dir), "--benchmark", "gsm8k", "--data", str(GSM8K), "--out", str(out),
            "--limit", "2", "--strategy", strategy, "--gen-length", "32", "--block-length", "16",
            "--dtype", "float32"]
    assert eval_main(args) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert "Janet" in r["prompt"] or "robe" in r["prompt"]  # the first two GSM8K test questions
        assert r["gold"] in ("18", "3") and r["nfe"] >= 2 and r["correct"] in (True, False)
        assert r["tpf"] == pytest.approx(r["tokens_ref"] / r["nfe"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["benchmark"] == "gsm8k"
    assert summary["tpf"] == pytest.approx(sum(r["tpf"] for r in rows) / 2)
    # a second run finds every sample done and does not decode again
    assert eval_main(args) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
