"""``mcq``: the paper's science multiple-choice format — chat-message prompts, a gold letter.

Two row formats load:
- the evaluation format: ``prompt`` (chat messages, system + user, or one string) and ``answer`` (the letter);
- the official science *training* format: ``messages`` (chat messages) and ``output_text`` (a full written
  answer ending in ``<answer>X</answer>``), with no ``answer`` column: the gold letter is the last
  ``<answer>`` of ``output_text``.
A row with ``output_text`` (either format) uses it as the gold demonstration; otherwise one is synthesised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from caopd.method.protocol import (
    MCQ_CONFIDENCE_INSTRUCTION,
    format_confidence,
    remove_confidence_statements,
    split_thinking,
)
from caopd.tasks.base import (
    Example,
    FieldError,
    Task,
    demonstration_with_confidence,
    register_task,
    require_str,
    row_id,
)

# One letter, optionally in parentheses or followed by a full stop: "B", "(B)", "B.".
_LETTER = r"\(?([A-Za-z])\)?\.?"
_LETTER_RE = re.compile(_LETTER)
# Every closed <answer>...</answer> span, tags in any case.
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# An open tag with a letter right after it, as a completion cut before its closing tag leaves it.
_OPEN_TAG_RE = re.compile(r"<answer>\s*\(?([A-Za-z])\)?(?![A-Za-z0-9])", re.IGNORECASE)
# "Answer: X" where the letter is all that is left of the line ("Final answer: (C)." too).
_ANSWER_LINE_RE = re.compile(rf"\banswer\s*:[ \t]*{_LETTER}[ \t]*$", re.IGNORECASE | re.MULTILINE)


def chat_messages(value: Any, column: str) -> list[dict[str, str]]:
    """Validate a chat prompt and return it as plain ``{"role", "content"}`` dicts.

    Rows from Arrow or JSON carry mappings with possibly extra keys; the prompt must survive JSON round
    trips and chat templates, so only role and content are kept.
    """
    if not isinstance(value, list) or not value:
        raise FieldError(column, "expected a non-empty list of chat messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise FieldError(column, f"message {i}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise FieldError(column, f"message {i}: 'role' and 'content' must be strings")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise FieldError(column, "has no user message")
    return messages


def gold_letter(value: Any) -> str:
    """The gold answer as one uppercase letter A-Z."""
    letter = value.strip().upper() if isinstance(value, str) else ""
    if len(letter) != 1 or not "A" <= letter <= "Z":
        raise FieldError("answer", f"expected a single letter A-Z, got {value!r}")
    return letter


def tagged_letter(text: str) -> str | None:
    """The letter of the last closed ``<answer>...</answer>`` in ``text``; None when there is no closed tag or
    the last one holds anything but one letter (an earlier tag does not stand in for it)."""
    tags = _ANSWER_TAG_RE.findall(text)
    if not tags:
        return None
    found = _LETTER_RE.fullmatch(tags[-1].strip())
    return found.group(1).upper() if found else None


def answer_letter(completion: str) -> str | None:
    """The option letter a completion gives, read from its answer part (after a thinking block).

    Rules, in order:
    1. closed ``<answer>X</answer>`` tags (any case): the **last** one decides; if it holds anything but one
       letter (``B``, ``(B)``, ``B.``, whitespace around), the completion gives no answer. The official
       evaluation takes the first tag; after ``</think>`` a response rarely holds two, so they rarely differ,
       and the last one is the model's final word (docs/method.md);
    2. no closed tag — an unclosed ``<answer>X`` (a completion cut before ``</answer>``): the letter right after
       the last open tag;
    3. ``Answer: X`` (key in any case) where the letter ends its line: the last such line;
    4. a bare letter: the answer part, with its confidence statements removed, is one letter and nothing else.
    """
    _, answer = split_thinking(completion)
    if _ANSWER_TAG_RE.search(answer):
        return tagged_letter(answer)
    for pattern in (_OPEN_TAG_RE, _ANSWER_LINE_RE):
        matches = pattern.findall(answer)
        if matches:
            return matches[-1].upper()
    bare = _LETTER_RE.fullmatch(remove_confidence_statements(answer).strip())
    return bare.group(1).upper() if bare else None


def prompt_of(row: Mapping[str, Any], column: str) -> str | list[dict[str, str]]:
    """A row's prompt: chat messages, or (the ``prompt`` column only) one string."""
    value = row[column]
    if column == "prompt" and isinstance(value, str):
        return require_str(row, column)
    return chat_messages(value, column)


@register_task
class MultipleChoiceTask(Task):
    """Rows: ``prompt`` (chat messages or a string) or ``messages`` (chat messages); ``answer`` (a letter) or
    ``output_text`` (a written answer ending in ``<answer>X</answer>``); optional ``id``.

    The prompt gets ``MCQ_CONFIDENCE_INSTRUCTION`` appended to its last user message after a blank line,
    unless it already asks for a confidence. The verdict: :func:`answer_letter` equals the gold letter.
    """

    name = "mcq"
    default_confidence_instruction = MCQ_CONFIDENCE_INSTRUCTION

    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        prompt = prompt_of(row, self.column_of(row, ("prompt", "messages")))
        gold_column = self.column_of(row, ("answer", "output_text"))
        letter = gold_letter(row["answer"]) if gold_column == "answer" else None
        if row.get("output_text") is not None:
            output_text = require_str(row, "output_text")
            written = tagged_letter(split_thinking(output_text)[1])
            if written is None:
                raise FieldError("output_text", "expected a written answer ending in <answer>X</answer> "
                                                "(one letter in its last <answer> tag)")
            if letter is not None and written != letter:
                raise FieldError("output_text", f"its <answer> is {written} but the row's answer is {letter}")
            letter = written
            demonstration = demonstration_with_confidence(output_text)
        else:
            demonstration = f"<answer>{letter}</answer>\n{format_confidence(1.0)}"
        return Example(id=row_id(row, index), prompt=self.prompt_asking_confidence(prompt), answer=letter,
                       demonstration=demonstration)

    def extract_answer(self, completion: str) -> str | None:
        return answer_letter(completion)

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer
