"""Tests for the demo task: arithmetic problem generator, task tokenizer and the data-writing tool."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from dmax_jax.demo import DEMO_DECODE, templates
from dmax_jax.demo import task as arith
from dmax_jax.demo.task import (
    TEMPLATES,
    final_answer,
    generate_problems,
    generate_records,
    gsm8k_prompt,
    sample_problem,
    split_of,
)
from dmax_jax.demo.tokenizer import (
    build_task_tokenizer,
    demo_vocab_size,
    prompt_ids,
    sequence_lengths,
)

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 3000, 500


@pytest.fixture(scope="module", params=sorted(arith.SCALES))
def scale(request: pytest.FixtureRequest) -> str:
    """Every guarantee holds at each number scale ("gsm" and the shipped demo's "small")."""
    return request.param


@pytest.fixture(scope="module")
def train(scale: str) -> list[arith.Problem]:
    return generate_records(N_TRAIN, seed=0, split="train", scale=scale)


@pytest.fixture(scope="module")
def varied(scale: str) -> list[arith.Problem]:
    return generate_records(N_TRAIN, seed=0, split="train", phrasing="varied", scale=scale)


@pytest.fixture(scope="module")
def test_split(scale: str) -> list[arith.Problem]:
    return generate_records(N_TEST, seed=0, split="test", scale=scale)


def _truth(template: str, v: dict[str, int]) -> Fraction:
    """The final answer recomputed from the template parameters, independently of the generator."""
    f = {k: Fraction(x) for k, x in v.items()}
    if template == "shopping":
        return f["a"] * f["p"] + f["b"] * f["q"]
    if template == "change":
        return f["bill"] - f["a"] * f["p"] - f["q"]
    if template == "sharing":
        return (f["a"] * f["b"] - f["keep"]) / f["c"]
    if template == "ages":
        return f["a"] * f["k"] + (f["d"] if v["older"] else -f["d"])
    if template == "speed":
        speed = f["dist"] / f["h"]
        return (speed * f["h2"]) / speed if v["ask_hours"] else speed * f["h2"]
    if template == "trip":
        return f["s1"] * f["h1"] + f["s2"] * f["h2"]
    if template == "savings":
        return f["start"] + f["a"] * f["w"] - f["cost"]
    if template == "packing":
        return f["n"] / f["k"] * f["p"] - f["flour"]
    raise AssertionError(f"no reference formula for template {template!r}")


def test_generation_is_deterministic_and_prefix_stable() -> None:
    a = generate_problems(120, seed=7, split="train")
    assert a == generate_problems(120, seed=7, split="train")
    assert a[:40] == generate_problems(40, seed=7, split="train")  # the tool relies on this
    assert a != generate_problems(120, seed=8, split="train")
    assert all(set(row) == {"question", "answer"} for row in a)


def test_splits_are_disjoint(train: list[arith.Problem], test_split: list[arith.Problem], scale: str) -> None:
    assert len({p.question for p in test_split}) == N_TEST  # distinct held-out problems
    assert len({p.question for p in train}) == N_TRAIN
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test_split)
    other_seed_train = generate_records(N_TRAIN, seed=1, split="train", scale=scale)
    test_skeletons = {p.skeleton for p in test_split}
    for rows in (train, other_seed_train):
        # Not even the same numbers under other names or items may reach train.
        assert not test_skeletons & {p.skeleton for p in rows}
        assert not {p.question for p in test_split} & {p.question for p in rows}
    # The hash split keeps roughly TEST_PER_MILLE / 1000 of the skeletons for test.
    draws = {p.skeleton: p for p in (sample_problem(random.Random(i), t, scale=scale)
                                     for i in range(2000) for t in TEMPLATES)}
    frac = sum(split_of(p) == "test" for p in draws.values()) / len(draws)
    assert 0.06 < frac < 0.14


