"""The identities of an authenticated MLflow server, created idempotently with MLflow's own auth client.

Run as the server's admin. It makes sure the project's experiment and registered model exist, then, for each role
given, that its user exists with the given password, is not an admin, and holds its role's permission on each of
the two (grants it holds elsewhere are left alone):

- ``pipeline``: EDIT on the experiment and the registered model — logs runs, registers versions, sets
  ``challenger``; it cannot delete runs or move ``champion``;
- ``promoter``: MANAGE on the registered model (moves ``champion``), READ on the experiment;
- ``reader``: READ on both (the UI, ``caopd lineage``).

Running it again changes nothing: each step compares what the server holds with what it should hold first.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caopd.errors import CaopdInputError, CaopdServiceError
from caopd.tracking.identity import CURRENT_USER_PATH, Credentials, redact_uri, refused, server_user
from caopd.tracking.registry import MODEL_DESCRIPTION
from caopd.tracking.tracker import service_errors, wait_for_server

EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"
ROLES: dict[str, dict[str, str]] = {  # role → resource type → permission
    "pipeline": {EXPERIMENT: "EDIT", REGISTERED_MODEL: "EDIT"},
    "promoter": {EXPERIMENT: "READ", REGISTERED_MODEL: "MANAGE"},
    "reader": {EXPERIMENT: "READ", REGISTERED_MODEL: "READ"},
}


@dataclass(frozen=True)
class Grant:
    username: str
    resource_type: str
    resource_id: str  # what MLflow keys the grant by: an experiment's id, a registered model's name
    permission: str
    resource_name: str  # what people call it


def role_grants(role: str, username: str, experiment: str, experiment_id: str, model: str) -> list[Grant]:
    """What ``role`` holds: one grant per resource, on the experiment (by id) and the model (by name)."""
    keys = {EXPERIMENT: (experiment_id, experiment), REGISTERED_MODEL: (model, model)}
    return [Grant(username, kind, keys[kind][0], permission, keys[kind][1]) for kind, permission in ROLES[role].items()]


def _password_works(uri: str, credentials: Credentials) -> bool:
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    response = http_request(MlflowHostCreds(uri, username=credentials.username, password=credentials.password),
                            CURRENT_USER_PATH, "GET", max_retries=0)
    return response.status_code == 200


def _ensure_user(auth: Any, uri: str, credentials: Credentials) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        user = auth.get_user(credentials.username)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(credentials.username, credentials.password)
        return [f"created user '{credentials.username}'"]
    changes = []
    if not _password_works(uri, credentials):
        auth.update_user_password(credentials.username, credentials.password)
        changes.append(f"set the password of '{credentials.username}' to its Secret's")
    if user.is_admin:  # an admin skips every check, the protected alias included
        auth.update_user_admin(credentials.username, False)
        changes.append(f"removed admin from '{credentials.username}'")
    return changes


def _ensure_grant(auth: Any, grant: Grant) -> list[str]:
    from mlflow.exceptions import MlflowException

    # get_user_permission resolves the effective permission as a request would (default_permission included), so
    # a grant is written only when the user holds something else.
    held = auth.get_user_permission(grant.username, grant.resource_type, grant.resource_id).permission
    if held == grant.permission:
        return []
    # Revoking a grant that does not exist is harmless (the effective one may be the default permission).
    try:
        auth.revoke_user_permission(grant.username, grant.resource_type, grant.resource_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    auth.grant_user_permission(grant.username, grant.resource_type, grant.resource_id, grant.permission)
    where = f"{grant.resource_type.replace('_', ' ')} '{grant.resource_name}'"
    now = auth.get_user_permission(grant.username, grant.resource_type, grant.resource_id).permission
    if now != grant.permission:  # a higher default_permission or another grant (a role's) wins over this one
        raise CaopdServiceError(f"'{grant.username}' should hold {grant.permission} on {where} but the server "
                                f"resolves {now}: set the server's default_permission to NO_PERMISSIONS or READ and "
                                "remove the user's other grants on it")
    return [f"granted {grant.permission} on {where} to '{grant.username}' (held {held})"]


def bootstrap(uri: str, experiment: str, model: str, identities: Mapping[str, Credentials],
              connect_timeout_s: float = 30.0) -> dict[str, Any]:
    """Make the server hold the experiment, the model and each role's user and grants; returns what it changed
    (an empty list when nothing had to change). ``identities``: role (a key of ROLES) → its credentials. The
    caller's own credentials (the environment's) must be an admin's."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # MLflow's server package imports a Starlette module that Starlette deprecates
        warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
        from mlflow.server.auth.client import AuthServiceClient

    unknown = sorted(set(identities) - set(ROLES))
    if unknown:
        raise CaopdInputError(f"unknown role(s) {unknown}; the roles are {sorted(ROLES)}", field="identities")
    names = [c.username for c in identities.values()]
    if len(set(names)) != len(names):
        raise CaopdInputError(f"two roles share a username ({names}): each role needs its own user",
                              field="identities")
    wait_for_server(uri, connect_timeout_s)
    with service_errors(uri, "an admin user"):
        admin = server_user(uri)
        if admin is None:
            raise CaopdInputError(f"MLflow at {redact_uri(uri)} runs without authentication: start it with "
                                  "--app-name caopd-auth", field="--tracking-uri")
        if not admin.get("is_admin"):
            raise refused(403, uri, "", f"bootstrapping users and permissions needs an admin; "
                                        f"'{admin['username']}' is not one")
        if admin["username"] in names:
            raise CaopdInputError(f"the admin '{admin['username']}' cannot also be a role's user",
                                  field="identities")
        client, auth, changes = MlflowClient(uri, uri), AuthServiceClient(uri), []
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment)
            changes.append(f"created experiment '{experiment}'")
        else:
            experiment_id = found.experiment_id
        try:
            client.get_registered_model(model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(model, description=MODEL_DESCRIPTION)
            changes.append(f"created registered model '{model}'")
        for role, credentials in sorted(identities.items()):
            changes += _ensure_user(auth, uri, credentials)
            for grant in role_grants(role, credentials.username, experiment, experiment_id, model):
                changes += _ensure_grant(auth, grant)
    return {"experiment": experiment, "experiment_id": experiment_id, "registered_model": model,
            "users": {role: c.username for role, c in sorted(identities.items())}, "changes": changes}
