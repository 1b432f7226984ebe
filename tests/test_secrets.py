"""Secrets in the environment (S3 keys, MLflow passwords and tokens, the authenticated server's settings, KFP and hub
tokens) never reach a stage's outputs, logs or MLflow records: a real training stage runs tracked, and every byte it
left behind is searched for them. (tests/test_auth.py does the same against the authenticated server, with the
identities' real passwords.)"""

import os
import subprocess
import sys

import pytest

FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000042",
    "AWS_SECRET_ACCESS_KEY": "fake-s3-secret-9f8e7d6c5b4a",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-1a2b3c",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-4d5e6f",
    "KFP_TOKEN": "fake-kfp-token-7a8b9c",
    # The authenticated MLflow server's: its admin, its sign-up page's key, its auth database.
    "MLFLOW_AUTH_ADMIN_PASSWORD": "fake-admin-password-0e1d2c",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "fake-flask-key-3b4a5f",
    "CAOPD_AUTH_DATABASE_URI": "postgresql://mlflow:fake-auth-db-pw-6c7d8e@db:5432/mlflow",
    "HF_TOKEN": "hf_fakehubtoken0123456789",
}


@pytest.mark.slow  # a tracked training run in a process of its own
def test_fake_secrets_in_the_environment_appear_nowhere(tmp_path, records):
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "caopd.cli", "train", "--records", records,
         "--out", str(work / "train"), "--train.steps", "2", "--train.prompts-per-step", "2", "--train.k", "2",
         "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifact-root", str(work / "artifacts"),
         "--pipeline-run-id", "secrets-check"],
        cwd=work, env={**os.environ, **FAKE_SECRETS}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    written = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written) and any(p.name == "training_curves.png" for p in written)
    assert any("artifacts" in p.parts for p in written)  # the run's logged artifacts are searched too
    for secret in [*FAKE_SECRETS.values(), "fake-auth-db-pw-6c7d8e"]:
        assert secret not in result.stdout and secret not in result.stderr
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret!r} leaked into {path}"
