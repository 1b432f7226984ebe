"""The MLflow server app ``caopd-auth``: MLflow's own basic-auth app, plus one rule — a protected alias
(``champion``) is set or removed only by an identity with MANAGE on the registered model (or an admin).

MLflow's permissions let any identity with EDIT on a registered model move any of its aliases. A scheduled
retraining needs EDIT to register versions and set ``challenger``, so without this rule it could also crown its own
model. Run it with ``mlflow server --app-name caopd-auth`` (the entry point is in caopd's package metadata); every
other request is authenticated and authorized by MLflow's basic-auth app unchanged.

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

from caopd.config.tracking import PROTECTED_ALIASES

AUTH_DATABASE_ENV = "CAOPD_AUTH_DATABASE_URI"
PROTECTED_ALIASES_ENV = "CAOPD_PROTECTED_ALIASES"
ALIAS_ROUTE_SUFFIX = "/mlflow/registered-models/alias"  # SetRegisteredModelAlias (POST), DeleteRegisteredModelAlias


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


def _protect_aliases() -> Any:
    """A Flask ``before_request`` hook: refuse a protected alias change by an identity without MANAGE."""
    from flask import request

    if not request.path.endswith(ALIAS_ROUTE_SUFFIX) or request.method not in ("POST", "DELETE"):
        return None
    from mlflow.server import auth

    try:
        name, alias = auth._get_request_param("name"), auth._get_request_param("alias")
    except Exception:  # a malformed request: MLflow's own handler answers it
        return None
    if alias not in protected_aliases():
        return None
    authorization = auth.authenticate_request()
    if not hasattr(authorization, "username"):  # a 401 response: not authenticated
        return authorization
    user = auth.store.get_user(authorization.username)
    if user.is_admin:
        return None
    permission = auth._resolve_user_permission_for_resource(user.username, "registered_model", name)
    if permission.can_manage:
        return None
    response = auth.make_forbidden_response()
    response.set_data(f"Permission denied: moving alias '{alias}' of registered model '{name}' needs MANAGE; "
                      f"user '{user.username}' has {permission.name}")
    return response


def prepare() -> None:
    """Create or migrate the auth database and create its admin: once, before the server's workers start (the
    chart's init container), since each worker does it again at start and would race on an empty database."""
    from mlflow.server import auth

    _database_from_environment(auth)
    auth.bootstrap_admin_user()


def create_app(app: Any = None) -> Any:
    """The ``mlflow.app`` factory: MLflow's basic-auth app with the protected-alias rule in front."""
    from mlflow.server import app as tracking_app
    from mlflow.server import auth

    _database_from_environment(auth)
    app = app if app is not None else tracking_app
    app.before_request(_protect_aliases)  # before basic-auth's own hook: it decides alias changes on EDIT
    return auth.create_app(app)


if __name__ == "__main__":
    prepare()
