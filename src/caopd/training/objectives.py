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
from caopd.method.protocol import confidence_start
from caopd.method.targets import student_target, teacher_context
from caopd.method.templates import render_prompt, teacher_prompt
from caopd.method.types import Method, Thinking
from caopd.models.distributed import World
from caopd.models.heads import completion_states, project
from caopd.models.loading import encode_text
from caopd.rollout.base import Completion
from caopd.tasks.base import Example
from caopd.training.losses import (
    chunked_head_loss,
    sparse_token_divergence,
    token_cross_entropy,
    token_divergence,
)
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
    prompt_ids: list[int]  # the student's prompt, as the rollouts were sampled from it (left-truncated if too long)
    completions: Sequence[Completion]
    correct: list[bool]
    confidences: list[float | None]
    p: float
    cut_prompt_ids: list[int] = field(default_factory=list)  # the student's first tokens that truncation dropped


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
    """What an objective works with: the trainer's models, tokenizer, teacher template and processes, and the chat
    template's thinking switch every prompt is rendered with."""

    student: torch.nn.Module
    teacher: Teacher
    tokenizer: Any
    template: str
    world: World
    thinking: Thinking = "template"


def left_truncate(ids: list[int], max_tokens: int | None) -> list[int]:
    """The last ``max_tokens`` tokens of a prompt (all of it when it fits, or when ``max_tokens`` is None): the
    official trainer's left truncation, which keeps the end of the prompt (the question and the chat template's
    opening of the answer) and drops whole tokens from its start."""
    if max_tokens is None or len(ids) <= max_tokens:
        return list(ids)
    return list(ids[len(ids) - max_tokens:])


def cut_teacher_prompt(teacher_ids: list[int], student_ids: list[int], n_cut: int) -> list[int]:
    """The teacher's prompt when the student's (``student_ids``, whole) lost its first ``n_cut`` tokens to
    ``max_prompt_tokens``: the teacher loses the same tokens and keeps all of its privileged context, so its prompt
    is at most max_prompt_tokens + the privileged part's length, and it conditions on exactly the part of the
    question the student still sees, plus what only the teacher knows.

    Where the student's tokens sit in the teacher's prompt depends on the template: the paper's puts the question
    first (so the student's prompt opens the teacher's, through the end of the question), the compact one puts the
    reference first (the student's prompt closes the teacher's). When neither holds (the cut reaches past the shared
    part), the teacher drops its first ``n_cut`` tokens.

    Why not the official rule: the official trainer (SalesforceAIResearch/CaOPD ``distil_trainer.py``, like TRL's
    experimental SDFT trainer) truncates the teacher's prompt to the same ``max_prompt_length`` as the student's,
    from the left under vLLM. A demonstration is often hundreds of tokens, so the teacher's prompt is then cut far
    more often than the student's, and silently, losing the chat template's opening, the system prompt and the start
    of the question (the tool documentation) that the student still sees: the teacher's distribution would then
    condition on less of the question than the student's it is compared with. TRL's experimental privileged-
    information GKD trainer gives the privileged part a budget of its own on top of the prompt's, as this does
    (without a limit here: the privileged part is the task's demonstration or a rollout, whose lengths the data and
    ``max_new_tokens`` set).
    """
    if n_cut <= 0:
        return list(teacher_ids)
    offset = len(teacher_ids) - len(student_ids)
    if teacher_ids[:n_cut] != student_ids[:n_cut] and offset >= 0 and teacher_ids[offset:] == student_ids:
        return teacher_ids[:offset] + teacher_ids[offset + n_cut:]
    return list(teacher_ids[n_cut:])


