"""Continual learning: distil on task A, then on task B, and score calibration on A before and after — the paper's
"calibration forgetting" check, for plain OPD and CaOPD from the same base.

On the tiny default, A and B are disjoint sets of arithmetic kinds. Every step is a stage function (prepare,
rollout estimation, target replacement, training, evaluation); the second training starts from the first one's
model, with rollouts and P re-estimated by that model on B. `caopd continual` runs the whole check here; the
pipeline runs the same task-B step (``run_continual_step``) and scoring (``evaluate_forgetting``) per arm when
``continual_kinds`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caopd.config.experiments import ContinualConfig, ContinualStepConfig
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import DEFAULT_KIND_WEIGHTS, EVAL, TRAIN, DataConfig, EvaluateConfig
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.evaluation.tables import comparison_table, markdown_table
from caopd.experiments.chain import run_chain
from caopd.io import write_json, write_text
from caopd.method.types import EngineName
from caopd.stages.evaluate import run_evaluation
from caopd.stages.prepare import run_data_preparation

FORGETTING = "forgetting.json"


def _weights(kinds: list[str]) -> dict[str, float]:
    return {kind: DEFAULT_KIND_WEIGHTS.get(kind, 1.0) for kind in kinds}


def run_continual_step(cfg: ContinualStepConfig, out_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Task B from task A's model: its rollouts and P on B, the method's targets, and training from it. The model
    lands in ``out_dir/train/model``."""
    done = run_chain(cfg.start_model, cfg.data, cfg.train, out_dir, task=cfg.task, rollout_engine=cfg.engine,
                     progress=progress)
    trained = done.training
    return {"stage": "continual-distillation", "config": cfg.model_dump(), "model": done.model,
            "n_prompts": done.rollouts["n_prompts"], "steps": trained["steps"], "final": trained["final"],
            "seconds": trained["seconds"], "model_digest": trained["model_digest"]}


def distil(cfg: ContinualConfig, start_model: str, data: Path, method: str, out: Path) -> str:
    """One training of the CLI check: ``method`` on ``data``'s training prompts, from ``start_model``."""
    train = cfg.train.model_copy(update={"method": method, "k": cfg.k, "seed": cfg.seed})
    return run_continual_step(ContinualStepConfig(start_model=start_model, data=str(data / TRAIN), train=train),
                              out)["model"]


def evaluate_forgetting(models: dict[str, str], methods: list[str], eval_a: str, eval_b: str,
                        sampling: SamplingConfig, out_dir: str | Path, engine: EngineName = "auto",
                        progress: bool = False) -> dict[str, Any]:
    """Score ``models`` (``<method>_after_a`` and ``<method>_after_b`` per method, any others beside) on task A and
    task B; the forgetting of each method, also written to ``forgetting.json``."""
    evaluation = run_evaluation(EvaluateConfig(models=models, data=eval_a, extra_data={"task_b": eval_b},
                                               sampling=sampling, engine=engine), out_dir, progress=progress)
    on_a = {arm: {k: m[k] for k in METRIC_KEYS} for arm, m in evaluation["arms"].items()}
    on_b = {arm: {k: m[k] for k in METRIC_KEYS} for arm, m in evaluation["sets"]["task_b"]["arms"].items()}
    forgetting = {method: {"ece_a_before": on_a[f"{method}_after_a"]["ece"],
                           "ece_a_after": on_a[f"{method}_after_b"]["ece"],
                           "accuracy_a_before": on_a[f"{method}_after_a"]["accuracy"],
                           "accuracy_a_after": on_a[f"{method}_after_b"]["accuracy"],
                           "ece_b_after": on_b[f"{method}_after_b"]["ece"]} for method in methods}
    result = {"task_a": on_a, "task_b": on_b, "forgetting": forgetting}
    write_json(Path(out_dir) / FORGETTING, result)
    return result


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
    scored = evaluate_forgetting(models, list(cfg.methods), str(data["a"] / EVAL), str(data["b"] / EVAL), sampling,
                                 out / "evaluation")
    on_a, on_b, forgetting = scored["task_a"], scored["task_b"], scored["forgetting"]
    summary = {"config": cfg.model_dump(), "task_a": on_a, "task_b": on_b, "forgetting": forgetting}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", forgetting_table(forgetting) + "\nTask A, every model:\n\n" + comparison_table(on_a)
               + "\nTask B, every model:\n\n" + comparison_table(on_b))
    return summary


def forgetting_table(forgetting: dict[str, dict[str, float]]) -> str:
    header = ["arm", "ECE on A after A", "ECE on A after B", "change", "accuracy on A after A", "after B",
              "ECE on B after B"]
    rows = [[method, f"{f['ece_a_before']:.3f}", f"{f['ece_a_after']:.3f}",
             f"{f['ece_a_after'] - f['ece_a_before']:+.3f}", f"{f['accuracy_a_before']:.3f}",
             f"{f['accuracy_a_after']:.3f}", f"{f['ece_b_after']:.3f}"]
            for method, f in forgetting.items()]
    return markdown_table(header, rows)
