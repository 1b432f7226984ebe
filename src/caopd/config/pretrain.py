"""Settings of the deterministic pre-training that regenerates the packaged tiny model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caopd.tasks.arithmetic import KINDS


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(128, ge=1, description="sequences per step")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="peak AdamW learning rate (cosine decay to 10%)")
    warmup_steps: int = Field(60, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    seed: int = Field(0, description="seed of the data stream and the initialisation")
    # Mid-difficulty kinds get more weight: they are where per-prompt success spreads out.
    kind_weights: dict[str, float] = Field(default_factory=lambda: {
        "add_1x1": 0.5, "add_2x1": 1.0, "add_2x2": 1.5, "mul_1x1": 1.0, "mul_2x1": 2.0, "mul_2x2": 1.5},
        description="arithmetic kind -> sampling weight")
    student_share: float = Field(0.55, ge=0.0, le=1.0, description="share of student-format pairs "
                                 "(question -> answer + an uninformative confidence)")
    note_share: float = Field(0.25, ge=0.0, le=1.0, description="share of teacher-format pairs with the "
                              "empirical-confidence Note; the rest are teacher format without it")

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        unknown = sorted(set(self.kind_weights) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {list(KINDS)}")
        if self.student_share + self.note_share > 1.0:
            raise ValueError("student_share + note_share must not exceed 1")
        return self

