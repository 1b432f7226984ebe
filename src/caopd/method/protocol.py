"""The response protocol: every response ends with a line ``Confidence: X``.

This module is the one home of that format. Every stage (rollouts, target replacement, training,
evaluation) formats and parses confidences through these functions only.
"""

from __future__ import annotations

import math
import re

CONFIDENCE_KEY = "Confidence:"

# The last "Confidence:" followed by a number; an optional "%" right after the number means percent.
_CONFIDENCE_RE = re.compile(r"Confidence:\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))(\s*%)?")


def format_confidence(p: float) -> str:
    """``Confidence: 0.50`` — two decimals, clipped to [0, 1]."""
    if p is None or not math.isfinite(p):
        raise ValueError(f"confidence must be a finite number, got {p!r}")
    return f"{CONFIDENCE_KEY} {min(max(float(p), 0.0), 1.0):.2f}"


def parse_confidence(text: str) -> float | None:
    """The stated confidence of a response, or None when it states none.

    Takes the last ``Confidence:`` followed by a number; a trailing ``%`` divides by 100; the value is
    clipped to [0, 1]. A ``Confidence:`` with no number after it does not count as a match.
    """
    last = None
    for match in _CONFIDENCE_RE.finditer(text):
        last = match
    if last is None:
        return None
    value = float(last.group(1))
    if last.group(2):
        value /= 100.0
    if not math.isfinite(value):
        return None
    return min(max(value, 0.0), 1.0)


def strip_confidence(text: str) -> str:
    """The response with everything from its last ``Confidence:`` on removed."""
    cut = text.rfind(CONFIDENCE_KEY)
    return text if cut < 0 else text[:cut]


def replace_confidence(text: str, p: float) -> str:
    """CaOPD's edit of a response: cut from the last ``Confidence:`` on, append ``Confidence: {p:.2f}``."""
    body = strip_confidence(text)
    if body and not body.endswith("\n"):
        body += "\n"
    return body + format_confidence(p)