def test_answers_equal_independent_truth(train: list[arith.Problem], test_split: list[arith.Problem]) -> None:
    for p in [*train, *test_split]:
        truth = _truth(p.template, p.numbers)
        assert truth.denominator == 1 and truth > 0, (p.template, p.numbers)
        assert p.final == truth, (p.question, p.answer)
        # Every number the arithmetic uses is stated in the question (the solution is a function of it).
        stated = set(map(int, re.findall(r"\d+", p.question)))
        hidden = {"speed": {"h2"} if p.numbers.get("ask_hours") else set()}.get(p.template, set())
        flags = {"older", "ask_hours"}
        assert {v for k, v in p.numbers.items() if k not in flags | hidden} <= stated, p.question


def test_solution_lines_are_true_steps(train: list[arith.Problem], varied: list[arith.Problem]) -> None:
    ops: Counter[str] = Counter()
    for p in [*train, *varied]:
        *steps, last = p.answer.split("\n")
        assert last == f"#### {p.final}"
        assert 2 <= len(steps) <= 3, p.answer
        results = []
        for line in steps:
            eqs = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)", line)
            assert len(eqs) == 1, line
            x, op, y, z = eqs[0]
            value = {"+": Fraction(int(x)) + int(y), "-": Fraction(int(x)) - int(y),
                     "*": Fraction(int(x)) * int(y), "/": Fraction(int(x), int(y))}[op]
            assert value == int(z), line  # exact: divisions divide evenly, nothing negative
            ops[op] += 1
            results.append(int(z))
        assert results[-1] == p.final
        if p.template == "shopping":  # the two purchases in either order; the sum follows the written order
            assert re.findall(r"(\d+)\+(\d+)=", steps[-1]) == [(str(results[0]), str(results[1]))], p.answer
    assert set(ops) == {"+", "-", "*", "/"}


def test_varied_phrasing_changes_wording_never_the_problem(train: list[arith.Problem],
                                                           varied: list[arith.Problem], scale: str) -> None:
    # Several wordings of every step are in use, per template (the multi-modality the demo relies on).
    def shape(p: arith.Problem, line: str) -> str:
        for word in sorted(p.words.values(), key=len, reverse=True):
            line = line.replace(word, "W")
        return re.sub(r"\b([Hh]e|[Ss]he)\b", "P", re.sub(r"\d+", "N", line))

    def step_shapes(problems: list[arith.Problem], template: str) -> list[Counter[str]]:
        """Per solution step of ``template``: how often each wording shape occurs."""
        rows = [p for p in problems if p.template == template]
        steps = [p.answer.split("\n")[:-1] for p in rows]
        return [Counter(shape(p, lines[i]) for p, lines in zip(rows, steps)) for i in range(len(steps[0]))]

    for template in TEMPLATES:
        for step, shapes in enumerate(step_shapes(varied, template)):
            assert len(shapes) >= 3, (template, step, shapes)
            assert max(shapes.values()) < 0.6 * sum(shapes.values()), (template, step, shapes)
    shopping = [p for p in varied if p.template == "shopping"]
    swapped = sum(p.words["item2"] in p.answer.split("\n")[0] for p in shopping)
    assert 0.3 < swapped / len(shopping) < 0.7  # the order of the independent purchases varies too
    # The phrasing is a function of the question alone ...
    again = {p.question: p.answer
             for p in generate_records(300, seed=0, split="train", phrasing="varied", scale=scale)}
    assert all(again[p.question] == p.answer for p in varied[:300])
    # ... and never moves the questions, the split or the final answers; "fixed" is each step's first
    # wording (the text the shipped demo models were trained on), in the template's order.
    assert [p.question for p in varied] == [p.question for p in train]
    assert [p.final for p in varied] == [p.final for p in train]
    assert sum(a.answer != b.answer for a, b in zip(varied, train)) > N_TRAIN // 2
    for template in TEMPLATES:  # "fixed": one wording per step (two where the operator or question differs)
        assert all(len(shapes) <= 2 for shapes in step_shapes(train, template)), template
    with pytest.raises(ValueError, match="phrasing"):
        generate_problems(2, phrasing="poetic")


