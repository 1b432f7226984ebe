"""The training loop, one for every method (OPD, CaOPD and the RLCR baseline), written for the method rather than
wrapped around TRL.

Each step: sample K rollouts per prompt from the live student, verify them and estimate P from the step's own group
(or take the offline estimate); the method's objective (caopd.training.objectives) then builds the groups it trains
on and takes its loss and backward. For OPD and CaOPD that is the target edits, the teacher scoring the (edited)
completions under its privileged context, and a per-token divergence on the student's own samples; for RLCR, each
sample's calibration reward and a policy-gradient step. Checkpoints hold everything needed to resume bit-for-bit:
weights, optimizer, RNG state, step (the data order, the sampling seed and the learning rate of every step are
functions of the config, the number of training prompts and the step).

The run's length is ``steps``, or ``epochs`` over the training prompts (``total_steps``); the learning rate warms up
over ``warmup_steps`` or ``warmup_ratio`` of the run, then stays constant or decays along transformers' cosine
(``learning_rate``). Student prompts longer than ``max_prompt_tokens`` are left-truncated once, up front: the
rollouts are sampled from exactly the ids the loss sees, and every step's record counts the prompts it cut.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from caopd.config.sampling import SamplingConfig
from caopd.config.training import TrainConfig, total_steps, warmup_steps
from caopd.errors import TrainingStopped
from caopd.method.protocol import parse_confidence
from caopd.method.targets import empirical_confidence
from caopd.method.templates import render_prompt
from caopd.method.types import Thinking
from caopd.models.compat import check_prompt_sharing
from caopd.models.distributed import World, full_tensor, gathered, reshard
from caopd.models.loading import encode_text
from caopd.models.precision import compute_precision, model_device_type
from caopd.rollout.base import RolloutEngine
from caopd.tasks.base import Task
from caopd.training.objectives import (
    PromptGroup,
    StepContext,
    TrainItem,
    VerifiedRollouts,
    left_truncate,
    objective_for,
)
from caopd.training.teachers import Teacher


# The step's data types live with the objectives; they are importable from here as before.
def prompt_order(n_items: int, seed: int, step: int, batch: int) -> list[int]:
    """Indices of the prompts for ``step``: epochs of seeded permutations, a pure function of the step."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_items)
        perm = list(range(n_items))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset: offset + batch - len(out)])
    return out


