"""Inputs a Kubeflow pod can reach: datasets and models from S3, models from the MLflow registry, local paths confined
to the data root — fetched, verified, cached, and recorded in lineage. Against a real S3-compatible server (moto) and
a real MLflow server on 127.0.0.1, started once for the module."""

import json
import os
from pathlib import Path

import pytest
from servers import BUCKET

from caopd.config.gates import GateConfig
from caopd.config.stages import RolloutConfig
from caopd.config.tracking import TrackingConfig
from caopd.errors import CaopdInputError
from caopd.io import file_digest, write_jsonl
from caopd.models.tiny import CHECKPOINT_DIR
from caopd.tasks.arithmetic import generate_rows
from caopd.tasks.datasets import load_rows
from caopd.tracking.registry import CHAMPION, lineage, register_version
from caopd.tracking.sources import (
    WEIGHTS_TAG,
    Fetched,
    fetch_dataset,
    fetch_model,
    source_tags,
    sources_from_tags,
)
from caopd.tracking.stage_runs import lineage_tags, register_in_mlflow, tracked
from caopd.tracking.storage import MANIFEST, upload_folder
from caopd.tracking.tracker import TAG_METHOD, Tracker

METRICS = {"accuracy": 0.5, "ece": 0.2, "brier": 0.25}
CHEMISTRY = Path(__file__).parent / "fixtures" / "sciknoweval_chemistry_rows.jsonl"


# --- no server ------------------------------------------------------------------------------------------------------
def test_a_local_dataset_stays_confined_to_the_data_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere.jsonl"
    write_jsonl(root / "train.jsonl", generate_rows(3, 0))
    write_jsonl(outside, generate_rows(3, 0))

    fetched = fetch_dataset("train.jsonl", root, tmp_path / "cache")
    assert fetched.path == str(root.resolve() / "train.jsonl") and fetched.resolved == "train.jsonl"
    assert fetched.digest == file_digest(root / "train.jsonl")
    with pytest.raises(CaopdInputError, match="outside the data root") as info:
        fetch_dataset(str(outside), root, tmp_path / "cache")
    assert info.value.field == "data"
    with pytest.raises(CaopdInputError, match="does not exist") as info:
        fetch_dataset("missing.jsonl", root, field="train_data")
    assert info.value.file == "missing.jsonl" and info.value.field == "train_data"
    with pytest.raises(CaopdInputError, match="unsupported dataset source"):
        fetch_dataset("https://example.com/train.jsonl", root)
    assert not (tmp_path / "cache").exists()  # nothing local is copied


def test_local_models_and_hub_ids_pass_through_unchanged(tmp_path, monkeypatch):
    assert fetch_model("tiny", tmp_path) == Fetched("tiny", "tiny", file_digest(CHECKPOINT_DIR), "tiny")
    assert fetch_model(str(CHECKPOINT_DIR), tmp_path).digest == file_digest(CHECKPOINT_DIR)
    assert fetch_model("Qwen/Qwen3-0.6B", tmp_path) == Fetched("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "",
                                                               "Qwen/Qwen3-0.6B")
    for bad in ("models:/caopd", "models:/caopd/latest", "models:/@champion", "s3://bucket-only"):
        with pytest.raises(CaopdInputError, match="expected") as info:
            fetch_model(bad, tmp_path)
        assert info.value.field == "model"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(CaopdInputError, match="MLFLOW_TRACKING_URI"):
        fetch_model("models:/caopd@champion", tmp_path)


def test_source_tags_name_the_source_its_digest_and_what_it_resolved_to():
    fetched = Fetched("models:/caopd@champion", "/cache/model", "ab" * 32, "models:/caopd/3",
                      {"name": "caopd", "version": "3", "alias": "champion", "uri": "s3://b/models/x"})
    tags = source_tags("model", fetched)
    assert tags == {"caopd.source.model": "models:/caopd@champion", "caopd.source.model.sha256": "ab" * 32,
                    "caopd.source.model.resolved": "models:/caopd/3", "caopd.source.model.name": "caopd",
                    "caopd.source.model.version": "3", "caopd.source.model.alias": "champion",
                    "caopd.source.model.uri": "s3://b/models/x"}
    # A hub id has no digest and resolves to itself: one tag. Credentials in a URI never reach a tag.
    assert source_tags("teacher", Fetched("org/m", "org/m", "", "org/m")) == {"caopd.source.teacher": "org/m"}
    assert source_tags("data", Fetched("http://u:pw@h/x", "/x", "cd", "http://u:pw@h/x")) == {
        "caopd.source.data": "http://***@h/x", "caopd.source.data.sha256": "cd"}
    assert sources_from_tags({**tags, "caopd.data.train": "ef", "caopd.source.data": "d.jsonl"}) == {
        "data": {"source": "d.jsonl"},
        "model": {"source": "models:/caopd@champion", "sha256": "ab" * 32, "resolved": "models:/caopd/3",
                  "name": "caopd", "version": "3", "alias": "champion", "uri": "s3://b/models/x"}}
    with pytest.raises(ValueError, match="role"):
        source_tags("train.data", fetched)


