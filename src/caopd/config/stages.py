"""The pipeline's stages: each one's identity (one table) and typed config, torch-free.

Every name a stage goes by is defined here once: its id (the KFP component's name and its MLflow run's name,
persisted in lineage tags), its CLI command, its config and the files it writes. Stage modules, components,
the CLI, tracking and the pipeline import them from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caopd.config.engines import VLLMConfig
from caopd.config.gates import GateConfig
from caopd.config.launch import LaunchConfig
from caopd.config.prompting import PromptConfig, prompt_field
from caopd.config.sampling import SamplingConfig, check_draws
from caopd.config.training import TrainConfig
from caopd.method.types import EngineName, Method, Sharding, TeacherMode
from caopd.tasks import get_task
from caopd.tasks.arithmetic import KINDS
from caopd.tasks.datasets import DATA_ROOT_ENV, confined_path

# The card the start-up fit check (``caopd plan``'s) plans against, in the GPU stages' configs.
GPU_MEMORY_DEFAULT = 0.0
GPU_MEMORY_HELP = ("memory of one GPU in GiB, which the start-up check (caopd plan's) plans the stage against; 0 = "
                   "the GPU this process runs on (no check on a machine without one)")

# Artifact files, one name each.
SUMMARY = "summary.json"  # every stage's summary
TRAIN, EVAL, OOD = "train.jsonl", "eval.jsonl", "ood.jsonl"
CONTINUAL_TRAIN, CONTINUAL_EVAL = "continual_train.jsonl", "continual_eval.jsonl"
ROLLOUTS, ESTIMATES = "rollouts.jsonl", "estimates.jsonl"
RECORDS = "records.jsonl"
MODEL_DIR, TRAIN_LOG, CURVES = "model", "train_log.jsonl", "training_curves.png"
REPORT = "report.md"

# Weighted towards the mid-difficulty kinds, where the tiny base model's per-prompt success spreads out:
# that spread is what P carries and what calibration is scored on.
DEFAULT_KIND_WEIGHTS = {"add_1x1": 0.5, "mul_1x1": 0.5, "add_2x1": 1.0, "add_2x2": 2.0, "mul_2x1": 3.0,
                        "mul_2x2": 3.0}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("arithmetic", description="task name (arithmetic, mcq, tooluse, or a registered one)")
    data_root: str = Field(default_factory=lambda: os.environ.get(DATA_ROOT_ENV, ""),
                           description="the folder every dataset source must resolve inside (relative sources are "
                           "taken from it); default $CAOPD_DATA_ROOT, empty = no restriction")
    train_source: str = Field("", description="training prompts: a load_from_disk folder, .jsonl or .parquet, on "
                              "this machine or s3://BUCKET/KEY (a folder: a key ending in /); empty = synthetic "
                              "arithmetic")
    eval_source: str = Field("", description="held-out prompts, same formats and places; empty = synthetic "
                             "arithmetic")
    n_train: int = Field(2000, ge=1, description="synthetic training prompts (when train_source is empty)")
    n_eval: int = Field(2000, ge=1, description="synthetic held-out prompts (when eval_source is empty); 2000 "
                        "keeps the accuracy standard error near one point")
    seed: int = Field(0, description="seed of the synthetic problems (eval uses seed + 10000)")
    kind_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
                                           description="arithmetic kind -> sampling weight of synthetic prompts")
    ood_kinds: list[str] = Field(default_factory=list, description="arithmetic kinds kept out of training and of the "
                                 "in-domain eval set, scored as a separate out-of-distribution set (ood.jsonl, "
                                 "n_eval prompts); empty = no OOD set")
    ood_source: str = Field("", description="an out-of-distribution prompt set of your own, in any task (a "
                            "load_from_disk folder, .jsonl or .parquet), validated and copied to ood.jsonl")
    ood_task: str = Field("", description="the task of ood_source when it differs from `task` (e.g. mcq for "
                          "chemistry after training on tooluse); empty = `task`")
    continual_kinds: list[str] = Field(default_factory=list, description="task B of the calibration-forgetting "
                                       "check: arithmetic kinds kept out of task A (training and in-domain eval) and "
                                       "written as continual_train.jsonl / continual_eval.jsonl (n_train / n_eval "
                                       "prompts), which each arm then trains on from its task-A model; empty = none")

    @field_validator("train_source", "eval_source", "ood_source")
    @classmethod
    def _inside_data_root(cls, value: str, info) -> str:
        if value and not value.startswith("s3://"):  # a path outside the data root fails here, before any work
            confined_path(value, info.data.get("data_root"))
        return value

    @field_validator("ood_kinds", "continual_kinds")
    @classmethod
    def _known_kinds_list(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {list(KINDS)}")
        return [kind for kind in KINDS if kind in value]  # one fixed order, duplicates dropped

    @field_validator("kind_weights")
    @classmethod
    def _known_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {list(KINDS)}")
        if not value or any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        # The kinds in one fixed order: the draw follows the order, and a dict that crossed KFP (a protobuf
        # Struct) arrives in a different key order in every process.
        return {kind: float(value[kind]) for kind in KINDS if kind in value}

    @model_validator(mode="after")
    def _sources_for_other_tasks(self) -> DataConfig:
        get_task(self.task)  # an unknown task fails here, naming the known ones
        if self.task != "arithmetic" and not (self.train_source and self.eval_source):
            raise ValueError(f"task {self.task!r} has no synthetic generator: give train_source and eval_source")
        if self.ood_task:
            get_task(self.ood_task)
            if not self.ood_source:
                raise ValueError("ood_task names the task of ood_source: give ood_source too")
        if self.ood_source and self.ood_kinds:
            raise ValueError("give either ood_kinds (held-out arithmetic kinds) or ood_source (your own set), not both")
        if self.ood_kinds:
            if self.train_source or self.eval_source:
                raise ValueError("ood_kinds splits the synthetic arithmetic kinds; with your own datasets, evaluate "
                                 "another set with `caopd evaluate --extra-data NAME=FILE`")
            if not sum(self.in_domain_weights().values()) > 0:
                raise ValueError(f"ood_kinds {self.ood_kinds} leave no kind with a positive weight to train on")
        if self.continual_kinds:
            if self.train_source or self.eval_source:
                raise ValueError("continual_kinds splits the synthetic arithmetic kinds into task A and task B; "
                                 "with your own datasets run `caopd continual` stage by stage")
            if set(self.continual_kinds) & set(self.ood_kinds):
                raise ValueError(f"a kind cannot be both task B (continual_kinds) and out of distribution "
                                 f"(ood_kinds): {sorted(set(self.continual_kinds) & set(self.ood_kinds))}")
            if not sum(self.in_domain_weights().values()) > 0:
                raise ValueError(f"continual_kinds {self.continual_kinds} leave task A no kind with a positive "
                                 "weight to train on")
        return self

    def in_domain_weights(self) -> dict[str, float]:
        """The kind weights of task A's training and in-domain eval prompts: ``kind_weights`` without the kinds
        held out (``ood_kinds``) or kept for task B (``continual_kinds``)."""
        held_out = set(self.ood_kinds) | set(self.continual_kinds)
        return {kind: w for kind, w in self.kind_weights.items() if kind not in held_out}



class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="base model: 'tiny', 'standin', a local checkpoint folder, a hub id, "
                       "s3://BUCKET/FOLDER or models:/NAME@ALIAS")
    task: str = Field("arithmetic", description="task name (arithmetic, mcq, tooluse, or a registered one)")
    data: str = Field(..., description="prompts: a load_from_disk folder, .jsonl or .parquet, or s3://BUCKET/KEY")
    prompt: PromptConfig = prompt_field()
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=24),
                                     description="rollout sampling (n is set from k)")
    engine: EngineName = Field("auto", description="auto: vLLM on a GPU when installed, else transformers")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="the vLLM engine's sizing (when vLLM samples)")
    gpu_memory_gib: float = Field(GPU_MEMORY_DEFAULT, ge=0.0, description=GPU_MEMORY_HELP)
    shard_index: int = Field(0, ge=0, description="this shard's index (prompts are split into contiguous shards)")
    num_shards: int = Field(1, ge=1, description="number of shards")

    def model_post_init(self, _: Any) -> None:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be below num_shards {self.num_shards}")

    @model_validator(mode="after")
    def _k_draws_need_a_temperature(self) -> RolloutConfig:
        # the K rollouts are sampled with n = k (the sampling's own n is replaced): greedy would give K copies
        check_draws(self.sampling.temperature, self.k, "sampling.temperature (with k rollouts per prompt)")
        return self



class TargetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = Field("caopd", description="caopd: edit targets with P; opd: keep completions, teacher says 1.00")
    teacher_context: TeacherMode = Field("demo", description="demo: gold demonstration; correct_solution: a verified "
                                         "correct rollout (falls back to the demo when none exists)")
    task: str = Field("arithmetic", description="task name")
    data: str = Field(..., description="the prompts the rollouts came from")
    prompt: PromptConfig = prompt_field()
    rollouts: str = Field(..., description="rollouts.jsonl from rollout estimation")
    estimates: str = Field(..., description="estimates.jsonl from rollout estimation")
    model: str = Field("tiny", description="base model (only its teacher-context template is read)")
    template: str | None = Field(None, description="teacher-context template; default: the model's own")



class TrainStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="the student's starting point: 'tiny', 'standin', a folder, a hub id, "
                       "s3://BUCKET/FOLDER or models:/NAME@ALIAS")
    task: str = Field("arithmetic", description="task used to verify the training rollouts")
    prompt: PromptConfig = prompt_field()
    records: str = Field(..., description="records.jsonl from target replacement")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the distillation settings")
    engine: EngineName = Field("transformers", description="rollout engine for training samples: transformers "
                               "samples from the live student; vllm runs beside it on its GPU, synced every step")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="the colocated vLLM engine's sizing and sleep "
                             "mode (engine vllm, or auto with vLLM on a GPU)")
    sharding: Sharding = Field(
        "replicate", description="under torchrun: replicate = every process holds the whole model (data parallel); "
        "fsdp = weights, gradients and optimizer state sharded across the processes (FSDP2; the weights are "
        "gathered whole only to sample), for models whose training state does not fit one GPU")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="where training runs: this process "
                                 "(torchrun around it for several GPUs), or a TrainJob / PyTorchJob on several nodes")
    collective_timeout_minutes: float = Field(
        30.0, gt=0.0, le=1440.0, description="how long a collective (NCCL or gloo) waits for every process before "
        "the run fails: covers the longest a process can be alone, e.g. gathering the final model on rank 0")
    gpu_memory_gib: float = Field(GPU_MEMORY_DEFAULT, ge=0.0, description=GPU_MEMORY_HELP)



class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(..., description="arm name -> model ('tiny', a folder or a hub id)")
    task: str = Field("arithmetic", description="task name")
    data: str = Field(..., description="held-out prompts: a load_from_disk folder, .jsonl or .parquet")
    prompt: PromptConfig = prompt_field()
    extra_data: dict[str, str] = Field(default_factory=dict, description="other prompt sets scored beside `data`, "
                                       "name -> file (e.g. ood -> prompts of kinds never trained on)")
    extra_tasks: dict[str, str] = Field(default_factory=dict, description="the task of an extra set when it is not "
                                        "`task`, name -> task (e.g. chemistry -> mcq after training on tooluse)")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(n=1, temperature=1.0, max_new_tokens=24, seed=1234),
        description="decoding at test time; the default samples as rollout estimation does, so that the "
                    "confidence a model learned (its sampled success rate) is scored against the same policy")
    engine: EngineName = Field("auto", description="auto: vLLM on a GPU when installed, else transformers")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="the vLLM engine's sizing (when vLLM samples; "
                             "one engine per arm, reused over its prompt sets)")
    bootstrap_resamples: int = Field(1000, ge=0, description="resamples for the 95 % bootstrap interval of every "
                                                             "metric (0: no intervals)")

    @field_validator("models", "extra_data")
    @classmethod
    def _names(cls, value: dict[str, str], info) -> dict[str, str]:
        if info.field_name == "models" and not value:
            raise ValueError("at least one model to evaluate")
        bad = [name for name in value if not name.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"names must be letters, digits, '-' or '_': {bad}")
        return value

    @model_validator(mode="after")
    def _known_set_tasks(self) -> EvaluateConfig:
        unknown = sorted(set(self.extra_tasks) - set(self.extra_data))
        if unknown:
            raise ValueError(f"extra_tasks names sets that extra_data does not give: {unknown}")
        for task in {self.task, *self.extra_tasks.values()}:
            get_task(task)  # an unknown task fails here, naming the known ones
        return self

    def task_of(self, set_name: str | None) -> str:
        return self.extra_tasks.get(set_name, self.task) if set_name is not None else self.task



class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("caopd-tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="registered model name")
    model_dir: str = Field(..., description="the trained checkpoint folder")
    base_model: str = Field("tiny", description="the model it was post-trained from (a lineage tag)")
    metrics: dict[str, Any] = Field(default_factory=dict, description="its evaluation metrics (the eight keys)")
    gates: GateConfig = Field(default_factory=GateConfig, description="promotion gates against the champion")



@dataclass(frozen=True)
class StageIdentity:
    """One stage's names. ``id`` names its KFP component and its MLflow run (persisted: lineage resolves by it)."""

    id: str
    cli: str
    config: type[BaseModel]
    files: tuple[str, ...]


DATA_PREPARATION = StageIdentity("data-preparation", "prepare", DataConfig,
                                 (TRAIN, EVAL, OOD, CONTINUAL_TRAIN, CONTINUAL_EVAL, SUMMARY))
ROLLOUT_ESTIMATION = StageIdentity("rollout-estimation", "rollout", RolloutConfig, (ROLLOUTS, ESTIMATES, SUMMARY))
TARGET_REPLACEMENT = StageIdentity("target-replacement", "targets", TargetsConfig, (RECORDS, SUMMARY))
OPD_TRAINING = StageIdentity("opd-training", "train", TrainStageConfig, (MODEL_DIR, TRAIN_LOG, CURVES, SUMMARY))
CALIBRATION_EVALUATION = StageIdentity("calibration-evaluation", "evaluate", EvaluateConfig, (SUMMARY, REPORT))
MODEL_REGISTRATION = StageIdentity("model-registration", "register", RegisterConfig, ())

STAGES: tuple[StageIdentity, ...] = (DATA_PREPARATION, ROLLOUT_ESTIMATION, TARGET_REPLACEMENT, OPD_TRAINING,
                                     CALIBRATION_EVALUATION, MODEL_REGISTRATION)
