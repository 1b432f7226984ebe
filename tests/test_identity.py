"""The MLflow client's identity without a server: credentials from the environment or a mounted Secret folder, the
one-line refusals, and the retry policy (a refusal is asked once, a transient failure again) against a stand-in
that counts requests. The real authenticated server: tests/test_auth.py."""

import os

import pytest
from mlflow.exceptions import MlflowException
from servers import InProcessHTTP, QuietHandler

from caopd.config.tracking import CREDENTIALS_DIR_ENV, PASSWORD_ENV, TOKEN_ENV, USERNAME_ENV
from caopd.errors import CaopdInputError
from caopd.tracking.bootstrap import ROLES, role_grants
from caopd.tracking.identity import (
    CaopdAuthError,
    Credentials,
    acting_identity,
    load_credentials,
    read_credentials_dir,
    refusal,
)
from caopd.tracking.server_app import PROTECTED_ALIASES_ENV, protected_aliases
from caopd.tracking.tracker import service_errors


@pytest.fixture
def no_identity(monkeypatch):
    for name in (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, CREDENTIALS_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _secret_folder(folder, username="caopd-pipeline", password="s3cret-pw\n"):
    folder.mkdir()
    (folder / "username").write_text(username)
    (folder / "password").write_text(password)
    return folder


def test_a_mounted_secret_folder_is_read_without_its_trailing_newline(tmp_path):
    assert read_credentials_dir(_secret_folder(tmp_path / "s")) == Credentials("caopd-pipeline", "s3cret-pw")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "username").write_text("u")
    with pytest.raises(CaopdInputError, match=r"half: no file 'password'"):
        read_credentials_dir(tmp_path / "half")
    empty = _secret_folder(tmp_path / "empty", password="\n")
    with pytest.raises(CaopdInputError, match=rf"{empty / 'password'}: is empty"):
        read_credentials_dir(empty)


def test_the_environment_wins_over_the_folder_and_the_folder_fills_in(tmp_path, no_identity):
    no_identity.setenv(CREDENTIALS_DIR_ENV, str(_secret_folder(tmp_path / "s")))
    no_identity.setenv(USERNAME_ENV, "from-env")
    no_identity.setenv(PASSWORD_ENV, "env-pw")
    load_credentials()
    assert (os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV]) == ("from-env", "env-pw")
    no_identity.delenv(USERNAME_ENV)
    no_identity.delenv(PASSWORD_ENV)
    load_credentials()
    assert (os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV]) == ("caopd-pipeline", "s3cret-pw")


def _mlflow_error(code, body):
    """The error MLflow's REST client raises for a refused request (mlflow/utils/rest_utils.py)."""
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    return MlflowException(f"API request to endpoint /x failed with error code {code} != 200. Response body: "
                           f"'{body}'", error_code={401: UNAUTHENTICATED, 403: PERMISSION_DENIED}[code])


def test_refusals_are_one_line_naming_the_identity_and_what_it_needs(no_identity):
    uri = "http://mlflow:5000"
    assert "refused an anonymous client (no $MLFLOW_TRACKING_USERNAME or $CAOPD_MLFLOW_CREDENTIALS) (HTTP 401): " \
           "not authenticated" in str(refusal(_mlflow_error(401, "You are not authenticated."), uri, "READ"))
    no_identity.setenv(USERNAME_ENV, "caopd-reader")
    forbidden = refusal(_mlflow_error(403, "Permission denied"), uri, "EDIT on experiment 'caopd'")
    assert isinstance(forbidden, CaopdAuthError) and str(forbidden) == (
        "MLflow at http://mlflow:5000 refused identity 'caopd-reader' (HTTP 403): it needs EDIT on experiment 'caopd'")
    # caopd-auth says why itself (the protected alias): its reason is kept.
    explained = refusal(_mlflow_error(403, "Permission denied: moving alias 'champion' of registered model 'm' needs "
                                           "MANAGE; user 'caopd-reader' has READ"), uri, "EDIT on registered model 'm'")
    assert str(explained).endswith("(HTTP 403): moving alias 'champion' of registered model 'm' needs MANAGE; user "
                                   "'caopd-reader' has READ")
    assert refusal(MlflowException("boom"), uri, "READ") is None  # INTERNAL_ERROR
    no_identity.delenv(USERNAME_ENV)
    no_identity.setenv(TOKEN_ENV, "a-token")
    assert "refused the token in $MLFLOW_TRACKING_TOKEN (HTTP 403)" in str(
        refusal(_mlflow_error(403, "Permission denied"), uri, "READ"))


class CountingMLflow(InProcessHTTP):
    """Answers get-experiment-by-name with the statuses queued (then 200), and 404 for basic-auth's current user
    (a server without authentication); counts the requests per path."""

    def __init__(self, statuses):
        self.statuses, self.counts = list(statuses), {}
        super().__init__()

    def _handler(self):
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.counts[path] = server.counts.get(path, 0) + 1
                if path.endswith("/experiments/get-by-name"):
                    status = server.statuses.pop(0) if server.statuses else 200
                    if status == 200:
                        return self._send(200, {"experiment": {"experiment_id": "7", "name": "caopd"}})
                    return self._send(status, {"error_code": {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(
                        status, "TEMPORARILY_UNAVAILABLE"), "message": "no"})
                return self._send(404, "not found", "text/plain")

        return Handler


def _get_experiment(url, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with service_errors(url, "READ on experiment 'caopd'"):
        return MlflowClient(url).get_experiment_by_name("caopd")


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_is_asked_once_never_retried(status, no_identity):
    no_identity.setenv(USERNAME_ENV, "caopd-pipeline")
    no_identity.setenv(PASSWORD_ENV, "pw")
    with CountingMLflow([status] * 5) as server:
        with pytest.raises(CaopdAuthError, match=rf"refused identity 'caopd-pipeline' \(HTTP {status}\)"):
            _get_experiment(server.url, no_identity)
        assert server.counts == {"/api/2.0/mlflow/experiments/get-by-name": 1}


def test_a_transient_failure_is_retried_and_a_server_without_auth_names_the_client(no_identity):
    no_identity.setenv(USERNAME_ENV, "someone")
    with CountingMLflow([503, 503]) as server:
        assert _get_experiment(server.url, no_identity).experiment_id == "7"
        assert server.counts == {"/api/2.0/mlflow/experiments/get-by-name": 3}
        assert acting_identity(server.url) == "someone"  # no /users/current here: the client's own name
    no_identity.delenv(USERNAME_ENV)
    assert acting_identity("sqlite:///x.db").startswith("local:")


def test_the_protected_aliases_and_the_roles_grants():
    assert protected_aliases() == frozenset({"champion"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PROTECTED_ALIASES_ENV, "champion, production,")
        assert protected_aliases() == frozenset({"champion", "production"})
    grants = {role: {(g.resource_type, g.resource_id, g.permission) for g in
                     role_grants(role, f"u-{role}", "caopd", "12", "caopd-tiny")} for role in ROLES}
    assert grants == {
        "pipeline": {("experiment", "12", "EDIT"), ("registered_model", "caopd-tiny", "EDIT")},
        "promoter": {("experiment", "12", "READ"), ("registered_model", "caopd-tiny", "MANAGE")},
        "reader": {("experiment", "12", "READ"), ("registered_model", "caopd-tiny", "READ")},
    }
