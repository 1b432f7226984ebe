"""``caopd score``'s config (torch-free): score completions a model already wrote, without loading a model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from caopd.config.prompting import PromptConfig
from caopd.tasks import get_task


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("arithmetic", description="task name (arithmetic, mcq, tooluse, or a registered one): its "
                      "verifier scores the completions against the gold answers it reads from `data`")
    data: str = Field(..., description="the prompts the completions answer: a load_from_disk folder, .jsonl or "
                      ".parquet; a row's id is its `id` column, else its position (0, 1, ...)")
    completions: str = Field(..., description="the completions: .jsonl (or .parquet, or a load_from_disk folder) "
                             "with one row per prompt, {\"id\": <the prompt's id>, \"completion\": <the model's "
                             "text>}; an optional boolean `finished` says the text ended at EOS; other fields are "
                             "ignored")
    arm: str = Field("completions", description="the name these completions go by in the summary, the report and "
                     "the files (predictions_<arm>.jsonl, reliability_<arm>.png, ...), e.g. the served model's name")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="how the prompts were built (the "
                                 "confidence instruction the task adds), as in the stage that generated them")
    bootstrap_resamples: int = Field(1000, ge=0, description="resamples for the 95 % bootstrap interval of every "
                                     "metric (0: no intervals)")
    seed: int = Field(1234, description="seed of the bootstrap resamples (the calibration evaluation's default "
                      "sampling seed, so the same completions get the same intervals there and here)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        get_task(value)  # an unknown task fails here, naming the known ones
        return value

    @field_validator("arm")
    @classmethod
    def _file_name_safe(cls, value: str) -> str:
        if not value or not value.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"the arm name must be letters, digits, '-' or '_': {value!r}")
        return value
