"""Scoring that stops before the LM head, so that the loss applies the head to a chunk of tokens at a time.

A micro-batch's logits over the vocabulary are its largest tensors (8 completions × 1,024 tokens × 151,936 × 4 bytes
≈ 5 GB per model), and the loss needs them only token by token. ``completion_states`` runs the model's own forward —
every architecture, adapter, hook and wrapper as it is — with the LM head's forward replaced by the identity, so it
returns the final hidden states where the logits would be; ``caopd.training.losses.chunked_head_loss`` then projects a
chunk of them through the head's weight at a time.

The head is bypassed only where the logits are exactly ``head(final hidden states)``: a plain ``nn.Linear`` with
plain parameters in a model that does not scale or soft-cap its logits afterwards
(``caopd.config.engines.logits_are_head_output``), and never in a sharded (FSDP) model's lockstep scoring. Any other
model returns its logits as before, and the loss runs a chunk at a time over them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from caopd.config.engines import logits_are_head_output
from caopd.models.batching import completion_logits


def plain_output_head(model: Any) -> torch.nn.Linear | None:
    """The model's LM head when its logits are exactly the head applied to the final hidden states; else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not torch.nn.Linear:  # LoRA-wrapped or custom heads compute something else
        return None
    if not all(type(p) is torch.nn.Parameter for p in head.parameters()):  # sharded (FSDP) parameters
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return head if logits_are_head_output(config.to_dict()) else None


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Module) -> Iterator[None]:
    """The head's forward returns its input for the block (an instance attribute shadows the class's forward; one
    already there, such as a hook library's, is put back after)."""
    own = head.__dict__.get("forward")
    head.forward = _identity
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def completion_states(model: Any, prompt_ids: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[Sequence[int]]], pad_id: int, lockstep: bool = False,
                      ) -> tuple[torch.Tensor, torch.nn.Linear | None]:
    """``completion_logits`` without the LM head where the model allows: ``(states, head)``, the final hidden
    states ``[completion tokens, hidden]`` and the head that makes them logits, or the logits themselves and None.
    Each prompt is computed once per group either way."""
    # Sharded (FSDP) models keep their head: between its root's forward and backward FSDP2 leaves the head's
    # parameters gathered as plain ones, so what the parameters look like depends on when they are looked at.
    head = None if lockstep else plain_output_head(model)
    if head is None:
        return completion_logits(model, prompt_ids, completions, pad_id, lockstep), None
    with head_bypassed(head):
        return completion_logits(model, prompt_ids, completions, pad_id, lockstep), head


def project(states: torch.Tensor, head: torch.nn.Linear | None) -> torch.Tensor:
    """Logits of ``states`` from ``completion_states``: through the head, or as they are when they are logits."""
    return states if head is None else torch.nn.functional.linear(states, head.weight, head.bias)