def completion_tokens(tokenizer: Any, text: str, sampled_ids: list[int] | None) -> tuple[list[int], list[bool]]:
    """Token ids of a training completion and which of them belong to the Confidence line: every token that ends
    after ``confidence_start`` (the answer part's first confidence statement, the one CaOPD's edit writes), and the
    EOS.

    An unedited (OPD) completion keeps exactly the ids the student sampled, its stop token included when it stopped
    on one (``caopd.rollout.base.Completion``): one EOS, never two. An edited (CaOPD) one is re-tokenised and always
    ends with EOS, since it ends with its Confidence line.
    """
    eos = tokenizer.eos_token_id
    if sampled_ids is not None:
        return list(sampled_ids), [False] * len(sampled_ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = confidence_start(text)
    mask = [cut is not None and end > cut for _, end in enc["offset_mapping"]]
    return enc["input_ids"] + [eos], mask + [True]


def split_group(group: PromptGroup, max_sequences: int) -> list[PromptGroup]:
    """A prompt group as parts of at most ``max_sequences`` completions each, in order (the group itself when it
    fits); each part keeps the prompts, so each computes them once for its own completions."""
    n = len(group.completion_ids)
    if n <= max_sequences:
        return [group]
    def part(values: list, start: int) -> list:
        return values[start: start + max_sequences]
    return [PromptGroup(group.prompt_ids, group.teacher_prompt_ids, part(group.completion_ids, start),
                        part(group.confidence_masks, start), part(group.advantages, start),
                        part(group.rewards, start)) for start in range(0, n, max_sequences)]


def micro_batches(groups: Sequence[PromptGroup], max_sequences: int) -> list[list[PromptGroup]]:
    """Micro-batches of at most ``max_sequences`` completions: whole prompt groups packed in order, and a group with
    more completions than that split into parts (``split_group``), so a step's memory is bounded by the setting
    whatever K is. Every process of a step gets the same number of micro-batches (equal shares of equal groups)."""
    batches: list[list[PromptGroup]] = []
    size = 0
    for group in (part for whole in groups for part in split_group(whole, max_sequences)):
        if batches and size + len(group.completion_ids) <= max_sequences:
            batches[-1].append(group)
            size += len(group.completion_ids)
        else:
            batches.append([group])
            size = len(group.completion_ids)
    return batches


def step_tokens(groups: Sequence[PromptGroup], skip_first_tokens: int, world: World) -> int:
    """The tokens the step's loss counts, across every process's groups."""
    local = sum(max(0, len(ids) - skip_first_tokens) for g in groups for ids in g.completion_ids)
    return max(1, round(world.sum([local])[0]))


def step_sequences(groups: Sequence[PromptGroup], skip_first_tokens: int, world: World) -> int:
    """The completions with at least one counted token, across every process's groups: what a sequence-normalised
    loss averages over. One too short to have a counted token adds nothing and is not counted (the official trainer
    counts it in its micro-batch's mean, as a zero: with skip_first_tokens=3 and completions of up to 1024 tokens,
    a completion of at most 3 tokens is rare there)."""
    local = sum(len(ids) > skip_first_tokens for g in groups for ids in g.completion_ids)
    return max(1, round(world.sum([local])[0]))


def step_normalizer(groups: Sequence[PromptGroup], cfg: TrainConfig, world: World) -> int:
    """What the step's weighted sum of per-token terms is divided by: its counted tokens (token normalisation) or
    its completions that have any (sequence normalisation)."""
    if cfg.loss_normalization == "sequence":
        return step_sequences(groups, cfg.skip_first_tokens, world)
    return step_tokens(groups, cfg.skip_first_tokens, world)


def token_weights(completion_ids: Sequence[Sequence[int]], skip_first_tokens: int, normalization: str,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Each token's weight (the completions flattened) in the step's loss sum, before ``step_normalizer``:

    - token: whether it is counted (a bool mask: the first ``skip_first_tokens`` of a completion are not);
    - sequence: 1 / (its completion's counted tokens) when counted, else 0, so that each completion's weighted terms
      sum to its own token mean (the official per-sequence mean; a completion without counted tokens adds 0).
    """
    counted = [[j >= skip_first_tokens for j in range(len(ids))] for ids in completion_ids]
    if normalization == "token":
        return torch.tensor([c for row in counted for c in row], dtype=torch.bool, device=device)
    return torch.tensor([c / max(1, sum(row)) for row in counted for c in row], dtype=torch.float32, device=device)


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
        """The step's loss over ``groups`` (this process's share; normalised as ``cfg.loss_normalization`` says,
        over the whole step across processes), backpropagated in micro-batches (``micro_batches``) to bound
        memory; what to log of it (``loss`` and ``trained_tokens`` at least), summed across processes."""

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
            tokenizer, teacher_prompt(item.example.prompt, ctx, context.template), context.thinking))
        if rollouts.cut_prompt_ids:
            t_prompt = cut_teacher_prompt(t_prompt, rollouts.cut_prompt_ids + rollouts.prompt_ids,
                                          len(rollouts.cut_prompt_ids))
        group = PromptGroup(rollouts.prompt_ids, t_prompt, [], [])
        for c in rollouts.completions:
            ids, conf_mask = completion_tokens(tokenizer, student_target(c.text, p, cfg.method),
                                               c.token_ids if cfg.method == "opd" else None)
            group.completion_ids.append(ids)
            group.confidence_masks.append(conf_mask)
        return group

    def loss_and_backward(self, groups: list[PromptGroup], context: StepContext) -> dict[str, float]:
        """Each prompt (student's and teacher's) is computed once for its K completions, and the loss is taken
        ``cfg.loss_chunk_tokens`` completion tokens at a time from both models' final hidden states (their logits
        exist for one chunk at once). The decoupled variant's confidence cross-entropy is normalised as the
        divergence is: per token, or within each completion."""
        cfg, world = self.cfg, context.world
        n_tokens = step_tokens(groups, cfg.skip_first_tokens, world)
        normalizer = step_normalizer(groups, cfg, world)
        totals = torch.zeros(2)
        for part in micro_batches(groups, cfg.micro_batch_size):
            loss, parts = self.micro_batch_loss(part, context, normalizer)
            loss.backward()
            totals += parts.cpu()
        total_div, total_ce = world.sum(totals.tolist())
        sequences = {"trained_sequences": normalizer} if cfg.loss_normalization == "sequence" else {}
        return {"loss": total_div + total_ce, "divergence": total_div, "confidence_ce": total_ce,
                "trained_tokens": n_tokens, **sequences}

    def micro_batch_loss(self, part: list[PromptGroup], context: StepContext,
                         normalizer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's share of the step's loss and its parts ``[divergence, confidence cross-entropy]``."""
        cfg, pad, fsdp, teacher = self.cfg, context.tokenizer.pad_token_id, context.world.fsdp, context.teacher
        completions = [g.completion_ids for g in part]
        s_states, s_head = completion_states(context.student, [g.prompt_ids for g in part], completions, pad, fsdp)
        flat = [ids for g in part for ids in g.completion_ids]
        device = s_states.device
        targets = torch.tensor([t for ids in flat for t in ids], device=device)
        conf = torch.tensor([m for g in part for mask in g.confidence_masks for m in mask], dtype=torch.bool,
                            device=device)
        # token normalisation: the counted-token mask itself, so its sums are the very ones it always took
        weight = token_weights(flat, cfg.skip_first_tokens, cfg.loss_normalization, device)
        if teacher.server is not None:  # the teacher's top-k, scored on its own GPUs
            index, t_logprobs = teacher.server.top_logprobs([g.teacher_prompt_ids for g in part], completions)
            index, t_logprobs = index.to(device), t_logprobs.to(device)

            def divergence(s_logits: torch.Tensor, rows: slice) -> torch.Tensor:
                return sparse_token_divergence(s_logits, index[rows], t_logprobs[rows], cfg.divergence, cfg.beta)
        else:
            with torch.no_grad(), teacher.scoring() as scorer:
                t_states, t_head = completion_states(scorer, [g.teacher_prompt_ids for g in part], completions, pad,
                                                     fsdp)

            def divergence(s_logits: torch.Tensor, rows: slice) -> torch.Tensor:
                with torch.no_grad():
                    t_logits = project(t_states[rows], t_head)
                return token_divergence(s_logits, t_logits, cfg.divergence, cfg.beta, cfg.top_k)

        def term(s_logits: torch.Tensor, rows: slice) -> torch.Tensor:
            div, w = divergence(s_logits, rows), weight[rows]
            if cfg.variant == "decoupled":
                div_part = (div * (w * ~conf[rows])).sum()
                ce_part = (token_cross_entropy(s_logits, targets[rows]) * (w * conf[rows])).sum() \
                    * cfg.confidence_weight
            else:
                div_part, ce_part = (div * w).sum(), torch.zeros((), device=device)
            return torch.stack([div_part, ce_part]) / normalizer

        return chunked_head_loss(s_states, s_head, term, cfg.loss_chunk_tokens, n_parts=2)


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
        ids = [completion_tokens(context.tokenizer, c.text, c.token_ids)[0] for c in rollouts.completions]
        return PromptGroup(rollouts.prompt_ids, [], ids, [[False] * len(i) for i in ids], group_advantages(rewards),
                           rewards)

    def sums(self, groups: list[PromptGroup]) -> dict[str, float]:
        return {"reward": sum(r for g in groups for r in g.rewards)}

    def statistics(self, totals: dict[str, float]) -> dict[str, float]:
        return {"mean_reward": totals["reward"] / totals["samples"]}

    def loss_and_backward(self, groups: list[PromptGroup], context: StepContext) -> dict[str, float]:
        """−advantage · log π over the step: the token mean, or the mean of each completion's token means."""
        cfg, world = self.cfg, context.world
        n_tokens = step_tokens(groups, cfg.skip_first_tokens, world)
        normalizer = step_normalizer(groups, cfg, world)
        total = 0.0
        for part in micro_batches(groups, cfg.micro_batch_size):
            loss, _ = self.micro_batch_loss(part, context, normalizer)
            loss.backward()
            total += loss.item()
        [total] = world.sum([total])
        sequences = {"trained_sequences": normalizer} if cfg.loss_normalization == "sequence" else {}
        return {"loss": total, "policy_loss": total, "trained_tokens": n_tokens, **sequences}

    def micro_batch_loss(self, part: list[PromptGroup], context: StepContext,
                         normalizer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's share of the step's policy loss, ``cfg.loss_chunk_tokens`` tokens at a time."""
        cfg = self.cfg
        states, head = completion_states(context.student, [g.prompt_ids for g in part],
                                         [g.completion_ids for g in part], context.tokenizer.pad_token_id,
                                         context.world.fsdp)
        flat = [(ids, a) for g in part for ids, a in zip(g.completion_ids, g.advantages)]
        device = states.device
        targets = torch.tensor([t for ids, _ in flat for t in ids], device=device)
        advantages = torch.tensor([a for ids, a in flat for _ in ids], device=device)
        weight = token_weights([ids for ids, _ in flat], cfg.skip_first_tokens, cfg.loss_normalization, device)

        def term(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            terms = policy_gradient_terms(logits, targets[rows], advantages[rows])
            return ((terms * weight[rows]).sum() / normalizer)[None]

        return chunked_head_loss(states, head, term, cfg.loss_chunk_tokens)


# Every training method (``TrainConfig.method``) and its objective.
OBJECTIVES: dict[str, type[Objective]] = {"opd": DistillationObjective, "caopd": DistillationObjective,
                                          "rlcr": RLCRObjective}


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective of ``cfg.method``, with its settings."""
    return OBJECTIVES[cfg.method](cfg)
