"""GSM8K-style multi-step arithmetic word problems for the embedded CPU demo.

Why: the demo trains a ~1-3M-parameter LLaDA2-MoE from scratch in CPU minutes, then shows OPUT + SPD
decoding it faster than threshold decoding at equal accuracy. Real GSM8K is far beyond such a model,
so this module generates problems with the same *shape* (short story, 2-3 arithmetic steps, one line
per step, ``#### N`` final line, algorithm §5.4 prompt) over a small vocabulary and small integers.

Guarantees (tested in ``tests/test_tasks.py``):
- deterministic: the same ``(n, seed, split)`` gives the same problems on every machine (seeded
  ``random.Random`` streams derived with SHA-256, never Python's salted ``hash``);
- the solution is a function of the question (every number it uses is stated in the question);
- train and test are disjoint by construction: the split is decided by a hash of the problem's
  *numeric skeleton* (template + numbers, names and items left out), so no test problem appears in
  train, not even with other names or items;
- every intermediate and final result is an exact positive integer (divisions divide evenly).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmax_jax.demo.templates import REORDERABLE, SCALES, TEMPLATES, Line, Scale

GSM8K_PROMPT = "Question: {question}\nLet's think step by step\nAnswer:"
SPLITS = ("train", "test")
PHRASINGS = ("fixed", "varied")
TEST_PER_MILLE = 100  # 10 % of numeric skeletons are reserved for the test split
_MAX_CONSECUTIVE_REJECTS = 20_000


@dataclass(frozen=True)
class Problem:
    """One generated problem: the template's parameters and the rendered GSM8K-format text.

    ``numbers`` are the integers (and 0/1 switches) the arithmetic depends on; ``words`` are the
    names and items, which change the text but never the answer.
    """

    template: str
    numbers: dict[str, int]
    words: dict[str, str]
    question: str
    answer: str

    @property
    def skeleton(self) -> str:
        """Canonical numeric content; its hash decides the split."""
        return self.template + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.numbers.items()))

    @property
    def final(self) -> int:
        """The number after ``####``."""
        return final_answer(self.answer)

    def to_gsm8k(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}




def final_answer(answer: str) -> int:
    """The integer after the last ``####`` of a GSM8K answer; raises if absent."""
    match = re.search(r"####\s*(-?\d+)\s*$", answer)
    if match is None:
        raise ValueError(f"answer has no final '#### N' line: {answer!r}")
    return int(match.group(1))


def split_of(problem: Problem) -> str:
    """'test' for ~TEST_PER_MILLE/1000 of numeric skeletons, else 'train' (stable across runs)."""
    digest = hashlib.sha256(problem.skeleton.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 1000 < TEST_PER_MILLE else "train"


def sample_problem(rng: random.Random, template: str, phrasing: str = "fixed", scale: str = "gsm") -> Problem:
    """Draw one problem of ``template`` (a key of ``TEMPLATES``) from ``rng``; ``phrasing`` is one of
    ``PHRASINGS`` ("fixed": one wording per step; "varied": see ``phrase_solution``), ``scale`` a key of
    ``SCALES``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    _check_phrasing(phrasing)
    numbers, words, question, alternatives = TEMPLATES[template](rng, _scale(scale))
    lines = phrase_solution(question, alternatives, phrasing=phrasing, reorderable=template in REORDERABLE)
    answer = "\n".join([*lines, f"#### {_last_result(lines[-1])}"])
    return Problem(template, numbers, words, question, answer)


def _scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def _check_phrasing(phrasing: str) -> None:
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")


def phrase_solution(question: str, alternatives: Sequence[Line | str], *, phrasing: str = "varied",
                    reorderable: bool = False) -> list[str]:
    """The solution lines: each step's first wording for ``phrasing="fixed"``; for ``"varied"`` one
    wording per step and, for ``reorderable`` templates, the order of the two first steps, drawn from a
    stream seeded by the question's SHA-256. A plain string is its step's only wording.

    Why: several equally likely wordings per step give the model genuinely multi-modal positions (as
    natural text does), which makes confidence-threshold decoding slow and naive parallel decoding
    incoherent -- the gap OPUT + SPD closes (README "Embedded demo" reports the experiment). Seeding
    by the question keeps the problem set, the split and the final answers independent of it.
    """
    _check_phrasing(phrasing)
    steps = [(alts,) if isinstance(alts, str) else alts for alts in alternatives]
    if phrasing == "fixed":
        return [alts[0] for alts in steps]
    rng = random.Random(int.from_bytes(hashlib.sha256(("phrasing:" + question).encode()).digest()[:8], "big"))
    lines = [rng.choice(alts) for alts in steps]
    if reorderable and rng.random() < 0.5:
        lines[0], lines[1] = lines[1], lines[0]
        lines[-1] = re.sub(r"(\d+)\+(\d+)=", r"\2+\1=", lines[-1])
    return lines


def _last_result(line: str) -> int:
    return int(re.findall(r"=(\d+)", line)[-1])


def _rng_for(seed: int, split: str, scale: str) -> random.Random:
    # The salt keeps the module's old name (dmax_jax.tasks.arith): it fixes every generated problem,
    # so changing it would silently change the models' train and held-out splits ("gsm" keeps the
    # salt it had before scales existed).
    tag = "" if scale == "gsm" else f"{scale}:"
    digest = hashlib.sha256(f"dmax_jax.tasks.arith:{tag}{seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def generate_records(n: int, seed: int = 0, split: str = "train", phrasing: str = "fixed",
                     scale: str = "gsm") -> list[Problem]:
    """``n`` distinct problems of ``split``; templates cycle round-robin so each gets n/len shares.

    Draws are rejected when their skeleton belongs to the other split or their question repeats.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_phrasing(phrasing)
    _scale(scale)
    rng, names = _rng_for(seed, split, scale), list(TEMPLATES)
    seen: set[str] = set()
    out: list[Problem] = []
    rejected = 0
    while len(out) < n:
        template = names[len(out) % len(names)]
        problem = sample_problem(rng, template, phrasing, scale)
        if problem.question in seen or split_of(problem) != split:
            rejected += 1
            if rejected > _MAX_CONSECUTIVE_REJECTS:
                raise RuntimeError(f"template {template!r} ran out of distinct {split!r} problems after "
                                   f"{len(out)} of {n}; ask for fewer")
            continue
        rejected = 0
        seen.add(problem.question)
        out.append(problem)
    return out


def generate_problems(n: int, seed: int = 0, split: str = "train", phrasing: str = "fixed",
                      scale: str = "gsm") -> list[dict[str, str]]:
    """``n`` distinct GSM8K-format rows ``{"question", "answer"}`` of ``split`` ("train" | "test")."""
    return [p.to_gsm8k() for p in generate_records(n, seed, split, phrasing, scale)]


def gsm8k_prompt(question: str) -> str:
    """The zero-shot GSM8K prompt of algorithm §5.4 (sent as the user turn of the chat template)."""
    return GSM8K_PROMPT.format(question=question)


def chat_row(problem: Mapping[str, str]) -> dict[str, list[dict[str, str]]]:
    """A GSM8K row as the training chat row: user turn = ``gsm8k_prompt(question)``, assistant = answer."""
    return {"messages": [{"role": "user", "content": gsm8k_prompt(problem["question"])},
                         {"role": "assistant", "content": problem["answer"]}]}


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """One JSON object per line, UTF-8, '\\n' line ends (the bytes depend only on the rows), written to a
    temporary file first so an interrupted write never leaves a truncated data file behind."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out
