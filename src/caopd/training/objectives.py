"""Training objectives: what a training method makes of a step's rollouts, behind one interface.

The trainer's loop is the same for every method: sample K rollouts per prompt from the live student, verify them,
estimate P, then hand each prompt's verified rollouts to the method's ``Objective``, which says

- ``needs_teacher``: whether a teacher scores the samples (the training stage makes none otherwise);
- ``targets_method``: the target replacement its training records are made with (``TargetsConfig.method``);
- ``group``: the prompt group it trains on, from one prompt's verified rollouts;
- ``sums`` and ``statistics``: what it logs of its own beside the common step statistics;
- ``loss_and_backward``: the step's loss over its groups, backpropagated micro-batch by micro-batch.

``DistillationObjective`` is OPD and CaOPD (faithful or decoupled): the target edits, the teacher under its privileged
context, a per-token divergence on the student's own samples. ``RLCRObjective`` is the RL baseline: the calibration
reward of each sample, GRPO advantages and a policy-gradient step, no teacher (its pure functions are in
``caopd.training.rlcr``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from caopd.config.training import TrainConfig
from caopd.method.protocol import CONFIDENCE_KEY
from caopd.method.targets import student_target, teacher_context
from caopd.method.templates import render_prompt, teacher_prompt
from caopd.method.types import Method
from caopd.models.batching import completion_logits
from caopd.models.distributed import World
from caopd.models.loading import encode_text
from caopd.rollout.base import Completion
from caopd.tasks.base import Example
from caopd.training.losses import sparse_token_divergence, token_cross_entropy, token_divergence
from caopd.training.rlcr import group_advantages, policy_gradient_terms, rlcr_reward
from caopd.training.teachers import Teacher


# --- a step's data ------------------------------------------------------------------------------------------------
@dataclass
class TrainItem:
    """One training prompt: the example, its offline P and a verified correct rollout if one exists."""

    example: Example
    p_offline: float | None
    correct_rollout: str | None


@dataclass
class VerifiedRollouts:
    """One prompt's K rollouts of a step, verified: which are correct, the confidence each states (None: missing)
    and P (the step's own estimate, or the offline one)."""

    item: TrainItem
    prompt_ids: list[int]  # the student's prompt
    completions: Sequence[Completion]
    correct: list[bool]
    confidences: list[float | None]
    p: float


@dataclass
class PromptGroup:
    """The K training completions of one prompt, with the student's and the teacher's prompt ids: each prompt is
    computed once per group in the loss forwards."""

    prompt_ids: list[int]
    teacher_prompt_ids: list[int]  # empty for RLCR, which has no teacher
    completion_ids: list[list[int]]
    confidence_masks: list[list[bool]]  # completion tokens of the Confidence line (decoupled variant)
    advantages: list[float] = field(default_factory=list)  # RLCR: one per completion
    rewards: list[float] = field(default_factory=list)  # RLCR: one per completion


@dataclass
class StepContext:
    """What an objective works with: the trainer's models, tokenizer, teacher template and processes."""

    student: torch.nn.Module
    teacher: Teacher
    tokenizer: Any
    template: str
    world: World


def completion_tokens(tokenizer: Any, text: str, sampled_ids: list[int] | None, finished: bool,
                      ) -> tuple[list[int], list[bool]]:
    """Token ids of a training completion (+ EOS) and which of them belong to the Confidence line.

    An unedited (OPD) completion keeps exactly the ids the student sampled; an edited (CaOPD) one is
    re-tokenised and always ends with EOS, since it ends with its Confidence line.
    """
    eos = tokenizer.eos_token_id
    if sampled_ids is not None:
        ids = list(sampled_ids) + ([eos] if finished else [])
        return ids, [False] * len(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = text.rfind(CONFIDENCE_KEY)
    mask = [cut >= 0 and end > cut for _, end in enc["offset_mapping"]]
    return enc["input_ids"] + [eos], mask + [True]


def micro_batches(groups: Sequence[PromptGroup], max_sequences: int) -> list[list[PromptGroup]]:
    """Whole prompt groups per micro-batch, up to ``max_sequences`` completions (at least one group)."""
    batches: list[list[PromptGroup]] = []
    size = 0
    for group in groups:
        if batches and size + len(group.completion_ids) <= max_sequences:
            batches[-1].append(group)
            size += len(group.completion_ids)
        else:
            batches.append([group])
            size = len(group.completion_ids)
    return batches


def step_tokens(groups: Sequence[PromptGroup], skip_first_tokens: int, world: World) -> int:
    """The tokens the step's loss averages over, across every process's groups."""
    local = sum(max(0, len(ids) - skip_first_tokens) for g in groups for ids in g.completion_ids)
    return max(1, round(world.sum([local])[0]))


# --- the interface ------------------------------------------------------------------------------------------------
class Objective(ABC):
    """What one training method makes of a step's verified rollouts (see the module docstring)."""

    needs_teacher: ClassVar[bool]

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @property
    @abstractmethod
    def targets_method(self) -> Method:
        """The target replacement (``TargetsConfig.method``) the training records of this method are made with."""

    @abstractmethod
    def group(self, rollouts: VerifiedRollouts, context: StepContext) -> PromptGroup:
        """The prompt group to train on, from one prompt's verified rollouts."""

    @abstractmethod
    def loss_and_backward(self, groups: list[PromptGroup], context: StepContext) -> dict[str, float]:
        """The step's token-mean loss over ``groups`` (this process's share), backpropagated in micro-batches of
        whole prompt groups to bound memory; what to log of it (``loss`` and ``trained_tokens`` at least), summed
        across processes."""

    def sums(self, groups: list[PromptGroup]) -> dict[str, float]:
        """This process's sums behind the objective's own step statistics (summed across processes, then passed to
        ``statistics``)."""
        return {}

    def statistics(self, totals: dict[str, float]) -> dict[str, float]:
        """The objective's own step statistics, from the sums of every process (``samples`` among them)."""
        return {}


class DistillationObjective(Objective):
    """OPD and CaOPD: the teacher scores the student's (edited) completions under its privileged context, and the
    student minimises a per-token divergence towards it; the decoupled variant trains the Confidence line by
    cross-entropy towards the replaced confidence instead."""

    needs_teacher = True

    @property
    def targets_method(self) -> Method:
        return self.cfg.method

    def group(self, rollouts: VerifiedRollouts, context: StepContext) -> PromptGroup:
        cfg, tokenizer, item, p = self.cfg, context.tokenizer, rollouts.item, rollouts.p
        # A correct rollout of this very step is the freshest verified solution; else the offline one.
        fresh = next((c.text for c, ok in zip(rollouts.completions, rollouts.correct) if ok), None)
        ctx = teacher_context(cfg.teacher_context, item.example.demonstration, fresh or item.correct_rollout,
                              p, cfg.method)
        t_prompt = encode_text(tokenizer, render_prompt(
            tokenizer, teacher_prompt(item.example.prompt, ctx, context.template)))
        group = PromptGroup(rollouts.prompt_ids, t_prompt, [], [])
        for c in rollouts.completions:
            ids, conf_mask = completion_tokens(tokenizer, student_target(c.text, p, cfg.method),
                                               c.token_ids if cfg.method == "opd" else None, c.finished)
            group.completion_ids.append(ids)
            group.confidence_masks.append(conf_mask)
        return group

    def loss_and_backward(self, groups: list[PromptGroup], context: StepContext) -> dict[str, float]:
        """Each prompt (student's and teacher's) is computed once for its K completions."""
        cfg, pad, world, teacher = self.cfg, context.tokenizer.pad_token_id, context.world, context.teacher
        n_tokens = step_tokens(groups, cfg.skip_first_tokens, world)
        total_div, total_ce = 0.0, 0.0
        for part in micro_batches(groups, cfg.micro_batch_size):
            completions = [g.completion_ids for g in part]
            s_logits = completion_logits(context.student, [g.prompt_ids for g in part], completions, pad, world.fsdp)
            flat = [ids for g in part for ids in g.completion_ids]
            device = s_logits.device
            targets = torch.tensor([t for ids in flat for t in ids], device=device)
            conf = torch.tensor([m for g in part for mask in g.confidence_masks for m in mask], dtype=torch.bool,
                                device=device)
            counted = torch.tensor([j >= cfg.skip_first_tokens for ids in flat for j in range(len(ids))],
                                   dtype=torch.bool, device=device)
            if teacher.server is not None:  # the teacher's top-k, scored on its own GPUs
                index, t_logprobs = teacher.server.top_logprobs([g.teacher_prompt_ids for g in part], completions)
                div = sparse_token_divergence(s_logits, index.to(device), t_logprobs.to(device), cfg.divergence,
                                              cfg.beta)
            else:
                with torch.no_grad():
                    t_logits = completion_logits(teacher.model, [g.teacher_prompt_ids for g in part],
                                                 completions, pad, world.fsdp)
                div = token_divergence(s_logits, t_logits, cfg.divergence, cfg.beta, cfg.top_k)
            if cfg.variant == "decoupled":
                div_part = (div * (counted & ~conf)).sum()
                ce_part = (token_cross_entropy(s_logits, targets) * (counted & conf)).sum() * cfg.confidence_weight
            else:
                div_part, ce_part = (div * counted).sum(), torch.zeros(())
            loss = (div_part + ce_part) / n_tokens
            loss.backward()
            total_div += div_part.item() / n_tokens
            total_ce += ce_part.item() / n_tokens
        total_div, total_ce = world.sum([total_div, total_ce])
        return {"loss": total_div + total_ce, "divergence": total_div, "confidence_ce": total_ce,
                "trained_tokens": n_tokens}


class RLCRObjective(Objective):
    """RLCR: each sample's reward is correctness − Brier of its stated confidence; a policy-gradient step on its
    GRPO advantage, on the completion exactly as sampled. No teacher, and no target edits: its records are plain
    OPD ones, of which it reads only the prompts and answers."""

    needs_teacher = False

    @property
    def targets_method(self) -> Method:
        return "opd"

    def group(self, rollouts: VerifiedRollouts, context: StepContext) -> PromptGroup:
        rewards = [rlcr_reward(ok, q) for ok, q in zip(rollouts.correct, rollouts.confidences)]
        ids = [completion_tokens(context.tokenizer, c.text, c.token_ids, c.finished)[0] for c in rollouts.completions]
        return PromptGroup(rollouts.prompt_ids, [], ids, [[False] * len(i) for i in ids], group_advantages(rewards),
                           rewards)

    def sums(self, groups: list[PromptGroup]) -> dict[str, float]:
        return {"reward": sum(r for g in groups for r in g.rewards)}

    def statistics(self, totals: dict[str, float]) -> dict[str, float]:
        return {"mean_reward": totals["reward"] / totals["samples"]}

    def loss_and_backward(self, groups: list[PromptGroup], context: StepContext) -> dict[str, float]:
        """Token-mean −advantage · log π over the step."""
        cfg, pad, world = self.cfg, context.tokenizer.pad_token_id, context.world
        n_tokens = step_tokens(groups, cfg.skip_first_tokens, world)
        total = 0.0
        for part in micro_batches(groups, cfg.micro_batch_size):
            logits = completion_logits(context.student, [g.prompt_ids for g in part],
                                       [g.completion_ids for g in part], pad, world.fsdp)
            flat = [(ids, a) for g in part for ids, a in zip(g.completion_ids, g.advantages)]
            device = logits.device
            targets = torch.tensor([t for ids, _ in flat for t in ids], device=device)
            advantages = torch.tensor([a for ids, a in flat for _ in ids], device=device)
            counted = torch.tensor([j >= cfg.skip_first_tokens for ids, _ in flat for j in range(len(ids))],
                                   dtype=torch.bool, device=device)
            loss = (policy_gradient_terms(logits, targets, advantages) * counted).sum() / n_tokens
            loss.backward()
            total += loss.item()
        [total] = world.sum([total])
        return {"loss": total, "policy_loss": total, "trained_tokens": n_tokens}


# Every training method (``TrainConfig.method``) and its objective.
OBJECTIVES: dict[str, type[Objective]] = {"opd": DistillationObjective, "caopd": DistillationObjective,
                                          "rlcr": RLCRObjective}


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective of ``cfg.method``, with its settings."""
    return OBJECTIVES[cfg.method](cfg)
