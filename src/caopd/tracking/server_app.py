"""The MLflow server app ``caopd-auth``: MLflow's own basic-auth app, plus the rules that make a protected alias
(``champion``) something only an identity with MANAGE on the registered model (or an admin) can move.

MLflow's permissions let any identity with EDIT on a registered model move any of its aliases, and give whoever
creates a registered model MANAGE on it. A scheduled retraining needs EDIT to register versions and set
``challenger``; without these rules it could crown its own model, directly or by renaming the project's model away
and creating a new one under its name. For an identity that is not an admin:

- setting or deleting a protected alias needs MANAGE on the registered model;
- renaming a registered model needs MANAGE on it;
- creating a registered model is refused: an admin creates them (``caopd bootstrap-auth``), so no one owns a model
  by having created it;
- setting or deleting a promotion decision on a version (tag ``caopd.promotion.<protected alias>``) needs MANAGE,
  so the decision's ``decided_by`` was written by an identity that may decide.

A request that names its model or alias twice (query string and body) with different values is refused: MLflow's
check reads one and its handler may read the other. Every other request is authenticated and authorized by MLflow's
basic-auth app unchanged. Run it with ``mlflow server --app-name caopd-auth`` (the entry point is in caopd's package
metadata).

Two settings come from the environment, so that no credential is written into a config file or a pod spec:

- ``CAOPD_AUTH_DATABASE_URI``: the auth database (users and permissions), e.g. ``postgresql://user:pw@host/db``;
  it replaces ``database_uri`` of the auth config file (``MLFLOW_AUTH_CONFIG_PATH``), which then holds no secret.
- ``CAOPD_PROTECTED_ALIASES``: comma-separated aliases that need MANAGE (default ``champion``).

The admin's credentials are MLflow's own ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``.
This module imports only MLflow, Flask and caopd's torch-free config: the MLflow server image installs caopd without
its dependencies (MLflow brings pydantic).
"""

from __future__ import annotations

import os
from typing import Any

from caopd.config.tracking import DECISION_TAG_PREFIX, PROTECTED_ALIASES

AUTH_DATABASE_ENV = "CAOPD_AUTH_DATABASE_URI"
PROTECTED_ALIASES_ENV = "CAOPD_PROTECTED_ALIASES"
# Route suffixes, under /api/2.0 and /ajax-api/2.0 alike (mlflow/server/handlers.py).
ALIAS_ROUTE = "/mlflow/registered-models/alias"  # SetRegisteredModelAlias (POST), DeleteRegisteredModelAlias
RENAME_ROUTE = "/mlflow/registered-models/rename"
CREATE_ROUTE = "/mlflow/registered-models/create"
VERSION_TAG_ROUTES = ("/mlflow/model-versions/set-tag", "/mlflow/model-versions/delete-tag")
GUARDED_ROUTES = (ALIAS_ROUTE, RENAME_ROUTE, CREATE_ROUTE, *VERSION_TAG_ROUTES)
WRITES = ("POST", "PATCH", "DELETE")


def protected_aliases() -> frozenset[str]:
    names = os.environ.get(PROTECTED_ALIASES_ENV)
    if names is None:
        return frozenset(PROTECTED_ALIASES)
    return frozenset(name.strip() for name in names.split(",") if name.strip())


def _database_from_environment(auth: Any) -> None:
    """``database_uri`` of MLflow's auth config (read when ``mlflow.server.auth`` is imported) from
    ``$CAOPD_AUTH_DATABASE_URI``; before the app initialises its store, which is the only reader of it."""
    uri = os.environ.get(AUTH_DATABASE_ENV)
    if uri:
        auth.auth_config = auth.auth_config._replace(database_uri=uri)


def _request_params(request: Any) -> dict[str, str] | None:
    """The request's parameters from its query string and its body (as JSON, whatever its content type, as MLflow's
    handlers read it); None when the two name one key differently."""
    body = request.get_json(force=True, silent=True)
    body = body if isinstance(body, dict) else {}
    query = request.args.to_dict()
    if any(key in body and str(body[key]) != value for key, value in query.items()):
        return None
    return {**query, **{key: str(value) for key, value in body.items() if not isinstance(value, (dict, list))}}


def _refused(status: int, reason: str) -> Any:
    from flask import make_response

    response = make_response(f"Permission denied: {reason}" if status == 403 else reason)
    response.status_code = status
    return response


def _rule(path: str, params: dict[str, str]) -> tuple[str, str] | None:
    """(the registered model, what the request does) when only MANAGE on that model (or an admin) may do it;
    ("", what) when only an admin may; None when MLflow's own rules decide."""
    name = params.get("name", "")
    if path.endswith(ALIAS_ROUTE) and params.get("alias") in protected_aliases():
        return name, f"moving alias '{params['alias']}' of registered model '{name}'"
    if path.endswith(RENAME_ROUTE):
        return name, f"renaming registered model '{name}'"
    if path.endswith(CREATE_ROUTE):
        return "", f"creating registered model '{name}' (an admin creates them: caopd bootstrap-auth --model NAME)"
    key = params.get("key", "")
    if path.endswith(VERSION_TAG_ROUTES) and key.startswith(DECISION_TAG_PREFIX) \
            and key[len(DECISION_TAG_PREFIX):] in protected_aliases():
        return name, f"writing the decision '{key}' on registered model '{name}'"
    return None


def _guard_registry() -> Any:
    """A Flask ``before_request`` hook: the rules above, before MLflow's own authorization."""
    from flask import request

    if request.method not in WRITES or not request.path.endswith(GUARDED_ROUTES):
        return None
    params = _request_params(request)
    if params is None:
        return _refused(400, "Bad request: the query string and the body name different values")
    rule = _rule(request.path, params)
    if rule is None:
        return None
    from mlflow.server import auth

    authorization = auth.authenticate_request()
    if not hasattr(authorization, "username"):  # a 401 response: not authenticated
        return authorization
    user = auth.store.get_user(authorization.username)
    if user.is_admin:
        return None
    model, action = rule
    if not model:
        return _refused(403, f"{action} needs an admin; user '{user.username}' is not one")
    permission = auth._resolve_user_permission_for_resource(user.username, "registered_model", model)
    if permission.can_manage:
        return None
    return _refused(403, f"{action} needs MANAGE; user '{user.username}' has {permission.name}")


def prepare() -> None:
    """Create or migrate the auth database and create its admin: once, before the server's workers start (the
    chart's init container), since each worker does it again at start and would race on an empty database."""
    from mlflow.server import auth

    _database_from_environment(auth)
    auth.bootstrap_admin_user()


def create_app(app: Any = None) -> Any:
    """The ``mlflow.app`` factory: MLflow's basic-auth app with the registry rules in front."""
    from mlflow.server import app as tracking_app
    from mlflow.server import auth

    _database_from_environment(auth)
    app = app if app is not None else tracking_app
    app.before_request(_guard_registry)  # before basic-auth's own hook, which would allow these on EDIT
    return auth.create_app(app)


if __name__ == "__main__":
    prepare()
