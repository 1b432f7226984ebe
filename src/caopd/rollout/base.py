"""The rollout-engine interface: prompts in, K completions per prompt out, whatever the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caopd.config.sampling import SamplingConfig

# A prompt is a text (already rendered, e.g. through a chat template; the engine encodes it) or the token ids
# themselves, used as they are (a truncated prompt: the samples must come from exactly the ids the loss sees).
Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One sample. ``token_ids`` are the tokens drawn, ending with the stop token when ``finished`` (as vLLM returns
    them: a training sequence is exactly what was sampled, its one EOS included); ``text`` is their decoding without
    special tokens; ``finished``: it stopped on a stop token (an EOS id) rather than at ``max_new_tokens``."""

    text: str
    token_ids: list[int]
    finished: bool


class RolloutEngine(ABC):
    """Generates completions for prompts: texts (already rendered, e.g. through a chat template) or token ids.

    An engine is released with ``shutdown`` (or by leaving a ``with`` block): one that holds resources of its own
    (vLLM: its GPU memory and process groups) gives them back then, not whenever garbage collection comes."""

    # Whether the engine samples from weights of its own (colocated vLLM) rather than from the live model: then the
    # trainer need not gather a sharded model to sample, and loads the trained weights into it (``sync_weights``).
    holds_own_weights = False

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        """``sampling.n`` completions for each prompt, in prompt order. A string is encoded as a rendered prompt
        (``caopd.models.loading.encode_text``); a sequence of ints is the prompt's token ids, used as is."""

    def sync_weights(self, model: Any) -> None:  # noqa: B027 -- a no-op default, not an abstract method
        """Take the trained weights after an optimizer step (and after a resume). Engines that sample from the live
        model need nothing; an engine holding its own copy (colocated vLLM) loads them."""

    def shutdown(self) -> None:  # noqa: B027 -- a no-op default, not an abstract method
        """Release what the engine holds, now (idempotent). An engine sampling from a model it does not own holds
        nothing."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
