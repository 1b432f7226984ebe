"""data-preparation: the train and eval prompt sets as one Dataset artifact (a folder)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from caopd.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def data_preparation(preset: str, task: str, train_source: str, eval_source: str, n_train: int, n_eval: int, seed: int,
                     kind_weights: dict, ood_kinds: list, ood_source: str, ood_task: str,
                     continual_kinds: list, mlflow_settings: dict, pipeline_run_id: str, data: Output[Dataset]):
    # The inputs by name, before any other local exists: the one mapping (caopd.config.parameters) builds
    # DataConfig from them, so the pipeline's parameters and DataConfig's fields are listed once.
    # A preset fills the parameters left at their defaults (it names the task).
    from caopd.config.presets import with_preset

    inputs = with_preset(dict(locals()))

    from pathlib import Path

    from caopd.config.parameters import config_values
    from caopd.config.stages import CONTINUAL_TRAIN, DATA_PREPARATION, EVAL, OOD, TRAIN, DataConfig
    from caopd.stages.prepare import run_data_preparation
    from caopd.tracking.stage_runs import tracked, tracker_if_configured

    cfg = DataConfig(**config_values(DataConfig, inputs))
    out = Path(data.path)
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, out.parent / "mlflow")
    summary = tracked(tracker, DATA_PREPARATION.id, cfg, lambda: run_data_preparation(cfg, out), out,
                      inputs={"train": (out / TRAIN, "training"), "eval": (out / EVAL, "evaluation"),
                              **({"ood": (out / OOD, "evaluation")} if ood_kinds or ood_source else {}),
                              **({"task_b_train": (out / CONTINUAL_TRAIN, "training")} if continual_kinds else {})})
    data.metadata.update({"n_train": summary["n_train"], "n_eval": summary["n_eval"], "n_ood": summary.get("n_ood", 0),
                          **summary["outputs"]})
