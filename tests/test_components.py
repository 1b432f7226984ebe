"""Every KFP component's function, called directly (``component.python_func``) in this process on a tiny budget and
wired as the pipeline wires it: each input from the pipeline parameter of the same name (its default, or the tiny
value below) or from the artifacts of the step before. The pipeline runs through kfp.local are the slow tier; this
is the components' own code in the fast one."""

import inspect
import json
from pathlib import Path

import pytest
from kfp import dsl

from caopd.components import (
    calibration_evaluation,
    continual_distillation,
    continual_enabled,
    continual_evaluation,
    data_preparation,
    merge_rollout_shards,
    model_registration,
    opd_training,
    rollout_estimation,
    rollout_shard_indices,
    target_replacement,
    training_arms,
)
from caopd.pipelines import caopd_pipeline

TINY = {"n_train": 6, "n_eval": 6, "k": 2, "rollout_max_new_tokens": 12, "train_max_new_tokens": 12,
        "eval_max_new_tokens": 12, "steps": 1, "prompts_per_step": 2,
        "continual_kinds": ["mul_2x2"], "engine": "transformers", "rollout_shards": 2,
        "train_options": {"micro_batch_size": 4}}
PARAMETERS = {name: p.default for name, p in inspect.signature(caopd_pipeline.pipeline_func).parameters.items()}
# and what the pipeline passes beside its parameters: the run's id, and the PVC fixed at compile time (none)
PARAMETERS.update(TINY, mlflow_settings={}, pipeline_run_id="components-test", workspace_pvc="")


def call(component, **given):
    """The component's function with ``given`` and every other input from the pipeline parameter of that name."""
    names = inspect.signature(component.python_func).parameters
    missing = [n for n in names if n not in given and n not in PARAMETERS]
    assert not missing, f"{component.name}: no value for {missing}"
    return component.python_func(**{n: PARAMETERS[n] for n in names if n not in given}, **given)


class Artifacts:
    """Output artifacts in a folder, as KFP hands them to a component (a local path for each)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, kind, name: str):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return kind(name=name, uri=str(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The pipeline's steps, in order, one shard and arm at a time; returns every output artifact by name."""
    out = Artifacts(tmp_path_factory.mktemp("components"))
    a: dict = {}
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "CAOPD_DATA_ROOT"):
            env.delenv(name, raising=False)  # no tracking server: the stages run untracked, registration locally
        a["data"] = out(dsl.Dataset, "data")
        call(data_preparation, data=a["data"])
        a["shard_indices"] = call(rollout_shard_indices, num_shards=PARAMETERS["rollout_shards"])
        shards = []
        for index in a["shard_indices"]:
            shards.append(out(dsl.Dataset, f"shard-{index}"))
            call(rollout_estimation, data=a["data"], shard_index=index, rollouts=shards[-1])
        a["rollouts"], a["base_metrics"] = out(dsl.Dataset, "rollouts"), out(dsl.Metrics, "base-metrics")
        call(merge_rollout_shards, shards=shards, rollouts=a["rollouts"], base_metrics=a["base_metrics"])
        a["arms"] = call(training_arms)
        a["continual"] = call(continual_enabled)
        a["models"] = []
        for method in a["arms"]:
            records = a[f"records-{method}"] = out(dsl.Dataset, f"records-{method}")
            call(target_replacement, data=a["data"], rollouts=a["rollouts"], method=method, records=records)
            model = out(dsl.Model, f"model-{method}")
            call(opd_training, records=records, method=method, model=model,
                 training_report=out(dsl.HTML, f"training-report-{method}/report.html"))
            a["models"].append(model)
            if a["continual"] and method == "caopd":  # one arm is enough to run the forgetting check's code
                a["continual_model"] = out(dsl.Model, "continual-model")
                call(continual_distillation, data=a["data"], model=model, continual_model=a["continual_model"])
                a["forgetting"], a["forgetting_metrics"] = (out(dsl.Dataset, "forgetting"),
                                                            out(dsl.Metrics, "forgetting-metrics"))
                call(continual_evaluation, data=a["data"], model=model, continual_model=a["continual_model"],
                     evaluation=a["forgetting"], metrics=a["forgetting_metrics"],
                     report=out(dsl.HTML, "forgetting-report/report.html"))
        a["evaluation"], a["metrics"] = out(dsl.Dataset, "evaluation"), out(dsl.Metrics, "metrics")
        a["report"] = out(dsl.HTML, "report/report.html")
        call(calibration_evaluation, data=a["data"], models=a["models"],
             evaluation=a["evaluation"], metrics=a["metrics"], report=a["report"])
        a["registered"] = out(dsl.Model, "registered")
        call(model_registration, models=a["models"], evaluation=a["evaluation"], registered=a["registered"])
    return a


def test_data_preparation_writes_the_sets_the_next_steps_read(run):
    data = run["data"]
    assert data.metadata["n_train"] == TINY["n_train"] and data.metadata["n_eval"] == TINY["n_eval"]
    for name in ("train.jsonl", "eval.jsonl", "continual_train.jsonl", "continual_eval.jsonl"):
        assert (Path(data.path) / name).is_file(), name


def test_the_rollout_shards_merge_into_one_set_with_the_base_metrics(run):
    assert run["shard_indices"] == list(range(TINY["rollout_shards"]))
    assert run["rollouts"].metadata["n_prompts"] == TINY["n_train"]
    assert run["rollouts"].metadata["n_rollouts"] == TINY["n_train"] * TINY["k"]
    assert "base_rollouts_accuracy" in run["base_metrics"].metadata
    with pytest.raises(ValueError, match="rollout_shards must be >= 1"):
        rollout_shard_indices.python_func(num_shards=0)


def test_each_arm_gets_its_records_and_its_trained_model_with_a_report(run):
    assert run["arms"] == ["caopd", "opd"] and run["continual"] is True
    for model in run["models"]:
        method = model.metadata["method"]
        assert run[f"records-{method}"].metadata["n_records"] > 0
        assert model.metadata["steps"] == TINY["steps"] and model.metadata["model_digest"]
        assert (Path(model.path) / "model").is_dir() and not (Path(model.path) / "checkpoints").exists()
    assert training_arms.python_func(train_baseline=False) == ["caopd"]


def test_evaluation_scores_every_arm_and_logs_only_metrics_kfp_can_show(run):
    summary = json.loads((Path(run["evaluation"].path) / "summary.json").read_text())
    assert set(summary["arms"]) == {"base", "opd", "caopd"}
    logged = run["metrics"].metadata
    assert {"base_ece", "opd_ece", "caopd_ece"} <= set(logged)
    assert all(value == value for value in logged.values())  # no NaN
    assert Path(run["report"].path).read_text().strip()


def test_the_caopd_model_is_registered_in_the_tasks_own_store(run):
    registered = run["registered"].metadata
    assert registered["name"] == PARAMETERS["model_name"] and registered["version"] == 1
    assert registered["created"] is True and registered["tracking_uri"].startswith("sqlite:///")


def test_the_forgetting_check_continues_on_task_b_and_scores_both_tasks(run):
    assert run["continual_model"].metadata["phase"] == "task_b"
    assert run["forgetting_metrics"].metadata
    assert continual_enabled.python_func(continual_kinds=[]) is False
