"""The eight problem templates of the demo task and the number scales they draw from.

A template draws its parameters from ``rng`` at a ``Scale`` and returns (numbers, words, question,
solution lines). Each solution line is a tuple of interchangeable phrasings (one equation each, same
result), the first being the "fixed" wording; ``task.phrase_solution`` picks one per problem from the
question's hash, never from ``rng``, so the questions (and the split) never depend on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

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
class Scale:
    """How large a template's numbers are (the ranges it draws its parameters from), and how the task
    tokenizer cuts them.

    Why: on "gsm" numbers (factors up to 9, sums up to ~160, carries, one token per digit) a
    0.67 M-parameter model trained for an hour on 2 CPU cores gets ~14 % of the varied-wording
    problems right, mostly for wrong step arithmetic. "small" keeps the templates, wordings and step
    dependencies (what makes parallel decoding hard) with every number <= 60, and makes each number
    one token (``whole_numbers``): a step's result is then one position to predict from two, not two
    digit positions that must agree (docs/experiments.md §5-6).
    """

    factor: int              # largest multiplication factor / divisor
    count: int               # largest box size, bag count, speed
    addend: int              # largest plain price added
    age: int                 # largest starting age
    gap: int                 # largest age difference
    start: int               # largest starting savings / flour cost
    bills: tuple[int, ...]   # the bills paid with (the largest always leaves change)
    whole_numbers: bool      # the task BPE keeps each number as one token (else one token per digit)


SCALES = {"gsm": Scale(factor=9, count=12, addend=18, age=15, gap=20, start=30, bills=(20, 50, 100),
                       whole_numbers=False),
          "small": Scale(factor=5, count=6, addend=9, age=9, gap=9, start=12, bills=(20, 30, 50),
                         whole_numbers=True)}


Line = tuple[str, ...]
Rendered = tuple[dict[str, int], dict[str, str], str, list[Line]]

def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_NAMES)


def _shopping(rng: random.Random, r: Scale) -> Rendered:
    name, pron = _person(rng)
    i1, i2 = rng.sample(_SHOP_ITEMS, 2)
    a, b, p, q = (rng.randint(2, r.factor) for _ in range(4))
    x, y = a * p, b * q
    he = pron.capitalize()
    question = (f"{name} buys {a} {i1} for ${p} each and {b} {i2} for ${q} each. "
                f"How many dollars does {pron} spend?")

    def cost(n: int, item: str, price: int, total: int) -> Line:
        return (f"The {item} cost {n}*{price}={total}.",
                f"{n} {item} at ${price} each is {n}*{price}={total}.",
                f"For the {item} {pron} pays {n}*{price}={total}.",
                f"{n}*{price}={total} dollars go to the {item}.")

    lines = [cost(a, i1, p, x), cost(b, i2, q, y),
             (f"In total {x}+{y}={x + y}.", f"Together that is {x}+{y}={x + y} dollars.",
              f"{he} spends {x}+{y}={x + y}.", f"So {x}+{y}={x + y}.")]
    return {"a": a, "p": p, "b": b, "q": q}, {"name": name, "item1": i1, "item2": i2}, question, lines


def _change(rng: random.Random, r: Scale) -> Rendered:
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


def _sharing(rng: random.Random, r: Scale) -> Rendered:
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


def _ages(rng: random.Random, r: Scale) -> Rendered:
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


def _speed(rng: random.Random, r: Scale) -> Rendered:
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


def _trip(rng: random.Random, r: Scale) -> Rendered:
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


def _savings(rng: random.Random, r: Scale) -> Rendered:
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


def _packing(rng: random.Random, r: Scale) -> Rendered:
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
REORDERABLE = frozenset({"shopping"})


TEMPLATES: dict[str, Callable[[random.Random, Scale], Rendered]] = {
    "shopping": _shopping, "change": _change, "sharing": _sharing, "ages": _ages,
    "speed": _speed, "trip": _trip, "savings": _savings, "packing": _packing,
}
