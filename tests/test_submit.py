"""caopd submit / schedule against a fake KFP v2 REST server on 127.0.0.1 that records the requests."""

import json
import socket
from pathlib import Path

import pytest
import yaml
from kfp_fake_server import FakeKfp

from caopd.cli import main
from caopd.errors import CaopdInputError
from caopd.kfp.submit import check_cron, parse_params, pipeline_parameters, read_token
from caopd.pipelines import COMPILED_PIPELINE

TOKEN = "s3cret-token"


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    with FakeKfp() as server:
        yield server


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_submit_uploads_the_compiled_spec_and_starts_a_run_with_typed_parameters(kfp, capsys):
    code, out, err = _run(capsys, "submit", "--host", kfp.url, "--param", "steps=5", "--param", "lr=0.001",
                          "--param", "train_baseline=false", "--param", 'gpu_node_selector={"pool": "h100"}',
                          "--param", "base_model=Qwen/Qwen3-8B")
    assert code == 0, err
    result = json.loads(out)  # stdout is one JSON document, ready for jq in CI
    [pipeline_id] = kfp.pipelines
    assert kfp.pipelines[pipeline_id] == "caopd"
    uploaded = [v["spec"] for v in kfp.versions[pipeline_id]]
    assert uploaded and all(spec == COMPILED_PIPELINE.read_bytes() for spec in uploaded)
    assert result["pipeline_id"] == pipeline_id and result["uploaded"] is True
    [run] = kfp.runs
    assert run["runtime_config"]["parameters"] == {"steps": 5, "lr": 0.001, "train_baseline": False,
                                                   "gpu_node_selector": {"pool": "h100"},
                                                   "base_model": "Qwen/Qwen3-8B"}
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id,
                                                 "pipeline_version_id": result["version_id"]}
    assert run["experiment_id"] == result["experiment_id"] and kfp.experiments[result["experiment_id"]] == "caopd"
    assert result["run_id"].startswith("run-") and result["url"].endswith(f"/#/runs/details/{result['run_id']}")
    # The token travels in the Authorization header of every request, never on the command line.
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in kfp.requests)


def test_resubmitting_reuses_the_version_and_a_changed_spec_adds_one(kfp, capsys, tmp_path):
    assert _run(capsys, "submit", "--host", kfp.url)[0] == 0
    uploads_before = len(kfp.uploads())
    code, out, _ = _run(capsys, "submit", "--host", kfp.url)
    assert code == 0 and json.loads(out)["uploaded"] is False
    assert len(kfp.uploads()) == uploads_before and len(kfp.runs) == 2
    assert kfp.runs[0]["pipeline_version_reference"] == kfp.runs[1]["pipeline_version_reference"]

    changed = tmp_path / "changed.yaml"
    changed.write_text(COMPILED_PIPELINE.read_text().replace("# Name: caopd", "# Name: caopd (changed)"))
    code, out, _ = _run(capsys, "submit", "--host", kfp.url, "--pipeline-file", str(changed))
    assert code == 0 and json.loads(out)["uploaded"] is True
    [pipeline_id] = kfp.pipelines
    assert kfp.versions[pipeline_id][-1]["spec"] == changed.read_bytes()
    assert kfp.uploads()[-1]["path"].endswith("/pipelines/upload_version")
    assert kfp.runs[-1]["pipeline_version_reference"]["pipeline_version_id"] == json.loads(out)["version_id"]


def test_schedule_creates_a_recurring_run_with_the_cron(kfp, capsys):
    code, out, err = _run(capsys, "schedule", "--host", kfp.url, "--cron", "0 0 3 * * 0", "--param", "seed=7")
    assert code == 0, err
    [job] = kfp.recurring_runs
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert job["runtime_config"]["parameters"] == {"seed": 7}
    assert job["mode"] == "ENABLE" and job["no_catchup"] is True and int(job["max_concurrency"]) == 1
    assert json.loads(out)["recurring_run_id"].startswith("recurring-")
    assert json.loads(out)["cron"] == "0 0 3 * * 0"


