import pytest

from megatron_spot.rectify.grading import answers_match, extract_boxed, grade


@pytest.mark.parametrize("pred,gt", [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "1/2"),
    ("1/2", "\\frac12"),
    ("\\dfrac{3}{4}", "0.75"),
    ("5\\text{ cm}", "5"),
    ("5 cm", "5"),
    ("12 dollars", "12"),
    ("\\$12", "12"),
    ("1,000", "1000"),
    ("x = 3", "3"),
    ("50\\%", "0.5"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("92", "92"),
])
def test_equivalent_forms_accepted(pred, gt):
    assert answers_match(pred, gt)


@pytest.mark.parametrize("pred,gt", [
    ("93", "92"), ("\\frac{1}{3}", "0.5"), ("5 cm", "6"), ("2\\sqrt{2}", "\\sqrt{18}"), ("-4", "4"),
    (None, "1"), ("", "1"),
])
def test_wrong_answers_rejected(pred, gt):
    assert not answers_match(pred, gt)


def test_extract_boxed_takes_last_and_balances_braces():
    t = "first \\boxed{1} then $\\boxed{\\frac{1}{2}}$."
    assert extract_boxed(t) == "\\frac{1}{2}"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{unclosed") is None


def test_grade_full_solution():
    ok, ans = grade("So... Therefore, the final answer is: $\\boxed{\\frac{10}{4}}$.", "2.5")
    assert ok and ans == "\\frac{10}{4}"
    ok, ans = grade("I think it is 7.", "7")  # no \boxed: counted wrong
    assert not ok and ans is None
