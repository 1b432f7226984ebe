"""Training configuration, validated up front with messages that say what to change; and the run's length and
warm-up as resolved from it (pure functions, torch-free: the trainer and the launchers share them)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caopd.config.sampling import SamplingConfig, check_draws
from caopd.method.types import (
    TEACHERLESS_METHODS,
    Divergence,
    Finetune,
    Precision,
    TeacherKind,
    TeacherMode,
    TrainMethod,
    Variant,
)

# Every linear layer of a decoder block (attention and MLP), as PEFT spells "all of them" for any architecture.
ALL_LINEAR = "all-linear"


class LoRAConfig(BaseModel):
    """The student's low-rank adapters (``finetune='lora'``), as PEFT's ``LoraConfig`` takes them."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: float = Field(32.0, gt=0.0, description="adapter scaling numerator: the update is (alpha / r)·B·A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input (0 keeps on-policy "
                           "scoring deterministic)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ALL_LINEAR, description="the linear layers that get adapters: 'all-linear' (every linear layer of the "
        "decoder blocks, PEFT's spelling; the LM head is left out) or module names such as [q_proj, v_proj]")

    @model_validator(mode="after")
    def _some_modules(self) -> LoRAConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the linear layers to adapt, or 'all-linear'")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: TrainMethod = Field(
        "caopd", description="opd: plain on-policy distillation (baseline); caopd: calibration-aware targets; "
        "rlcr: the RL baseline, policy gradient on correctness − (confidence − correctness)², no teacher")
    teacher_context: TeacherMode = Field(
        "demo", description="privileged context: the gold demonstration, or a verified correct rollout (SDPO)")
    divergence: Divergence = Field("forward_kl", description="per-token divergence: forward_kl = KL(teacher‖student), "
                                   "reverse_kl = KL(student‖teacher), jsd = generalized JSD with `beta`")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixing weight (0 → forward KL, 1 → reverse KL)")
    top_k: int | None = Field(None, ge=1, description="restrict the divergence to the teacher's top-k tokens; "
                              "None = full vocabulary")
    variant: Variant = Field(
        "faithful", description="faithful: one divergence over the whole edited completion (the paper); "
        "decoupled: divergence on the answer, cross-entropy towards the replaced confidence tokens")
    confidence_weight: float = Field(1.0, gt=0.0, description="weight of the decoupled confidence cross-entropy")
    teacher: TeacherKind = Field("frozen", description="frozen base | student (live) | ema of the student | "
                                 "separate model with the same tokenizer | server: a model with the same tokenizer "
                                 "behind a vLLM server on its own GPUs (scores through top_k log-probabilities)")
    teacher_model: str | None = Field(None, description="the separate teacher: local folder or hub id")
    teacher_server: str | None = Field(None, description="the server teacher's URL, e.g. http://teacher:8000 "
                                       "(`vllm serve MODEL --max-logprobs K`, K >= top_k)")
    ema_rate: float = Field(0.01, gt=0.0, le=1.0, description="EMA teacher update rate per step (paper: 0.01)")
    p_source: Literal["online", "offline"] = Field(
        "online", description="online: P from each step's own K rollouts (paper default); offline: stage-1 estimates")
    steps: int = Field(150, ge=1, description="optimizer steps (leave at its default when `epochs` is set)")
    epochs: float | None = Field(
        None, gt=0.0, description="train for this many passes over the training prompts instead of `steps`: "
        "ceil(epochs × prompts / prompts_per_step) optimizer steps (official recipe: 1); None = `steps`")
    prompts_per_step: int = Field(16, ge=1, description="prompts per step (B); each gets K rollouts")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    lr: float = Field(1.5e-4, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear learning-rate warm-up steps (leave at its default when "
                              "`warmup_ratio` is set)")
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="warm up over ceil(ratio × the run's optimizer steps) instead of "
        "`warmup_steps`, as transformers does (official recipe: 0.1); None = `warmup_steps`")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after the warm-up: constant = the learning rate held at `lr` (the warm-up ramps "
        "(step + 1) / warmup); cosine = transformers' get_cosine_schedule_with_warmup, the rate at optimizer step s "
        "(from 0) is lr·s/warmup during the warm-up, then decays to 0 along a half cosine over the remaining steps "
        "(official recipe)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    skip_first_tokens: int = Field(0, ge=0, description="completion tokens at the start left out of the loss "
                                   "(official recipe: 3)")
    loss_normalization: Literal["token", "sequence"] = Field(
        "token", description="how the step's per-token loss terms are averaged: token = the mean over every counted "
        "token of the step (across processes); sequence = each completion's mean over its counted tokens, then the "
        "mean over the step's completions that have any (across processes) (official recipe)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="student prompts longer than this keep their last max_prompt_tokens tokens (left "
        "truncation, official recipe: 1024); the teacher's prompt loses the same tokens and keeps its whole "
        "privileged context; cut prompts are counted in the train log and summary. None = never cut")
    micro_batch_size: int = Field(64, ge=1, description="completions per forward/backward, which bounds the "
                                  "activations' memory: whole prompt groups are packed up to it, and a prompt whose "
                                  "K completions exceed it is split (its prompt recomputed for each part)")
    loss_chunk_tokens: int = Field(
        512, ge=1, description="completion tokens whose logits the loss computes at a time: the student's and the "
        "teacher's logits over the vocabulary exist for one chunk only (the LM head's gradient is taken chunk by "
        "chunk), so the loss's memory is ~7 x loss_chunk_tokens x vocabulary x 4 bytes whatever the micro-batch "
        "holds; a larger chunk runs fewer, larger matmuls, with the same numbers")
    precision: Precision = Field(
        "fp32", description="fp32: weights, compute and optimizer state in float32; bf16: the student computes in "
        "bfloat16 over float32 master weights, gradient reductions and AdamW state (FSDP2's MixedPrecisionPolicy "
        "under FSDP, autocast otherwise), and the teacher's frozen weights (and the vLLM copy) are bfloat16")
    activation_checkpointing: bool = Field(
        True, description="recompute each decoder layer's activations in the backward instead of keeping them: "
        "a micro-batch's activations shrink to one layer's plus each layer's input, for ~1/3 more compute, with "
        "the same numbers (TRL's trainers default to it too); a model whose attention it does not cover "
        "(sliding-window, chunked) trains without it, as the log says; false = keep every activation")
    finetune: Finetune = Field(
        "full", description="full: every weight trains; lora: PEFT LoRA adapters on a frozen base (in bf16 with "
        "precision=bf16), the frozen teacher is the base with the adapters off (no second copy), an EMA teacher "
        "averages the adapters, and the trained model is saved merged")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="the adapters (finetune='lora')")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=8, max_new_tokens=24),
                                     description="rollout sampling during training (n is set from k)")
    seed: int = Field(0, description="data order, sampling and initialisation seed")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.teacher == "separate" and not self.teacher_model:
            raise ValueError("teacher='separate' needs teacher_model (a folder or hub id with the same tokenizer)")
        if self.teacher != "separate" and self.teacher_model:
            raise ValueError("teacher_model is only used with teacher='separate'")
        if self.teacher == "server" and not (self.teacher_server and self.top_k):
            raise ValueError("teacher='server' needs teacher_server (its URL) and top_k (the server returns the "
                             "teacher's top-k log-probabilities, not its whole distribution)")
        if self.teacher != "server" and self.teacher_server:
            raise ValueError("teacher_server is only used with teacher='server'")
        if self.method in TEACHERLESS_METHODS and (self.teacher != "frozen" or self.variant != "faithful"
                                                   or self.top_k):
            raise ValueError(f"method={self.method!r} has no teacher and no divergence: leave teacher, variant and "
                             "top_k at their defaults")
        check_draws(self.sampling.temperature, self.k, "train.sampling.temperature (with train.k rollouts per prompt)")
        if self.lora != LoRAConfig() and self.finetune != "lora":
            raise ValueError("lora settings are only used with finetune='lora'")
        if self.variant == "decoupled" and self.method != "caopd":
            raise ValueError("variant='decoupled' trains towards the replaced confidence: it needs method='caopd'")
        # The length and warm-up are each given one way: a changed default beside its replacement is a contradiction.
        if self.epochs is not None and self.steps != _default("steps"):
            raise ValueError(f"epochs={self.epochs} sets the number of optimizer steps: leave steps at its default "
                             f"({_default('steps')}), or set steps and leave epochs unset")
        if self.warmup_ratio is not None and self.warmup_steps != _default("warmup_steps"):
            raise ValueError(f"warmup_ratio={self.warmup_ratio} sets the warm-up: leave warmup_steps at its default "
                             f"({_default('warmup_steps')}), or set warmup_steps and leave warmup_ratio unset")
        return self


def _default(name: str) -> object:
    return TrainConfig.model_fields[name].default


def total_steps(cfg: TrainConfig, n_prompts: int) -> int:
    """The run's optimizer steps: ``cfg.steps``, or with ``epochs`` ceil(epochs × n_prompts / prompts_per_step) (a
    last partial batch is a step of its own, its prompts drawn from the next pass)."""
    if cfg.epochs is None:
        return cfg.steps
    if n_prompts < 1:
        raise ValueError("epochs needs at least one training prompt")
    # round() first: 0.1 × 30 is 3.0000000000000004 in floats, which must not become 4 steps
    return max(1, math.ceil(round(cfg.epochs * n_prompts / cfg.prompts_per_step, 9)))


def warmup_steps(cfg: TrainConfig, n_steps: int) -> int:
    """The warm-up length of a run of ``n_steps``: ceil(warmup_ratio × n_steps) exactly as transformers'
    TrainingArguments resolves it (float product included: 0.1 × 30 steps warms up over 4, as the official run
    would), else ``cfg.warmup_steps``."""
    if cfg.warmup_ratio is None:
        return cfg.warmup_steps
    return math.ceil(n_steps * cfg.warmup_ratio)