def test_a_token_file_is_read_when_given(kfp, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("KFP_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    assert _run(capsys, "submit", "--host", kfp.url, "--token-file", str(token_file))[0] == 0
    assert {r["headers"].get("authorization") for r in kfp.requests} == {"Bearer from-a-file"}


@pytest.mark.parametrize("status, words", [(401, ["401", "token"]), (403, ["403", "token"]),
                                           (503, ["503", "server-side"]), (500, ["500"])])
def test_server_errors_are_one_clear_line(kfp, capsys, status, words):
    kfp.fail_with = status
    code, out, err = _run(capsys, "submit", "--host", kfp.url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("caopd: error: KFP at ") and kfp.url in err
    assert all(w in err for w in words)
    assert len(kfp.requests) == 1  # one health check, no retries hammering a failing server


def test_an_error_after_the_health_check_is_explained_too(kfp, capsys):
    kfp.fail_on["/runs"] = 503
    code, out, err = _run(capsys, "submit", "--host", kfp.url)
    assert code == 1 and out == "" and kfp.runs == []
    last = err.strip().splitlines()[-1]  # above it: the links kfp.Client printed for what did succeed
    assert last.startswith("caopd: error: KFP at ") and "503" in last and "create run" in last


def test_an_unreachable_host_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = _run(capsys, "submit", "--host", f"http://127.0.0.1:{port}")
    assert code == 1 and err.startswith(f"caopd: error: cannot reach KFP at http://127.0.0.1:{port}")
    code, _, err = _run(capsys, "submit", "--host", "kubeflow.example.com")
    assert code == 2 and "field '--host'" in err and "http(s)://" in err
    code, _, err = _run(capsys, "submit", "--host", "http://no-such-host.invalid")
    assert code == 1 and "cannot reach KFP at http://no-such-host.invalid" in err


def test_bad_parameters_and_crons_fail_before_any_request(kfp, capsys):
    for argv, words in [(["submit", "--param", "stepz=5"], ["unknown pipeline parameter 'stepz'", "steps"]),
                        (["submit", "--param", "steps=five"], ["steps", "NUMBER_INTEGER"]),
                        (["submit", "--param", "train_baseline=yes"], ["true or false"]),
                        (["submit", "--param", "gpu_tolerations={}"], ["JSON array"]),
                        (["submit", "--param", "steps"], ["NAME=VALUE"]),
                        (["schedule", "--cron", "0 3 * * 0"], ["6 fields", "'0 0 3 * * 0'"]),
                        (["schedule", "--cron", "daily"], ["6 space-separated fields"])]:
        code, _, err = _run(capsys, *argv[:1], "--host", kfp.url, *argv[1:])
        assert code == 2, argv
        assert all(w in err for w in words), (argv, err)
    assert kfp.requests == []


def test_parameter_types_come_from_the_spec():
    types = pipeline_parameters(COMPILED_PIPELINE)
    spec = next(yaml.safe_load_all(COMPILED_PIPELINE.read_text()))
    assert set(types) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert parse_params(["k=4", "beta=0.25", "kind_weights={\"add_1x1\": 1}", "gpu_tolerations=[]", "task=mcq"],
                        types) == {"k": 4, "beta": 0.25, "kind_weights": {"add_1x1": 1}, "gpu_tolerations": [],
                                   "task": "mcq"}
    assert check_cron("  0 0 3 * * 0 ") == "0 0 3 * * 0"


def test_mlflow_settings_with_a_password_never_become_a_run_parameter(kfp, capsys):
    settings = 'mlflow_settings={"tracking_uri": "http://pipeline:hunter2-pw@mlflow:5000", "experiment": "caopd"}'
    code, out, err = _run(capsys, "submit", "--host", kfp.url, "--param", settings)
    assert code == 2 and "field '--param mlflow_settings': tracking_uri:" in err and "must not carry credentials" in err
    assert "hunter2" not in out + err and not kfp.runs  # refused before anything reached the server
    code, out, err = _run(capsys, "submit", "--host", kfp.url, "--param", settings[:-1])  # bad JSON: not echoed
    assert code == 2 and "hunter2" not in err and "bad value for a STRUCT parameter" in err


def test_token_sources(tmp_path):
    mounted = tmp_path / "sa-token"
    mounted.write_text("mounted\n")
    assert read_token(None, {"KFP_TOKEN": "env"}) == "env"
    assert read_token(None, {"KF_PIPELINES_SA_TOKEN_PATH": str(mounted)}) == "mounted"
    assert read_token(None, {"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "absent")}) is None
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(CaopdInputError, match="empty"):
        read_token(str(empty), {})


def test_the_ci_workflow_compiles_tests_and_submits_on_a_schedule():
    workflow = yaml.safe_load((Path(__file__).parents[1] / ".github" / "workflows" / "retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["retrain"]["steps"]
    scripts = [step.get("run", "") for step in steps]
    order = [next(i for i, s in enumerate(scripts) if needle in s)
             for needle in ("torch==2.13.0", "caopd compile", "pytest", "caopd submit")]
    assert order == sorted(order)
    submit = next(step for step in steps if "caopd submit" in step.get("run", ""))
    assert submit["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    assert "secrets." not in submit["run"] and "--token" not in submit["run"].replace("--token-file", "")
    assert "--pipeline-file build/caopd_pipeline.yaml" in submit["run"]
