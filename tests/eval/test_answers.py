"""Answer extraction and equivalence on real-looking GSM8K / boxed responses, malformed included."""

from fractions import Fraction

import pytest

from megatron_gem.eval import answers as A

# (response, extracted as written, canonical key)
TABLE = [
    # GSM8K references and GSM8K-style responses
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
        "72",
        "72",
    ),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "10", "10"),
    ("He pays 2 * 600 = $1,200 in total.\n#### 1,200", "1,200", "1200"),
    ("#### $1,200.", "$1,200", "1200"),
    ("The temperature dropped.\n#### -5", "-5", "-5"),
    ("#### 0.50", "0.50", "1/2"),
    ("#### 3/4", "3/4", "3/4"),
    ("#### 18 dollars", "18", "18"),  # text after ####: the number that starts it
    ("#### 42\n\nI hope this helps! 7 more facts", "42", "42"),
    ("first #### 3 then a correction #### 4", "4", "4"),  # the last mark counts
    ("The answer is\n####", None, None),  # a mark with no number: no answer
    ("#### forty-two", None, None),
    # \boxed
    ("So the total is $\\boxed{72}$.", "72", "72"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "1/2"),
    ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}", "3/4"),
    ("\\boxed{-\\frac{3}{4}}", "-\\frac{3}{4}", "-3/4"),
    ("\\boxed{\\frac34}", "\\frac34", "3/4"),
    ("\\boxed{18 \\text{ dollars}}", "18 \\text{ dollars}", "18"),
    ("\\boxed{\\$1{,}200}", "\\$1{,}200", "1200"),
    ("first \\boxed{3}, then \\boxed{5}", "5", "5"),  # several boxed: the last one
    ("\\boxed{x^{2}+\\frac{1}{x}}", "x^{2}+\\frac{1}{x}", "x^{2}+\\frac{1}{x}"),  # nested braces
    ("\\boxed{7} and an unbalanced \\boxed{8", "7", "7"),  # unbalanced: skipped
    ("only an unbalanced \\boxed{8 ", "8", "8"),  # ... then the last-number fallback
    ("\\boxed{}", None, None),
    # last-number fallback
    ("The answer is 42.", "42", "42"),
    ("She has 5 apples and 3 oranges, so 8 fruits", "8", "8"),
    ("It costs $3.50 each.", "$3.50", "7/2"),
    ("about .5 of it", ".5", "1/2"),
    ("I don't know.", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, written, key", TABLE)
def test_extraction_table(text, written, key):
    got = A.extract_answer(text)
    assert got == written
    assert A.answer_key(got) == key


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("42", "42.0", True),
        ("42", "$42", True),
        ("42", "42.", True),
        ("1,234", "1234", True),
        ("0.5", "\\frac{1}{2}", True),
        ("50%", "50", True),
        ("84/2", "42", True),
        ("-5", "5", False),
        ("42", "41.999", False),
        ("42", None, False),
        (None, None, False),
    ],
)
def test_answers_match(a, b, same):
    assert A.answers_match(a, b) is same
    assert A.answers_match(b, a) is same


def test_parse_number_exact():
    assert A.parse_number("1,234.50") == Fraction(2469, 2)
    assert A.parse_number("-\\frac{6}{8}") == Fraction(-3, 4)
    assert A.parse_number("3/0") is None and A.parse_number("\\frac{1}{0}") is None
    assert A.parse_number("5 dollars") is None and A.parse_number("1,23") is None
    assert A.parse_number("x") is None and A.parse_number("-") is None


def test_reference_answer_shapes():
    assert A.reference_answer("Janet has 3 ducks ... #### 1,800") == "1,800"
    assert A.reference_answer(42) == "42" and A.reference_answer(" 7 ") == "7"
    for bad, match in (("steps #### none", "no number after"), ("", "empty"), (None, "string")):
        with pytest.raises(ValueError, match=match):
            A.reference_answer(bad)


def test_symbolic_answers_need_math_verify():
    same = A.answers_match("x^2+1", "1+x^2")
    assert same is A.has_math_verify()  # equal by math-verify only; by text they differ
    assert A.answers_match("x^{2} + 1", "x^{2}+1")  # spaces never matter
