"""calibration-evaluation: the base model and every trained arm on the same held-out prompts."""


from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from caopd.config.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def calibration_evaluation(data: Input[Dataset], models: Input[list[Model]], preset: str, task: str,
                           base_model: str, eval_temperature: float, eval_top_p: float, eval_max_new_tokens: int,
                           eval_seed: int, engine: str, thinking: str, ask_confidence: bool,
                           confidence_instruction: str, mlflow_settings: dict, pipeline_run_id: str,
                           evaluation: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    # The inputs by name: the one mapping builds the config (see rollout_estimation).
    inputs = dict(locals())
    from pathlib import Path

    from caopd.config.parameters import config_values
    from caopd.config.presets import with_preset
    from caopd.config.stages import CALIBRATION_EVALUATION, EVAL, EvaluateConfig
    from caopd.evaluation.html import html_report
    from caopd.stages.evaluate import run_evaluation
    from caopd.stages.prepare import ood_set
    from caopd.stages.train import trained_arms
    from caopd.tracking.stage_runs import tracked, tracker_if_configured

    trained = trained_arms([model.path for model in models])
    arms = {"base": base_model, **{m: str(trained[m]) for m in ("opd", "caopd") if m in trained}}
    ood = ood_set(data.path)  # held-out kinds, or an OOD set of the user's own in any task
    cfg = EvaluateConfig(**config_values(EvaluateConfig, with_preset(inputs)), models=arms,
                         data=str(Path(data.path) / EVAL), extra_data={"ood": ood[0]} if ood else {},
                         extra_tasks={"ood": ood[1]} if ood else {})
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, Path(evaluation.path).parent / "mlflow")
    summary = tracked(tracker, CALIBRATION_EVALUATION.id, cfg, lambda: run_evaluation(cfg, evaluation.path),
                      evaluation.path, inputs={"eval": (cfg.data, "evaluation"),
                                               **{name: (path, "evaluation") for name, path in cfg.extra_data.items()}})
    scored = {"": summary["arms"], **{f"{name}_": s["arms"] for name, s in summary["sets"].items()}}
    for prefix, arm_metrics in scored.items():
        for arm, values in arm_metrics.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and value == value:  # KFP metrics take no NaN (one-class AUROC)
                    metrics.log_metric(f"{prefix}{arm}_{key}", value)
    Path(report.path).write_text(html_report("Calibration evaluation", sorted(Path(evaluation.path).glob("*.png")),
                                             arms=summary["arms"],
                                             other_sets={n: s["arms"] for n, s in summary["sets"].items()}))
