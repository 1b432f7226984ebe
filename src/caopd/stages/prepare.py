"""Stage 0 — data preparation: the train and eval prompt sets every later stage reads.

Either the user's datasets (a ``load_from_disk`` folder, .jsonl or .parquet), validated by the task and copied
so that the run keeps exactly what it trained on, or — when no source is given — synthetic arithmetic problems.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caopd.data import DATA_ROOT_ENV, confined_path, load_rows, read_json, write_json, write_jsonl
from caopd.tasks import get_task
from caopd.tasks.arithmetic import KINDS, generate_rows

TRAIN, EVAL, OOD, SUMMARY = "train.jsonl", "eval.jsonl", "ood.jsonl", "summary.json"
CONTINUAL_TRAIN, CONTINUAL_EVAL = "continual_train.jsonl", "continual_eval.jsonl"

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
    train_source: str = Field("", description="training prompts: a load_from_disk folder, .jsonl or .parquet; "
                              "empty = synthetic arithmetic")
    eval_source: str = Field("", description="held-out prompts, same formats; empty = synthetic arithmetic")
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
        if value:  # a path outside the data root fails here, before any work
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
    def _sources_for_other_tasks(self) -> "DataConfig":
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


def _rows(cfg: DataConfig, source: str, n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    if source:
        rows = load_rows(confined_path(source, cfg.data_root))
        get_task(cfg.task).examples_from_rows(rows, source=source)  # validate now, not three stages later
        return rows
    weights = cfg.in_domain_weights()
    return generate_rows(n, seed, list(weights), list(weights.values()), id_prefix=prefix)


def _kind_rows(cfg: DataConfig, kinds: list[str], n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Prompts of ``kinds``, weighted as in ``kind_weights`` (equally where it gives them no positive weight)."""
    weights = [cfg.kind_weights.get(kind, 0.0) for kind in kinds]
    if not sum(weights) > 0:
        weights = [1.0] * len(kinds)
    return generate_rows(n, seed, kinds, weights, id_prefix=prefix)


def _ood_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Your OOD set, validated by its task; or prompts of the held-out kinds."""
    if cfg.ood_source:
        rows = load_rows(confined_path(cfg.ood_source, cfg.data_root))
        get_task(cfg.ood_task or cfg.task).examples_from_rows(rows, source=cfg.ood_source)
        return rows
    return _kind_rows(cfg, cfg.ood_kinds, cfg.n_eval, cfg.seed + 20_000, "ood")


def run_data_preparation(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    # Every set is read and validated before the first file is written: a bad row leaves nothing behind.
    train = _rows(cfg, cfg.train_source, cfg.n_train, cfg.seed, "train")
    evaluation = _rows(cfg, cfg.eval_source, cfg.n_eval, cfg.seed + 10_000, "eval")
    ood = _ood_rows(cfg) if cfg.ood_kinds or cfg.ood_source else None
    task_b = {CONTINUAL_TRAIN: _kind_rows(cfg, cfg.continual_kinds, cfg.n_train, cfg.seed + 30_000, "b_train"),
              CONTINUAL_EVAL: _kind_rows(cfg, cfg.continual_kinds, cfg.n_eval, cfg.seed + 40_000, "b_eval")} \
        if cfg.continual_kinds else {}
    out = Path(out_dir)
    summary = {"stage": "data-preparation", "config": cfg.model_dump(), "n_train": len(train),
               "n_eval": len(evaluation),
               "outputs": {TRAIN: write_jsonl(out / TRAIN, train), EVAL: write_jsonl(out / EVAL, evaluation)}}
    if ood is not None:
        summary["n_ood"] = len(ood)
        summary["outputs"][OOD] = write_jsonl(out / OOD, ood)
    for name, rows in task_b.items():
        summary["outputs"][name] = write_jsonl(out / name, rows)
    write_json(out / SUMMARY, summary)
    return summary


def ood_set(data_dir: str | Path) -> tuple[str, str] | None:
    """The prepared OOD set of a data folder and the task that verifies it, or None when the run has none."""
    folder = Path(data_dir)
    if not (folder / OOD).is_file():
        return None
    config = read_json(folder / SUMMARY)["config"]
    return str(folder / OOD), config.get("ood_task") or config["task"]
