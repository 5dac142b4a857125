"""Answer extraction and canonicalisation for the math benchmarks (algorithm §5.4).

Why this shape: the reference scores GSM8K/ASDIV with ``val_gsm8k.py``-style rules, not lm-eval's
regexes: collect candidate answers from a response (``#### N``, ``Answer:``, ``Final Answer:``,
``The final answer is``, ``<answer>``, ``\\boxed{}``, the last numbers of the tail), canonicalise them
(numbers compared as exact fractions), and call the response correct when the gold equals either of
the **top-2** distinct canonical candidates. Two modes:

* ``"numeric"`` (GSM8K, ASDIV): every candidate is the last number of its snippet. Responses that
  read as "unstable" (many "wait"/"wrong"/"stuck"... triggers, the degenerate loops an over-parallel
  decoder produces) yield **no candidates, hence score 0**, unless the last 250 characters hold a
  clean final marker (an answer span or ``\\boxed{}`` free of trigger words); single snippets that
  contain trigger words are skipped. This is our reading of the spec's "unstable responses without a
  clean final marker score 0", matching the reference heuristics.
* ``"math"`` (MATH500, Minerva): candidates are whole answer expressions (last ``\\boxed{}``, answer
  spans, the last LaTeX block, the last lines and their right-hand sides), compared after LaTeX
  normalisation; numeric values (``\\frac{1}{2}`` = ``0.5`` = ``1/2``) compare exactly. The reference's
  MATH scorer additionally tries sympy / math_verify equivalence over up to 10 candidates; we do not,
  so our MATH accuracy is a slightly stricter (lower-bound) version of theirs.

Deliberate difference: answer spans are ordered by their position in the text (the reference
concatenates them pattern by pattern); "the last 3 spans" then means the last 3 in reading order.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal

Mode = Literal["numeric", "math"]

# A number, with an optional "/denominator"; a leading minus only when it is not a binary minus
# ("16-3-4" gives 16, 3, 4 rather than -3, -4).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}.])-)?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_HASH_SPAN_RE = re.compile(r"####\s*([^\n]+)")  # GSM8K's final "#### N" line
_SPAN_PATTERNS = [
    _HASH_SPAN_RE,
    re.compile(r"(?is)<answer>\s*(.*?)\s*</answer>"),
    re.compile(r"(?is)Final Answer\s*[:：]\s*(.*?)(?=\n\s*\n|$)"),
    re.compile(r"(?is)The final answer is\s*(.*?)(?:\.?\s*I hope it is correct\.?|$)"),
    re.compile(r"(?im)^\s*Answer\s*[:：]\s*(.+?)\s*$"),
]
_TRIGGER_RE = re.compile(
    r"\bwrong\b|\bincorrect\b|\bfalse\b|\btypo\b|\bglitch\b|\bstuck\b|\bloop(?:ing)?\b|"
    r"\bmalfunction\b|\bgive up\b|\bsystem error\b|\bnot right\b|\bconfusing\b",
    re.IGNORECASE,
)
_RESPONSE_TRIGGERS = ("wait", "wrong", "incorrect", "false", "glitch", "stuck", "loop", "malfunction",
                      "system error", "give up")
_FATAL_PHRASES = ("i give up", "system error", "malfunction", "i'm stuck", "glitch")
# "18 dollars", "4 hours", "5 cm^2": a number followed only by words (not math words like "pi").
_UNIT_TAIL_RE = re.compile(
    r"^(-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?)\s+(?!(?:pi|sqrt|log|ln|sin|cos|tan)\b)[A-Za-z]{2,}[A-Za-z\s.'/^\d]*$"
)
_LATEX_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\circ",
               "\\displaystyle", "{,}", "\\%", "%", "\\$", "$", "**", "__", "`")
_TRAILING_PUNCT = " \t\r\n.,;:!?。，；：！？"


# ---------------------------------------------------------------------------------------------
# Low-level pieces
# ---------------------------------------------------------------------------------------------
def _braced(text: str, open_idx: int) -> tuple[str, int] | None:
    """Content of the balanced ``{...}`` starting at ``open_idx`` and the index of its ``}``."""
    depth = 0
    for pos in range(open_idx, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1:pos], pos
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in text order, nested braces kept."""
    found: list[tuple[int, str]] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*(?=\{)", text):
        got = _braced(text, match.end())
        if got is not None:
            found.append((match.start(), got[0].strip()))
    return [content for _, content in sorted(found)]


def answer_spans(text: str) -> list[str]:
    """Text after the final-answer markers (``####``, ``Answer:``, ...), in reading order."""
    spans: list[tuple[int, str]] = []
    for pattern in _SPAN_PATTERNS:
        for match in pattern.finditer(text):
            if match.group(1).strip():
                spans.append((match.start(1), match.group(1).strip()))
    return [span for _, span in sorted(spans)]


def snippet_is_unstable(snippet: str) -> bool:
    """A single snippet reads like self-doubt ("wrong", "wait... wait") and must not give an answer."""
    lower = snippet.lower()
    if not lower.strip():
        return False
    if _TRIGGER_RE.search(lower) or lower.count("wait") >= 2:
        return True
    return lower.count("?") >= 2 and any(w in lower for w in (" no", "wrong", "incorrect"))


def response_is_unstable(text: str) -> bool:
    """The whole response looks like a degenerate loop (many trigger words or a fatal phrase)."""
    lower = text.lower()
    if not lower.strip():
        return False
    if any(phrase in lower for phrase in _FATAL_PHRASES):
        return True
    wrong = lower.count("wrong") + lower.count("incorrect") + lower.count("false")
    if lower.count("wait") >= 3 and wrong >= 1:
        return True
    return sum(lower.count(t) for t in _RESPONSE_TRIGGERS) >= 8


def has_clean_final_marker(text: str, tail_chars: int = 250) -> bool:
    """The last ``tail_chars`` characters hold an answer span or ``\\boxed{}`` and no trigger words."""
    tail = text.strip()[-tail_chars:]
    if not tail or snippet_is_unstable(tail):
        return False
    return bool(answer_spans(tail) or boxed_contents(tail))


def _frac_to_slash(text: str) -> str:
    """``\\frac{a}{b}`` / ``\\dfrac ab`` with plain numbers → ``a/b`` (so numbers compare exactly)."""
    text = re.sub(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}", r"\1/\2", text)
    return re.sub(r"\\[dt]?frac\s*(\d)(\d)", r"\1/\2", text)


def last_number(text: str) -> str | None:
    """The last number in ``text`` after thousands commas are dropped and LaTeX fractions flattened."""
    cleaned = _THOUSANDS_RE.sub("", _frac_to_slash(text.replace("\u2212", "-")))
    matches = _NUMBER_RE.findall(cleaned)
    return matches[-1] if matches else None


def _unwrap(text: str) -> str:
    """Strip one layer at a time of ``$..$``, ``\\(..\\)``, ``\\[..\\]``, ``\\boxed{}``, ``\\text{}``."""
    current = text.strip()
    while True:
        previous = current
        for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            fits = len(current) >= len(left) + len(right)
            if fits and current.startswith(left) and current.endswith(right):
                current = current[len(left):len(current) - len(right)].strip()
        match = re.match(r"^\\(?:boxed|fbox|text|textbf|mathrm|mbox|mathbf)\s*(?=\{)", current)
        if match:
            got = _braced(current, match.end())
            if got is not None and got[1] == len(current) - 1:
                current = got[0].strip()
        current = current.strip(_TRAILING_PUNCT)
        if current == previous:
            return current


def _as_fraction(text: str) -> Fraction | None:
    """Exact value of a plain number, ``a/b`` or decimal; None when it is not one."""
    text = text.lstrip("+")
    if re.fullmatch(r"-?\d+/\d+", text):
        num, den = text.split("/")
        return None if int(den) == 0 else Fraction(int(num), int(den))
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", text):
        return None
    try:
        return Fraction(Decimal(text))
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def canonicalize(s: str) -> str:
    """Canonical form of one answer: a reduced fraction / integer string when the answer is a number
    (``"$1,234.00"`` → ``"1234"``, ``"\\frac{6}{4}"`` → ``"3/2"``, ``"18 dollars"`` → ``"18"``),
    otherwise a whitespace-free normalised LaTeX string (``"\\left( 3, \\dfrac{\\pi}{2} \\right)"`` →
    ``"(3,\\frac{\\pi}{2})"``). Never raises; returns ``""`` for an empty answer."""
    text = s.replace("\u2212", "-").replace("\u00d7", "\\times").replace("\\dfrac", "\\frac")
    text = text.replace("\\tfrac", "\\frac").replace("\\mbox", "\\text")
    text = _unwrap(text)
    text = re.sub(r"\\text\{\s*\}", "", text)
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text)
    for token in _LATEX_DROP:
        text = text.replace(token, "")
    if "=" in text and not re.search(r"[<>]|\\[lg]e|\\neq", text):
        text = text.split("=")[-1]  # "x = 5" → "5", as the reference does
    text = _THOUSANDS_RE.sub("", _frac_to_slash(text)).strip().strip(_TRAILING_PUNCT)
    unit = _UNIT_TAIL_RE.match(text)  # "18 dollars", "4 hours", "5 cm"
    if unit:
        text = unit.group(1)
    value = _as_fraction(text.replace(" ", ""))
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    text = re.sub(r"\\frac\s*([^{\s\\])\s*([^{\s\\])", r"\\frac{\1}{\2}", text)  # \frac12 → \frac{1}{2}
    text = re.sub(r"\\sqrt\s*([^{\s\\])", r"\\sqrt{\1}", text)  # \sqrt2 → \sqrt{2}
    return text.replace("\\{", "{").replace("\\}", "}").replace(" ", "").strip(_TRAILING_PUNCT)


