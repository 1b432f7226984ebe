"""model-registration: the CaOPD model into the MLflow registry with its lineage, gated (never cached)."""


from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from caopd.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def model_registration(models: Input[list[Model]], evaluation: Input[Dataset], model_name: str, base_model: str,
                       promotion_gates: dict, mlflow_settings: dict, pipeline_run_id: str,
                       registered: Output[Model]):
    from pathlib import Path

    from caopd.config.gates import GateConfig
    from caopd.config.stages import SUMMARY, RegisterConfig
    from caopd.io import read_json
    from caopd.stages.register import run_registration
    from caopd.stages.train import trained_arms
    from caopd.tracking.stage_runs import tracker_if_configured

    trained = trained_arms([m.path for m in models])
    if "caopd" not in trained:
        raise ValueError(f"no CaOPD model among the trained arms ({sorted(trained)})")
    cfg = RegisterConfig(name=model_name, model_dir=str(trained["caopd"]), base_model=base_model,
                         metrics=read_json(Path(evaluation.path) / SUMMARY)["arms"]["caopd"],
                         gates=GateConfig(**promotion_gates))
    # Without a tracking server the registry is a SQLite store in this task's output, kept by the artifact store.
    tracker = tracker_if_configured(mlflow_settings, pipeline_run_id, registered.path, required=True)
    result = run_registration(cfg, tracker)
    registered.metadata.update({"name": result["name"], "version": result["version"], "source": result["source"],
                                "created": result["created"], "gates_passed": result["decision"]["passed"],
                                "tracking_uri": result["tracking_uri"]})