# --- the S3 and MLflow servers --------------------------------------------------------------------------------------
def _tracker(url, tmp_path, pipeline_run_id):
    return Tracker(TrackingConfig(tracking_uri=url, experiment="sources", pipeline_run_id=pipeline_run_id),
                   tmp_path / "mlflow-local")


@pytest.mark.slow  # the S3 server
def test_datasets_from_s3_are_fetched_once_per_content_and_keep_their_format(s3_client_env, tmp_path):
    local = tmp_path / "prompts.jsonl"
    write_jsonl(local, generate_rows(5, 0))
    s3_client_env.upload_file(str(local), BUCKET, "data/prompts.jsonl")
    cache = tmp_path / "cache"

    fetched = fetch_dataset(f"s3://{BUCKET}/data/prompts.jsonl", tmp_path / "root", cache)
    assert fetched.digest == file_digest(local) and fetched.path.endswith("/prompts.jsonl")
    assert load_rows(fetched.path) == load_rows(local)
    first = os.stat(fetched.path)
    again = fetch_dataset(f"s3://{BUCKET}/data/prompts.jsonl", tmp_path / "root", cache)
    assert again.path == fetched.path and os.stat(again.path).st_ino == first.st_ino  # not downloaded again

    write_jsonl(local, generate_rows(6, 0))  # the object changes: its new content is fetched
    s3_client_env.upload_file(str(local), BUCKET, "data/prompts.jsonl")
    changed = fetch_dataset(f"s3://{BUCKET}/data/prompts.jsonl", None, cache)
    assert changed.digest == file_digest(local) != fetched.digest and len(load_rows(changed.path)) == 6

    # A save_to_disk folder under a prefix, uploaded with its manifest; with or without the trailing "/".
    import datasets

    folder = tmp_path / "chem"
    rows = [json.loads(line) for line in CHEMISTRY.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    upload_folder(folder, f"s3://{BUCKET}/data/chem")
    saved = fetch_dataset(f"s3://{BUCKET}/data/chem/", None, cache)
    assert saved.digest == file_digest(folder) and load_rows(saved.path) == rows
    assert fetch_dataset(f"s3://{BUCKET}/data/chem", None, cache).path == saved.path

    with pytest.raises(CaopdInputError, match="no such object") as info:
        fetch_dataset(f"s3://{BUCKET}/data/nothing.jsonl", None, cache, field="eval_data")
    assert info.value.field == "eval_data" and "data/nothing.jsonl" in str(info.value)
    s3_client_env.put_object(Bucket=BUCKET, Key="data/prompts.csv", Body=b"a,b\n")
    with pytest.raises(CaopdInputError, match="unknown dataset format '.csv'"):
        fetch_dataset(f"s3://{BUCKET}/data/prompts.csv", None, cache)
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]  # no partial download left behind


@pytest.mark.slow  # the S3 server
def test_a_model_folder_that_changed_after_upload_is_refused_naming_the_file(s3_client_env, tmp_path):
    cache = tmp_path / "cache"
    uri = f"s3://{BUCKET}/models/tampered"
    upload_folder(CHECKPOINT_DIR, uri)
    s3_client_env.put_object(Bucket=BUCKET, Key="models/tampered/config.json", Body=b"{}")
    with pytest.raises(CaopdInputError, match="config.json: sha256") as info:
        fetch_model(uri, cache)
    assert info.value.field == "model" and info.value.file == f"{uri}/config.json"

    uri = f"s3://{BUCKET}/models/bad-manifest"
    manifest = upload_folder(CHECKPOINT_DIR, uri)
    manifest["files"]["tokenizer.json"] = "0" * 64
    s3_client_env.put_object(Bucket=BUCKET, Key=f"models/bad-manifest/{MANIFEST}", Body=json.dumps(manifest).encode())
    with pytest.raises(CaopdInputError, match="tokenizer.json: sha256"):
        fetch_model(uri, cache)
    s3_client_env.put_object(Bucket=BUCKET, Key="models/bad-manifest/extra.bin", Body=b"x")
    with pytest.raises(CaopdInputError, match=f"extra.bin is not listed in {MANIFEST}"):
        fetch_model(uri, cache)
    assert not list(cache.rglob("*.safetensors"))  # nothing unverified is left where a later run would take it

    upload_folder(CHECKPOINT_DIR, f"s3://{BUCKET}/models/good")
    fetched = fetch_model(f"s3://{BUCKET}/models/good/", cache)
    assert fetched.digest == file_digest(CHECKPOINT_DIR) and not (Path(fetched.path) / MANIFEST).exists()


