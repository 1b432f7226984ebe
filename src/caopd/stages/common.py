"""Pieces every stage shares: scoring completions, fitting prompts into the context, stage summaries.

This module imports no model code at load time: scoring logged completions (``caopd score``) needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from caopd.config.engines import GIB
from caopd.errors import CaopdInputError
from caopd.method.protocol import parse_confidence
from caopd.method.templates import render_prompt
from caopd.method.types import Thinking
from caopd.rollout.base import Completion
from caopd.tasks.base import Example, Task

# The fields every prediction row has; any other field of a row is one of the task's extra checks.
PREDICTION_FIELDS: tuple[str, ...] = ("prompt_id", "sample", "completion", "answer", "correct", "confidence",
                                      "finished")


def extra_checks(task: Task, example: Example, completion: str) -> dict[str, bool]:
    """The task's checks beyond ``correct`` (tool use: ``all_calls``), as booleans; a check may not reuse the name of
    a prediction field, since it would overwrite it in the row."""
    checks = {key: bool(value) for key, value in task.extra_checks(example, completion).items()}
    clash = sorted(set(checks) & {*PREDICTION_FIELDS, "kind"})
    if clash:
        raise ValueError(f"task {task.name!r}: extra check names {clash} clash with prediction fields")
    return checks


def prediction_row(task: Task, example: Example, text: str, sample: int = 0,
                   finished: bool | None = None) -> dict[str, Any]:
    """One scored completion: what it answered, whether that verifies, the confidence it states and the task's extra
    checks. ``finished`` (ended with EOS rather than at the token limit) is None when it is not known, as for
    completions a served model logged."""
    answer = task.extract_answer(text)
    return {"prompt_id": example.id, "sample": sample, "completion": text, "answer": answer,
            "correct": task.is_correct(example, answer), "confidence": parse_confidence(text), "finished": finished,
            **extra_checks(task, example, text)}


def score_completions(task: Task, examples: Sequence[Example], outputs: Sequence[Sequence[Completion]]
                      ) -> list[dict[str, Any]]:
    """One row per completion (``prediction_row``), in prompt order, then sample order."""
    return [prediction_row(task, example, completion.text, sample, completion.finished)
            for example, group in zip(examples, outputs) for sample, completion in enumerate(group)]


def check_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The extra checks that prediction rows carry (every field beyond ``PREDICTION_FIELDS`` and ``kind``), sorted."""
    return sorted({key for row in rows for key in row} - {*PREDICTION_FIELDS, "kind"})


def context_length(model: Any) -> int:
    from caopd.models.loading import config_context_length  # loads torch; only stages that run a model come here

    return config_context_length(model.config)


def fit_to_context(examples: Sequence[Example], tokenizer: Any, max_length: int, max_new_tokens: int,
                   source: str, thinking: Thinking = "template") -> tuple[list[Example], list[str]]:
    """Examples whose prompt, rendered as the model will see it (``thinking`` is the chat template's switch), leaves
    room for ``max_new_tokens``, and the ids of those skipped.

    A prompt that does not fit is skipped and reported (counted in the stage summary), not truncated:
    a cut question would be scored as if it were the real one.
    """
    from caopd.models.loading import encode_text  # loads torch; only stages that run a model come here

    kept, skipped = [], []
    for example in examples:
        n = len(encode_text(tokenizer, render_prompt(tokenizer, example.prompt, thinking)))
        (kept if n + max_new_tokens <= max_length else skipped).append(example)
    if not kept:
        raise CaopdInputError(f"no prompt fits the model's context of {max_length} tokens with room for "
                              f"{max_new_tokens} new tokens", file=source, field="prompt")
    return kept, [e.id for e in skipped]


def gpu_memory_bytes(gib: float) -> int | None:
    """The card a stage's start-up fit check (``caopd plan``'s) plans against: ``gib`` when given, else this
    process's GPU's total, else None (no GPU: nothing to check)."""
    if gib:
        return int(gib * GIB)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])  # (free, total) of this process's device
    return None
