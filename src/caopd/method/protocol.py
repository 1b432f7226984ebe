"""The response protocol: every response ends with a line ``Confidence: X``.

This module is the one home of that format. Every stage (rollouts, target replacement, training,
evaluation) formats, finds, parses and edits confidences through these functions only, and every task
takes its confidence instruction from here.

A response may open with a thinking block (``<think>...</think>``, Qwen3 and other reasoning models). The
protocol reads only the *answer part* after it: the thinking block is the model's scratchpad, and a
confidence it mentions while thinking is not its statement. Edits never touch the thinking block.
"""

from __future__ import annotations

import math
import re

CONFIDENCE_KEY = "Confidence:"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# The official tool-use line (SalesforceAIResearch/CaOPD, main.py: CONFIDENCE_FORMAT_LINE), verbatim.
TOOLUSE_CONFIDENCE_INSTRUCTION = (
    "Confidence: your confidence level (0.0-1.0) regarding the success of this action, must be in numerical "
    "format, no other words or explanation."
)
# The science MCQ prompts' system message fixes the format (<reasoning>...</reasoning> then <answer>X</answer>,
# "only output the letter ..."); this line, appended to the question, asks for one more final line in the same
# terse imperative style, worded like the tool-use line so that both tasks ask for the same thing.
MCQ_CONFIDENCE_INSTRUCTION = (
    "After </answer>, end your response with a final line \"Confidence: X\", where X is your confidence level "
    "(0.0-1.0) that your answer is correct, must be in numerical format, no other words or explanation."
)

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
# A confidence statement: the key in any case followed by a number (an optional "%" right after it), or a
# <confidence>x</confidence> tag. One alternation, so finditer yields the statements in text order.
_STATEMENT_RE = re.compile(
    rf"confidence:\s*(?P<key_value>{_NUMBER})(?P<key_pct>\s*%)?"
    rf"|<confidence>\s*(?P<tag_value>{_NUMBER})(?P<tag_pct>\s*%)?\s*</confidence>",
    re.IGNORECASE,
)
# Where a confidence statement starts, number or not: the official edit cuts at a bare "confidence:" too, and a
# "<confidence>" tag opens one.
_START_RE = re.compile(r"confidence:|<confidence>", re.IGNORECASE)


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking block, answer part); the two concatenated give ``text`` back.

    With a ``</think>``, the thinking block runs up to and including the last one. With only a ``<think>``
    (a completion cut while thinking) everything is thinking and the answer is empty. With neither, the
    whole text is the answer.
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        cut = close + len(THINK_CLOSE)
        return text[:cut], text[cut:]
    if THINK_OPEN in text:
        return text, ""
    return "", text


def _is_cut_while_thinking(text: str) -> bool:
    return THINK_CLOSE not in text and THINK_OPEN in text


def format_confidence(p: float) -> str:
    """``Confidence: 0.50`` — two decimals, clipped to [0, 1]."""
    if p is None or not math.isfinite(p):
        raise ValueError(f"confidence must be a finite number, got {p!r}")
    return f"{CONFIDENCE_KEY} {min(max(float(p), 0.0), 1.0):.2f}"


def parse_confidence(text: str) -> float | None:
    """The stated confidence of a response, or None when it states none.

    Reads the answer part only (after a thinking block). Takes the last statement in text order:
    ``confidence:`` in any case followed by a number, or ``<confidence>x</confidence>``; a ``%`` right after
    the number divides by 100; the value is clipped to [0, 1]. A key with no number after it is no statement.
    ``Confidence: 0.9.`` reads 0.9 (the number stops before the sentence's full stop).
    """
    _, answer = split_thinking(text)
    last = None
    for match in _STATEMENT_RE.finditer(answer):
        last = match
    if last is None:
        return None
    by_key = last.group("key_value") is not None
    value = float(last.group("key_value") if by_key else last.group("tag_value"))
    if last.group("key_pct" if by_key else "tag_pct"):
        value /= 100.0
    if not math.isfinite(value):
        return None
    return min(max(value, 0.0), 1.0)


def confidence_start(text: str) -> int | None:
    """Index in ``text`` where the answer part's first confidence statement begins, or None.

    A statement begins at a case-insensitive ``confidence:`` (with or without a number after it) or at a
    ``<confidence>`` tag. CaOPD's edit cuts here, and the training loss masks the confidence tokens from here.
    """
    thinking, answer = split_thinking(text)
    found = _START_RE.search(answer)
    return None if found is None else len(thinking) + found.start()


def strip_confidence(text: str) -> str:
    """The response without its confidence: everything from ``confidence_start`` on removed (the thinking
    block is kept). The text unchanged when it states none."""
    start = confidence_start(text)
    return text if start is None else text[:start]


def remove_confidence_statements(text: str) -> str:
    """``text`` with every confidence statement (a key with its number, a tag) deleted where it stands."""
    return _STATEMENT_RE.sub("", text)


def replace_confidence(text: str, p: float) -> str:
    """CaOPD's edit of a response: its confidence becomes ``p``; ``parse_confidence`` of the result is ``p``.

    The thinking block is kept byte for byte. In the answer part, everything from the first confidence
    statement on is cut (the official edit cuts at the first ``confidence:`` of the whole text, which deletes a
    thinking block that mentions confidence), then ``Confidence: {p:.2f}`` is appended on its own line. A
    completion cut while thinking gets its block closed first: ``"\\n</think>\\n\\n"`` and the line.
    """
    if _is_cut_while_thinking(text):
        return f"{text}\n{THINK_CLOSE}\n\n{format_confidence(p)}"
    body = strip_confidence(text)
    if body and not body.endswith("\n"):
        body += "\n"
    return body + format_confidence(p)


def asks_for_confidence(text: str) -> bool:
    """Whether a prompt already asks for a confidence (it holds a case-insensitive ``confidence:``)."""
    return "confidence:" in text.lower()