def extract_candidates(text: str, mode: Mode = "numeric") -> list[str]:
    """Raw answer candidates in priority order (not yet canonicalised, may repeat).

    numeric: last number of each of the last 3 answer spans (last first), of the last ``\\boxed{}``,
    of each of the last 5 non-empty lines (last first), and of the last 8 lines together; snippets
    with trigger words are skipped, and an unstable response without a clean final marker gives [].
    math: last ``\\boxed{}``, the last 3 answer spans (last first), the last LaTeX block of the tail,
    then the last 3 lines and the right-hand side of their last ``=``.
    """
    raw = str(text or "").strip()
    if not raw:
        return []
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    spans = answer_spans(raw)
    boxed = boxed_contents(raw)
    if mode == "numeric":
        if response_is_unstable(raw) and not has_clean_final_marker(raw):
            return []
        snippets = list(reversed(spans[-3:])) + boxed[-1:] + list(reversed(lines[-5:]))
        snippets.append("\n".join(lines[-8:]))
        numbers = (last_number(s) for s in snippets if not snippet_is_unstable(s))
        return [n for n in numbers if n is not None]
    if mode != "math":
        raise ValueError(f"unknown extraction mode {mode!r}; expected 'numeric' or 'math'")
    candidates = boxed[-1:] + list(reversed(spans[-3:]))
    latex = re.findall(r"(?s)\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<!\$)\$([^$]+?)\$", raw[-800:])
    if latex:
        candidates.append(next(part for part in latex[-1] if part))
    for line in reversed(lines[-3:]):
        candidates.append(line.lstrip("-* "))
        if "=" in line:
            candidates.append(line.rsplit("=", 1)[-1])
    return [c for c in candidates if c.strip()]