def test_templates_are_all_covered(test_split: list[arith.Problem]) -> None:
    counts = Counter(p.template for p in test_split)
    assert len(TEMPLATES) >= 5 and set(counts) == set(TEMPLATES)
    assert min(counts.values()) >= N_TEST // len(TEMPLATES)  # round-robin keeps them balanced


def test_question_length_bounds(train: list[arith.Problem]) -> None:
    words = [len(p.question.split()) for p in train]
    assert 15 <= min(words) and max(words) <= 35


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_problems(3, split="validation")
    with pytest.raises(ValueError, match="n must be"):
        generate_problems(-1)
    with pytest.raises(ValueError, match="unknown template"):
        sample_problem(random.Random(0), "geometry")
    with pytest.raises(ValueError, match="scale must be one of"):
        generate_problems(3, scale="huge")
    with pytest.raises(ValueError, match="####"):
        final_answer("The answer is 4.")
    assert final_answer("2+2=4.\n#### 4") == 4


def test_exhausted_template_space_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def constant(rng: random.Random, scale: templates.Scale) -> templates.Rendered:
        return {"a": 2}, {}, "What is 2 times 2?", ["2*2=4."]

    monkeypatch.setattr(arith, "TEMPLATES", {"constant": constant})
    monkeypatch.setattr(arith, "_MAX_CONSECUTIVE_REJECTS", 50)
    split = split_of(sample_problem(random.Random(0), "constant"))
    assert generate_problems(1, split=split)[0]["answer"] == "2*2=4.\n#### 4"
    with pytest.raises(RuntimeError, match="ran out of distinct"):
        generate_problems(2, split=split)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, scale: str):
    from transformers import AutoTokenizer

    out = build_task_tokenizer(tmp_path_factory.mktemp("tok"), n_problems=1500, seed=0, scale=scale)
    return AutoTokenizer.from_pretrained(out)


def test_tokenizer_loads_with_demo_special_ids(tokenizer, scale: str) -> None:
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (1, 1, 2)
    assert 500 < len(tokenizer) <= demo_vocab_size(scale)
    ids = prompt_ids(tokenizer, "Tom has 3 apples.")
    expected = f"<role>HUMAN</role>{gsm8k_prompt('Tom has 3 apples.')}<|role_end|><role>ASSISTANT</role>"
    assert tokenizer.decode(ids) == expected
    for word in ("HUMAN", "ASSISTANT", "Question", " think", " dollars"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    if arith.SCALES[scale].whole_numbers:  # every number the task draws is one token, in any context
        numbers = _numbers(generate_problems(1500, seed=0, split="train", scale=scale))  # its corpus
        assert len(numbers) >= 40
        for n in numbers:
            for text in (n, f"=${n}.", f" {n}+"):
                pieces = tokenizer.tokenize(text)
                assert sum(any(c.isdigit() for c in piece) for piece in pieces) == 1, (text, pieces)
                assert n in [tokenizer.convert_tokens_to_string([piece]) for piece in pieces], (text, pieces)
    else:
        assert len(tokenizer("1234", add_special_tokens=False)["input_ids"]) == 4  # one token per digit


def _numbers(problems: list[dict[str, str]]) -> set[str]:
    return {n for p in problems for n in re.findall(r"\d+", p["question"] + p["answer"])}


def test_held_out_numbers_are_all_whole_tokens_of_the_demo_tokenizer() -> None:
    """A whole-number tokenizer has 0..99 whole; every number the task draws is in that range."""
    from dmax_jax.demo.tokenizer import WHOLE_NUMBERS

    for scale in (s for s in sorted(arith.SCALES) if arith.SCALES[s].whole_numbers):
        for split in ("train", "test"):
            drawn = {int(n) for n in _numbers(generate_problems(3000, split=split, phrasing="varied",
                                                                scale=scale))}
            assert drawn <= set(WHOLE_NUMBERS), (scale, split, sorted(drawn - set(WHOLE_NUMBERS)))


def test_whole_number_tokenizer_refuses_a_vocab_too_small_for_its_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small to keep every number whole"):
        build_task_tokenizer(tmp_path / "tok", n_problems=300, scale="small", vocab_size=420)


def test_tokenizer_round_trips_held_out_text(tokenizer, test_split: list[arith.Problem]) -> None:
    for p in test_split[:200]:
        for text in (gsm8k_prompt(p.question), p.answer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_sequence_lengths_fit_demo_budget(tokenizer, test_split: list[arith.Problem], scale: str) -> None:
    rows = [p.to_gsm8k() for p in test_split]
    lengths = sequence_lengths(tokenizer, rows)
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": gsm8k_prompt(rows[0]["question"])},
         {"role": "assistant", "content": rows[0]["answer"]}], tokenize=True)
    first_ids = first["input_ids"] if hasattr(first, "keys") else first
    assert lengths["total"][0] == len(first_ids) + 1  # batch path == per-conversation template + EOS
    assert lengths["total"].max() <= 128  # configs/demo_*.yaml data.max_length
    # Answer + EOS fit the demo's generation budget (decode and eval), so no answer is cut short.
    assert lengths["answer"].max() + 1 <= DEMO_DECODE.gen_length
    if scale == "gsm":
        assert lengths["answer"].max() <= 50 and lengths["answer"].mean() <= 42
    assert lengths["prompt"].max() <= 64 and lengths["answer"].min() >= 10
    with pytest.raises(ValueError, match="at least one"):
        sequence_lengths(tokenizer, [])


