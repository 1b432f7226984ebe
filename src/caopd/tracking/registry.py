"""The MLflow model registry: idempotent registration with lineage tags, gated aliases, promotion, lineage.

A version's tags carry what it came from (``caopd.run.<stage>`` run ids, ``caopd.data.<name>`` digests,
``caopd.source.<role>`` sources with their digests, ``caopd.base_model``, ``caopd.pipeline_run_id``), how it
scored (``caopd.metric.<key>``) and every gate decision made about it (``caopd.gate`` at registration,
``caopd.promotion.<alias>`` at promotion), each naming the identity that made it (``decided_by``), so the registry
alone answers "why is this model the champion, and who said so". On an authenticated server moving a protected alias
(``champion``) needs MANAGE on the registered model: ``promote`` checks that before it writes anything, and the
``caopd-auth`` server app enforces it (caopd.tracking.server_app).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from caopd.config.gates import GateConfig
from caopd.config.stages import CALIBRATION_EVALUATION, OPD_TRAINING, ROLLOUT_ESTIMATION
from caopd.config.tracking import CHALLENGER, CHAMPION, DECISION_TAG_PREFIX, PROTECTED_ALIASES
from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.tracking.gates import GateDecision, evaluate_gates
from caopd.tracking.identity import acting_identity, require_permission
from caopd.tracking.sources import sources_from_tags
from caopd.tracking.tracker import TAG_PIPELINE_RUN, service_errors

MODEL_DESCRIPTION = "Calibration-aware OPD models (caopd)"
METRIC_TAG, RUN_TAG, DATA_TAG = "caopd.metric.", "caopd.run.", "caopd.data."
LINEAGE_STAGES = (ROLLOUT_ESTIMATION.id, OPD_TRAINING.id, CALIBRATION_EVALUATION.id)


def _version_for_pipeline_run(client: Any, name: str, pipeline_run_id: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and tag.`{TAG_PIPELINE_RUN}` = '{pipeline_run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such alias (or model)
            return None
        raise  # a refusal or an outage is not "no version"


def version_metrics(version: Any) -> dict[str, float]:
    return {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)}


def _record(client: Any, name: str, version: str, key: str, decision: GateDecision, decided_by: str) -> None:
    client.set_model_version_tag(name, version, key,
                                 json.dumps({**decision.as_dict(), "decided_by": decided_by}, sort_keys=True))


def register_version(client: Any, name: str, source: str, run_id: str | None, metrics: Mapping[str, float],
                     lineage: Mapping[str, str], pipeline_run_id: str, gates: GateConfig,
                     tracking_uri: str = "") -> dict[str, Any]:
    """Register ``source`` as a new version of ``name`` — or return the version this pipeline run already
    registered — then decide the gates against the current champion and set ``challenger`` if they pass."""
    from mlflow.exceptions import MlflowException

    with service_errors(tracking_uri, f"EDIT on registered model '{name}'"):
        existing = _version_for_pipeline_run(client, name, pipeline_run_id)
        if existing is not None:
            decision = json.loads(existing.tags.get("caopd.gate", "null") or "null")
            return {"name": name, "version": int(existing.version), "created": False, "decision": decision,
                    "source": existing.source}
        try:  # asked first: on caopd-auth only an admin may create one, even one that exists
            client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                client.create_registered_model(name, description=MODEL_DESCRIPTION)
            except MlflowException as race:
                if race.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration created it meanwhile
                    raise
        tags = {TAG_PIPELINE_RUN: pipeline_run_id, **{str(k): str(v) for k, v in lineage.items()},
                **{f"{METRIC_TAG}{k}": repr(float(metrics[k])) for k in METRIC_KEYS
                   if k in metrics and math.isfinite(float(metrics[k]))}}
        version = client.create_model_version(name, source, run_id=run_id, tags=tags)
        champion = _alias_version(client, name, CHAMPION)
        decision = evaluate_gates(metrics, version_metrics(champion) if champion else None, gates,
                                  champion.version if champion else None)
        decided_by = acting_identity(tracking_uri)
        _record(client, name, version.version, "caopd.gate", decision, decided_by)
        if decision.passed and decision.mode == "enabled":
            client.set_registered_model_alias(name, CHALLENGER, version.version)
    return {"name": name, "version": int(version.version), "created": True,
            "decision": {**decision.as_dict(), "decided_by": decided_by}, "source": source}


def promote(client: Any, name: str, to: str, gates: GateConfig, version: int | None = None,
            tracking_uri: str = "") -> dict[str, Any]:
    """Move alias ``to`` (``champion``) onto ``version`` (default: the challenger) if the gates pass again
    against the model that holds ``to`` now. The decision is tagged on the candidate either way, with who made it.
    A protected alias needs MANAGE on the model: an identity without it is refused before anything is written (asked
    of the server first; the alias moves before the decision is recorded, so a refusal by the server changes
    nothing either)."""
    protected = to in PROTECTED_ALIASES
    needs = f"{'MANAGE' if protected else 'EDIT'} on registered model '{name}'"
    with service_errors(tracking_uri, needs):
        if protected:
            require_permission(tracking_uri, "registered_model", name, "MANAGE", f"moving '{to}'")
        candidate = client.get_model_version(name, str(version)) if version is not None \
            else _alias_version(client, name, CHALLENGER)
        if candidate is None:
            raise CaopdInputError(f"model {name!r} has no {CHALLENGER!r} version; name one with --version",
                                  field="--version")
        current = _alias_version(client, name, to)
        if current is not None and current.version == candidate.version:
            return {"name": name, "version": int(candidate.version), "alias": to, "moved": False,
                    "reason": f"already {to}"}
        decision = evaluate_gates(version_metrics(candidate), version_metrics(current) if current else None, gates,
                                  current.version if current else None)
        decided_by = acting_identity(tracking_uri)
        moved = decision.passed and decision.mode == "enabled"
        if moved:  # the alias first: a refusal then leaves the registry as it was
            client.set_registered_model_alias(name, to, candidate.version)
        _record(client, name, candidate.version, f"{DECISION_TAG_PREFIX}{to}", decision, decided_by)
        if moved and to == CHAMPION and CHALLENGER in (candidate.aliases or []):
            client.delete_registered_model_alias(name, CHALLENGER)
    return {"name": name, "version": int(candidate.version), "alias": to, "moved": moved,
            "decision": {**decision.as_dict(), "decided_by": decided_by}}


def lineage(client: Any, reference: str, tracking_uri: str = "") -> dict[str, Any]:
    """``NAME@ALIAS`` or ``NAME/VERSION`` → datasets → rollout → training → evaluation runs → the version."""
    name, sep, alias = reference.partition("@")
    if not sep:
        name, sep, alias = reference.partition("/")
    if not sep or not name or not alias:
        raise CaopdInputError(f"expected NAME@ALIAS or NAME/VERSION, got {reference!r}", field="reference")
    with service_errors(tracking_uri, f"READ on registered model '{name}' and on its runs' experiment"):
        version = client.get_model_version(name, alias) if alias.isdigit() else _alias_version(client, name, alias)
        if version is None:
            raise CaopdInputError(f"model {name!r} has no version with alias {alias!r}", field="reference")
        steps = []
        for stage in LINEAGE_STAGES:
            run_ids = [r for r in version.tags.get(f"{RUN_TAG}{stage}", "").split(",") if r]  # shards: several
            run = client.get_run(run_ids[0]) if run_ids else None
            steps.append({"stage": stage, "run_id": run_ids[0] if run_ids else None, "run_ids": run_ids,
                          "metrics": dict(sorted(run.data.metrics.items())) if run else {}})
    return {"datasets": {k[len(DATA_TAG):]: v for k, v in sorted(version.tags.items()) if k.startswith(DATA_TAG)},
            "base_model": version.tags.get("caopd.base_model"), "sources": sources_from_tags(version.tags),
            "runs": steps,
            "version": {"name": name, "version": int(version.version), "aliases": sorted(version.aliases or []),
                        "source": version.source, "metrics": version_metrics(version),
                        "gate": json.loads(version.tags.get("caopd.gate", "null") or "null")}}
