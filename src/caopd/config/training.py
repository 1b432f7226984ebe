"""Training configuration, validated up front with messages that say what to change."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caopd.config.sampling import SamplingConfig
from caopd.method.types import TEACHERLESS_METHODS, Divergence, TeacherKind, TeacherMode, TrainMethod, Variant


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
    steps: int = Field(150, ge=1, description="optimizer steps")
    prompts_per_step: int = Field(16, ge=1, description="prompts per step (B); each gets K rollouts")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    lr: float = Field(1.5e-4, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear learning-rate warm-up steps")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    skip_first_tokens: int = Field(0, ge=0, description="completion tokens at the start left out of the loss")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward (bounds memory)")
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
        if self.variant == "decoupled" and self.method != "caopd":
            raise ValueError("variant='decoupled' trains towards the replaced confidence: it needs method='caopd'")
        return self
