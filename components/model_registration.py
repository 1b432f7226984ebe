"""model-registration: the CaOPD model, its metrics and its lineage into the registry (never cached)."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from caopd.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def model_registration(models: Input[List[Model]], evaluation: Input[Dataset], data: Input[Dataset],
                       rollouts: Input[Dataset], model_name: str, registry_dir: str, base_model: str,
                       registered: Output[Model]):
    from pathlib import Path

    from caopd.data import read_json
    from caopd.stages.register import RegisterConfig, run_registration
    from caopd.stages.train import trained_arms

    trained = trained_arms([m.path for m in models])
    if "caopd" not in trained:
        raise ValueError(f"no CaOPD model among the trained arms ({sorted(trained)})")
    caopd_model = next(m for m in models if Path(m.path) == trained["caopd"].parent)
    arms = read_json(Path(evaluation.path) / "summary.json")["arms"]
    cfg = RegisterConfig(
        name=model_name, model_dir=str(trained["caopd"]),
        # Without a registry folder the registry lives in this task's output, so the artifact store keeps it.
        registry_dir=registry_dir or registered.path, metrics=arms["caopd"],
        lineage={"base_model": base_model, "data": data.uri, "data_outputs": data.metadata,
                 "rollouts": rollouts.uri, "model": caopd_model.uri,
                 "model_digest": caopd_model.metadata.get("model_digest"), "evaluation": evaluation.uri})
    record = run_registration(cfg)
    registered.metadata.update({k: record[k] for k in ("name", "version", "path", "model_digest", "created")})