def learning_rate(cfg: TrainConfig, step: int, n_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) in a run of ``n_steps``.

    constant: a linear warm-up, lr·(step + 1)/warmup (the first step already moves), then ``lr``.
    cosine: transformers' ``get_cosine_schedule_with_warmup`` as the Hugging Face Trainer (and so the official run)
    applies it, lr·λ(step) with λ(s) = s/warmup during the warm-up, then ½(1 + cos(π·progress)) over the steps after
    it; so with a warm-up the first step's rate is 0, and the last one's is just above 0.
    """
    warmup = warmup_steps(cfg, n_steps)
    if cfg.lr_schedule == "constant":
        return cfg.lr * min(1.0, (step + 1) / max(1, warmup))
    if step < warmup:
        return cfg.lr * (float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, n_steps - warmup))
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))  # transformers' λ, op for op


def step_sampling(cfg: TrainConfig, step: int, rank: int) -> SamplingConfig:
    """The training rollouts' sampling at ``step`` on process ``rank``: K samples per prompt, and a seed of the step
    and the process — each process draws its own noise (its prompts differ: their draws must not be correlated), and
    rank 0's seed is a one-process run's."""
    return cfg.sampling.model_copy(update={"n": cfg.k, "seed": cfg.seed * 100_003 + step + rank * 1_000_000_007})


class Trainer:
    def __init__(self, cfg: TrainConfig, student: torch.nn.Module, tokenizer: Any, template: str,
                 task: Task, items: list[TrainItem], engine: RolloutEngine | None, teacher: Teacher,
                 out_dir: Path, progress: bool = True, world: World | None = None,
                 thinking: Thinking = "template") -> None:
        """``thinking``: the chat template's thinking switch for every prompt it renders (the student's, and the
        teacher's in the objective), as the stage's ``PromptConfig`` says. ``engine`` may be set after construction
        (before ``run``): a vLLM engine is sized for the prompts as the trainer encodes and cuts them."""
        self.cfg, self.student, self.tokenizer, self.template = cfg, student, tokenizer, template
        self.task, self.items, self.engine, self.teacher = task, items, engine, teacher
        self.out_dir, self.progress, self.world, self.thinking = out_dir, progress, world or World(), thinking
        if cfg.prompts_per_step < self.world.size:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be at least the number of processes "
                             f"({self.world.size}): each process trains on its share of a step's prompts")
        if self.world.fsdp and cfg.prompts_per_step % self.world.size:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of "
                             f"processes ({self.world.size}) under FSDP: every process trains on an equal share")
        # What trains: every weight, or only the LoRA adapters (PEFT froze the base). Fused: one kernel for all
        # parameters, not a loop of small ops per tensor (7.5 → 1.7 ms, tiny model).
        for model in (student, teacher.model):  # before any sampling: the loss scores each prompt once per group
            if model is not None:
                check_prompt_sharing(model.config)
        self.trained = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        # Rendered and encoded once: the whole prompt, and the ids the rollouts are sampled from and trained on.
        self.full_prompt_ids = {it.example.id: encode_text(tokenizer, render_prompt(tokenizer, it.example.prompt,
                                                                                    thinking)) for it in items}
        self.prompt_ids = {pid: left_truncate(ids, cfg.max_prompt_tokens) for pid, ids in self.full_prompt_ids.items()}
        self.objective = objective_for(cfg)  # what the method makes of each step's rollouts
        self.log: list[dict[str, Any]] = []

    @property
    def n_steps(self) -> int:
        """The run's optimizer steps (``total_steps`` of the config and the training prompts)."""
        return total_steps(self.cfg, len(self.items))

    def prompt_truncation(self) -> dict[str, Any]:
        """How the training prompts fare against ``max_prompt_tokens``: how many distinct ones are cut, and the
        longest (in tokens, before any cut)."""
        lengths = [len(ids) for ids in self.full_prompt_ids.values()]
        return {"max_prompt_tokens": self.cfg.max_prompt_tokens, "training_prompts": len(lengths),
                "truncated_prompts": sum(self.is_cut(pid) for pid in self.full_prompt_ids),
                "longest_prompt_tokens": max(lengths, default=0)}

    def is_cut(self, prompt_id: str) -> bool:
        return len(self.prompt_ids[prompt_id]) < len(self.full_prompt_ids[prompt_id])

    # --- one step -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return learning_rate(self.cfg, step, self.n_steps)

    def compute_precision(self) -> contextlib.AbstractContextManager:
        """The step's forwards (sampling from the student, the loss's) in the configured precision."""
        return compute_precision(self.cfg.precision, model_device_type(self.student))

    def context(self) -> StepContext:
        return StepContext(self.student, self.teacher, self.tokenizer, self.template, self.world, self.thinking)

    def build_groups(self, batch: list[TrainItem], rollouts) -> tuple[list[PromptGroup], dict[str, float]]:
        """The prompt groups to train on (the objective's), and the sums behind the step's statistics (summed
        across processes before they become rates)."""
        cfg, context = self.cfg, self.context()
        groups: list[PromptGroup] = []
        correct_all, stated, ps = [], [], []
        for item, rollout_group in zip(batch, rollouts):
            correct = [self.task.verify(item.example, c.text) for c in rollout_group]
            confidences = [parse_confidence(c.text) for c in rollout_group]
            correct_all += correct
            stated += confidences
            p = empirical_confidence(correct) if cfg.p_source == "online" or item.p_offline is None \
                else item.p_offline
            ps.append(p)
            pid = item.example.id
            cut = self.full_prompt_ids[pid][:len(self.full_prompt_ids[pid]) - len(self.prompt_ids[pid])]
            groups.append(self.objective.group(VerifiedRollouts(item, self.prompt_ids[pid], rollout_group,
                                                                correct, confidences, p, cut), context))
        sums = {"samples": len(stated), "correct": sum(correct_all), "prompts": len(ps), "p": sum(ps),
                "stated": sum(s or 0.0 for s in stated), "missing": sum(s is None for s in stated),
                "truncated": sum(self.is_cut(it.example.id) for it in batch), **self.objective.sums(groups)}
        return groups, sums

    def step_statistics(self, sums: dict[str, float]) -> dict[str, float]:
        total = dict(zip(sums, self.world.sum(list(sums.values()))))
        stats = {"sample_accuracy": total["correct"] / total["samples"], "mean_p": total["p"] / total["prompts"],
                 "mean_stated_confidence": total["stated"] / total["samples"],
                 "missing_rate": total["missing"] / total["samples"],
                 "truncated_prompts": round(total["truncated"])}  # student prompts of the step cut to fit
        return {**stats, **self.objective.statistics(total)}

    def loss_and_backward(self, groups: list[PromptGroup]) -> dict[str, float]:
        """The objective's loss over the step's groups, backpropagated: the one loss hook of every method."""
        return self.objective.loss_and_backward(groups, self.context())

    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        batch = [self.items[i] for i in prompt_order(len(self.items), cfg.seed, step, cfg.prompts_per_step)]
        batch = self.world.shard(batch)  # under torchrun, this process's share of the step's prompts
        sampling = step_sampling(cfg, step, self.world.rank)
        # Sharded (FSDP): sampling from the live student gathers it whole once (processes stop sampling at different
        # lengths, so no forward there may wait on the others); the loss's forwards and backwards gather one layer at
        # a time. An engine with weights of its own (colocated vLLM) needs no gather.
        gather = self.world.fsdp and not self.engine.holds_own_weights
        # the live student samples in the run's precision; an engine with weights of its own has its dtype
        precision = contextlib.nullcontext() if self.engine.holds_own_weights else self.compute_precision()
        with gathered(self.student) if gather else contextlib.nullcontext(), precision:
            self.student.eval()
            # the very ids the loss sees: a truncated prompt is sampled from as truncated
            rollouts = self.engine.generate([self.prompt_ids[it.example.id] for it in batch], sampling)
        groups, sums = self.build_groups(batch, rollouts)
        stats = self.step_statistics(sums)
        self.student.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.compute_precision():
            losses = self.loss_and_backward(groups)
        if self.world.fsdp:  # the gradients are reduce-scattered already
            reshard(self.student, self.teacher.model)
        else:
            self.world.sum_gradients(self.trained)  # then every process clips and steps alike
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trained, cfg.max_grad_norm))
        if not (math.isfinite(losses["loss"]) and torch.isfinite(grad_norm)):
            # Before the optimizer step: the weights and the checkpoints on disk are still the last good ones.
            raise TrainingStopped(f"non-finite loss ({losses['loss']}) or gradient norm ({float(grad_norm)}) at step "
                                  f"{step + 1}; stopped with the last good checkpoint kept in "
                                  f"{self.out_dir / 'checkpoints'} (lower the lr or check the data)", exit_code=3)
        self.optimizer.step()
        self.engine.sync_weights(self.student)  # an engine with its own copy samples the next step from these
        self.teacher.after_step(self.student)
        return {"step": step + 1, **losses, **stats, "grad_norm": float(grad_norm), "lr": self.lr_at(step)}

    # --- the loop, checkpoints and resume --------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        from caopd.training.checkpoints import (
            checkpoint_root,
            latest_checkpoint,
            load_checkpoint,
            save_checkpoint,
        )

        n_steps = self.n_steps  # resolved once: steps, or epochs over the training prompts
        start_step = 0
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is not None:
            start_step, self.log = load_checkpoint(ckpt, self.student, self.optimizer, self.teacher, self.world)
            self.engine.sync_weights(self.student)
        t0, seqs = time.perf_counter(), 0
        bar = tqdm(range(start_step, n_steps), initial=start_step, total=n_steps,
                   desc=f"train {self.cfg.method} ({n_steps} steps)", unit="step",
                   disable=not (self.progress and self.world.is_main))
        with sigterm_flag() as preempted:
            for step in bar:
                record = self.train_step(step)
                seqs += self.cfg.prompts_per_step * self.cfg.k
                record["samples_per_s"] = seqs / (time.perf_counter() - t0)
                self.log.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['sample_accuracy']:.2f}",
                                conf=f"{record['mean_stated_confidence']:.2f}",
                                samples_s=f"{record['samples_per_s']:.0f}")
                # Read once (a signal between two reads must not skip the save), and agreed by every process.
                stop = self.world.sum([float(preempted.is_set())])[0] > 0
                path = checkpoint_root(self.out_dir)
                if (step + 1) % self.cfg.save_every == 0 or step + 1 == n_steps or stop:
                    # Every process writes its part (its shards under FSDP, its RNG state); rank 0 completes it.
                    path = save_checkpoint(self.out_dir, step + 1, self.student, self.tokenizer, self.optimizer,
                                           self.teacher, self.log, self.cfg.keep_checkpoints, self.world)
                    if stop:
                        self.world.barrier()  # nobody exits (and gets the others killed) before the save is done
                if stop and step + 1 < n_steps:
                    raise TrainingStopped(f"SIGTERM: saved {path} after step {step + 1} of {n_steps}; run the "
                                          "same command again to resume from it", exit_code=143)
        return self.log


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """While training, SIGTERM (a preempted pod's notice) sets a flag instead of killing the process, so the step
    in flight finishes and is checkpointed; the previous handler comes back afterwards. Signals reach only the
    main thread, so elsewhere the flag just stays clear."""
    flag, previous = threading.Event(), None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
