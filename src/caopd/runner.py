"""The main job: base, plain OPD and CaOPD from one base model, evaluated on the same held-out prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caopd.data import write_json, write_text
from caopd.distill.config import TrainConfig
from caopd.metrics import METRIC_KEYS
from caopd.report import comparison_table, print_comparison
from caopd.rollout import SamplingConfig
from caopd.stages.estimate import ESTIMATES, ROLLOUTS, RolloutConfig, run_rollout_estimation
from caopd.stages.evaluate import EvaluateConfig, run_evaluation
from caopd.stages.register import RegisterConfig, run_registration
from caopd.stages.prepare import DEFAULT_KIND_WEIGHTS, DataConfig, run_data_preparation
from caopd.stages.targets import RECORDS, TargetsConfig, run_target_replacement
from caopd.stages.train import MODEL_DIR, TrainStageConfig, run_training

ARMS = ("base", "opd", "caopd")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="base model")
    seed: int = Field(0, description="seed of the data, the sampling and the training")
    n_train: int = Field(2000, ge=1, description="training prompts (arithmetic)")
    n_eval: int = Field(2000, ge=1, description="held-out evaluation prompts (arithmetic); 2000 keeps the "
                        "accuracy standard error near one point")
    kind_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS),
                                           description="arithmetic kind -> sampling weight of train and eval prompts")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    teacher_context: Literal["demo", "correct_solution"] = Field(
        "demo", description="privileged context of the teacher: the gold demonstration or a verified correct rollout")
    train: TrainConfig = Field(default_factory=TrainConfig, description="shared training settings of both arms")
    max_new_tokens: int = Field(24, ge=1, description="completion length limit")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (rollouts, training, evaluation)")


def run_main_job(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    start = time.perf_counter()
    data = out / "data"
    run_data_preparation(DataConfig(n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed,
                                    kind_weights=cfg.kind_weights), data)
    sampling = SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    estimate = run_rollout_estimation(RolloutConfig(model=cfg.model, data=str(data / "train.jsonl"), k=cfg.k,
                                                    sampling=sampling), out / "rollouts", progress)
    models = {"base": cfg.model}
    trained = {}
    for method in ("opd", "caopd"):
        run_target_replacement(TargetsConfig(
            method=method, teacher_context=cfg.teacher_context, data=str(data / "train.jsonl"),
            rollouts=str(out / "rollouts" / ROLLOUTS), estimates=str(out / "rollouts" / ESTIMATES), model=cfg.model,
        ), out / f"targets_{method}")
        train_cfg = cfg.train.model_copy(update={"method": method, "k": cfg.k, "seed": cfg.seed,
                                                 "teacher_context": cfg.teacher_context, "sampling": sampling})
        if method == "opd" and train_cfg.variant == "decoupled":
            train_cfg = train_cfg.model_copy(update={"variant": "faithful"})
        trained[method] = run_training(TrainStageConfig(model=cfg.model, records=str(out / f"targets_{method}" / RECORDS),
                                                        train=TrainConfig.model_validate(train_cfg.model_dump())),
                                       out / f"train_{method}", progress)
        models[method] = str(out / f"train_{method}" / MODEL_DIR)
    evaluation = run_evaluation(EvaluateConfig(
        models=models, data=str(data / "eval.jsonl"),
        sampling=SamplingConfig(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed + 1)), out / "evaluation", progress)
    arms = evaluation["arms"]
    registered = run_registration(RegisterConfig(
        model_dir=models["caopd"], registry_dir=str(out / "registry"), metrics=arms["caopd"],
        lineage={"base_model": cfg.model, "train_data": str(data / "train.jsonl"),
                 "rollout_outputs": estimate["outputs"], "training": trained["caopd"]["model_digest"]}))
    summary = {"arms": {name: {k: arms[name][k] for k in METRIC_KEYS} for name in ARMS},
               "config": cfg.model_dump(), "seconds": round(time.perf_counter() - start, 1),
               "registered": {"name": registered["name"], "version": registered["version"]},
               "plots": {name: f"evaluation/reliability_{name}.png" for name in ARMS},
               "base_rollout_metrics": estimate["base_metrics"]}
    write_json(out / "summary.json", summary)
    write_text(out / "comparison.md", comparison_table(summary["arms"]) + "\n")
    if progress:
        print_comparison(summary["arms"])
    return summary

