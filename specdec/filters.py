"""The rewrite filter: whether a generated answer is kept or falls back to the original.

Every generation goes through a filter; a rejected one falls back to the original answer and the
record says so (`origin: "fallback"`, `reason`). Reasons, first match wins: `empty`, `repetition`
(a loop: a large share of repeated 4-grams, or a line repeated), `truncated` (hit
--max-new-tokens), `template_leak` ("reference answer", "### Response:", "your response", ...
when the instruction itself does not say it), and `math_mismatch` (the final number differs
from the reference's).

Math-like records (a simple detector: arithmetic in the instruction, or an explicit final answer
in the reference) get the final-answer check.
"""

from __future__ import annotations

import math
import re
from collections import Counter

REASONS = ("empty", "repetition", "truncated", "template_leak", "math_mismatch")

# Phrases that show the generation talks about the rewriting task instead of answering. Each is
# a leak only when the instruction itself does not contain it (a user may ask for a rewrite).
LEAK_PATTERNS = (
    "reference answer", "reference solution", "reference response", "the reference",
    "original response", "original answer", "example answer", "provided answer",
    "### response", "### instruction", "### reference", "### problem", "your response",
    "your answer", "in your own words", "in my own words", "as a guide",
)


_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_MARKERS = (
    re.compile(rf"####\s*\$?\s*({_NUM})"),
    re.compile(rf"\\boxed\{{\s*\$?\s*({_NUM})"),
    re.compile(rf"answer\s+is\s*:?\s*\$?\s*\**\s*({_NUM})", re.I),
)
_ARITHMETIC = re.compile(r"\d\s*[-+*/×÷^]\s*\(?\d")
_STATED_NUMBER = re.compile(rf"(=|\bis\b|\bare\b)\s*\$?\s*\**\s*{_NUM}\s*\**\s*[a-z%]*\.?\s*$",
                            re.I)
_MATH_WORDS = re.compile(
    r"\b(calculate|compute|solve|evaluate|how many|how much|sum of|product of|percent|"
    r"probability|equation|average)\b", re.I)


def final_number(text: str) -> str | None:
    """The final numeric answer of a text: after '####', in '\\boxed{}', after 'answer is',
    else the last number in it; commas removed."""
    for pattern in _ANSWER_MARKERS:
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "")
    numbers = re.findall(_NUM, text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def is_math(instruction: str, reference: str) -> bool:
    """A simple detector of math word problems: the reference marks its final answer
    ('####', \\boxed, 'the answer is N'), or the instruction is a short question with arithmetic
    or a math word in it (no code) and the reference's last line states a number after '=' or
    'is'."""
    if any(p.search(reference) for p in _ANSWER_MARKERS):
        return True
    if len(instruction) > 600 or "```" in instruction or "```" in reference:
        return False
    if not (_ARITHMETIC.search(instruction) or _MATH_WORDS.search(instruction)):
        return False
    lines = [line for line in reference.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_STATED_NUMBER.search(lines[-1]))


def repetition_loop(text: str, n: int = 4, max_share: float = 0.5, max_line_repeats: int = 5,
                    min_ngrams: int = 16) -> bool:
    """A generation stuck in a loop: more than `max_share` of its word/punctuation n-grams
    (numbers count as equal, so "step 1: ... step 2: ..." loops too) repeat an earlier one, or
    one line of 8+ characters appears more than `max_line_repeats` times."""
    units = re.findall(r"\w+|[^\w\s]+", re.sub(r"\d+", "0", text))  # a counting loop repeats
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    if len(grams) >= min_ngrams and 1 - len(set(grams)) / len(grams) > max_share:
        return True
    lines = Counter(s for line in text.splitlines() if len(s := line.strip()) >= 8)
    return bool(lines) and max(lines.values()) > max_line_repeats


def template_leak(text: str, instruction: str) -> str | None:
    """The first leak phrase in `text` that the instruction does not itself contain."""
    low, asked = text.lower(), instruction.lower()
    for phrase in LEAK_PATTERNS:
        if phrase in low and phrase not in asked:
            return phrase
    return None


def reject_reason(text: str, *, instruction: str, reference: str, finished: bool,
                  math_like: bool, n: int = 4, max_repeat_share: float = 0.5,
                  max_line_repeats: int = 5) -> str | None:
    """Why a generation is rejected (one of REASONS), or None to keep it."""
    if not re.search(r"\w", text):
        return "empty"
    if repetition_loop(text, n, max_repeat_share, max_line_repeats):
        return "repetition"
    if not finished:
        return "truncated"
    if template_leak(text, instruction):
        return "template_leak"
    if math_like:
        got, want = final_number(text), final_number(reference)
        if got is None or want is None or not same_number(got, want):
            return "math_mismatch"
    return None
