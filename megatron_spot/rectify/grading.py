"""Answer extraction and math-aware grading (math-verify).

``extract_boxed`` pulls the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (brace-balanced, so
``\\boxed{\\frac{1}{2}}`` works). ``answers_match`` compares a predicted answer string with the
ground truth using math-verify, after a light normalisation that math-verify does not do by itself:
thousands separators are left to math-verify, but trailing plain-word units ("12 dollars",
"5 cm") are stripped when what is left is a number. math-verify handles LaTeX (``\\frac``,
``\\dfrac``, ``\\sqrt``), ``\\text{cm}``-style units, percentages, ``x = 3`` and decimals vs fractions.

math-verify uses SIGALRM for its timeouts, which only works in the main thread; off the main thread
we call it without timeouts.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Optional

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TRAILING_WORDS = re.compile(r"^\s*(?P<num>[-+]?\$?\s*[\d][\d,]*(?:\.\d+)?)\s*(?:[A-Za-z][A-Za-z .]*)$")


def extract_boxed(text: Optional[str]) -> Optional[str]:
    """Content of the last \\boxed{...} in ``text`` (brace-balanced), or None."""
    if not text:
        return None
    last = None
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            last = text[m.end(): i - 1].strip()
    return last


def _normalise(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    m = _TRAILING_WORDS.match(ans)
    if m:  # "12 dollars" -> "12"; leaves LaTeX alone
        ans = m.group("num").replace("$", "").strip()
    return ans


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=65536)
def _parse_cached(expr: str, main: bool):
    from math_verify import parse

    timeout = 5 if main else None
    # Wrap in \boxed{} so bare answers ("\sqrt{18}", "1/2") are found as the answer itself.
    parsed = parse("\\boxed{" + expr + "}", parsing_timeout=timeout)
    if not parsed:
        parsed = parse("$" + expr + "$", parsing_timeout=timeout)
    return tuple(parsed)


def parse_answer(ans: str):
    return list(_parse_cached(_normalise(ans), _in_main_thread()))


def answers_match(pred: Optional[str], ground_truth: Optional[str]) -> bool:
    """True when ``pred`` (an extracted answer string) is mathematically equal to ``ground_truth``."""
    if pred is None or ground_truth is None:
        return False
    pred, gt = str(pred), str(ground_truth)
    if _normalise(pred) == _normalise(gt):
        return True
    from math_verify import verify

    gold_p, pred_p = parse_answer(gt), parse_answer(pred)
    if not gold_p or not pred_p:
        return False
    try:
        return bool(verify(gold_p, pred_p, timeout_seconds=5 if _in_main_thread() else None))
    except Exception:
        return False


def grade(solution_text: Optional[str], ground_truth) -> tuple[bool, Optional[str]]:
    """(is_correct, extracted_answer) for a full solution text; no \\boxed answer means wrong."""
    extracted = extract_boxed(solution_text)
    if extracted is None:
        return False, None
    return answers_match(extracted, str(ground_truth)), extracted
