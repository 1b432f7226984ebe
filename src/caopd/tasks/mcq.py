"""``mcq``: the paper's science multiple-choice format — chat-message prompts, a gold letter."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from caopd.method.protocol import format_confidence
from caopd.tasks.base import Example, FieldError, Task, register_task, row_id

# Every <answer>...</answer> span; the verifier judges only the last one's content.
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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


@register_task
class MultipleChoiceTask(Task):
    """Columns: ``prompt`` (chat messages, system + user), ``answer`` (a letter); optional ``id``.

    The answer is the content of the completion's last ``<answer>...</answer>``: one letter, whitespace
    and case tolerated. A last tag holding anything else is no answer — an earlier tag does not count,
    because the model's final word is what it is scored on.
    """

    name = "mcq"
    required_columns = ("prompt", "answer")

    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        prompt = chat_messages(row["prompt"], "prompt")
        letter = gold_letter(row["answer"])
        demonstration = f"<answer>{letter}</answer>\n{format_confidence(1.0)}"
        return Example(id=row_id(row, index), prompt=prompt, answer=letter, demonstration=demonstration)

    def extract_answer(self, completion: str) -> str | None:
        tags = _ANSWER_TAG_RE.findall(completion)
        if not tags:
            return None
        letter = tags[-1].strip().upper()
        return letter if len(letter) == 1 and "A" <= letter <= "Z" else None

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer
