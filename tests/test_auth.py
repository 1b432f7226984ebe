"""Authenticated MLflow, against the real thing: caopd's server app (MLflow's basic-auth app plus the protected
alias) on 127.0.0.1, SQLite for runs, users and permissions, artifacts and weights on the S3 test server. The
bootstrap creates the identities the chart's Secrets hold; then each identity does what it may and is refused, in
one line naming it and the permission it lacks, what it may not."""

import json
import os
from types import SimpleNamespace

import pytest
from servers import ADMIN_PASSWORD, ADMIN_USER, BUCKET, FLASK_SECRET_KEY, S3_SECRET
from test_tracking import run_stages

from caopd.cli import main
from caopd.config.gates import GateConfig
from caopd.config.stages import ESTIMATES, MODEL_DIR, ROLLOUTS, TargetsConfig
from caopd.config.tracking import CREDENTIALS_DIR_ENV, PASSWORD_ENV, TOKEN_ENV, USERNAME_ENV, TrackingConfig
from caopd.stages.targets import run_target_replacement
from caopd.tracking.bootstrap import bootstrap
from caopd.tracking.identity import CaopdAuthError, Credentials, read_credentials_dir
from caopd.tracking.registry import CHALLENGER, CHAMPION, lineage
from caopd.tracking.stage_runs import register_in_mlflow, tracked
from caopd.tracking.tracker import TAG_METHOD, TAG_SUPERSEDED, Tracker

pytestmark = pytest.mark.slow  # the MLflow and S3 servers, and the stages on the tiny model

EXPERIMENT, MODEL = "caopd-auth-test", "caopd-auth-model"
PASSWORDS = {"pipeline": "pipeline-pw-8e2a51c7d3", "promoter": "promoter-pw-1f7b93e0a4",
             "reader": "reader-pw-5c0d8a2e6b"}
IDENTITIES = {role: Credentials(f"caopd-{role}", password) for role, password in PASSWORDS.items()}
ALL_SECRETS = (*PASSWORDS.values(), ADMIN_PASSWORD, FLASK_SECRET_KEY, S3_SECRET)


IDENTITY_VARIABLES = (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, CREDENTIALS_DIR_ENV)


@pytest.fixture(autouse=True)
def own_identity():
    """Each test starts and ends without an MLflow identity in the environment, whatever the code under test wrote
    there (load_credentials copies a Secret folder's credentials into it)."""
    saved = {name: os.environ.pop(name, None) for name in IDENTITY_VARIABLES}
    yield
    for name in IDENTITY_VARIABLES:
        os.environ.pop(name, None)
        if saved[name] is not None:
            os.environ[name] = saved[name]


@pytest.fixture
def as_identity():
    """Switch this process's MLflow identity: a role, 'admin', or None (anonymous)."""
    def switch(role):
        for name in IDENTITY_VARIABLES:
            os.environ.pop(name, None)
        if role is not None:
            user, password = (ADMIN_USER, ADMIN_PASSWORD) if role == "admin" else \
                (IDENTITIES[role].username, IDENTITIES[role].password)
            os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = user, password

    return switch


@pytest.fixture(scope="module")
def bootstrapped(mlflow_auth):
    """The identities, created once per module by the bootstrap as the admin."""
    url, _ = mlflow_auth
    env = {USERNAME_ENV: ADMIN_USER, PASSWORD_ENV: ADMIN_PASSWORD}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        first = bootstrap(url, EXPERIMENT, MODEL, IDENTITIES)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    return url, first


def _tracker(url, tmp_path, pipeline_run_id):
    return Tracker(TrackingConfig(tracking_uri=url, experiment=EXPERIMENT, pipeline_run_id=pipeline_run_id,
                                  artifact_root=f"s3://{BUCKET}/auth"), tmp_path / "local")


@pytest.fixture
def caopd(capsys):
    """Run a caopd command here with the variables ``env`` as its only identity: (exit code, stdout, stderr)."""
    def run(*args, env=None):
        saved = {name: os.environ.pop(name, None) for name in IDENTITY_VARIABLES}
        os.environ.update(env or {})
        try:
            run.seen.extend(capsys.readouterr())
            code = main(list(args))
            out, err = capsys.readouterr()
        finally:
            for name in IDENTITY_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update({name: value for name, value in saved.items() if value is not None})
        run.seen.extend((out, err))
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    run.seen = []  # everything printed, this test's own output included: searched for credentials
    return run


def _identity_env(role):
    return {USERNAME_ENV: IDENTITIES[role].username, PASSWORD_ENV: IDENTITIES[role].password}


def _grants(url):
    """Every user and what it holds, as the admin sees them (MLflow's REST API)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(url)
    users = http_request(creds, "/api/2.0/mlflow/users/list", "GET").json()["users"]
    held = {}
    for user in users:
        listed = http_request(creds, "/api/3.0/mlflow/users/permissions/list", "GET",
                              params={"username": user["username"]}).json()
        held[user["username"]] = (user["is_admin"], sorted(json.dumps(p, sort_keys=True)
                                                            for p in listed["permissions"]))
    return held


def test_the_bootstrap_creates_the_identities_once_and_running_it_again_changes_nothing(bootstrapped, as_identity,
                                                                                       tmp_path, caopd):
    url, first = bootstrapped
    assert f"created experiment '{EXPERIMENT}'" in first["changes"]
    assert f"created registered model '{MODEL}'" in first["changes"]
    assert {c for c in first["changes"] if c.startswith("created user")} == \
        {f"created user '{c.username}'" for c in IDENTITIES.values()}
    as_identity("admin")
    before = _grants(url)
    assert before[IDENTITIES["pipeline"].username][0] is False  # not an admin: the alias rule applies to it
    again = bootstrap(url, EXPERIMENT, MODEL, IDENTITIES)
    assert again["changes"] == [] and _grants(url) == before

    # Drift is repaired: a grant changed by hand, a password set elsewhere, an identity made admin.
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(url)
    pipeline, reader, promoter = (IDENTITIES[role].username for role in ("pipeline", "reader", "promoter"))
    auth.revoke_user_permission(pipeline, "registered_model", MODEL)
    auth.grant_user_permission(pipeline, "registered_model", MODEL, "READ")
    auth.update_user_password(reader, "another-password-123")
    auth.update_user_admin(promoter, True)
    repaired = bootstrap(url, EXPERIMENT, MODEL, IDENTITIES)["changes"]
    assert sorted(repaired) == sorted([
        f"granted EDIT on registered model '{MODEL}' to '{pipeline}' (held READ)",
        f"set the password of '{reader}' to its Secret's", f"removed admin from '{promoter}'"])
    assert _grants(url) == before and bootstrap(url, EXPERIMENT, MODEL, IDENTITIES)["changes"] == []

    # The CLI as the chart's job runs it: Secret folders, the admin from the environment; nothing to change.
    folders = {}
    for role, credentials in IDENTITIES.items():
        folders[role] = folder = tmp_path / role
        folder.mkdir()
        for key in ("username", "password"):
            (folder / key).write_text(getattr(credentials, key) + "\n")  # `echo` into a Secret leaves a newline
    result = caopd("bootstrap-auth", "--tracking-uri", url, "--experiment", EXPERIMENT, "--model", MODEL,
                    *(f"--{role}-credentials={folder}" for role, folder in folders.items()),
                    env={USERNAME_ENV: ADMIN_USER, PASSWORD_ENV: ADMIN_PASSWORD})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changes"] == [] and _grants(url) == before
    assert read_credentials_dir(folders["reader"]) == IDENTITIES["reader"]

    # A role's identity cannot bootstrap: one line, exit 1.
    refused = caopd("bootstrap-auth", "--tracking-uri", url, f"--pipeline-credentials={folders['pipeline']}",
                     env=_identity_env("pipeline"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"caopd: error: MLflow at {url} refused identity 'caopd-pipeline' (HTTP 403): bootstrapping")


def test_an_unauthenticated_client_is_refused_once_in_one_line(bootstrapped, as_identity, tmp_path, mlflow_auth,
                                                               caopd):
    url, log = mlflow_auth
    as_identity(None)
    with pytest.raises(CaopdAuthError, match=r"refused an anonymous client .*\(HTTP 401\): not authenticated"):
        _tracker(url, tmp_path, "anonymous")
    result = caopd("lineage", f"{MODEL}@{CHALLENGER}", "--tracking-uri", url)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"caopd: error: MLflow at {url} refused an anonymous client") and "HTTP 401" in line
    # A wrong password: refused once, not retried (MLflow's client retries only 408, 429 and 5xx).
    before = log.read_text().count("401 Unauthorized")
    wrong = caopd("lineage", f"{MODEL}@{CHALLENGER}", "--tracking-uri", url,
                   env={USERNAME_ENV: IDENTITIES["reader"].username, PASSWORD_ENV: "not-the-password"})
    assert wrong.returncode == 1 and "refused identity 'caopd-reader' (HTTP 401)" in wrong.stderr
    assert log.read_text().count("401 Unauthorized") == before + 1


def test_the_reader_reads_lineage_and_nothing_else(bootstrapped, as_identity, tmp_path, mlflow_auth, caopd):
    url, _ = mlflow_auth
    as_identity("admin")
    from mlflow import MlflowClient

    admin = MlflowClient(url, url)
    other = admin.create_experiment("not-for-readers")
    [version] = admin.search_model_versions(f"name = '{MODEL}'")[:1] or [None]
    if version is None:  # a version to read, registered by the admin
        version = admin.create_model_version(MODEL, f"s3://{BUCKET}/auth/some-model")
    as_identity("reader")
    reader = MlflowClient(url, url)
    chain = lineage(reader, f"{MODEL}/{version.version}", url)
    assert chain["version"]["name"] == MODEL
    # Through a mounted Secret folder rather than the environment: the CLI reads the chain too.
    folder = tmp_path / "reader-secret"
    folder.mkdir()
    (folder / "username").write_text(IDENTITIES["reader"].username)
    (folder / "password").write_text(IDENTITIES["reader"].password)
    shown = caopd("lineage", f"{MODEL}/{version.version}", "--tracking-uri", url, "--json",
                   env={CREDENTIALS_DIR_ENV: str(folder)})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["version"]["version"] == int(version.version)

    from mlflow.exceptions import MlflowException

    for write in (lambda: reader.create_run(reader.get_experiment_by_name(EXPERIMENT).experiment_id),
                  lambda: reader.set_model_version_tag(MODEL, version.version, "k", "v"),
                  lambda: reader.set_registered_model_alias(MODEL, CHALLENGER, version.version),
                  lambda: reader.get_experiment(other)):
        with pytest.raises(MlflowException) as refused:
            write()
        assert refused.value.error_code == "PERMISSION_DENIED"
    # In caopd's terms: one line naming the reader and the permission logging needs.
    with pytest.raises(CaopdAuthError, match=rf"refused identity 'caopd-reader' \(HTTP 403\): it needs EDIT on "
                                             rf"experiment '{EXPERIMENT}'"):
        tracker = _tracker(url, tmp_path, "reader-run")
        with tracker.stage("data-preparation", {"n": 1}):
            pass
    assert not any(IDENTITIES["reader"].password in text for text in caopd.seen)


def test_the_pipeline_registers_a_challenger_cannot_crown_it_and_a_manager_can(
        bootstrapped, as_identity, tmp_path, mlflow_auth, s3_client_env, caopd, capsys):
    url, log = mlflow_auth
    as_identity("pipeline")
    tracker = _tracker(url, tmp_path, "kfp-run-auth")
    _, _, summary = run_stages(tracker, tmp_path)
    result = register_in_mlflow(tracker, MODEL, tmp_path / "train_caopd" / MODEL_DIR, summary["arms"]["caopd"],
                                "tiny", GateConfig(), artifact_root=f"s3://{BUCKET}/auth")
    client = tracker.client
    version = str(result["version"])
    assert client.get_model_version_by_alias(MODEL, CHALLENGER).version == version
    gate = json.loads(client.get_model_version(MODEL, version).tags["caopd.gate"])
    assert gate["decided_by"] == "caopd-pipeline" and gate["passed"]

    # A rerun of a stage replaces its run: EDIT may not delete runs, so the earlier one is marked superseded.
    [earlier] = [r for r in tracker.stage_runs()["target-replacement"] if r.data.tags[TAG_METHOD] == "caopd"]
    targets_cfg = TargetsConfig(method="caopd", data=str(tmp_path / "train.jsonl"),
                                rollouts=str(tmp_path / "rollouts" / ROLLOUTS),
                                estimates=str(tmp_path / "rollouts" / ESTIMATES))
    tracked(tracker, "target-replacement", targets_cfg,
            lambda: run_target_replacement(targets_cfg, tmp_path / "targets_again"), tmp_path / "targets_again",
            tags={TAG_METHOD: "caopd"})
    [rerun] = [r for r in tracker.stage_runs()["target-replacement"] if r.data.tags[TAG_METHOD] == "caopd"]
    assert rerun.info.run_id != earlier.info.run_id
    assert client.get_run(earlier.info.run_id).data.tags[TAG_SUPERSEDED] == rerun.info.run_id

    # `caopd promote` as the pipeline: refused before anything is written, in one line naming who and what.
    refused = caopd("promote", MODEL, "--to", CHAMPION, "--tracking-uri", url, env=_identity_env("pipeline"))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert line == (f"caopd: error: MLflow at {url} refused identity 'caopd-pipeline' (HTTP 403): moving "
                    f"'{CHAMPION}' needs MANAGE on registered model '{MODEL}'; it holds EDIT")
    assert f"caopd.promotion.{CHAMPION}" not in client.get_model_version(MODEL, version).tags
    assert CHAMPION not in client.get_registered_model(MODEL).aliases
    # The server enforces it too, for any client: one 403, not retried.
    from mlflow.exceptions import MlflowException

    before = log.read_text().count('POST /api/2.0/mlflow/registered-models/alias HTTP/1.1" 403')
    with pytest.raises(MlflowException, match="needs MANAGE; user 'caopd-pipeline' has EDIT") as refusal:
        client.set_registered_model_alias(MODEL, CHAMPION, version)
    assert refusal.value.error_code == "PERMISSION_DENIED"
    assert log.read_text().count('POST /api/2.0/mlflow/registered-models/alias HTTP/1.1" 403') == before + 1
    assert CHAMPION not in client.get_registered_model(MODEL).aliases

    # The promoter (MANAGE on the model) crowns it; the decision names it.
    promoted = caopd("promote", MODEL, "--to", CHAMPION, "--tracking-uri", url,
                      env=_identity_env("promoter"))
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["moved"] is True
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == version
    decision = json.loads(client.get_model_version(MODEL, version).tags[f"caopd.promotion.{CHAMPION}"])
    assert decision["decided_by"] == "caopd-promoter"

    # No credential anywhere: outputs, the server's database and log, every object in the bucket, the output.
    as_identity("admin")
    logged = [str(r.data.params) + str(r.data.tags) for r in client.search_runs([tracker.experiment_id])]
    logged += [str(v.tags) + v.source for v in client.search_model_versions(f"name = '{MODEL}'")]
    logged += [*caopd.seen, *capsys.readouterr(), log.read_text()]
    files = [p for p in tmp_path.rglob("*") if p.is_file()] + [p for p in log.parent.iterdir() if p.is_file()]
    objects = [s3_client_env.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
               for o in s3_client_env.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len(objects) > 5 and any(p.name == "mlflow.db" for p in files)
    for secret in ALL_SECRETS:
        assert not any(secret in text for text in logged), secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret!r} leaked into {path}"
        assert not any(secret.encode() in body for body in objects), secret


def test_the_pipeline_cannot_get_around_the_champion_rule(bootstrapped, as_identity, mlflow_auth):
    """Every other way to crown a model or forge the decision, as the pipeline identity with a plain HTTP client:
    refused by the server (caopd.tracking.server_app), and the registry unchanged."""
    import requests
    from mlflow import MlflowClient

    url, _ = mlflow_auth
    as_identity("admin")
    admin = MlflowClient(url, url)
    version = (admin.search_model_versions(f"name = '{MODEL}'") or
               [admin.create_model_version(MODEL, f"s3://{BUCKET}/auth/some-model")])[0].version
    admin.set_registered_model_alias(MODEL, CHALLENGER, version)
    champion_before = {a: v for a, v in admin.get_registered_model(MODEL).aliases.items()}
    tags_before = dict(admin.get_model_version(MODEL, version).tags)
    pipeline = (IDENTITIES["pipeline"].username, IDENTITIES["pipeline"].password)

    def call(method, path, *, json_body=None, params=None, text_body=None):
        headers = {"Content-Type": "text/plain"} if text_body is not None else {}
        return requests.request(method, f"{url}{path}", json=json_body, params=params, data=text_body,
                                headers=headers, auth=pipeline, timeout=30)

    refusals = [
        # its own model: whoever creates one holds MANAGE on it, so only an admin creates them
        (call("POST", "/api/2.0/mlflow/registered-models/create", json_body={"name": "pipeline-owned"}),
         403, "creating registered model 'pipeline-owned'"),
        # renaming the project's model away, to create a new one under its name
        (call("POST", "/api/2.0/mlflow/registered-models/rename", json_body={"name": MODEL, "new_name": "x"}),
         403, f"renaming registered model '{MODEL}' needs MANAGE"),
        # removing the champion, through either API prefix
        (call("DELETE", "/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": CHAMPION}),
         403, "needs MANAGE"),
        (call("POST", "/ajax-api/2.0/mlflow/registered-models/alias",
              json_body={"name": MODEL, "alias": CHAMPION, "version": version}), 403, "needs MANAGE"),
        # a query string that names the challenger while the body names the champion
        (call("DELETE", "/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": CHALLENGER},
              text_body=json.dumps({"name": MODEL, "alias": CHAMPION})), 400, "name different values"),
        # a forged promotion decision
        (call("POST", "/api/2.0/mlflow/model-versions/set-tag",
              json_body={"name": MODEL, "version": version, "key": f"caopd.promotion.{CHAMPION}",
                         "value": json.dumps({"passed": True, "decided_by": IDENTITIES["promoter"].username})}),
         403, f"writing the decision 'caopd.promotion.{CHAMPION}'"),
    ]
    for response, status, reason in refusals:
        assert (response.status_code, reason in response.text) == (status, True), response.text
    assert admin.get_registered_model(MODEL).aliases == champion_before
    assert dict(admin.get_model_version(MODEL, version).tags) == tags_before
    assert [m.name for m in admin.search_registered_models("name = 'pipeline-owned'")] == []
    # What the pipeline may do still works: the challenger, and a tag of its own.
    assert call("POST", "/api/2.0/mlflow/registered-models/alias",
                json_body={"name": MODEL, "alias": CHALLENGER, "version": version}).status_code == 200
    assert call("POST", "/api/2.0/mlflow/model-versions/set-tag",
                json_body={"name": MODEL, "version": version, "key": "note", "value": "ok"}).status_code == 200
