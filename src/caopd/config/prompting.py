"""How prompts reach the model (torch-free): the chat template's thinking switch and the confidence instruction.

Every stage that renders prompts or builds a task's examples carries one ``PromptConfig``, so rollouts, training
targets, training and evaluation all see the same prompt.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from caopd.method.types import Thinking


class PromptConfig(BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid", frozen=True)

    thinking: Thinking = Field(
        "template", description="the chat template's thinking switch (Qwen3's enable_thinking): template = the "
        "template's own default (Qwen3 thinks), on = enable_thinking=True, off = enable_thinking=False; models "
        "without a chat template take the prompt as raw text")
    ask_confidence: bool = Field(
        True, description="add the task's confidence instruction to every prompt that does not already ask for a "
        "confidence (tool use: the official line before 'Begin!'; mcq: the equivalent line after the question)")
    confidence_instruction: str = Field(
        "", description="the confidence instruction's text; empty = the task's own (the official tool-use line)")

    def task_options(self) -> dict[str, Any]:
        """The options a task is built with (``caopd.tasks.get_task(name, **options)``)."""
        return {"ask_confidence": self.ask_confidence, "confidence_instruction": self.confidence_instruction or None}


def prompt_field() -> Any:
    """The ``prompt`` field of every config that renders prompts (the stages and ``caopd run``)."""
    return Field(default_factory=PromptConfig, description="how prompts reach the model: the chat template's "
                 "thinking switch and the confidence instruction")
