import os
import shutil
from pathlib import Path

# One thread for torch in the test process and, through the environment, in every process a test starts (CLI runs,
# torchrun, kfp.local tasks, servers), unless OMP_NUM_THREADS says otherwise. The tiny model's many small ops gain
# nothing from a second thread, and on a loaded machine a thread pool waiting at each op's barrier for a descheduled
# thread makes them 10-30x slower. Set before torch loads, so that torch starts with it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.get_num_threads() != int(os.environ["OMP_NUM_THREADS"]):  # torch was loaded before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))



@pytest.fixture(scope="session")
def tiny_model():
    from caopd.models.loading import load_model

    return load_model("tiny")


def _write_arithmetic_files(folder: Path) -> tuple[Path, Path]:
    from caopd.io import write_jsonl
    from caopd.tasks.arithmetic import generate_rows

    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    write_jsonl(train, generate_rows(6, 0, id_prefix="train"))
    write_jsonl(evaluation, generate_rows(6, 1, id_prefix="eval"))
    return train, evaluation


@pytest.fixture
def arithmetic_files(tmp_path):
    """Small train / eval prompt files for end-to-end runs."""
    return _write_arithmetic_files(tmp_path)


@pytest.fixture(scope="session")
def session_targets(tmp_path_factory) -> Path:
    """Target replacement's output folder for the small training file: K = 2 rollouts of the tiny model per prompt.
    Built once per session (rollout estimation is the expensive part); tests read it through ``records``."""
    from caopd.config.stages import RolloutConfig, TargetsConfig
    from caopd.stages.estimate import run_rollout_estimation
    from caopd.stages.targets import run_target_replacement

    root = tmp_path_factory.mktemp("records")
    train, _ = _write_arithmetic_files(root)
    run_rollout_estimation(RolloutConfig(data=str(train), k=2), root / "rollouts", progress=False)
    run_target_replacement(TargetsConfig(data=str(train), rollouts=str(root / "rollouts" / "rollouts.jsonl"),
                                         estimates=str(root / "rollouts" / "estimates.jsonl")),
                           root / "targets")
    return root / "targets"


@pytest.fixture
def records(tmp_path, arithmetic_files, session_targets):
    """Training records (CaOPD targets) of the small training file, as ``tmp_path/targets/records.jsonl``: this
    test's own copy of the session's, so a test may change or delete it."""
    targets = shutil.copytree(session_targets, tmp_path / "targets")
    return str(targets / "records.jsonl")


# --- the S3-compatible and MLflow servers on 127.0.0.1, one of each per test module that asks ----------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server (moto) with the test bucket; its endpoint URL."""
    import boto3
    from servers import BUCKET, s3_env, start_s3

    server, endpoint = start_s3(tmp_path_factory.mktemp("s3"))
    env = s3_env(endpoint)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def mlflow_url(s3, tmp_path_factory):
    """An MLflow server whose artifacts go to the S3 server; its URL."""
    from servers import start_mlflow

    server, url = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def mlflow_auth(s3, tmp_path_factory):
    """caopd's authenticated MLflow server (the chart's), artifacts on the S3 server: (its URL, its access log)."""
    from servers import start_mlflow

    workdir = tmp_path_factory.mktemp("mlflow-auth")
    server, url = start_mlflow(workdir, s3, auth=True)
    yield url, workdir / "server.log"
    server.stop()


@pytest.fixture
def s3_client_env(s3, monkeypatch):
    """A boto3 client on the S3 server, with the same variables set for the code under test."""
    import boto3
    from servers import s3_env

    for name, value in s3_env(s3).items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3", endpoint_url=s3)
