"""``caopd run``: the main job's settings (the pipeline, run through kfp.local)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caopd.config.parameters import train_fields_set_by_the_run
from caopd.config.stages import DEFAULT_KIND_WEIGHTS
from caopd.config.training import TrainConfig
from caopd.method.types import TeacherMode

ARMS = ("base", "opd", "caopd")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="base model")
    seed: int = Field(0, description="seed of the data, the rollouts and the training (evaluation uses seed + 1)")
    n_train: int = Field(2000, ge=1, description="training prompts (arithmetic)")
    n_eval: int = Field(2000, ge=1, description="held-out evaluation prompts (arithmetic); 2000 keeps the "
                        "accuracy standard error near one point")
    kind_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
                                           description="arithmetic kind -> sampling weight of train and eval prompts")
    ood_kinds: list[str] = Field(default_factory=list, description="arithmetic kinds held out of training and scored "
                                 "as an out-of-distribution set beside the in-domain one (e.g. mul_2x2)")
    continual_kinds: list[str] = Field(default_factory=list, description="task B of the calibration-forgetting "
                                       "check: arithmetic kinds kept out of task A; each arm then trains on them from "
                                       "its model and is scored on task A before and after (e.g. mul_2x1 mul_2x2)")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    rollout_shards: int = Field(1, ge=1, description="rollout-estimation shards (one pod each on a cluster)")
    teacher_context: TeacherMode = Field(
        "demo", description="privileged context of the teacher: the gold demonstration or a verified correct rollout")
    train_baseline: bool = Field(True, description="also train plain OPD (the baseline arm)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="shared training settings of both arms")
    max_new_tokens: int = Field(24, ge=1, description="completion length limit")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (rollouts, training, evaluation)")
    cache: bool = Field(False, description="reuse tasks that already ran with the same inputs under this --out "
                        "(kfp.local caching); off by default so that a changed library is never skipped")

    @model_validator(mode="after")
    def _train_leaves_the_run_its_own(self) -> RunConfig:
        # The run sets these TrainConfig fields itself (k, seed, temperature, ... are shared with the rollouts and
        # the evaluation; the method is each arm's): a value given under `train` would be ignored, so say so.
        defaults = TrainConfig()
        for name, source in train_fields_set_by_the_run().items():
            if getattr(self.train, name) != getattr(defaults, name):
                raise ValueError(f"train.{name} is not read by `caopd run`, which sets it from {source}")
        return self
