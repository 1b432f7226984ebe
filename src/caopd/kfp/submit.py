"""Submit and schedule the compiled pipeline on a Kubeflow Pipelines server (KFP v2 REST, through kfp.Client).

The token comes from the environment (``KFP_TOKEN``) or a file (``--token-file``, else the service-account
token KFP mounts into pods) — never from the command line, where it would land in shell history and ``ps``.
Uploading is idempotent: a pipeline version is named after the spec's digest, so resubmitting the same spec
reuses its version and a changed spec adds a new version to the same pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from caopd import __version__
from caopd.config.tracking import TrackingConfig
from caopd.errors import CaopdInputError, CaopdServiceError

MLFLOW_SETTINGS = "mlflow_settings"  # the pipeline parameter holding TrackingConfig's fields (config.parameters)

TOKEN_ENV = "KFP_TOKEN"
# Where KFP mounts a pod's service-account token (kfp.client.set_volume_credentials reads the same variable).
SA_TOKEN_PATH_ENV, SA_TOKEN_PATH = "KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ = "/apis/v2beta1/healthz"


@dataclass(frozen=True)
class Target:
    """What to run: the spec file, the pipeline and experiment names, and the parameters."""

    spec_path: Path
    pipeline_name: str
    experiment: str
    params: dict[str, Any]


# --- pure helpers ---------------------------------------------------------------------------------
def read_token(token_file: str | None = None, env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CaopdInputError(f"cannot read the token: {err}", file=str(path)) from None
        if not token:
            raise CaopdInputError("the token file is empty", file=str(path))
        return token
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip()
    mounted = Path(env.get(SA_TOKEN_PATH_ENV, SA_TOKEN_PATH))
    return mounted.read_text(encoding="utf-8").strip() if mounted.is_file() else None


def pipeline_parameters(spec_path: Path) -> dict[str, str]:
    """Parameter name -> KFP type (STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, STRUCT, LIST) of a spec."""
    try:
        docs = list(yaml.safe_load_all(spec_path.read_text(encoding="utf-8")))
        params = docs[0]["root"]["inputDefinitions"]["parameters"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise CaopdInputError(f"not a compiled KFP pipeline spec ({err})", file=str(spec_path)) from None
    return {name: p["parameterType"] for name, p in params.items()}


def parse_params(pairs: list[str], types: dict[str, str]) -> dict[str, Any]:
    """``name=value`` pairs typed by the spec: unknown names and unparsable values are errors, not surprises."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise CaopdInputError(f"expected NAME=VALUE, got {pair!r}", field="--param")
        if name not in types:
            raise CaopdInputError(f"unknown pipeline parameter {name!r}; known: {', '.join(sorted(types))}",
                                  field="--param")
        out[name] = _typed(name, raw, types[name])
        if name == MLFLOW_SETTINGS:  # a run parameter is stored and shown: no credentials in it
            try:
                TrackingConfig(**out[name])
            except ValidationError as err:
                first = err.errors()[0]
                raise CaopdInputError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}",
                                      field=f"--param {name}") from None
    return out


def _typed(name: str, raw: str, kind: str) -> Any:
    try:
        if kind == "NUMBER_INTEGER":
            return int(raw)
        if kind == "NUMBER_DOUBLE":
            return float(raw)
        if kind == "BOOLEAN":
            if raw.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return raw.lower() == "true"
        if kind in ("STRUCT", "LIST"):
            value = json.loads(raw)
            if not isinstance(value, dict if kind == "STRUCT" else list):
                raise ValueError(f"expected a JSON {'object' if kind == 'STRUCT' else 'array'}")
            return value
    except (ValueError, json.JSONDecodeError) as err:
        shown = "" if kind in ("STRUCT", "LIST") else f" {raw!r}"  # a JSON value may hold a URI with a password
        raise CaopdInputError(f"bad value{shown} for a {kind} parameter: {err}", field=f"--param {name}") from None
    return raw


def check_cron(expression: str) -> str:
    """KFP's scheduler takes six fields, seconds first; a five-field crontab line is a common slip."""
    fields = expression.split()
    if len(fields) == 5:
        raise CaopdInputError(f"KFP cron expressions have 6 fields, seconds first: did you mean "
                              f"'0 {expression.strip()}'?", field="--cron")
    if len(fields) != 6:
        raise CaopdInputError(f"expected 6 space-separated fields (sec min hour day month weekday), got "
                              f"{len(fields)}", field="--cron")
    return " ".join(fields)


def version_name(spec_path: Path) -> str:
    return f"{__version__}-{hashlib.sha256(spec_path.read_bytes()).hexdigest()[:12]}"


