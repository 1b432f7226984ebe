"""The Task interface: a verifiable task builds prompts, gold demonstrations and a verifier.

A user adds a task by subclassing :class:`Task` (one small class) and decorating it with
:func:`register_task`. Datasets become :class:`Example` objects through ``Task.examples_from_rows``,
which validates every row and names the file, row and field of anything wrong.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from caopd.errors import CaopdInputError
from caopd.method.protocol import asks_for_confidence, parse_confidence, replace_confidence

# A prompt is plain text (tiny/base models) or a list of chat messages ({"role", "content"}).
Prompt = "str | list[dict[str, str]]"


@dataclass(frozen=True)
class Example:
    """One verifiable question."""

    id: str
    prompt: Any  # str, or a list of chat messages
    answer: str  # the gold answer in the task's canonical form
    demonstration: str  # a gold response in the response protocol (ends with a Confidence line)
    meta: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"kind": "mul_2x2"}


class Task(ABC):
    """A verifiable task. Subclasses set ``name`` (and ``required_columns`` when the row's columns are fixed)
    and implement three methods.

    Every task accepts ``ask_confidence`` and ``confidence_instruction`` (``get_task(name, **options)`` passes
    them). A task whose prompts should ask for a confidence calls :meth:`prompt_asking_confidence` on each
    example's prompt in ``example_from_row``; a task that never asks (arithmetic: its prompts are the tiny
    model's own format) simply does not call it.
    """

    name: ClassVar[str]
    # Columns every row must have, checked by examples_from_rows before example_from_row runs. A task whose
    # rows come in several formats leaves it empty and checks in example_from_row (see ``column_of``).
    required_columns: ClassVar[tuple[str, ...]] = ()
    # The line added to prompts that do not ask for a confidence yet; "" adds nothing.
    default_confidence_instruction: ClassVar[str] = ""

    def __init__(self, ask_confidence: bool = True, confidence_instruction: str | None = None) -> None:
        if confidence_instruction is not None and not isinstance(confidence_instruction, str):
            raise CaopdInputError(f"expected a string, got {type(confidence_instruction).__name__}",
                                  field="confidence_instruction")
        self.ask_confidence = bool(ask_confidence)
        self.confidence_instruction = confidence_instruction

    @property
    def confidence_instruction_text(self) -> str:
        """The line this task adds to its prompts: the user's, else the task's own; "" when it adds none."""
        if not self.ask_confidence:
            return ""
        return self.confidence_instruction or self.default_confidence_instruction

    def prompt_asking_confidence(self, prompt: Any) -> Any:
        """``prompt`` with the confidence instruction inserted, unless asking is off, the instruction is empty,
        or some message already asks (holds the instruction, or a line opening with ``Confidence:``). The input is
        not modified."""
        line = self.confidence_instruction_text
        if not line or any(asks_for_confidence(text) or line in text for text in prompt_texts(prompt)):
            return prompt
        return self.insert_confidence_instruction(prompt, line)

    def insert_confidence_instruction(self, prompt: Any, line: str) -> Any:
        """Where the instruction goes: by default at the end of the last user message, after a blank line."""
        return append_to_last_user_message(prompt, line)

    def column_of(self, row: Mapping[str, Any], alternatives: tuple[str, ...]) -> str:
        """The first of ``alternatives`` the row has (not None); FieldError naming the first one otherwise,
        in the same words as examples_from_rows's check of ``required_columns``."""
        for column in alternatives:
            if row.get(column) is not None:
                return column
        raise FieldError(alternatives[0], f"missing required column for task '{self.name}' "
                                          f"(needs {' or '.join(alternatives)})")

    def extra_checks(self, example: Example, completion: str) -> dict[str, bool]:
        """Further verdicts on a completion beside ``verify`` (the evaluation reports the mean of each key as
        ``accuracy_<key>``); none by default."""
        return {}

    @abstractmethod
    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        """Build one example from a dataset row; raise ``FieldError(field, message)`` on a bad field."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The answer a completion gives, in canonical form, or None when it gives none. Read it from the answer
        part only (``caopd.method.protocol.split_thinking``): a thinking block is the model's scratchpad."""

    @abstractmethod
    def is_correct(self, example: Example, answer: str | None) -> bool:
        """Whether an extracted answer is correct for this example."""

    def verify(self, example: Example, completion: str) -> bool:
        return self.is_correct(example, self.extract_answer(completion))

    def examples_from_rows(self, rows: Iterable[Mapping[str, Any]], source: str = "<rows>") -> list[Example]:
        """Validate rows and build examples; errors name the source, the row (0-based) and the field."""
        examples: list[Example] = []
        seen: dict[str, int] = {}
        for index, row in enumerate(rows):
            missing = [c for c in self.required_columns if c not in row or row[c] is None]
            if missing:
                raise CaopdInputError(
                    f"missing required column for task '{self.name}' (needs {', '.join(self.required_columns)})",
                    file=source, row=index, field=missing[0])
            try:
                example = self.example_from_row(row, index)
            except FieldError as err:
                raise CaopdInputError(err.message, file=source, row=index, field=err.field) from None
            if example.id in seen:
                raise CaopdInputError(f"duplicate id {example.id!r} (first seen in row {seen[example.id]})",
                                      file=source, row=index, field="id")
            seen[example.id] = index
            examples.append(example)
        if not examples:
            raise CaopdInputError(f"dataset is empty: task '{self.name}' needs at least one row", file=source)
        return examples


class FieldError(ValueError):
    """Raised by ``Task.example_from_row`` for a bad field; turned into a CaopdInputError with file and row."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def row_id(row: Mapping[str, Any], index: int) -> str:
    """A row's id: its ``id`` column when present, else its position."""
    value = row.get("id")
    return str(index) if value is None else str(value)


def prompt_texts(prompt: Any) -> list[str]:
    """The texts of a prompt: the string itself, or every chat message's content."""
    if isinstance(prompt, str):
        return [prompt]
    return [str(message.get("content") or "") for message in prompt]


def append_after_blank_line(content: str, line: str) -> str:
    """``line`` after ``content``, separated by one blank line (only the newlines that are missing are added)."""
    if not content:
        return line
    trailing_newlines = len(content) - len(content.rstrip("\n"))
    return content + "\n" * max(0, 2 - trailing_newlines) + line


def append_to_last_user_message(prompt: Any, line: str) -> Any:
    """A copy of ``prompt`` with ``line`` appended after a blank line: to the string, or to the last user message
    of a chat prompt (the other messages are kept as they are)."""
    if isinstance(prompt, str):
        return append_after_blank_line(prompt, line)
    messages = [dict(message) for message in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = append_after_blank_line(message["content"], line)
            return messages
    raise ValueError("a chat prompt needs a user message to carry the confidence instruction")


def demonstration_with_confidence(text: str) -> str:
    """A gold response in the response protocol: unchanged when it states a confidence, else with
    ``Confidence: 1.00`` on a last line of its own (the official code appends ``\\nConfidence: 1.00``)."""
    return text if parse_confidence(text) is not None else replace_confidence(text, 1.0)


def require_str(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise FieldError(column, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise FieldError(column, "is empty")
    return value


_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator that makes a task available by name (CLI ``--task NAME``, pipeline parameters)."""
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str, **options: Any) -> Task:
    if name not in _REGISTRY:
        raise CaopdInputError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}", field="task")
    return _REGISTRY[name](**options)


def task_names() -> list[str]:
    return sorted(_REGISTRY)
