"""The calibration-forgetting option: each arm continues on task B from its task-A model, and both are scored on
task A (before and after B) and on task B."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from caopd.config.images import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def continual_enabled(continual_kinds: list) -> bool:
    """KFP conditions compare primitive values only: whether the run has a task B, as a bool."""
    return bool(continual_kinds)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def continual_distillation(data: Input[Dataset], model: Input[Model], task: str, engine: str, mlflow_settings: dict,
                           pipeline_run_id: str, continual_model: Output[Model]):
    import json
    import shutil
    from pathlib import Path

    from caopd.config.experiments import ContinualStepConfig
    from caopd.config.stages import CONTINUAL_TRAIN, MODEL_DIR
    from caopd.config.training import TrainConfig
    from caopd.experiments.chain import TRAIN_DIR
    from caopd.experiments.continual import run_continual_step
    from caopd.models.loading import METADATA_FILE
    from caopd.tracking.stage_runs import tracked, tracker_if_configured
    from caopd.tracking.tracker import TAG_METHOD
    from caopd.training.checkpoints import checkpoint_root

    start = Path(model.path) / MODEL_DIR
    # Task B trains with task A's settings: the checkpoint records them.
    train = TrainConfig.model_validate(json.loads((start / METADATA_FILE).read_text())["train"])
    cfg = ContinualStepConfig(start_model=str(start), data=str(Path(data.path) / CONTINUAL_TRAIN), task=task,
                              train=train, engine=engine)
    out = Path(continual_model.path)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, out.parent / "mlflow")
    summary = tracked(tracker, "continual-distillation", cfg, lambda: run_continual_step(cfg, out), out / TRAIN_DIR,
                      inputs={"task_b_train": (cfg.data, "training")}, tags={TAG_METHOD: train.method})
    shutil.rmtree(checkpoint_root(out / TRAIN_DIR), ignore_errors=True)
    continual_model.metadata.update({"method": train.method, "phase": "task_b", "steps": summary["steps"],
                                     "model_digest": summary["model_digest"]})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def continual_evaluation(data: Input[Dataset], model: Input[Model], continual_model: Input[Model], task: str,
                         eval_temperature: float, eval_top_p: float, eval_max_new_tokens: int, eval_seed: int,
                         engine: str, mlflow_settings: dict, pipeline_run_id: str, evaluation: Output[Dataset],
                         metrics: Output[Metrics], report: Output[HTML]):
    from pathlib import Path

    from caopd.config.sampling import SamplingConfig
    from caopd.config.stages import CONTINUAL_EVAL, EVAL, MODEL_DIR, EvaluateConfig
    from caopd.evaluation.html import html_report
    from caopd.experiments.chain import TRAIN_DIR
    from caopd.experiments.continual import evaluate_forgetting
    from caopd.tracking.stage_runs import tracked, tracker_if_configured
    from caopd.tracking.tracker import TAG_METHOD

    method = model.metadata["method"]
    models = {f"{method}_after_a": str(Path(model.path) / MODEL_DIR),
              f"{method}_after_b": str(Path(continual_model.path) / TRAIN_DIR / MODEL_DIR)}
    sampling = SamplingConfig(n=1, temperature=eval_temperature, top_p=eval_top_p, max_new_tokens=eval_max_new_tokens,
                              seed=eval_seed)
    eval_a, eval_b = str(Path(data.path) / EVAL), str(Path(data.path) / CONTINUAL_EVAL)
    # The config MLflow records: the evaluation as run_evaluation sees it.
    cfg = EvaluateConfig(models=models, task=task, data=eval_a, extra_data={"task_b": eval_b}, sampling=sampling,
                         engine=engine)
    out = Path(evaluation.path)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, out.parent / "mlflow")
    summary = tracked(tracker, "continual-evaluation", cfg,
                      lambda: evaluate_forgetting(models, [method], eval_a, eval_b, sampling, out, engine=engine),
                      out, inputs={"eval": (eval_a, "evaluation"), "task_b_eval": (eval_b, "evaluation")},
                      tags={TAG_METHOD: method})
    for key, value in summary["forgetting"][method].items():
        metrics.log_metric(f"{method}_{key}", value)
    Path(report.path).write_text(html_report(
        f"Calibration forgetting ({method}): task A before and after task B", sorted(out.glob("reliability_*.png")),
        other_sets={"task A": summary["task_a"], "task B": summary["task_b"]}, values=summary["forgetting"][method]))
