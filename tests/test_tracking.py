"""MLflow lineage and the registry against a real MLflow server and a real S3-compatible server on 127.0.0.1."""

import time

import pytest
from servers import (
    BUCKET,
    S3_KEY_ID,
    S3_SECRET,
    free_port,
    start_mlflow,
)

from caopd.config.gates import GateConfig
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import (
    ESTIMATES,
    MODEL_DIR,
    RECORDS,
    ROLLOUTS,
    EvaluateConfig,
    RolloutConfig,
    TargetsConfig,
    TrainStageConfig,
)
from caopd.config.tracking import TrackingConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdServiceError
from caopd.io import file_digest, write_jsonl
from caopd.stages.estimate import run_rollout_estimation
from caopd.stages.evaluate import run_evaluation
from caopd.stages.targets import run_target_replacement
from caopd.stages.train import run_training
from caopd.tasks.arithmetic import generate_rows
from caopd.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    lineage,
    promote,
    register_version,
)
from caopd.tracking.stage_runs import register_in_mlflow, tracked
from caopd.tracking.tracker import (
    TAG_METHOD,
    TAG_STAGE,
    Tracker,
    flat_params,
    redact_uri,
)

# The tests against the MLflow and S3 servers (processes of their own, started once per module) are slow; those on
# a local SQLite store or on no server at all are fast.


def _tracker(url, tmp_path, experiment, pipeline_run_id, **kw):
    return Tracker(TrackingConfig(tracking_uri=url, experiment=experiment, pipeline_run_id=pipeline_run_id, **kw),
                   tmp_path / "mlflow-local")


def run_stages(tracker, out):
    """The pipeline's stages on a tiny budget, each in its MLflow run (what the components do)."""
    train, evaluation = out / "train.jsonl", out / "eval.jsonl"
    write_jsonl(train, generate_rows(8, 0, id_prefix="train"))
    write_jsonl(evaluation, generate_rows(8, 1, id_prefix="eval"))
    sampling = SamplingConfig(max_new_tokens=8)
    rollout_cfg = RolloutConfig(data=str(train), k=2, sampling=sampling)
    tracked(tracker, "rollout-estimation", rollout_cfg,
            lambda: run_rollout_estimation(rollout_cfg, out / "rollouts", progress=False), out / "rollouts",
            inputs={"train": (train, "training")})
    models = {"base": "tiny"}
    for method in ("opd", "caopd"):
        targets_cfg = TargetsConfig(method=method, data=str(train), rollouts=str(out / "rollouts" / ROLLOUTS),
                                    estimates=str(out / "rollouts" / ESTIMATES))
        tracked(tracker, "target-replacement", targets_cfg,
                lambda cfg=targets_cfg, method=method: run_target_replacement(cfg, out / f"targets_{method}"),
                out / f"targets_{method}", tags={TAG_METHOD: method})
        train_cfg = TrainStageConfig(records=str(out / f"targets_{method}" / RECORDS), train=TrainConfig(
            method=method, steps=2, prompts_per_step=2, k=2, sampling=sampling))
        tracked(tracker, "opd-training", train_cfg,
                lambda cfg=train_cfg, method=method: run_training(cfg, out / f"train_{method}", False),
                out / f"train_{method}", inputs={"records": (out / f"targets_{method}" / RECORDS, "training")},
                tags={TAG_METHOD: method})
        models[method] = str(out / f"train_{method}" / MODEL_DIR)
    eval_cfg = EvaluateConfig(models=models, data=str(evaluation), sampling=SamplingConfig(n=1, max_new_tokens=8))
    summary = tracked(tracker, "calibration-evaluation", eval_cfg,
                      lambda: run_evaluation(eval_cfg, out / "evaluation", progress=False), out / "evaluation",
                      inputs={"eval": (evaluation, "evaluation")})
    return train, evaluation, summary