def canonical_candidates(text: str, mode: Mode = "numeric") -> list[str]:
    """Distinct canonical candidates in priority order (``"answer"``-like leftovers dropped)."""
    out: list[str] = []
    for candidate in extract_candidates(text, mode):
        canon = canonicalize(candidate)
        if canon and canon.lower() not in {"answer", "finalanswer"} and canon not in out:
            out.append(canon)
    return out


def score_answer(response: str, gold: str, mode: Mode = "numeric", top_k: int = 2) -> tuple[bool, list[str]]:
    """``(correct, top candidates)``: correct when the canonical gold equals one of the top-``top_k``
    (reference: 2) distinct canonical candidates."""
    gold_canon = canonicalize(gold)
    if not gold_canon:
        raise ValueError(f"gold answer {gold!r} is empty after canonicalisation")
    top = canonical_candidates(response, mode)[:top_k]
    return gold_canon in top, top


def is_correct(response: str, gold: str, mode: Mode = "numeric", top_k: int = 2) -> bool:
    """True when the canonical gold is among the top-``top_k`` candidates (see :func:`score_answer`)."""
    return score_answer(response, gold, mode, top_k)[0]


def final_answer(response: str) -> str | None:
    """The number on a response's last ``#### N`` line, or None: the strict reading of a GSM8K
    response (the reference scorer, ``score_answer``, also accepts the gold as its second candidate,
    e.g. a last step's result when the ``####`` line disagrees with it)."""
    marks = _HASH_SPAN_RE.findall(str(response or ""))
    return last_number(marks[-1]) if marks else None


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field: the text after ``####`` (commas removed)."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer_field[-80:]!r}")
    gold = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError(f"GSM8K answer has an empty '####' line: {answer_field[-80:]!r}")
    return gold
