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
    """A verifiable task. Subclasses set ``name`` and ``required_columns`` and implement three methods."""

    name: ClassVar[str]
    required_columns: ClassVar[tuple[str, ...]]

    @abstractmethod
    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        """Build one example from a dataset row; raise ``ValueError(field, message)`` on a bad field."""

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The answer a completion gives, in canonical form, or None when it gives none."""

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
