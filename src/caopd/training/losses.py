"""Per-token divergences between the student's and the teacher's next-token distributions.

Conventions follow GKD / TRL's ``generalized_jsd_loss``: ``forward_kl`` = KL(teacher ‖ student)
(mode-covering), ``reverse_kl`` = KL(student ‖ teacher) (mode-seeking), ``jsd`` = generalized JSD with
mixing weight ``beta`` (beta → 0 behaves like forward KL, beta → 1 like reverse KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from caopd.method.types import Divergence


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence = "forward_kl",
                     beta: float = 0.5, top_k: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Divergence per position: logits ``[..., V]`` → ``[...]``.

    With ``top_k``, both distributions are restricted to the teacher's k most likely tokens and
    renormalised there (the teacher's tail is dropped, as in SDFT's ``distillation_topk``).
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float().detach()
    # x / 1 is x: at the default a division would only copy both models' [tokens × V] logits and add their backward
    if temperature != 1.0:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    if top_k is not None and top_k < teacher_logits.shape[-1]:
        index = teacher_logits.topk(top_k, dim=-1).indices
        student_logits, teacher_logits = student_logits.gather(-1, index), teacher_logits.gather(-1, index)
    return _divergence(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), divergence, beta)


def sparse_token_divergence(student_logits: torch.Tensor, teacher_index: torch.Tensor,
                            teacher_logprobs: torch.Tensor, divergence: Divergence = "forward_kl",
                            beta: float = 0.5) -> torch.Tensor:
    """The top-k divergence when only the teacher's top-k tokens ``[..., k]`` and their log-probabilities are known
    (a teacher behind a server): the same value as ``token_divergence(..., top_k=k)`` on its full logits."""
    student = student_logits.float().gather(-1, teacher_index)
    return _divergence(F.log_softmax(student, dim=-1), F.log_softmax(teacher_logprobs.float().detach(), dim=-1),
                       divergence, beta)


def _divergence(s_log: torch.Tensor, t_log: torch.Tensor, divergence: Divergence, beta: float) -> torch.Tensor:
    if divergence == "forward_kl":
        return _kl(t_log, s_log)
    if divergence == "reverse_kl":
        return _kl(s_log, t_log)
    if divergence == "jsd":
        if not 0.0 < beta < 1.0:
            return _kl(t_log, s_log) if beta == 0.0 else _kl(s_log, t_log)
        mixture = torch.logsumexp(torch.stack([s_log + math.log(1 - beta), t_log + math.log(beta)]), dim=0)
        return beta * _kl(t_log, mixture) + (1 - beta) * _kl(s_log, mixture)
    raise ValueError(f"unknown divergence {divergence!r}")


def token_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position towards fixed target token ids (the decoupled variant's confidence term)."""
    flat = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    return flat.view(targets.shape)


# A chunk's per-token terms, already weighted and normalised: ``term(logits, rows)`` → a 1-D tensor of the chunk's
# contributions to each reported part of the loss (e.g. [divergence, confidence cross-entropy]); the loss is their sum.
ChunkTerm = Callable[[torch.Tensor, slice], torch.Tensor]


class _ChunkedHeadLoss(torch.autograd.Function):
    """The sum over chunks of ``term(head(states[rows]), rows)``, with its gradients taken chunk by chunk in the
    forward (as Liger Kernel's fused linear losses do): a chunk's logits and their graph are freed before the next
    chunk's are made, and the backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                term: ChunkTerm, chunk_tokens: int, n_parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        needs = ctx.needs_input_grad[:3]
        grad_states = torch.zeros_like(states) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if needs[2] else None
        parts = torch.zeros(n_parts, dtype=torch.float32, device=states.device)
        for start in range(0, states.shape[0], chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, states.shape[0]))
            with torch.enable_grad():
                # a view of the detached states: autocast caches the bf16 cast of a leaf that is not a view until
                # its context ends, which would keep every chunk (and the micro-batch's states) for the whole step
                hidden = states.detach()[rows].requires_grad_(needs[0])
                # the head's own parameters, not detached copies: under autocast their bf16 casts are cached for the
                # step as the head's forward would cache them, not made anew (and kept by the cache) per micro-batch
                logits = hidden if weight is None else F.linear(hidden, weight, bias)
                chunk_parts = term(logits, rows)
                if chunk_parts.shape != (n_parts,):
                    raise ValueError(f"a loss term returned shape {tuple(chunk_parts.shape)}, not ({n_parts},)")
                leaves = [(leaf, grad) for leaf, grad in ((hidden, grad_states), (weight, grad_weight),
                                                          (bias, grad_bias)) if grad is not None]
                if leaves and chunk_parts.requires_grad:
                    grads = torch.autograd.grad(chunk_parts.sum(), [leaf for leaf, _ in leaves], allow_unused=True)
                    for (leaf, into), grad in zip(leaves, grads):
                        if grad is not None:
                            (into[rows] if leaf is hidden else into).add_(grad)
            parts += chunk_parts.detach().float()
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.mark_non_differentiable(parts)
        return parts.sum(), parts

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_parts: torch.Tensor) -> tuple[Any, ...]:
        grads = ctx.saved_tensors
        if not torch.equal(grad_total, torch.ones_like(grad_total)):  # the loss is used as it is, almost always
            grads = [None if grad is None else grad * grad_total.to(grad.dtype) for grad in grads]
        return (*grads, None, None, None)


def chunked_head_loss(states: torch.Tensor, head: torch.nn.Linear | None, term: ChunkTerm, chunk_tokens: int,
                      n_parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-token loss over ``states [tokens, hidden]`` (or logits, when ``head`` is None) computed
    ``chunk_tokens`` tokens at a time, so a chunk's logits over the vocabulary — and the divergence's temporaries —
    are all of them that exist at once: ``(loss, parts)``, the loss in the autograd graph (its backward reaches
    ``states`` and the head's weight and bias) and its parts, detached.

    ``term(logits, rows)`` sees the logits of tokens ``rows`` and returns their weighted contributions to each of
    ``n_parts`` parts. The values and gradients are those of the whole batch's logits at once, up to the order of
    float sums across chunks (with one chunk, the very same operations)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    weight, bias = (None, None) if head is None else (head.weight, head.bias)
    return _ChunkedHeadLoss.apply(states, weight, bias, term, chunk_tokens, n_parts)
