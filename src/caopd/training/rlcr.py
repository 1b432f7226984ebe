"""RLCR, the reinforcement-learning baseline for calibration (Damani et al. 2025, "Beyond Binary Rewards").

The policy is rewarded for being right and for stating a confidence that matches it:
reward = correctness − (confidence − correctness)², the correctness reward plus a Brier penalty. Each prompt's K
samples form a group; a sample's advantage is its reward against the group's (GRPO), and the loss is the
on-policy policy gradient −advantage · log π(token), averaged over the step's tokens. One optimizer step per batch
of fresh samples keeps the importance ratio at 1, so PPO-style clipping would never act and is left out.

These are its pure functions; the training objective built on them is ``caopd.training.objectives.RLCRObjective``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# A group whose rewards all agree carries no signal; a floor on the spread keeps near-ties from exploding.
_STD_FLOOR = 1e-4


def rlcr_reward(correct: bool, confidence: float | None) -> float:
    """1[correct] − (q − 1[correct])²; a missing confidence counts as 0.0, as everywhere in the project."""
    c = 1.0 if correct else 0.0
    q = 0.0 if confidence is None else min(1.0, max(0.0, float(confidence)))
    return c - (q - c) ** 2


def group_advantages(rewards: Sequence[float], scale: bool = True) -> list[float]:
    """GRPO advantages of one prompt's samples: reward minus the group mean, divided by the group's standard
    deviation when ``scale`` (population std, floored); all zero when the group's rewards are equal."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    std = (sum(x * x for x in centred) / n) ** 0.5
    if std < _STD_FLOOR:
        return [0.0] * n
    return [x / std for x in centred]


def policy_gradient_terms(logits: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Per-token −advantage · log π(target): logits ``[N, V]``, targets and advantages ``[N]``."""
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -advantages * log_probs
