"""``caopd run``: the main job's settings (the pipeline, run through kfp.local)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caopd.config.parameters import train_fields_set_by_the_run
from caopd.config.presets import get_preset, merge_over_preset, preset_run_values
from caopd.config.prompting import PromptConfig, prompt_field
from caopd.config.sampling import DecodingConfig, check_draws
from caopd.config.stages import DEFAULT_KIND_WEIGHTS
from caopd.config.training import TrainConfig
from caopd.method.types import TeacherMode

ARMS = ("base", "opd", "caopd")


def _decoding(where: str):
    return Field(default_factory=lambda: DecodingConfig(max_new_tokens=24), description=f"decoding of {where}")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("", description="a recipe of the paper: paper-tooluse or paper-science (every value in "
                        "docs/paper-setup.md); values given here win over it; empty = none")
    model: str = Field("tiny", description="base model: 'tiny', 'standin', a local checkpoint folder, a hub id, "
                       "s3://BUCKET/FOLDER or models:/NAME@ALIAS")
    task: str = Field("arithmetic", description="task name (arithmetic, mcq, tooluse, or a registered one)")
    train_source: str = Field("", description="training prompts: a load_from_disk folder, .jsonl or .parquet, local "
                              "or s3://BUCKET/KEY; empty = synthetic arithmetic")
    eval_source: str = Field("", description="held-out prompts, same formats; empty = synthetic arithmetic")
    seed: int = Field(0, description="seed of the data, the rollouts and the training (evaluation uses seed + 1)")
    n_train: int = Field(2000, ge=1, description="training prompts (synthetic arithmetic)")
    n_eval: int = Field(2000, ge=1, description="held-out evaluation prompts (synthetic arithmetic); 2000 keeps the "
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
    prompt: PromptConfig = prompt_field()
    rollout: DecodingConfig = _decoding("the rollouts that estimate P")
    train: TrainConfig = Field(default_factory=TrainConfig, description="shared training settings of both arms "
                               "(train.sampling: the decoding of the on-policy training samples)")
    evaluation: DecodingConfig = _decoding("the calibration evaluation")
    cache: bool = Field(False, description="reuse tasks that already ran with the same inputs under this --out "
                        "(kfp.local caching); off by default so that a changed library is never skipped")

    @model_validator(mode="before")
    @classmethod
    def _preset_under_the_values_given(cls, data: Any) -> Any:
        # The values given win over the preset's, whatever they are (a value equal to the tiny default included);
        # the pipeline then gets the resolved values, not the preset's name.
        if isinstance(data, dict) and data.get("preset"):
            return merge_over_preset(preset_run_values(data["preset"]), data)
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        get_preset(value)  # an unknown name fails here, naming the known ones
        return value

    @model_validator(mode="after")
    def _train_leaves_the_run_its_own(self) -> RunConfig:
        # The run sets these TrainConfig fields itself (k, seed, ... are shared with the rollouts and the evaluation;
        # the method is each arm's): a value given under `train` would be ignored, so say so.
        defaults = TrainConfig()
        for path, source in train_fields_set_by_the_run().items():
            if _get(self.train, path) != _get(defaults, path):
                raise ValueError(f"train.{path} is not read by `caopd run`, which sets it from {source}")
        check_draws(self.rollout.temperature, self.k, "rollout.temperature (with k rollouts per prompt)")
        return self


def _get(config: BaseModel, path: str):
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value
