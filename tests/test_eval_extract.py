"""Answer extraction / canonicalisation (spec §5.4) on the formats the reference scorer handles."""

from __future__ import annotations

import pytest

from dmax_jax.eval.extract import (
    boxed_contents,
    canonical_candidates,
    canonicalize,
    extract_candidates,
    gsm8k_gold,
    is_correct,
)


@pytest.mark.parametrize(("raw", "canon"), [
    ("1,234", "1234"),
    ("$1,234.00", "1234"),
    ("\\$18", "18"),
    ("18 dollars", "18"),
    ("4 hours.", "4"),
    ("5 cm^2", "5"),
    ("**18**", "18"),
    ("18.", "18"),
    ("18.0", "18"),
    ("+7", "7"),
    ("-3.50", "-7/2"),
    ("\u22124", "-4"),
    ("0.75", "3/4"),
    ("6/8", "3/4"),
    ("\\frac{6}{8}", "3/4"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\frac12", "1/2"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("1,\\!000", "1000"),
    ("1{,}000", "1000"),
    ("x = 5", "5"),
    ("$\\boxed{12}$", "12"),
    ("\\text{(C)}", "(C)"),
    ("\\textbf{(C)}", "(C)"),
    ("\\left( 3, \\dfrac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\frac{\\sqrt2}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("2 pi", "2pi"),  # "pi" is math, not a unit: the number must not be split off
    ("x \\le 5", "x\\le5"),  # an inequality is not cut at a relation sign
    ("", ""),
])
def test_canonicalize(raw: str, canon: str) -> None:
    assert canonicalize(raw) == canon


def test_boxed_contents_keep_nested_braces_in_text_order() -> None:
    text = "first \\boxed{1} then \\fbox{2} and \\boxed{\\frac{\\sqrt{3}}{2}} and broken \\boxed{3"
    assert boxed_contents(text) == ["1", "2", "\\frac{\\sqrt{3}}{2}"]


@pytest.mark.parametrize(("response", "gold"), [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is 1,000 + 234.\n#### 1,234", "1234"),
    ("She needs 3 boxes.\nAnswer: 18", "18"),
    ("Some work.\nFinal Answer: The farmer earns 18 dollars per day.", "18"),
    ("So the answer is \\boxed{42}.", "42"),
    ("The probability is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "1/2"),
    ("Adding them up, she has 42 apples left.", "42"),
    ("So the cost is $18.00.", "18"),
    ("The temperature dropped to -5 degrees.", "-5"),
    ("The result is -3.5.", "-3.5"),
    ("Each part weighs 2.50 kg.", "2.5"),
    ("Each share is 3/4 of a pie.", "0.75"),
])
def test_numeric_mode_accepts_reference_formats(response: str, gold: str) -> None:
    assert is_correct(response, gold)


@pytest.mark.parametrize(("response", "gold"), [
    ("The result is -3.5.", "3.5"),  # the sign matters
    ("The total is 1,234.", "1.234"),  # thousands comma is not a decimal point
    ("Janet has 16 - 3 - 4 = 9 eggs.", "-4"),  # a binary minus does not make a negative number
])
def test_numeric_mode_rejects_near_misses(response: str, gold: str) -> None:
    assert not is_correct(response, gold)


def test_top2_rule() -> None:
    text = "First 5 apples.\nThen 6 pears.\nAnswer: 7"
    assert canonical_candidates(text) == ["7", "6", "5"]
    assert is_correct(text, "7") and is_correct(text, "6")
    assert not is_correct(text, "5")  # third candidate: outside the top 2


def test_answer_marker_outranks_trailing_numbers() -> None:
    text = "#### 12\nThat took 3 steps and 4 minutes."
    assert canonical_candidates(text)[0] == "12"
    assert extract_candidates(text)[0] == "12"


def test_unstable_response_without_final_marker_scores_zero() -> None:
    loop = "Wait, that is wrong. Wait, I'm stuck in a loop. Wait, false start. Let me redo. " * 2
    unstable = loop + "\nSo she has 18"
    assert extract_candidates(unstable) == []
    assert not is_correct(unstable, "18")
    # The same mess followed by a clean ending (last 250 chars free of triggers, with a final marker)
    # is scored normally.
    clean_end = "\n" + "She sells the 9 remaining eggs at the market for two dollars each. " * 4 + "\n#### 18"
    assert is_correct(loop + clean_end, "18")
    assert not is_correct(loop + clean_end[-150:], "18")  # the marker's tail still shows the loop


def test_unstable_snippets_are_skipped() -> None:
    text = "Nine eggs.\nAnswer: 7 is wrong\nShe makes 18 in total."
    cands = canonical_candidates(text)
    assert "7" not in cands[:1] and cands[0] == "18"


def test_math_mode_compares_expressions() -> None:
    resp = "Converting, we get $(r, \\theta) = \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$."
    assert is_correct(resp, "\\left( 3, \\frac{\\pi}{2} \\right)", mode="math")
    assert not is_correct(resp, "\\left( 3, \\frac{\\pi}{3} \\right)", mode="math")
    assert is_correct("Thus $\\boxed{x = 5}$.", "5", mode="math")
    assert is_correct("The answer is \\boxed{\\text{(C)}}", "\\text{(C)}", mode="math")
    assert is_correct("So the angle is \\boxed{90^\\circ}.", "90", mode="math")
    assert is_correct("\\boxed{\\dfrac{1}{2}}", "0.5", mode="math")
    assert is_correct("We find \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt3}{2}", mode="math")
    # Numeric mode would reduce an expression to its last number; math mode keeps it whole.
    assert not is_correct("\\boxed{\\frac{\\sqrt{3}}{2}}", "2", mode="math")


def test_unknown_mode_and_empty_gold_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        extract_candidates("1", mode="symbolic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gold"):
        is_correct("1", "   ")


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k_gold("Total: 1,234\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final line 18")


def test_final_answer_is_the_last_marked_number_only() -> None:
    from dmax_jax.eval.extract import final_answer, is_correct

    text = "She gets back 30-13=17.\n#### 13"
    assert final_answer(text) == "13"
    assert is_correct(text, "17")  # the reference's top-2 rule also takes the last step's result
    assert final_answer("#### 5\n#### 7 dollars") == "7"
    assert final_answer("So 3+4=7.") is None
