"""Per-token divergences between the student's and the teacher's next-token distributions.

Conventions follow GKD / TRL's ``generalized_jsd_loss``: ``forward_kl`` = KL(teacher ‖ student)
(mode-covering), ``reverse_kl`` = KL(student ‖ teacher) (mode-seeking), ``jsd`` = generalized JSD with
mixing weight ``beta`` (beta → 0 behaves like forward KL, beta → 1 like reverse KL).
"""

from __future__ import annotations

import math

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
    student_logits = student_logits.float() / temperature
    teacher_logits = teacher_logits.float().detach() / temperature
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