def _run_tool(out: Path, hash_seed: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "tools" / "make_task_data.py"), "--out", str(out), "--n-train", "1200",
           "--n-test", "500", "--seed", "3", "--tokenizer-problems", "1200", "--stats-sample", "50"]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=300)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_make_task_data_is_byte_deterministic(tmp_path: Path) -> None:
    runs = [_run_tool(tmp_path / f"run{i}", seed) for i, seed in enumerate(("1", "2"))]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "prompt:" in runs[0].stdout and "answer:" in runs[0].stdout and "total:" in runs[0].stdout
    first, second = (_tree_bytes(tmp_path / f"run{i}") for i in range(2))
    assert set(first) == {"train.jsonl", "test.jsonl", "tokenizer/tokenizer.json",
                          "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja"}
    assert first == second
    test_rows = [json.loads(line) for line in first["test.jsonl"].decode().splitlines()]
    train_rows = [json.loads(line) for line in first["train.jsonl"].decode().splitlines()]
    # the tool's default task is the shipped demo's (arith_small: varied wording, small numbers)
    assert test_rows == generate_problems(500, seed=3, split="test", phrasing="varied", scale="small")
    assert train_rows == generate_problems(1200, seed=3, split="train", phrasing="varied", scale="small")
    small = subprocess.run([sys.executable, str(REPO / "tools" / "make_task_data.py"), "--out",
                            str(tmp_path / "small"), "--n-test", "10"], capture_output=True, text=True)
    assert small.returncode != 0 and "--n-test must be >= 500" in small.stderr


def test_small_scale_keeps_numbers_small_and_gsm_unchanged() -> None:
    """"small" (the shipped demo's task) bounds every number; "gsm" draws exactly what it drew before
    scales existed (its first held-out problem is pinned), so old models keep their splits."""
    small = generate_records(2000, seed=0, split="test", scale="small")
    for p in small:
        numbers = [int(n) for n in re.findall(r"\d+", p.answer)]
        assert max(numbers) <= 60, p.answer
    assert {p.template for p in small} == set(TEMPLATES)
    first = generate_problems(1, seed=0, split="test")[0]
    assert first["question"] == ("Zoe buys 3 toys for $3 each and 2 hats for $8 each. "
                                 "How many dollars does she spend?")
    assert generate_problems(5, split="test", scale="small") != generate_problems(5, split="test")
