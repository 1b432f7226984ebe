"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

KFP's MLflow integration injects ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_ID`` and ``MLFLOW_RUN_ID`` (the
parent run); they are honoured when set. Otherwise the parent run is found by its pipeline run id tag, or
created. Without a tracking URI the store is SQLite in a local folder (MLflow's file store is retired).

Stages write their outputs first and log them after, so a tracking failure never loses a stage's output.
Requests to a server are retried a bounded number of times, and the server is checked before any work
starts: a server that is down fails the command within ``connect_timeout_s``, with one clear line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from caopd.config.tracking import TrackingConfig
from caopd.errors import CaopdServiceError
from caopd.io import file_digest
from caopd.tracking.identity import load_credentials, redact_uri, refusal

TAG_PIPELINE_RUN, TAG_STAGE, TAG_METHOD = "caopd.pipeline_run_id", "caopd.stage", "caopd.method"
TAG_CONFIG = "caopd.config_digest"  # a stage run's identity within its pipeline run, with its stage and tags
# On an earlier run that a rerun replaced, where its identity may not delete runs (EDIT does not include delete):
# the run that replaced it. Searches here skip such runs, as MLflow's skip deleted ones.
TAG_SUPERSEDED = "caopd.superseded_by"
PIPELINE_STAGE = "pipeline"
# Bounded client retries: MLflow's defaults (7 retries, backoff factor 2) wait minutes on a dead server.
_CLIENT_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|credential|access_key|api_key|session_key)", re.I)


# --- redaction: credentials never reach params, tags, logs or messages ---------------------------
def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``a.b`` keys with string values; secret-looking keys are dropped, URIs redacted."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = redact_uri(text)[:6000]  # MLflow's param value limit
    return out


def config_digest(config: Mapping[str, Any]) -> str:
    """A short digest of a stage's config as MLflow records it (so secrets never enter it)."""
    return hashlib.sha256(json.dumps(flat_params(config), sort_keys=True).encode()).hexdigest()[:16]


