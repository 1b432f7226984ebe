"""calibration-evaluation: the base model and every trained arm on the same held-out prompts."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from caopd.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def calibration_evaluation(data: Input[Dataset], models: Input[List[Model]], task: str, base_model: str,
                           temperature: float, max_new_tokens: int, seed: int, engine: str,
                           evaluation: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    from pathlib import Path

    from caopd.report import html_report
    from caopd.rollout import SamplingConfig
    from caopd.stages.evaluate import EvaluateConfig, run_evaluation
    from caopd.stages.prepare import EVAL
    from caopd.stages.train import trained_arms

    trained = trained_arms([model.path for model in models])
    arms = {"base": base_model, **{m: str(trained[m]) for m in ("opd", "caopd") if m in trained}}
    cfg = EvaluateConfig(models=arms, task=task, data=str(Path(data.path) / EVAL), engine=engine,
                         sampling=SamplingConfig(n=1, temperature=temperature, max_new_tokens=max_new_tokens,
                                                 seed=seed))
    summary = run_evaluation(cfg, evaluation.path)
    for arm, values in summary["arms"].items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and value == value:  # KFP metrics take no NaN (one-class AUROC)
                metrics.log_metric(f"{arm}_{key}", value)
    Path(report.path).write_text(html_report("Calibration evaluation", sorted(Path(evaluation.path).glob("*.png")),
                                             arms=summary["arms"]))
