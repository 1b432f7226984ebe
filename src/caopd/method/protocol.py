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
# A key with nothing after it but whitespace, at the very end: a statement cut before its number (max_new_tokens).
_TRAILING_KEY_RE = re.compile(r"confidence:\s*$", re.IGNORECASE)


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


def thinking_of(text: str) -> str:
    """The thinking block of ``text`` ("" when it has none)."""
    return split_thinking(text)[0]


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


def _statement_spans(answer: str) -> list[tuple[int, int]]:
    """The confidence statements of an answer part, in order: keys with their numbers, tags, and a key left
    without its number at the very end."""
    spans = [m.span() for m in _STATEMENT_RE.finditer(answer)]
    trailing = _TRAILING_KEY_RE.search(answer)
    if trailing and not any(start <= trailing.start() < end for start, end in spans):
        spans.append(trailing.span())
    return sorted(spans)


def confidence_start(text: str) -> int | None:
    """Index in ``text`` where the answer part's first confidence statement begins, or None.

    A statement is a case-insensitive ``confidence:`` with a number after it, a ``<confidence>`` tag, or a key cut
    before its number at the very end; a ``confidence:`` in prose ("my confidence: low") is none. CaOPD's edit
    cuts here, and the training loss masks the confidence tokens from here.
    """
    thinking, answer = split_thinking(text)
    spans = _statement_spans(answer)
    return len(thinking) + spans[0][0] if spans else None


def remove_confidence_statements(text: str) -> str:
    """``text`` with every confidence statement (a key with its number, a tag, a key cut at the very end)
    deleted where it stands."""
    return _TRAILING_KEY_RE.sub("", _STATEMENT_RE.sub("", text))


def _without_trailing_key(text: str) -> str:
    """``text`` without a key left at its end with no number ("... Confidence:"): it belongs to the statement
    that follows it, or to none."""
    while (key := _TRAILING_KEY_RE.search(text)) is not None:
        text = text[:key.start()]
    return text


def _before_statement(line: str) -> str:
    """A line up to its first confidence statement (the statement and the rest of its line go together)."""
    spans = _statement_spans(line)
    return _without_trailing_key(line[:spans[0][0]]) if spans else line


def strip_confidence(text: str) -> str:
    """The response without its confidence statements: from the answer part's first statement on, each line is cut
    at its first statement (the rest of a statement's line goes with it) and the lines left empty are dropped, so
    the lines after a statement that say something else (an answer written after its confidence) stay; the thinking
    block is kept. The text unchanged when it states none."""
    start = confidence_start(text)
    if start is None:
        return text
    head, rest = text[:start], text[start:]
    thinking = thinking_of(head)
    head = thinking + _without_trailing_key(head[len(thinking):])
    later = [_before_statement(line) for line in rest.split("\n")[1:]]
    later = [line for line in later if line.strip()]
    if not later:
        return head
    return head + ("" if head.endswith("\n") or not head else "\n") + "\n".join(later)


def replace_confidence(text: str, p: float) -> str:
    """CaOPD's edit of a response: its confidence becomes ``p``; ``parse_confidence`` of the result is ``p``.

    The thinking block is kept byte for byte. The answer part loses its confidence statements (from the first one
    on, keeping the lines after it that say something else, so an answer written after its confidence survives)
    and gets ``Confidence: {p:.2f}`` on a line of its own at the end: exactly one statement, after the answer. The
    official edit cuts at the first ``confidence:`` of the whole text to the end, which deletes a thinking block
    that mentions confidence and an answer written after the confidence. A completion cut while thinking gets
    its block closed first: ``"\\n</think>\\n\\n"`` and the line.
    """
    if _is_cut_while_thinking(text):
        return f"{text}\n{THINK_CLOSE}\n\n{format_confidence(p)}"
    body = strip_confidence(text)
    if body and not body.endswith("\n"):
        body += "\n"
    return body + format_confidence(p)


def asks_for_confidence(text: str) -> bool:
    """Whether a prompt already asks for a confidence: it holds a case-insensitive ``confidence:``, as a request
    for the format does ("End with a line Confidence: X"; no ToolAlpaca API documentation holds one otherwise)."""
    return "confidence:" in text.lower()
