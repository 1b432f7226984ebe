"""Who the MLflow client is, and what an authenticated server says about it.

Credentials come only from the environment (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or
``MLFLOW_TRACKING_TOKEN``) or from a mounted Secret folder named by ``CAOPD_MLFLOW_CREDENTIALS`` (files ``username``
and ``password``, as a ``kubernetes.io/basic-auth`` Secret mounts): never from a URI, a parameter or a config file.
A refusal (HTTP 401 or 403) becomes one line naming the identity and the permission it lacks; MLflow's client
retries only transient answers (408, 429, 5xx), never a refusal.
"""

from __future__ import annotations

import getpass
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caopd.config.tracking import CREDENTIALS_DIR_ENV, PASSWORD_ENV, TOKEN_ENV, USERNAME_ENV
from caopd.errors import CaopdInputError, CaopdServiceError

CURRENT_USER_PATH = "/api/2.0/mlflow/users/current"  # MLflow's basic-auth app (mlflow/server/auth/routes.py)
USER_PERMISSION_PATH = "/api/3.0/mlflow/users/permissions/get"
# mlflow/server/auth/permissions.py: PERMISSION_PRIORITY
PERMISSION_RANK = {"NO_PERMISSIONS": 0, "READ": 1, "USE": 2, "EDIT": 3, "MANAGE": 4}
REFUSALS = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}


class CaopdAuthError(CaopdServiceError):
    """The server refused this identity (401: not authenticated; 403: lacks a permission). Never retried."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def read_credentials_dir(folder: str | Path) -> Credentials:
    """A mounted basic-auth Secret: the files ``username`` and ``password`` in ``folder`` (whitespace around them,
    a trailing newline from ``echo``, is not part of them)."""
    folder = Path(folder)
    values = {}
    for key in ("username", "password"):
        path = folder / key
        if not path.is_file():
            raise CaopdInputError(f"no file '{key}': a credentials folder holds the files 'username' and "
                                  "'password' (a mounted kubernetes.io/basic-auth Secret)", file=str(folder))
        values[key] = path.read_text(encoding="utf-8").strip()
        if not values[key]:
            raise CaopdInputError("is empty", file=str(path))
    return Credentials(values["username"], values["password"])


def load_credentials() -> None:
    """Give MLflow's client the credentials: the environment's when set, else the folder in
    ``$CAOPD_MLFLOW_CREDENTIALS`` (copied into this process's environment, where MLflow's client and the
    processes this one starts read them). Without either the client is anonymous."""
    if os.environ.get(USERNAME_ENV) or os.environ.get(TOKEN_ENV):
        return
    folder = os.environ.get(CREDENTIALS_DIR_ENV)
    if folder:
        credentials = read_credentials_dir(folder)
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = credentials.username, credentials.password


def identity_name() -> str:
    """How this client is named in messages: its username, else its kind of credential."""
    if os.environ.get(USERNAME_ENV):
        return f"identity '{os.environ[USERNAME_ENV]}'"
    if os.environ.get(TOKEN_ENV):
        return f"the token in ${TOKEN_ENV}"
    return f"an anonymous client (no ${USERNAME_ENV} or ${CREDENTIALS_DIR_ENV})"


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://***@host/...``; other strings unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def refused(status: int, uri: str, needs: str, reason: str = "") -> CaopdAuthError:
    """One line: which server refused whom, and what to do (401) or what the identity needs (403). ``reason``:
    the server's own explanation, where it gave one."""
    where = f"MLflow at {redact_uri(uri)} refused {identity_name()} (HTTP {status})"
    if status == 401:
        return CaopdAuthError(f"{where}: not authenticated; set ${USERNAME_ENV} and ${PASSWORD_ENV}, or "
                              f"${CREDENTIALS_DIR_ENV} to a folder with 'username' and 'password', to an MLflow user")
    return CaopdAuthError(f"{where}: {reason or f'it needs {needs}'}")


def refusal(err: Any, uri: str, needs: str) -> CaopdAuthError | None:
    """An MLflow client error that is a refusal (401/403) as ``refused``'s line; None for any other error."""
    status = REFUSALS.get(getattr(err, "error_code", ""))
    if status is None:
        return None
    body = str(getattr(err, "message", err)).split("Response body: ", 1)
    reason = body[1].strip(" '\"").splitlines()[0] if len(body) == 2 else ""
    # caopd-auth explains its own refusals (the protected-alias rule); MLflow's say only "Permission denied".
    reason = reason[len("Permission denied:"):].strip() if reason.startswith("Permission denied:") else ""
    return refused(status, uri, needs, reason)


def _rest(uri: str, path: str, params: dict[str, str] | None = None) -> Any:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), path, "GET", params=params)


def _answered(response: Any, uri: str, path: str) -> None:
    """Any answer but 200 (after MLflow's client retried the transient ones) as one line: not a guess."""
    if response.status_code != 200:
        raise CaopdServiceError(f"MLflow at {redact_uri(uri)} answered {path} with HTTP {response.status_code}; "
                                "retry once the server is healthy")


def server_user(uri: str) -> dict[str, Any] | None:
    """The authenticated user as the server sees it (``username``, ``is_admin``), or None where there is no
    authentication (a local store, or a server without MLflow's auth app)."""
    if not uri.startswith(("http://", "https://")):
        return None
    response = _rest(uri, CURRENT_USER_PATH)
    if response.status_code in (401, 403):
        raise refused(response.status_code, uri, "an MLflow user")
    if response.status_code == 404:  # no auth app serves the route
        return None
    _answered(response, uri, CURRENT_USER_PATH)
    return response.json().get("user")


def acting_identity(uri: str) -> str:
    """The name a decision is recorded under: the server's user, else the client's username, else the local user
    of a local store."""
    user = server_user(uri)
    if user:
        return user["username"]
    if os.environ.get(USERNAME_ENV):
        return os.environ[USERNAME_ENV]
    return f"local:{getpass.getuser()}"


def require_permission(uri: str, resource_type: str, resource: str, permission: str, why: str) -> None:
    """Refuse, before anything is written, when the server has authentication and this identity holds less than
    ``permission`` on the resource (an admin holds everything). Servers without authentication: no check."""
    user = server_user(uri)
    if not user or user.get("is_admin"):
        return
    response = _rest(uri, USER_PERMISSION_PATH, {"username": user["username"], "resource_type": resource_type,
                                                 "resource_id": resource})
    _answered(response, uri, USER_PERMISSION_PATH)
    held = response.json()["permission"]
    if PERMISSION_RANK.get(held, 0) < PERMISSION_RANK[permission]:
        raise refused(403, uri, "", f"{why} needs {permission} on {resource_type.replace('_', ' ')} '{resource}'; "
                                    f"it holds {held}")
