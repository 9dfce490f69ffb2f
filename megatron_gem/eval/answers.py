"""Final answers of math responses: extraction, a canonical key, and equivalence.

Extraction (``extract_answer``), first rule that applies:
  1. GSM8K: the number right after the last ``####`` (``#### 1,234.`` -> ``1234``); text after
     ``####`` that starts with no number gives None (the response claimed an answer and gave none);
  2. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance (nested
     braces allowed; an unbalanced one is skipped);
  3. fallback: the last number in the text.
A number may carry a sign, ``$``, thousands commas, decimals, a trailing period or ``%`` and be a
fraction ``a/b`` or ``\\frac{a}{b}``; it becomes an exact ``Fraction``, so "42", "42.0", "$42",
"42." and "84/2" are one answer (``answer_key`` -> "42"; 0.5 and 1/2 -> "1/2").

Non-numeric answers (a boxed expression such as ``x^2+1``) compare with the ``math-verify``
package where it is installed (symbolic equivalence), else by their text without spaces.
Hand-written numbers rather than math-verify alone: the GSM8K rules above are exact and
deterministic, work without the optional package, and give a hashable key for majority votes.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = [
    "answer_key",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k",
    "has_math_verify",
    "last_number",
    "parse_number",
    "reference_answer",
]

# a number: sign, $, thousands commas, decimals; then an optional "/denominator" (a fraction)
_NUMBER_RE = re.compile(
    r"(?<![\w.])(-?\$?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|-?\$?\.\d+)"
    r"(?:\s*/\s*(\d+))?"
)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}$")
_FRAC_SHORT_RE = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")  # \frac34
_PLAIN_RE = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def parse_number(text: str) -> Fraction | None:
    """Exact value of one number written as a GSM8K or boxed answer, else None.

    Accepts ``-1,234.50``, ``$42``, ``42.``, ``50%``, ``3/4``, ``-\\frac{3}{4}``, ``\\dfrac34``,
    ``\\$5`` and LaTeX units (``18\\text{ dollars}``); ``5 dollars`` is not a number (None).
    """
    value = _parse_number(text)
    if value is None and "\\" in text:
        value = _parse_number(re.sub(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}", "", text))
    return value


def _parse_number(text: str) -> Fraction | None:
    s = text.strip()
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip()
    s = s.rstrip(".").rstrip("%").strip()
    s = s.replace("$", "").replace(" ", "")
    if s.startswith("+"):
        s = s[1:]
    m = _FRAC_RE.match(s) or _FRAC_SHORT_RE.match(s)
    if m:
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _parse_number(num), _parse_number(den)
        if a is None or b is None or b == 0:
            return None
        return a / b
    if not s or s in ("-", ".", "-.") or not _PLAIN_RE.match(s):
        return None
    return Fraction(s.replace(",", ""))


def _format(value: Fraction) -> str:
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER_RE.finditer(text):
        out.append(m.group(0))
    return out


def last_number(text: str) -> str | None:
    """The last number in the text, as written (``None`` when there is none)."""
    nums = _numbers(text)
    return nums[-1] if nums else None


def extract_gsm8k(text: str) -> str | None:
    """The number right after the last ``####`` (GSM8K's final-answer mark), else None."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    m = _NUMBER_RE.match(tail)
    return m.group(0) if m else None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, else None."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i].strip()
                    break
    return found


def extract_answer(text: str) -> str | None:
    """The response's final answer (rules in the module docstring), as written; None if none."""
    if "####" in text:
        return extract_gsm8k(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed or None
    return last_number(text)


def reference_answer(answer: str | int | float) -> str:
    """A prompt's reference answer: GSM8K's ``"... #### 42"`` gives "42"; a plain string or
    number is the answer itself. Raises ValueError when a ``####`` is followed by no number."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"an answer must be a string or a number, got {answer!r}")
    text = str(answer).strip()
    if "####" in text:
        got = extract_gsm8k(text)
        if got is None:
            raise ValueError(f"no number after '####' in answer {answer!r}")
        return got
    if not text:
        raise ValueError("the answer is empty")
    return text


def answer_key(answer: str | None) -> str | None:
    """Canonical, hashable form of an extracted answer (for majority votes): numbers as their
    exact value ("42", "-3/4"), other answers as their text without spaces."""
    if answer is None:
        return None
    value = parse_number(answer)
    if value is not None:
        return _format(value)
    key = re.sub(r"\s+", "", answer).rstrip(".")
    return key or None


def has_math_verify() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _math_verify_equal(a: str, b: str) -> bool | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math-verify times out with SIGALRM, which works only in the main thread.
    t = 5 if threading.current_thread() is threading.main_thread() else None
    gold, pred = parse(f"${a}$", parsing_timeout=t), parse(f"${b}$", parsing_timeout=t)
    if not gold or not pred:
        return None
    return bool(verify(gold, pred, timeout_seconds=t))


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Whether two extracted answers are the same: exact numeric value when both are numbers;
    else math-verify's symbolic equivalence when installed; else equal ``answer_key``."""
    if predicted is None or reference is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    if answer_key(predicted) == answer_key(reference):
        return True
    return bool(_math_verify_equal(reference, predicted))
