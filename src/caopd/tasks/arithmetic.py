"""``arithmetic``: the synthetic CPU default — addition and multiplication of several difficulty kinds."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from caopd.method.protocol import format_confidence, strip_confidence
from caopd.tasks.base import (
    Example,
    FieldError,
    Task,
    register_task,
    require_str,
    row_id,
)

# kind -> (operator, digits of the left operand, digits of the right operand); easy to hard.
KINDS: dict[str, tuple[str, int, int]] = {
    "add_1x1": ("+", 1, 1),
    "add_2x1": ("+", 2, 1),
    "add_2x2": ("+", 2, 2),
    "mul_1x1": ("*", 1, 1),
    "mul_2x1": ("*", 2, 1),
    "mul_2x2": ("*", 2, 2),
}


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_problem(rng: random.Random, kind: str) -> tuple[str, str]:
    """A (prompt, answer) pair such as ("12*34=", "408")."""
    op, left_digits, right_digits = KINDS[kind]
    a, b = _operand(rng, left_digits), _operand(rng, right_digits)
    return f"{a}{op}{b}=", str(a + b if op == "+" else a * b)


def generate_rows(n: int, seed: int, kinds: Sequence[str] | None = None,
                  weights: Sequence[float] | None = None, id_prefix: str = "arith") -> list[dict[str, Any]]:
    """``n`` problems, deterministic in ``seed``; kinds drawn with ``weights`` (uniform by default)."""
    kinds = list(kinds or KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown arithmetic kinds {unknown}; known: {', '.join(KINDS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choices(kinds, weights=weights)[0]
        prompt, answer = make_problem(rng, kind)
        rows.append({"id": f"{id_prefix}-{seed}-{i}", "prompt": prompt, "answer": answer, "kind": kind})
    return rows


@register_task
class ArithmeticTask(Task):
    """Columns: ``prompt`` ("12*34="), ``answer`` ("408"); optional ``id`` and ``kind``.

    The answer is the completion's text before its Confidence line, stripped; it must equal the gold
    number exactly.
    """

    name = "arithmetic"
    required_columns = ("prompt", "answer")

    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        prompt = require_str(row, "prompt")
        answer = row["answer"]
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        answer = require_str({"answer": answer}, "answer").strip()
        if not answer.lstrip("-").isdigit():
            raise FieldError("answer", f"expected an integer, got {answer!r}")
        demonstration = f"{answer}\n{format_confidence(1.0)}"
        return Example(id=row_id(row, index), prompt=prompt, answer=answer, demonstration=demonstration,
                       meta={"kind": str(row.get("kind") or "")})

    def extract_answer(self, completion: str) -> str | None:
        lines = strip_confidence(completion).strip().splitlines()
        return lines[0].strip() if lines else None

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer
