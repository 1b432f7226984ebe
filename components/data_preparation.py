"""data-preparation: the train and eval prompt sets as one Dataset artifact (a folder)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from caopd.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data_preparation(task: str, train_source: str, eval_source: str, n_train: int, n_eval: int, seed: int,
                     kind_weights: dict, ood_kinds: list, ood_source: str, ood_task: str,
                     continual_kinds: list, mlflow_settings: dict, pipeline_run_id: str, data: Output[Dataset]):
    from pathlib import Path

    from caopd.config.stages import CONTINUAL_TRAIN, EVAL, OOD, TRAIN, DataConfig
    from caopd.stages.prepare import run_data_preparation
    from caopd.tracking.stage_runs import tracked, tracker_if_configured

    cfg = DataConfig(task=task, train_source=train_source, eval_source=eval_source, n_train=n_train,
                     n_eval=n_eval, seed=seed, kind_weights=kind_weights, ood_kinds=ood_kinds, ood_source=ood_source,
                     ood_task=ood_task, continual_kinds=continual_kinds)
    out = Path(data.path)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, out.parent / "mlflow")
    summary = tracked(tracker, "data-preparation", cfg, lambda: run_data_preparation(cfg, out), out,
                      inputs={"train": (out / TRAIN, "training"), "eval": (out / EVAL, "evaluation"),
                              **({"ood": (out / OOD, "evaluation")} if ood_kinds or ood_source else {}),
                              **({"task_b_train": (out / CONTINUAL_TRAIN, "training")} if continual_kinds else {})})
    data.metadata.update({"n_train": summary["n_train"], "n_eval": summary["n_eval"], "n_ood": summary.get("n_ood", 0),
                          **summary["outputs"]})