@pytest.mark.slow  # the S3 and MLflow servers
def test_the_champion_is_fetched_from_the_registry_and_its_sources_reach_lineage(s3_client_env, mlflow_url, tmp_path):
    from caopd.models.loading import load_model

    cache, name = tmp_path / "cache", "caopd-sources"
    local = tmp_path / "train.jsonl"
    write_jsonl(local, generate_rows(4, 0))
    s3_client_env.upload_file(str(local), BUCKET, "data/train.jsonl")

    # A stage run that read its model and data from elsewhere; registration carries the sources onto the version.
    tracker = _tracker(mlflow_url, tmp_path, "kfp-sources-1")
    data, base = fetch_dataset(f"s3://{BUCKET}/data/train.jsonl", None, cache), fetch_model("tiny", cache)
    tracked(tracker, "rollout-estimation", RolloutConfig(data=data.source), lambda: {}, tmp_path / "out",
            inputs={"train": (data.path, "training", data.source)},
            tags={**source_tags("model", base), **source_tags("data", data)})
    tracked(tracker, "opd-training", RolloutConfig(data=data.source), lambda: {}, tmp_path / "out",
            tags={TAG_METHOD: "caopd"}, sources={"teacher": base})
    tags = lineage_tags(tracker)
    assert tags["caopd.source.teacher"] == "tiny" and "caopd.source.teacher.sha256" in tags
    assert tags["caopd.source.data"] == data.source and tags["caopd.source.data.sha256"] == file_digest(local)
    assert tags["caopd.source.model"] == "tiny" and tags["caopd.source.model.sha256"] == file_digest(CHECKPOINT_DIR)
    [run] = tracker.stage_runs()["rollout-estimation"]
    [dataset_input] = tracker.client.get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(dataset_input.dataset.source) == {"uri": data.source}  # the S3 object, not the pod's copy

    registered = register_in_mlflow(tracker, name, CHECKPOINT_DIR, METRICS, "tiny", GateConfig(),
                                    artifact_root=f"s3://{BUCKET}/registry")
    client = tracker.client
    client.set_registered_model_alias(name, CHAMPION, registered["version"])
    assert lineage(client, f"{name}@{CHAMPION}")["sources"]["data"] == {"source": data.source,
                                                                        "sha256": file_digest(local)}

    # Scheduled retraining continues from the champion: fetched from S3, verified, loadable, recorded.
    champion = fetch_model(f"models:/{name}@{CHAMPION}", cache, tracking_uri=mlflow_url)
    assert champion.digest == file_digest(CHECKPOINT_DIR) == file_digest(champion.path)
    assert champion.resolved == f"models:/{name}/{registered['version']}"
    assert champion.details == {"name": name, "version": str(registered["version"]), "alias": CHAMPION,
                                "uri": registered["source"]}
    assert load_model(champion.path).model.config.hidden_size == 128
    inode = os.stat(champion.path).st_ino
    assert os.stat(fetch_model(f"models:/{name}/{registered['version']}", cache,
                               mlflow_client=client).path).st_ino == inode  # cached: not downloaded again

    with pytest.raises(CaopdInputError, match=r"has no alias 'nightly' \(aliases: challenger→1, champion→1\)") as info:
        fetch_model(f"models:/{name}@nightly", cache, tracking_uri=mlflow_url)
    assert info.value.field == "model" and f"models:/{name}@nightly" in str(info.value)
    with pytest.raises(CaopdInputError, match="no registered model 'nobody'"):
        fetch_model("models:/nobody@champion", cache, mlflow_client=client)

    # A version logged as a run artifact (runs:/ URI, through MLflow), keyed by its weights digest: once cached,
    # fetching it again needs no artifact at all.
    with tracker.stage("model-registration", {"artifact": "run"}) as stage_run:
        stage_run.log_artifacts([CHECKPOINT_DIR], "model")
    version = register_version(client, name, f"runs:/{stage_run.run_id}/model", stage_run.run_id, METRICS,
                               {WEIGHTS_TAG: file_digest(CHECKPOINT_DIR)}, "kfp-sources-2", GateConfig())
    from_run = fetch_model(f"models:/{name}/{version['version']}", cache, mlflow_client=client,
                           tracking_uri=mlflow_url)
    assert from_run.digest == file_digest(CHECKPOINT_DIR) and from_run.path != champion.path
    listed = s3_client_env.list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]
    for item in [o for o in listed if stage_run.run_id in o["Key"]]:
        s3_client_env.delete_object(Bucket=BUCKET, Key=item["Key"])
    assert fetch_model(f"models:/{name}/{version['version']}", cache, mlflow_client=client).path == from_run.path

    # A version whose stated weights digest does not match what its source holds is refused.
    wrong = register_version(client, name, registered["source"], None, METRICS, {WEIGHTS_TAG: "0" * 64},
                             "kfp-sources-3", GateConfig())
    with pytest.raises(CaopdInputError, match=f"states {WEIGHTS_TAG} 0000"):
        fetch_model(f"models:/{name}/{wrong['version']}", cache, mlflow_client=client)