# --- the server ------------------------------------------------------------------------------------
def resolve_tracking_uri(cfg: TrackingConfig, local_dir: str | Path) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    folder = Path(local_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def wait_for_server(uri: str, timeout_s: float) -> None:
    """Poll ``/health`` of an HTTP tracking server with exponential backoff until ``timeout_s``."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline, delay, attempts, last = time.monotonic() + timeout_s, 0.5, 0, ""
    while True:
        attempts += 1
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=min(5.0, timeout_s)):
                return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + delay > deadline:
            raise CaopdServiceError(f"MLflow tracking server at {redact_uri(uri)} is not reachable ({last}) after "
                                    f"{attempts} attempts in {timeout_s:.0f} s; stage outputs already written are "
                                    "kept — rerun once the server is up")
        time.sleep(delay)
        delay = min(delay * 2, 8.0)


def connect(uri: str, connect_timeout_s: float) -> Any:
    """An MLflow client on ``uri`` with this process's credentials and bounded retries, once the server answers:
    what a tracker, the registry commands and a registry source each use."""
    from mlflow import MlflowClient

    for name, value in _CLIENT_RETRY_ENV.items():
        os.environ.setdefault(name, value)
    load_credentials()
    wait_for_server(uri, connect_timeout_s)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


class Tracker:
    """The MLflow side of one pipeline run: its parent run and the stage runs nested under it."""

    def __init__(self, cfg: TrackingConfig, local_dir: str | Path) -> None:
        self.uri = resolve_tracking_uri(cfg, local_dir)
        self.client = connect(self.uri, cfg.connect_timeout_s)
        self.needs = f"EDIT on experiment '{cfg.experiment}'"  # what logging a pipeline run takes
        self.artifact_root = cfg.artifact_root
        self.pipeline_run_id = cfg.pipeline_run_id or os.environ.get("CAOPD_PIPELINE_RUN_ID") or uuid.uuid4().hex
        local_artifacts = "" if "://" in self.uri and not self.uri.startswith("sqlite") else \
            str(Path(local_dir).resolve() / "artifacts")
        with service_errors(self.uri, self.needs):
            self.experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or self._experiment(
                cfg.experiment, cfg.artifact_root or local_artifacts)
            self.parent_run_id = os.environ.get("MLFLOW_RUN_ID") or self._parent_run()

    def _experiment(self, name: str, artifact_location: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location or None)

    def _parent_run(self) -> str:
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{TAG_PIPELINE_RUN}` = '{self.pipeline_run_id}' and "
            f"tags.`{TAG_STAGE}` = '{PIPELINE_STAGE}'", max_results=1)
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"caopd {self.pipeline_run_id[:12]}",
                                     tags={TAG_PIPELINE_RUN: self.pipeline_run_id, TAG_STAGE: PIPELINE_STAGE})
        return run.info.run_id

    @contextlib.contextmanager
    def stage(self, name: str, config: Mapping[str, Any], tags: Mapping[str, str] | None = None
              ) -> Iterator[StageRun]:
        """A nested run for one stage: config as params; FINISHED on success, FAILED (and re-raised) on error.

        Idempotent: a stage run again in the same pipeline run with the same config and tags (a KFP retry, a
        rerun) replaces its earlier run, which is deleted (MLflow keeps it retrievable by id, out of searches) or,
        where this identity may not delete runs, tagged ``TAG_SUPERSEDED`` (out of this module's searches)."""
        identity = {TAG_PIPELINE_RUN: self.pipeline_run_id, TAG_STAGE: name, TAG_CONFIG: config_digest(config),
                    **(tags or {})}
        with service_errors(self.uri, self.needs):
            earlier = self.runs_tagged(identity)
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={"mlflow.parentRunId": self.parent_run_id, **identity})
            for replaced in earlier:
                self._retire(replaced.info.run_id, run.info.run_id)
            stage_run = StageRun(self, run.info.run_id)
            stage_run.log_params(config)
        try:
            yield stage_run
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.set_terminated(stage_run.run_id, "FAILED")
            raise
        with service_errors(self.uri, self.needs):
            self.client.set_terminated(stage_run.run_id, "FINISHED")

    def _retire(self, run_id: str, replaced_by: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(run_id)
        except MlflowException as err:
            if err.error_code != "PERMISSION_DENIED":
                raise
            self.client.set_tag(run_id, TAG_SUPERSEDED, replaced_by)

    def runs_tagged(self, tags: Mapping[str, str]) -> list[Any]:
        """This experiment's runs carrying every one of ``tags``, neither deleted nor superseded."""
        runs = self.client.search_runs([self.experiment_id],
                                       " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items()))
        return [run for run in runs if TAG_SUPERSEDED not in run.data.tags]

    def stage_runs(self) -> dict[str, list[Any]]:
        """Stage name → its runs in this pipeline run (newest first), neither deleted nor superseded."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_PIPELINE_RUN}` = '{self.pipeline_run_id}'",
                                       order_by=["attributes.start_time DESC"])
        out: dict[str, list[Any]] = {}
        for run in runs:
            if TAG_SUPERSEDED in run.data.tags:
                continue
            out.setdefault(run.data.tags.get(TAG_STAGE, ""), []).append(run)
        return out


class StageRun:
    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker, self.run_id, self.client = tracker, run_id, tracker.client

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat_params(config).items()]
        with service_errors(self.tracker.uri, self.tracker.needs):
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        with service_errors(self.tracker.uri, self.tracker.needs):
            for i in range(0, len(values), 1000):
                self.client.log_batch(self.run_id, metrics=values[i: i + 1000])

    def log_history(self, rows: list[Mapping[str, Any]], step_key: str = "step") -> None:
        """Per-step metrics (a training log), one batch call per thousand values."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, int(row[step_key])) for row in rows for k, v in row.items()
                  if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        with service_errors(self.tracker.uri, self.tracker.needs):
            for i in range(0, len(values), 1000):
                self.client.log_batch(self.run_id, metrics=values[i: i + 1000])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        with service_errors(self.tracker.uri, self.tracker.needs):
            for path in paths:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path)
                elif path.is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, path: str | Path, name: str, context: str, source_uri: str = "") -> str:
        """The dataset as an input of this run, named, with its content digest; returns the digest.
        ``source_uri``: where the local copy at ``path`` was fetched from (s3://...), recorded as its source."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        digest = file_digest(path)
        with warnings.catch_warnings():  # a local path resolves to two equivalent source kinds; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(redact_uri(source_uri) or str(Path(path).resolve()))
        dataset = MetaDataset(source, name=name, digest=digest[:36])
        with service_errors(self.tracker.uri, self.tracker.needs):
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])
            self.client.set_tag(self.run_id, f"caopd.data.{name}", digest)
        return digest

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with service_errors(self.tracker.uri, self.tracker.needs):
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, redact_uri(str(value)))


@contextlib.contextmanager
def service_errors(uri: str, needs: str = "") -> Iterator[None]:
    """MLflow and network failures as one line naming the (redacted) server, without the request's details; a
    refusal (401/403) names the identity and ``needs``, the permission the calls inside need."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        refused = refusal(err, uri, needs or "a permission it lacks")
        if refused is not None:
            raise refused from None
        message = str(err.message if hasattr(err, "message") else err).splitlines()[0][:300]
        raise CaopdServiceError(f"MLflow at {redact_uri(uri)}: {redact_uri(message)}") from None
    except (ConnectionError, OSError) as err:
        raise CaopdServiceError(f"MLflow at {redact_uri(uri)} is not reachable: {type(err).__name__}") from None
