"""The rollout-engine interface: prompts in, K completions per prompt out, whatever the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from caopd.config.sampling import SamplingConfig


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # ended with EOS rather than at max_new_tokens


class RolloutEngine(ABC):
    """Generates completions for prompt texts (already rendered, e.g. through a chat template)."""

    @abstractmethod
    def generate(self, prompts: list[str], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        """``sampling.n`` completions for each prompt, in prompt order."""

    def sync_weights(self, model: Any) -> None:  # noqa: B027 -- a no-op default, not an abstract method
        """Take the trained weights after an optimizer step (and after a resume). Engines that sample from the live
        model need nothing; an engine holding its own copy (colocated vLLM) loads them."""