@pytest.mark.slow  # the MLflow and S3 servers
def test_stages_log_a_run_tree_and_register_a_version_with_its_lineage(mlflow_url, s3_client_env, tmp_path, capfd):
    tracker = _tracker(mlflow_url, tmp_path, "lineage", "kfp-run-1", artifact_root=f"s3://{BUCKET}/runs")
    train, evaluation, summary = run_stages(tracker, tmp_path)
    result = register_in_mlflow(tracker, "caopd-lineage", tmp_path / "train_caopd" / MODEL_DIR,
                                summary["arms"]["caopd"], "tiny", GateConfig(), artifact_root=f"s3://{BUCKET}/runs")
    client = tracker.client

    runs = tracker.stage_runs()
    [parent] = runs["pipeline"]
    children = [r for stage, rs in runs.items() if stage != "pipeline" for r in rs]
    assert {r.data.tags[TAG_STAGE] for r in children} == {"rollout-estimation", "target-replacement", "opd-training",
                                                          "calibration-evaluation", "model-registration"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)

    [caopd_train] = [r for r in runs["opd-training"] if r.data.tags[TAG_METHOD] == "caopd"]
    assert caopd_train.data.params["train.method"] == "caopd" and caopd_train.data.params["train.steps"] == "2"
    assert [m.step for m in client.get_metric_history(caopd_train.info.run_id, "loss")] == [1, 2]
    [evaluation_run] = runs["calibration-evaluation"]
    assert evaluation_run.data.metrics["caopd_ece"] == pytest.approx(summary["arms"]["caopd"]["ece"])
    [rollout_run] = runs["rollout-estimation"]
    [dataset_input] = client.get_run(rollout_run.info.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "train" and dataset_input.dataset.digest == file_digest(train)[:36]
    assert {t.value for t in dataset_input.tags} == {"training"}

    keys = {o["Key"] for o in s3_client_env.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert any(k.endswith(f"{evaluation_run.info.run_id}/artifacts/reliability_caopd.png") for k in keys)
    assert any(k.endswith(f"{caopd_train.info.run_id}/artifacts/training_curves.png") for k in keys)
    weights = [k for k in keys if k.startswith("runs/models/caopd-lineage/") and k.endswith("model.safetensors")]
    assert len(weights) == 1
    head = s3_client_env.head_object(Bucket=BUCKET, Key=weights[0])
    model_file = tmp_path / "train_caopd" / MODEL_DIR / "model.safetensors"
    assert head["Metadata"]["sha256"] == file_digest(model_file)

    version = client.get_model_version("caopd-lineage", str(result["version"]))
    assert version.source == f"s3://{BUCKET}/" + weights[0].rsplit("/", 1)[0]
    tags = version.tags
    assert tags["caopd.run.rollout-estimation"] == rollout_run.info.run_id
    assert tags["caopd.run.opd-training"] == caopd_train.info.run_id
    assert tags["caopd.run.calibration-evaluation"] == evaluation_run.info.run_id
    assert tags["caopd.data.train"] == file_digest(train) and tags["caopd.data.eval"] == file_digest(evaluation)
    assert tags["caopd.base_model"] == "tiny" and tags["caopd.pipeline_run_id"] == "kfp-run-1"
    assert float(tags["caopd.metric.ece"]) == pytest.approx(summary["arms"]["caopd"]["ece"])

    chain = lineage(client, "caopd-lineage@challenger")
    assert [step["run_id"] for step in chain["runs"]] == [rollout_run.info.run_id, caopd_train.info.run_id,
                                                          evaluation_run.info.run_id]
    assert chain["datasets"] == {"train": file_digest(train), "eval": file_digest(evaluation),
                                 "records": tags["caopd.data.records"]}

    # Registering the same pipeline run again returns its version.
    again = register_in_mlflow(tracker, "caopd-lineage", tmp_path / "train_caopd" / MODEL_DIR,
                               summary["arms"]["caopd"], "tiny", GateConfig(), artifact_root=f"s3://{BUCKET}/runs")
    assert again["version"] == result["version"] and again["created"] is False
    assert len(client.search_model_versions("name = 'caopd-lineage'")) == 1

    # No credential anywhere in what was logged.
    logged = [str(r.data.params) + str(r.data.tags) for r in client.search_runs([tracker.experiment_id])]
    logged += [str(v.tags) + v.source for v in client.search_model_versions("name = 'caopd-lineage'")]
    output = capfd.readouterr()
    logged += [output.out, output.err]
    assert not any(secret in text for text in logged for secret in (S3_SECRET, S3_KEY_ID))


def _metrics(accuracy, ece, brier):
    return {"accuracy": accuracy, "ece": ece, "brier": brier, "auroc": 0.7, "spr": 0.6, "mean_confidence": 0.6,
            "overconfidence_gap": 0.0, "missing_rate": 0.0}


@pytest.mark.slow  # the MLflow and S3 servers
def test_gates_decide_the_challenger_and_promotion(mlflow_url, tmp_path):
    tracker = _tracker(mlflow_url, tmp_path, "gates", "unused")
    client, name = tracker.client, "caopd-gates"

    def register(run_id, metrics, mode="enabled"):
        return register_version(client, name, f"s3://{BUCKET}/models/{run_id}", None, metrics, {}, run_id,
                                GateConfig(mode=mode, max_ece=0.3))

    first = register("run-1", _metrics(0.60, 0.10, 0.20))
    assert first["decision"]["passed"] and client.get_model_version_by_alias(name, CHALLENGER).version == "1"
    promoted = promote(client, name, CHAMPION, GateConfig())
    assert promoted["moved"] and client.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert CHALLENGER not in client.get_registered_model(name).aliases

    worse = register("run-2", _metrics(0.61, 0.15, 0.21))  # ECE above the champion's
    assert not worse["decision"]["passed"]
    failed = {c["name"] for c in worse["decision"]["checks"] if not c["passed"]}
    assert failed == {"ece_vs_champion", "brier_vs_champion"}
    assert CHALLENGER not in client.get_registered_model(name).aliases
    assert '"passed": false' in client.get_model_version(name, "2").tags["caopd.gate"]

    too_high = register("run-3", _metrics(0.9, 0.35, 0.1))  # beats the champion's Brier but not max_ece
    assert [c["name"] for c in too_high["decision"]["checks"] if not c["passed"]] == ["ece", "ece_vs_champion"]

    dry = register("run-4", _metrics(0.62, 0.08, 0.18), mode="dry-run")
    assert dry["decision"]["passed"] and dry["decision"]["mode"] == "dry-run"
    assert CHALLENGER not in client.get_registered_model(name).aliases  # dry-run moves no alias

    better = register("run-5", _metrics(0.62, 0.08, 0.18))
    assert better["decision"]["passed"] and client.get_model_version_by_alias(name, CHALLENGER).version == "5"
    assert register("run-5", _metrics(0.1, 0.9, 0.9))["version"] == 5  # same pipeline run: same version
    assert len(client.search_model_versions(f"name = '{name}'")) == 5

    dry_promotion = promote(client, name, CHAMPION, GateConfig(mode="dry-run"))
    assert dry_promotion["decision"]["passed"] and not dry_promotion["moved"]
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert promote(client, name, CHAMPION, GateConfig())["moved"]
    assert client.get_model_version_by_alias(name, CHAMPION).version == "5"
    assert "caopd.promotion.champion" in client.get_model_version(name, "5").tags
    # Promoting a worse version by number re-checks the gates against the new champion and refuses.
    refused = promote(client, name, CHAMPION, GateConfig(), version=2)
    assert not refused["moved"] and client.get_model_version_by_alias(name, CHAMPION).version == "5"


def test_a_tracking_server_that_is_down_fails_fast_and_clearly(tmp_path, monkeypatch):
    url = f"http://user:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="must not carry credentials") as refused:  # a parameter: refused
        TrackingConfig(tracking_uri=url)
    assert "hunter2" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the environment's: used, and redacted in messages
    start = time.monotonic()
    with pytest.raises(CaopdServiceError) as info:
        _tracker("", tmp_path, "down", "x", connect_timeout_s=3)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "not reachable" in message and "attempts" in message and "hunter2" not in message
    assert TrackingConfig().connect_timeout_s == 30


@pytest.mark.slow  # the MLflow and S3 servers
def test_the_server_stopping_mid_stage_keeps_the_outputs_and_registration_reruns(s3, s3_client_env, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the client's retries, without their waits
    port = free_port()
    server, url = start_mlflow(tmp_path / "server", s3, port=port)
    try:
        tracker = _tracker(url, tmp_path, "flaky", "kfp-run-flaky")
        train = tmp_path / "train.jsonl"
        write_jsonl(train, generate_rows(6, 0, id_prefix="train"))
        cfg = RolloutConfig(data=str(train), k=1, sampling=SamplingConfig(max_new_tokens=8))

        def rollouts_then_server_dies():
            summary = run_rollout_estimation(cfg, tmp_path / "rollouts", progress=False)
            server.stop()
            return summary

        with pytest.raises(CaopdServiceError):
            tracked(tracker, "rollout-estimation", cfg, rollouts_then_server_dies, tmp_path / "rollouts",
                    inputs={"train": (train, "training")})
        assert (tmp_path / "rollouts" / "summary.json").is_file() and (tmp_path / "rollouts" / ROLLOUTS).is_file()

        server, url = start_mlflow(tmp_path / "server", s3, port=port)  # same database, back up
        tracker = _tracker(url, tmp_path, "flaky", "kfp-run-flaky")
        result = register_in_mlflow(tracker, "caopd-flaky", _tiny_model_dir(tmp_path), _metrics(0.5, 0.1, 0.2),
                                    "tiny", GateConfig())
        assert result["created"] and result["version"] == 1
    finally:
        server.stop()


def _tiny_model_dir(tmp_path):
    from caopd.models.loading import load_model

    loaded = load_model("tiny")
    target = tmp_path / "tiny-copy"
    loaded.model.save_pretrained(target, safe_serialization=True)
    loaded.tokenizer.save_pretrained(target)
    return target


def test_credentials_are_redacted_from_params_and_uris():
    params = flat_params({"tracking_uri": "https://alice:pa55word@mlflow.example.com/", "aws_secret_access_key": "x",
                          "nested": {"api_key": "y", "lr": 0.1}, "token_file": "/secrets/t"})
    assert params == {"tracking_uri": "https://***@mlflow.example.com/", "nested.lr": "0.1"}
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_the_run_kfp_injects_is_the_parent(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'injected.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("injected", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id).info.run_id
    for name, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id,
                        "MLFLOW_RUN_ID": parent}.items():
        monkeypatch.setenv(name, value)
    tracker = Tracker(TrackingConfig(experiment="ignored", pipeline_run_id="kfp-7"), tmp_path)
    with tracker.stage("data-preparation", {"n_train": 3}) as stage_run:
        stage_run.log_metrics({"n_train": 3})
    run = client.get_run(stage_run.run_id)
    assert tracker.experiment_id == experiment_id and run.info.experiment_id == experiment_id
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["caopd.pipeline_run_id"] == "kfp-7"
    assert run.data.params == {"n_train": "3"} and run.data.metrics == {"n_train": 3.0}
    assert client.get_experiment_by_name("ignored") is None


@pytest.mark.slow  # the MLflow and S3 servers
def test_large_weights_go_up_in_parts_with_their_checksums(s3_client_env, tmp_path):
    import json
    import os

    from caopd.tracking.storage import MANIFEST, MULTIPART_THRESHOLD, upload_folder

    folder = tmp_path / "weights"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "model-00001.safetensors").write_bytes(os.urandom(MULTIPART_THRESHOLD + 1024))
    (folder / "config.json").write_text("{}")
    manifest = upload_folder(folder, f"s3://{BUCKET}/big/v1")
    big = s3_client_env.head_object(Bucket=BUCKET, Key="big/v1/shards/model-00001.safetensors")
    assert big["ETag"].strip('"').endswith("-2")  # a multipart upload's ETag counts its parts
    assert big["Metadata"]["sha256"] == file_digest(folder / "shards" / "model-00001.safetensors")
    stored = json.loads(s3_client_env.get_object(Bucket=BUCKET, Key=f"big/v1/{MANIFEST}")["Body"].read())
    assert stored == manifest and set(stored["files"]) == {"config.json", "shards/model-00001.safetensors"}
    assert stored["digest"] == file_digest(folder)


def test_rerunning_a_stage_in_the_same_pipeline_run_leaves_one_run(tmp_path):
    from caopd.config.stages import DataConfig
    from caopd.stages.prepare import run_data_preparation
    from caopd.tracking.stage_runs import tracked

    tracker = _tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, "idempotent", "kfp-run-7")
    cfg = DataConfig(n_train=5, n_eval=5)
    first = tracked(tracker, "data-preparation", cfg, lambda: run_data_preparation(cfg, tmp_path / "a"), tmp_path / "a")
    written = (tmp_path / "a" / "train.jsonl").read_bytes()
    again = tracked(tracker, "data-preparation", cfg, lambda: run_data_preparation(cfg, tmp_path / "a"), tmp_path / "a")
    [run] = tracker.stage_runs()["data-preparation"]  # a retry replaced the first run, with the same outputs
    assert run.info.run_id == again["mlflow_run_id"] != first["mlflow_run_id"]
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == written
    assert tracker.client.get_run(first["mlflow_run_id"]).info.lifecycle_stage == "deleted"
    other = DataConfig(n_train=6, n_eval=5)  # other inputs: a run of their own beside it
    tracked(tracker, "data-preparation", other, lambda: run_data_preparation(other, tmp_path / "b"), tmp_path / "b")
    assert len(tracker.stage_runs()["data-preparation"]) == 2
    elsewhere = _tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, "idempotent", "kfp-run-8")
    tracked(elsewhere, "data-preparation", cfg, lambda: run_data_preparation(cfg, tmp_path / "c"), tmp_path / "c")
    assert len(tracker.stage_runs()["data-preparation"]) == 2  # another pipeline run's stage is its own