# --- talking to the server ------------------------------------------------------------------------
def _explain(host: str, status: int | None, detail: str) -> CaopdServiceError:
    if status in (401, 403):
        return CaopdServiceError(f"KFP at {host} refused the request ({status}): check the token "
                                 f"(${TOKEN_ENV} or --token-file) and its permissions")
    if status is not None and status >= 500:
        return CaopdServiceError(f"KFP at {host} failed with {status}: {detail[:200]} (a server-side error; "
                                 "retry later or check the ml-pipeline logs)")
    if status is not None:
        return CaopdServiceError(f"KFP at {host} answered {status}: {detail[:200]}")
    return CaopdServiceError(f"cannot reach KFP at {host}: {detail}")


def check_server(host: str, token: str | None, timeout: float = 10.0) -> None:
    """One quick health request, so a wrong host or token fails at once with a clear message (kfp.Client
    would otherwise retry its own health check for half a minute)."""
    if urllib.parse.urlparse(host).scheme not in ("http", "https"):
        raise CaopdInputError(f"expected an http(s):// URL of the KFP API, got {host!r}", field="--host")
    request = urllib.request.Request(host.rstrip("/") + HEALTHZ)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        raise _explain(host, err.code, err.read().decode("utf-8", "replace")) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _explain(host, None, str(getattr(err, "reason", err))) from None


class KfpSession:
    """A kfp.Client bound to one host, with server errors turned into one-line messages."""

    def __init__(self, host: str, token: str | None, namespace: str | None = None) -> None:
        import kfp

        self.host = host
        check_server(host, token)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2": we know
            self.client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")

    def call(self, what: str, fn, *args, **kwargs):
        import kfp_server_api
        import urllib3

        try:
            # kfp.Client prints links as it goes; stdout stays one JSON document that CI can parse.
            with contextlib.redirect_stdout(sys.stderr):
                return fn(*args, **kwargs)
        except kfp_server_api.ApiException as err:
            raise _explain(self.host, err.status, f"{what}: {err.body or err.reason}") from None
        except urllib3.exceptions.HTTPError as err:
            raise _explain(self.host, None, f"{what}: {err}") from None

    def ensure_version(self, target: Target) -> tuple[str, str, bool]:
        """(pipeline id, version id, uploaded?) of this spec: the version named after its digest, uploaded
        unless the pipeline has it already. A new pipeline also gets KFP's initial version (named after it)."""
        c, spec, name = self.client, str(target.spec_path), version_name(target.spec_path)
        pipeline_id = self.call("find pipeline", c.get_pipeline_id, target.pipeline_name)
        if pipeline_id is None:
            pipeline_id = self.call("upload pipeline", c.upload_pipeline, spec, pipeline_name=target.pipeline_name,
                                    description=f"caopd {__version__}").pipeline_id
        version_id = self._version_named(pipeline_id, name)
        if version_id is not None:
            return pipeline_id, version_id, False
        version = self.call("upload pipeline version", c.upload_pipeline_version, spec, pipeline_version_name=name,
                            pipeline_id=pipeline_id)
        return pipeline_id, version.pipeline_version_id, True

    def _version_named(self, pipeline_id: str, name: str) -> str | None:
        found = self.call("list pipeline versions", self.client.list_pipeline_versions, pipeline_id,
                          page_size=1, filter=json.dumps({"predicates": [
                              {"operation": "EQUALS", "key": "display_name", "stringValue": name}]}))
        versions = found.pipeline_versions or []
        return versions[0].pipeline_version_id if versions else None

    def experiment_id(self, name: str) -> str:
        return self.call("create experiment", self.client.create_experiment, name).experiment_id


def submit(host: str, target: Target, token: str | None, namespace: str | None = None) -> dict[str, Any]:
    session = KfpSession(host, token, namespace)
    pipeline_id, version_id, uploaded = session.ensure_version(target)
    experiment_id = session.experiment_id(target.experiment)
    run = session.call("create run", session.client.run_pipeline, experiment_id,
                       f"{target.pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S')}", params=target.params,
                       pipeline_id=pipeline_id, version_id=version_id)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "uploaded": uploaded,
            "experiment_id": experiment_id, "run_id": run.run_id,
            "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def schedule(host: str, target: Target, cron: str, token: str | None, namespace: str | None = None,
             name: str | None = None) -> dict[str, Any]:
    cron = check_cron(cron)
    session = KfpSession(host, token, namespace)
    pipeline_id, version_id, uploaded = session.ensure_version(target)
    experiment_id = session.experiment_id(target.experiment)
    # One run at a time, and no backfill of missed slots: retraining twice on the same data helps nobody.
    job = session.call("create recurring run", session.client.create_recurring_run, experiment_id,
                       name or f"{target.pipeline_name} ({cron})", cron_expression=cron, params=target.params,
                       pipeline_id=pipeline_id, version_id=version_id, max_concurrency=1, no_catchup=True)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "uploaded": uploaded,
            "experiment_id": experiment_id, "recurring_run_id": job.recurring_run_id, "cron": cron}