@pytest.mark.slow  # the S3 and MLflow servers, and a rollout stage of the tiny model
def test_a_stage_reads_prompts_from_s3_and_its_base_model_from_the_champion_and_names_both_in_lineage(
        s3_client_env, mlflow_url, tmp_path, monkeypatch):
    from caopd.cli import main

    monkeypatch.setenv("CAOPD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the stage takes the registry from --tracking-uri
    name, prompts = "caopd-stage-sources", tmp_path / "prompts.jsonl"
    write_jsonl(prompts, generate_rows(4, 1))
    s3_client_env.upload_file(str(prompts), BUCKET, "stage/prompts.jsonl")
    setup = _tracker(mlflow_url, tmp_path, "kfp-stage-sources-0")
    registered = register_in_mlflow(setup, name, CHECKPOINT_DIR, METRICS, "tiny", GateConfig(),
                                    artifact_root=f"s3://{BUCKET}/registry")
    setup.client.set_registered_model_alias(name, CHAMPION, registered["version"])

    source, champion = f"s3://{BUCKET}/stage/prompts.jsonl", f"models:/{name}@{CHAMPION}"
    assert main(["rollout", "--quiet", "--data", source, "--model", champion, "--k", "2",
                 "--sampling.max-new-tokens", "8", "--out", str(tmp_path / "rollouts"), "--tracking-uri", mlflow_url,
                 "--experiment", "sources", "--pipeline-run-id", "kfp-stage-sources-1"]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the registry was the stage's, for its run only

    tracker = _tracker(mlflow_url, tmp_path, "kfp-stage-sources-1")
    [run] = tracker.stage_runs()["rollout-estimation"]
    tags = run.data.tags
    assert (tags["caopd.source.train_data"], tags["caopd.source.train_data.sha256"]) == (source, file_digest(prompts))
    assert (tags["caopd.source.model"], tags["caopd.source.model.sha256"]) == (champion, file_digest(CHECKPOINT_DIR))
    assert tags["caopd.source.model.resolved"] == f"models:/{name}/{registered['version']}"
    lineage = lineage_tags(tracker)
    assert lineage["caopd.source.train_data.sha256"] == file_digest(prompts)
    assert lineage["caopd.source.model.sha256"] == file_digest(CHECKPOINT_DIR)
    summary = json.loads((tmp_path / "rollouts" / "summary.json").read_text())
    assert summary["n_prompts"] == 4 and summary["data_digest"] == file_digest(prompts)

    # Scheduled retraining continues from the champion: the training stage fetches it too, and says so.
    rollouts, records = tmp_path / "rollouts", tmp_path / "targets"
    assert main(["targets", "--data", source, "--rollouts", str(rollouts / "rollouts.jsonl"), "--estimates",
                 str(rollouts / "estimates.jsonl"), "--model", champion, "--out", str(records)]) == 0
    assert main(["train", "--quiet", "--records", str(records / "records.jsonl"), "--model", champion,
                 "--train.steps", "1", "--train.prompts-per-step", "2", "--train.k", "2",
                 "--train.sampling.max-new-tokens", "8", "--out", str(tmp_path / "train"), "--tracking-uri",
                 mlflow_url, "--experiment", "sources", "--pipeline-run-id", "kfp-stage-sources-1"]) == 0
    [training] = tracker.stage_runs()["opd-training"]
    assert training.data.tags["caopd.source.model.resolved"] == f"models:/{name}/{registered['version']}"
    assert training.data.tags["caopd.source.model.sha256"] == file_digest(CHECKPOINT_DIR)
