"""GSM8K-style multi-step arithmetic word problems for the embedded CPU demo.

Why: the demo trains a ~1-3M-parameter LLaDA2-MoE from scratch in CPU minutes, then shows OPUT + SPD
decoding it faster than threshold decoding at equal accuracy. Real GSM8K is far beyond such a model,
so this module generates problems with the same *shape* (short story, 2-3 arithmetic steps, one line
per step, ``#### N`` final line, spec §5.4 prompt) over a small vocabulary and small integers.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GSM8K_PROMPT = "Question: {question}\nLet's think step by step\nAnswer:"
SPLITS = ("train", "test")
PHRASINGS = ("fixed", "varied")
TEST_PER_MILLE = 100  # 10 % of numeric skeletons are reserved for the test split
_MAX_CONSECUTIVE_REJECTS = 20_000

_NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Lily", "she"),
          ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ava", "she"),
          ("Noah", "he"), ("Ella", "she"), ("Liam", "he"), ("Rosa", "she"))
_SHOP_ITEMS = ("pens", "books", "apples", "cups", "hats", "toys", "balls", "cakes", "shirts", "plates",
               "pencils", "candles")
_SHARE_ITEMS = ("cookies", "marbles", "stickers", "candies", "crayons", "cards", "shells", "beads")
_BAKED = ("muffins", "rolls", "cookies", "buns", "bagels", "donuts")
_VEHICLES = ("car", "bus", "train", "truck", "boat", "bike")
_MODES = ("rides a bike", "runs", "walks", "skates", "rows a boat")
_THINGS = ("game", "book", "bag", "lamp", "watch", "kite", "ball", "jacket")


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


@dataclass(frozen=True)
class Scale:
    """How large a template's numbers are: the ranges it draws its parameters from.

    Why: on "gsm" numbers (factors up to 9, sums up to ~160) a 0.67 M-parameter model trained for an hour
    on 2 CPU cores gets ~14 % of the problems right -- every number is one BPE token, so each sum is a
    separate fact to memorise. "small" keeps the templates, wordings and step dependencies (what makes
    parallel decoding hard) with operands small enough for such a model to be mostly right.
    """

    factor: int              # largest multiplication factor / divisor
    count: int               # largest box size, bag count, speed
    addend: int              # largest plain price added
    age: int                 # largest starting age
    gap: int                 # largest age difference
    start: int               # largest starting savings / flour cost
    bills: tuple[int, ...]   # the bills paid with (the largest always leaves change)


SCALES = {"gsm": Scale(factor=9, count=12, addend=18, age=15, gap=20, start=30, bills=(20, 50, 100)),
          "small": Scale(factor=5, count=6, addend=9, age=9, gap=9, start=12, bills=(20, 30, 50))}


# A template draws its parameters from ``rng`` and returns (numbers, words, question, solution lines).
# Each solution line is a tuple of interchangeable phrasings (one equation each, same result), the
# first being the "fixed" wording; with ``phrasing="varied"`` ``phrase_solution`` picks one per problem
# from the question's hash, never from ``rng``, so the questions (and the split) never depend on it.
_Line = tuple[str, ...]
_Rendered = tuple[dict[str, int], dict[str, str], str, list[_Line]]


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_NAMES)


def _shopping(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    i1, i2 = rng.sample(_SHOP_ITEMS, 2)
    a, b, p, q = (rng.randint(2, r.factor) for _ in range(4))
    x, y = a * p, b * q
    he = pron.capitalize()
    question = (f"{name} buys {a} {i1} for ${p} each and {b} {i2} for ${q} each. "
                f"How many dollars does {pron} spend?")

    def cost(n: int, item: str, price: int, total: int) -> _Line:
        return (f"The {item} cost {n}*{price}={total}.",
                f"{n} {item} at ${price} each is {n}*{price}={total}.",
                f"For the {item} {pron} pays {n}*{price}={total}.",
                f"{n}*{price}={total} dollars go to the {item}.")

    lines = [cost(a, i1, p, x), cost(b, i2, q, y),
             (f"In total {x}+{y}={x + y}.", f"Together that is {x}+{y}={x + y} dollars.",
              f"{he} spends {x}+{y}={x + y}.", f"So {x}+{y}={x + y}.")]
    return {"a": a, "p": p, "b": b, "q": q}, {"name": name, "item1": i1, "item2": i2}, question, lines


def _change(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    item = rng.choice(_SHOP_ITEMS)
    thing = rng.choice(_THINGS)
    a, p, q = rng.randint(2, r.factor), rng.randint(2, r.factor), rng.randint(2, r.addend)
    x = a * p
    y = x + q  # < r.bills[-1], so the largest bill always leaves change
    bill = rng.choice([v for v in r.bills if v > y])
    he = pron.capitalize()
    question = (f"{name} buys {a} {item} for ${p} each and a {thing} for ${q}. "
                f"{he} pays with ${bill}. How many dollars of change does {pron} get?")
    res = bill - y
    lines = [(f"The {item} cost {a}*{p}={x}.", f"{a} {item} at ${p} each is {a}*{p}={x}.",
              f"For the {item} {pron} pays {a}*{p}={x}."),
             (f"With the {thing} {x}+{q}={y}.", f"Adding the {thing} gives {x}+{q}={y}.",
              f"{he} spends {x}+{q}={y} in all."),
             (f"The change is {bill}-{y}={res}.", f"{he} gets back {bill}-{y}={res}.",
              f"From ${bill} that leaves {bill}-{y}={res} dollars.")]
    words = {"name": name, "item": item, "thing": thing}
    return {"a": a, "p": p, "q": q, "bill": bill}, words, question, lines


def _sharing(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    item = rng.choice(_SHARE_ITEMS)
    a, b = rng.randint(2, r.factor), rng.randint(2, r.count)
    t = a * b
    while True:  # c = 2 always has a valid `keep` (t >= 4), so this ends
        c = rng.randint(2, r.factor)
        keeps = [k for k in range(1, min(r.count, t - c) + 1) if (t - k) % c == 0]
        if keeps:
            break
    keep = rng.choice(keeps)
    he = pron.capitalize()
    question = (f"{name} has {a} boxes of {item} with {b} in each box. {he} keeps {keep} and shares the "
                f"rest equally among {c} friends. How many {item} does each friend get?")
    u, each = t - keep, (t - keep) // c
    lines = [(f"There are {a}*{b}={t} {item}.", f"{he} has {a}*{b}={t} {item} in all.",
              f"{a} boxes of {b} make {a}*{b}={t}."),
             (f"{he} shares {t}-{keep}={u}.", f"After keeping {keep} there are {t}-{keep}={u} left.",
              f"{t}-{keep}={u} {item} are shared."),
             (f"Each friend gets {u}/{c}={each}.", f"Split among {c} friends that is {u}/{c}={each} each.",
              f"So each gets {u}/{c}={each} {item}.")]
    return {"a": a, "b": b, "keep": keep, "c": c}, {"name": name, "item": item}, question, lines


def _ages(rng: random.Random, r: Scale) -> _Rendered:
    n1, n2, n3 = (n for n, _ in rng.sample(_NAMES, 3))
    a, k = rng.randint(2, r.age), rng.randint(2, 5)
    x = a * k
    older = rng.randint(0, 1)
    d = rng.randint(1, r.gap) if older else rng.randint(1, min(r.gap, x - 1))
    relation, op, result = ("older", "+", x + d) if older else ("younger", "-", x - d)
    question = (f"{n1} is {a} years old. {n2} is {k} times as old as {n1}. "
                f"{n3} is {d} years {relation} than {n2}. How old is {n3}?")
    lines = [(f"{n2} is {a}*{k}={x}.", f"{n2} is {a}*{k}={x} years old.", f"So {n2} is {a}*{k}={x}."),
             (f"{n3} is {x}{op}{d}={result}.", f"So {n3} is {x}{op}{d}={result} years old.",
              f"Being {relation}, {n3} is {x}{op}{d}={result}.")]
    return {"a": a, "k": k, "d": d, "older": older}, {"name1": n1, "name2": n2, "name3": n3}, question, lines


def _speed(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    vehicle = rng.choice(_VEHICLES)
    s, h, h2 = rng.randint(3, r.count), rng.randint(2, r.factor), rng.randint(2, r.factor)
    dist, dist2 = s * h, s * h2
    ask_hours = rng.randint(0, 1)
    he = pron.capitalize()
    lines = [(f"The speed is {dist}/{h}={s}.", f"{he} goes {dist}/{h}={s} miles per hour.",
              f"In one hour {pron} travels {dist}/{h}={s} miles.")]
    if ask_hours:
        ask = f"how many hours does {pron} need for {dist2} miles?"
        lines.append((f"For {dist2} miles it takes {dist2}/{s}={h2}.",
                      f"{dist2} miles take {dist2}/{s}={h2} hours.", f"{he} needs {dist2}/{s}={h2} hours."))
    else:
        ask = f"how many miles does {pron} travel in {h2} hours?"
        lines.append((f"In {h2} hours it is {s}*{h2}={dist2}.", f"{h2} hours give {s}*{h2}={dist2} miles.",
                      f"{he} travels {s}*{h2}={dist2} miles."))
    question = f"{name} travels {dist} miles by {vehicle} in {h} hours. At the same speed, {ask}"
    return ({"dist": dist, "h": h, "h2": h2, "ask_hours": ask_hours}, {"name": name, "vehicle": vehicle},
            question, lines)


def _trip(rng: random.Random, r: Scale) -> _Rendered:
    name, _ = _person(rng)
    m1, m2 = rng.sample(_MODES, 2)
    s1, s2 = rng.randint(2, r.count), rng.randint(2, r.count)
    h1, h2 = rng.randint(2, 5), rng.randint(2, 5)
    x, y = s1 * h1, s2 * h2
    question = (f"{name} {m1} at {s1} miles per hour for {h1} hours, then {m2} at {s2} miles per hour "
                f"for {h2} hours. How many miles is that?")
    lines = [(f"First {s1}*{h1}={x} miles.", f"The first part is {s1}*{h1}={x} miles.",
              f"{name} {m1} {s1}*{h1}={x} miles."),
             (f"Then {s2}*{h2}={y} miles.", f"The second part is {s2}*{h2}={y} miles.",
              f"Then {name} {m2} {s2}*{h2}={y} miles."),
             (f"In total {x}+{y}={x + y}.", f"Together that is {x}+{y}={x + y} miles.",
              f"So {x}+{y}={x + y}.")]
    return {"s1": s1, "h1": h1, "s2": s2, "h2": h2}, {"name": name, "mode1": m1, "mode2": m2}, question, lines


def _savings(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    thing = rng.choice(_THINGS)
    start, a, w = rng.randint(2, r.start), rng.randint(2, r.factor), rng.randint(2, r.factor)
    x = a * w
    y = start + x
    cost = rng.randint(1, y - 1)
    he = pron.capitalize()
    question = (f"{name} has ${start}. {he} saves ${a} each week for {w} weeks, then buys a {thing} "
                f"for ${cost}. How many dollars does {pron} have left?")
    res = y - cost
    lines = [(f"{he} saves {a}*{w}={x}.", f"In {w} weeks {pron} saves {a}*{w}={x} dollars.",
              f"Saving ${a} a week gives {a}*{w}={x}."),
             (f"{he} has {start}+{x}={y}.", f"Then {pron} has {start}+{x}={y} dollars.",
              f"With the ${start} that is {start}+{x}={y}."),
             (f"After the {thing} {y}-{cost}={res}.", f"The {thing} leaves {y}-{cost}={res}.",
              f"So {pron} has {y}-{cost}={res} dollars left.")]
    return {"start": start, "a": a, "w": w, "cost": cost}, {"name": name, "thing": thing}, question, lines


def _packing(rng: random.Random, r: Scale) -> _Rendered:
    name, pron = _person(rng)
    item = rng.choice(_BAKED)
    bags, k, p = rng.randint(2, r.count), rng.randint(2, r.factor), rng.randint(2, r.factor)
    n, money = bags * k, bags * p
    flour = rng.randint(1, min(r.start, money - 1))
    he = pron.capitalize()
    question = (f"{name} bakes {n} {item} and packs them in bags of {k}. {he} sells each bag "
                f"for ${p} and spent ${flour} on flour. How many dollars of profit does {pron} make?")
    res = money - flour
    lines = [(f"There are {n}/{k}={bags} bags.", f"{he} makes {n}/{k}={bags} bags.",
              f"In bags of {k} that is {n}/{k}={bags} bags."),
             (f"They sell for {bags}*{p}={money}.", f"The bags bring {bags}*{p}={money} dollars.",
              f"{he} earns {bags}*{p}={money}."),
             (f"After the flour {money}-{flour}={res}.", f"The profit is {money}-{flour}={res}.",
              f"Minus the flour that is {money}-{flour}={res} dollars.")]
    return {"n": n, "k": k, "p": p, "flour": flour}, {"name": name, "item": item}, question, lines


# Templates whose first two steps are independent and whose last step adds their results: the order
# of the two is part of the phrasing (the sum follows it).
_REORDERABLE = frozenset({"shopping"})


TEMPLATES: dict[str, Callable[[random.Random, Scale], _Rendered]] = {
    "shopping": _shopping, "change": _change, "sharing": _sharing, "ages": _ages,
    "speed": _speed, "trip": _trip, "savings": _savings, "packing": _packing,
}


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
    lines = phrase_solution(question, alternatives, phrasing=phrasing, reorderable=template in _REORDERABLE)
    answer = "\n".join([*lines, f"#### {_last_result(lines[-1])}"])
    return Problem(template, numbers, words, question, answer)


def _scale(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def _check_phrasing(phrasing: str) -> None:
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")


def phrase_solution(question: str, alternatives: Sequence[_Line | str], *, phrasing: str = "varied",
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
    """The zero-shot GSM8K prompt of spec §5.4 (sent as the user turn of the chat template)."""
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
