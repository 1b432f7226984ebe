"""Continual learning: distil on task A, then on task B, and score calibration on A before and after — the paper's
"calibration forgetting" check, for plain OPD and CaOPD from the same base.

On the tiny default, A and B are disjoint sets of arithmetic kinds. Every step is a stage function (prepare,
rollout estimation, target replacement, training, evaluation); the second training starts from the first one's
model, with rollouts and P re-estimated by that model on B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from caopd.data import write_json, write_text
from caopd.distill.config import TrainConfig
from caopd.metrics import METRIC_KEYS
from caopd.report import comparison_table
from caopd.rollout import SamplingConfig
from caopd.stages.estimate import ESTIMATES, ROLLOUTS, RolloutConfig, run_rollout_estimation
from caopd.stages.evaluate import EvaluateConfig, run_evaluation
from caopd.stages.prepare import DEFAULT_KIND_WEIGHTS, EVAL, TRAIN, DataConfig, run_data_preparation
from caopd.stages.targets import RECORDS, TargetsConfig, run_target_replacement
from caopd.stages.train import MODEL_DIR, TrainStageConfig, run_training
from caopd.tasks.arithmetic import KINDS


class ContinualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="the base model both arms start from")
    task_a_kinds: list[str] = Field(default_factory=lambda: ["add_1x1", "add_2x1", "add_2x2"],
                                    description="arithmetic kinds of task A (trained first, scored before and after B)")
    task_b_kinds: list[str] = Field(default_factory=lambda: ["mul_1x1", "mul_2x1", "mul_2x2"],
                                    description="arithmetic kinds of task B (trained second)")
    methods: list[Literal["opd", "caopd"]] = Field(default_factory=lambda: ["opd", "caopd"],
                                                   description="arms, each trained on A then B")
    n_train: int = Field(1000, ge=1, description="training prompts per task")
    n_eval: int = Field(1000, ge=1, description="held-out prompts per task")
    k: int = Field(8, ge=1, description="rollouts per prompt (K)")
    seed: int = Field(0, description="seed of the data, rollouts and training (evaluation uses seed + 1)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100),
                               description="training settings of every run (method is set per arm)")

    @model_validator(mode="after")
    def _disjoint_known_kinds(self) -> "ContinualConfig":
        unknown = sorted(set(self.task_a_kinds + self.task_b_kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown arithmetic kinds {unknown}; choose from {list(KINDS)}")
        if not self.task_a_kinds or not self.task_b_kinds or set(self.task_a_kinds) & set(self.task_b_kinds):
            raise ValueError("task A and task B need kinds of their own (non-empty, no kind in both)")
        if not self.methods:
            raise ValueError("at least one method to train")
        return self


def _weights(kinds: list[str]) -> dict[str, float]:
    return {kind: DEFAULT_KIND_WEIGHTS.get(kind, 1.0) for kind in kinds}


def distil(cfg: ContinualConfig, start_model: str, data: Path, method: str, out: Path) -> str:
    """Rollouts of ``start_model`` on ``data``, the method's targets, and training from it: the trained model."""
    sampling = SamplingConfig(max_new_tokens=cfg.train.sampling.max_new_tokens, seed=cfg.seed)
    run_rollout_estimation(RolloutConfig(model=start_model, data=str(data / TRAIN), k=cfg.k, sampling=sampling),
                           out / "rollouts", progress=False)
    run_target_replacement(TargetsConfig(method=method, data=str(data / TRAIN), model=start_model,
                                         rollouts=str(out / "rollouts" / ROLLOUTS),
                                         estimates=str(out / "rollouts" / ESTIMATES)), out / "targets")
    train = cfg.train.model_copy(update={"method": method, "k": cfg.k, "seed": cfg.seed})
    run_training(TrainStageConfig(model=start_model, records=str(out / "targets" / RECORDS), train=train),
                 out / "train", progress=False)
    return str(out / "train" / MODEL_DIR)


def run_continual(cfg: ContinualConfig, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    data = {name: out / f"data_{name}" for name in ("a", "b")}
    for name, kinds, offset in (("a", cfg.task_a_kinds, 0), ("b", cfg.task_b_kinds, 1)):
        run_data_preparation(DataConfig(n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed + offset,
                                        kind_weights=_weights(kinds)), data[name])
    models = {"base": cfg.model}
    for method in cfg.methods:
        after_a = distil(cfg, cfg.model, data["a"], method, out / method / "after_a")
        models[f"{method}_after_a"] = after_a
        models[f"{method}_after_b"] = distil(cfg, after_a, data["b"], method, out / method / "after_b")
    sampling = SamplingConfig(n=1, max_new_tokens=cfg.train.sampling.max_new_tokens, seed=cfg.seed + 1)
    evaluation = run_evaluation(EvaluateConfig(models=models, data=str(data["a"] / EVAL),
                                               extra_data={"task_b": str(data["b"] / EVAL)}, sampling=sampling),
                                out / "evaluation", progress=False)
    on_a = {arm: {k: m[k] for k in METRIC_KEYS} for arm, m in evaluation["arms"].items()}
    on_b = {arm: {k: m[k] for k in METRIC_KEYS} for arm, m in evaluation["sets"]["task_b"]["arms"].items()}
    forgetting = {method: {"ece_a_before": on_a[f"{method}_after_a"]["ece"],
                           "ece_a_after": on_a[f"{method}_after_b"]["ece"],
                           "accuracy_a_before": on_a[f"{method}_after_a"]["accuracy"],
                           "accuracy_a_after": on_a[f"{method}_after_b"]["accuracy"],
                           "ece_b_after": on_b[f"{method}_after_b"]["ece"]} for method in cfg.methods}
    summary = {"config": cfg.model_dump(), "task_a": on_a, "task_b": on_b, "forgetting": forgetting}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", forgetting_table(forgetting) + "\nTask A, every model:\n\n" + comparison_table(on_a)
               + "\nTask B, every model:\n\n" + comparison_table(on_b))
    return summary


def forgetting_table(forgetting: dict[str, dict[str, float]]) -> str:
    lines = ["| arm | ECE on A after A | ECE on A after B | change | accuracy on A after A | after B | "
             "ECE on B after B |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, f in forgetting.items():
        lines.append(f"| {method} | {f['ece_a_before']:.3f} | {f['ece_a_after']:.3f} | "
                     f"{f['ece_a_after'] - f['ece_a_before']:+.3f} | {f['accuracy_a_before']:.3f} | "
                     f"{f['accuracy_a_after']:.3f} | {f['ece_b_after']:.3f} |")
    return "\n".join(lines) + "\n"
