"""Pieces every stage shares: scoring completions, fitting prompts into the context, stage summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caopd.errors import CaopdInputError
from caopd.method.protocol import parse_confidence
from caopd.method.templates import render_prompt
from caopd.models.loading import encode_text
from caopd.rollout.base import Completion
from caopd.tasks.base import Example, Task


def score_completions(task: Task, examples: Sequence[Example], outputs: Sequence[Sequence[Completion]]
                      ) -> list[dict[str, Any]]:
    """One row per completion: what it answered, whether that verifies, and the confidence it states."""
    rows = []
    for example, group in zip(examples, outputs):
        for sample, completion in enumerate(group):
            answer = task.extract_answer(completion.text)
            rows.append({"prompt_id": example.id, "sample": sample, "completion": completion.text,
                         "answer": answer, "correct": task.is_correct(example, answer),
                         "confidence": parse_confidence(completion.text), "finished": completion.finished})
    return rows


def context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


def fit_to_context(examples: Sequence[Example], tokenizer: Any, max_length: int, max_new_tokens: int,
                   source: str) -> tuple[list[Example], list[str]]:
    """Examples whose prompt leaves room for ``max_new_tokens``, and the ids of those skipped.

    A prompt that does not fit is skipped and reported (counted in the stage summary), not truncated:
    a cut question would be scored as if it were the real one.
    """
    kept, skipped = [], []
    for example in examples:
        n = len(encode_text(tokenizer, render_prompt(tokenizer, example.prompt)))
        (kept if n + max_new_tokens <= max_length else skipped).append(example)
    if not kept:
        raise CaopdInputError(f"no prompt fits the model's context of {max_length} tokens with room for "
                              f"{max_new_tokens} new tokens", file=source, field="prompt")
    return kept, [e.id for e in skipped]
