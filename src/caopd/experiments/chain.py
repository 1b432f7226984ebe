"""The stage chain behind a training run: rollout estimation → target replacement → training, written once.

Each step's config is derived from the one ``TrainConfig`` of the training that follows, so the three always agree:
the rollouts are K = ``train.k`` per prompt, sampled as the training samples (``train.sampling``) with the training
seed; the targets are the ones the method's objective trains from (RLCR: plain OPD records) in its teacher context;
the training reads those records. ``run_chain`` runs all three into one folder (``rollouts/``, ``targets/``,
``train/``); an experiment that shares one estimation between several trainings (``caopd compare``) calls the steps
one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caopd.config.stages import (
    ESTIMATES,
    MODEL_DIR,
    RECORDS,
    ROLLOUTS,
    RolloutConfig,
    TargetsConfig,
    TrainStageConfig,
)
from caopd.config.training import TrainConfig
from caopd.method.types import EngineName
from caopd.stages.estimate import run_rollout_estimation
from caopd.stages.targets import run_target_replacement
from caopd.stages.train import run_training
from caopd.training.objectives import objective_for

ROLLOUTS_DIR, TARGETS_DIR, TRAIN_DIR = "rollouts", "targets", "train"


def estimate_rollouts(model: str, data: str, train: TrainConfig, out: Path, task: str = "arithmetic",
                      engine: EngineName = "auto", progress: bool = False) -> dict[str, Any]:
    """Rollout estimation for ``train``: its K rollouts per prompt of ``data`` by ``model``, sampled as in training and
    seeded by its seed, into ``out``; the stage's summary."""
    sampling = train.sampling.model_copy(update={"seed": train.seed})
    return run_rollout_estimation(RolloutConfig(model=model, task=task, data=data, k=train.k, sampling=sampling,
                                                engine=engine), out, progress=progress)


def replace_targets(model: str, data: str, rollouts: Path, train: TrainConfig, out: Path,
                    task: str = "arithmetic") -> str:
    """Target replacement for ``train`` from the estimation in ``rollouts``, into ``out``: the records the method's
    objective trains from, in its teacher context. Returns the records' path."""
    run_target_replacement(TargetsConfig(method=objective_for(train).targets_method,
                                         teacher_context=train.teacher_context, task=task, data=data, model=model,
                                         rollouts=str(rollouts / ROLLOUTS), estimates=str(rollouts / ESTIMATES)), out)
    return str(out / RECORDS)


def train_on(model: str, records: str, train: TrainConfig, out: Path, task: str = "arithmetic",
             engine: EngineName = "transformers", progress: bool = False) -> dict[str, Any]:
    """Training from ``model`` on ``records`` into ``out`` (the model lands in ``out/model``); the stage's summary."""
    return run_training(TrainStageConfig(model=model, task=task, records=records, train=train, engine=engine), out,
                        progress=progress)


@dataclass
class ChainResult:
    rollouts: dict[str, Any]  # each stage's summary
    targets: str  # the records' path
    training: dict[str, Any]
    model: str  # the trained model's folder
    seconds: dict[str, float]  # wall-clock time of each step, model loading included


def run_chain(model: str, data: str, train: TrainConfig, out_dir: str | Path, task: str = "arithmetic",
              rollout_engine: EngineName = "auto", train_engine: EngineName = "transformers",
              progress: bool = False) -> ChainResult:
    """Rollout estimation, target replacement and training of ``train`` from ``model`` on ``data``, into
    ``out_dir/rollouts``, ``out_dir/targets`` and ``out_dir/train``."""
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    rollouts = estimate_rollouts(model, data, train, out / ROLLOUTS_DIR, task, rollout_engine, progress)
    seconds["rollouts"] = time.perf_counter() - start
    start = time.perf_counter()
    records = replace_targets(model, data, out / ROLLOUTS_DIR, train, out / TARGETS_DIR, task)
    seconds["targets"] = time.perf_counter() - start
    start = time.perf_counter()
    training = train_on(model, records, train, out / TRAIN_DIR, task, train_engine, progress)
    seconds["training"] = time.perf_counter() - start
    return ChainResult(rollouts, records, training, str(out / TRAIN_DIR / MODEL_DIR), seconds)
