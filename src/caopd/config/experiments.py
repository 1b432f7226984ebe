"""Settings of the experiments built on the stages: baselines side by side, calibration forgetting, routing."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from caopd.config.stages import DEFAULT_KIND_WEIGHTS, DataConfig
from caopd.config.training import TrainConfig
from caopd.method.types import EngineName, Method
from caopd.tasks.arithmetic import KINDS

ArmName = Literal["opd_demo", "opd_solution", "caopd_demo", "caopd_solution", "rlcr"]


# arm -> (training method, teacher context of its targets, what it stands for in the paper's table)
ARMS: dict[str, tuple[str, str, str]] = {
    "opd_demo": ("opd", "demo", "OPD, demonstration teacher (SDFT-style)"),
    "opd_solution": ("opd", "correct_solution", "OPD, correct-solution teacher (SDPO-style)"),
    "caopd_demo": ("caopd", "demo", "CaOPD, demonstration teacher"),
    "caopd_solution": ("caopd", "correct_solution", "CaOPD, correct-solution teacher"),
    "rlcr": ("rlcr", "demo", "RLCR: policy gradient on correctness − Brier"),
}


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="the base model every arm starts from")
    arms: list[ArmName] = Field(default_factory=lambda: list(ARMS), description="trained arms (the base model is "
                                "always scored): " + ", ".join(ARMS))
    n_train: int = Field(2000, ge=1, description="training prompts (arithmetic)")
    n_eval: int = Field(2000, ge=1, description="held-out prompts, in-domain and per OOD set")
    kind_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
                                           description="arithmetic kind -> sampling weight")
    ood_kinds: list[str] = Field(default_factory=lambda: ["add_2x2", "mul_2x2"],
                                 description="arithmetic kinds kept out of training and scored as the OOD set; empty = "
                                 "in-domain only. Default: the two-by-two-digit level of both operators (trained on "
                                 "operands up to two-by-one digits: length generalization)")
    k: int = Field(8, ge=1, description="rollouts per prompt (K), for P and during training")
    seed: int = Field(0, description="seed of the data, rollouts and training (evaluation uses seed + 1)")
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="training settings shared by every arm (method and teacher context are "
                               "set per arm)")
    bootstrap_resamples: int = Field(1000, ge=0, description="resamples for the 95 % interval of every metric")

    @field_validator("arms")
    @classmethod
    def _some_arms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"at least one arm to train; choose from {list(ARMS)}")
        return [arm for arm in ARMS if arm in value]  # the table's order, duplicates dropped

    @model_validator(mode="after")
    def _valid_data_settings(self) -> CompareConfig:
        try:  # checked here, before any work, by the data stage's own config
            self.data_config()
        except ValidationError as err:
            raise ValueError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def data_config(self) -> DataConfig:
        return DataConfig(n_train=self.n_train, n_eval=self.n_eval, seed=self.seed, kind_weights=self.kind_weights,
                          ood_kinds=self.ood_kinds)



class ContinualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="the base model both arms start from")
    task_a_kinds: list[str] = Field(default_factory=lambda: ["add_1x1", "add_2x1", "add_2x2"],
                                    description="arithmetic kinds of task A (trained first, scored before and after B)")
    task_b_kinds: list[str] = Field(default_factory=lambda: ["mul_1x1", "mul_2x1", "mul_2x2"],
                                    description="arithmetic kinds of task B (trained second)")
    methods: list[Method] = Field(default_factory=lambda: ["opd", "caopd"],
                                                   description="arms, each trained on A then B")
    n_train: int = Field(1000, ge=1, description="training prompts per task")
    n_eval: int = Field(1000, ge=1, description="held-out prompts per task")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    seed: int = Field(0, description="seed of the data, rollouts and training (evaluation uses seed + 1)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100),
                               description="training settings of every run (method is set per arm)")

    @model_validator(mode="after")
    def _disjoint_known_kinds(self) -> ContinualConfig:
        unknown = sorted(set(self.task_a_kinds + self.task_b_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {list(KINDS)}")
        if not self.task_a_kinds or not self.task_b_kinds or set(self.task_a_kinds) & set(self.task_b_kinds):
            raise ValueError("task A and task B need kinds of their own (non-empty, no kind in both)")
        if not self.methods:
            raise ValueError("at least one method to train")
        return self


class ContinualStepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_model: str = Field(..., description="the model trained on task A (a folder), where task B starts")
    data: str = Field(..., description="task B's training prompts")
    task: str = Field("arithmetic", description="task B's verifier")
    train: TrainConfig = Field(..., description="the training settings (the pipeline reuses task A's)")
    engine: EngineName = Field("auto", description="rollout engine of the P estimation on task B")



class RouteConfig(BaseModel):
    """``caopd route``: which small models to route on, the large model, the costs and the accuracy to reach."""

    model_config = ConfigDict(extra="forbid")

    small: dict[str, str] = Field(..., description="name -> predictions JSONL of a small model (e.g. the CaOPD "
                                                   "and the OPD arm), each line with prompt_id, confidence, correct")
    large: str | None = Field(None, description="predictions JSONL of the large model on the same prompts")
    large_accuracy: float | None = Field(None, ge=0.0, le=1.0,
                                         description="the large model's accuracy, when its predictions are not given")
    small_cost: float = Field(1.0, ge=0.0, description="cost of one small-model call")
    large_cost: float = Field(10.0, gt=0.0, description="cost of one large-model call, in the same unit")
    target_accuracy: float = Field(..., ge=0.0, le=1.0, description="the accuracy the cascade must reach")

    @model_validator(mode="after")
    def _one_large_model(self) -> RouteConfig:
        if (self.large is None) == (self.large_accuracy is None):
            raise ValueError("give the large model's predictions (large) or its accuracy (large_accuracy), "
                             "exactly one of them")
        if not self.small:
            raise ValueError("at least one small model's predictions")
        return self



