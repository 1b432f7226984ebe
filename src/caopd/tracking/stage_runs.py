"""What each stage logs to MLflow, and registration into the MLflow registry.

``tracked`` wraps a stage function: the stage writes its outputs first, then its run gets the config as params,
its metrics (per step for training), its plots and summaries as artifacts, and its input datasets with content
digests. Without a tracker the stage simply runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from caopd.config.gates import GateConfig
from caopd.config.stages import CALIBRATION_EVALUATION, MODEL_REGISTRATION, OPD_TRAINING, SUMMARY
from caopd.io import file_digest, read_jsonl
from caopd.tracking.registry import DATA_TAG, LINEAGE_STAGES, RUN_TAG, register_version
from caopd.tracking.sources import SOURCE_TAG, WEIGHTS_TAG, Fetched, source_tags
from caopd.tracking.tracker import TAG_METHOD, Tracker

_COUNTS = ("n_prompts", "n_rollouts", "skipped_too_long", "n_records", "mean_target_confidence", "n_train", "n_eval",
           "steps", "seconds")


def log_outputs(stage_run: Any, stage: str, summary: Mapping[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    stage_run.log_metrics({k: summary[k] for k in _COUNTS if k in summary})
    if "base_metrics" in summary:
        stage_run.log_metrics(summary["base_metrics"], prefix="base_rollouts_")
    for arm, metrics in (summary.get("arms") or {}).items():
        stage_run.log_metrics(metrics, prefix=f"{arm}_")
    for set_name, scored in (summary.get("sets") or {}).items():  # e.g. the OOD set: ood_caopd_ece
        for arm, metrics in scored["arms"].items():
            stage_run.log_metrics(metrics, prefix=f"{set_name}_{arm}_")
    if (out / "train_log.jsonl").is_file():
        stage_run.log_history(read_jsonl(out / "train_log.jsonl"))
    stage_run.log_artifacts(sorted(out.glob("*.png")) + sorted(out.glob("*.md")) + sorted(out.glob(SUMMARY)))


def tracked(tracker: Tracker | None, stage: str, config: Any, run: Callable[[], dict[str, Any]],
            out_dir: str | Path, inputs: Mapping[str, tuple[str | Path, str] | tuple[str | Path, str, str]] = (),
            tags: Mapping[str, str] | None = None, sources: Mapping[str, Fetched] | None = None) -> dict[str, Any]:
    """Run one stage inside its MLflow run; ``inputs``: dataset name → (file, context such as "training"), or
    (file, context, source URI) for a dataset fetched from elsewhere (s3://...), which MLflow then records as the
    dataset's source instead of the local copy. ``tags`` are part of the run's identity (a rerun with the same
    ones replaces it); ``sources`` (role → what fetch_dataset / fetch_model returned) are recorded as
    ``caopd.source.<role>`` tags without being part of it, so a retry that finds newer content replaces its try."""
    if tracker is None:
        return run()
    with tracker.stage(stage, config.model_dump(), tags) as stage_run:
        for role, fetched in dict(sources or {}).items():
            stage_run.set_tags(source_tags(role, fetched))
        with registry_for_sources(tracker.uri):
            summary = run()
        if "confidence_instruction" in summary:  # the line the task added to every prompt ("" = none)
            stage_run.log_params({"prompt": {"instruction_added": summary["confidence_instruction"]}})
        # The sources the stage fetched itself (s3://, models:/) and where their local copies are.
        fetched = {role: Fetched(**record) for role, record in (summary.get("sources") or {}).items()}
        for role, found in fetched.items():
            stage_run.set_tags(source_tags(role, found))
        copies = {found.source: found.path for found in fetched.values() if found.path != found.source}
        for name, (path, context, *source) in dict(inputs).items():
            if str(path) in copies:  # a remote dataset: its local copy, recorded with its source
                path, source = copies[str(path)], [str(path)]
            stage_run.log_dataset(path, name, context, *source)
        log_outputs(stage_run, stage, summary, out_dir)
        summary["mlflow_run_id"] = stage_run.run_id
    return summary


@contextmanager
def registry_for_sources(uri: str) -> Iterator[None]:
    """While a tracked stage runs, its ``models:/`` sources resolve in the registry of the server it logs to
    (caopd.tracking.sources reads $MLFLOW_TRACKING_URI); the environment is restored afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def lineage_tags(tracker: Tracker) -> dict[str, str]:
    """Run ids of this pipeline run's finished stages (CaOPD's training run, every rollout shard, the latest
    evaluation), the digests of the datasets they read and the sources they fetched (``caopd.source.*``: where
    the base model and data came from; a later stage's tag wins for the same role)."""
    runs = tracker.stage_runs()
    tags: dict[str, str] = {}
    for stage in LINEAGE_STAGES:
        found = [r for r in runs.get(stage, []) if r.info.status == "FINISHED"]  # not a failed try before a retry
        if stage == OPD_TRAINING.id:
            found = [r for r in found if r.data.tags.get(TAG_METHOD) == "caopd"][:1]
        elif stage == CALIBRATION_EVALUATION.id:
            found = found[:1]
        if found:
            tags[f"{RUN_TAG}{stage}"] = ",".join(r.info.run_id for r in found)
        for run in found:
            tags.update({k: v for k, v in run.data.tags.items() if k.startswith((DATA_TAG, SOURCE_TAG))})
    return tags


def register_in_mlflow(tracker: Tracker, name: str, model_dir: str | Path, metrics: Mapping[str, float],
                       base_model: str, gates: GateConfig, artifact_root: str = "") -> dict[str, Any]:
    """The registration stage: weights to the artifact store (S3 directly when ``artifact_root`` is s3://),
    then a model version pointing at them, tagged with its lineage, gated against the champion."""
    from caopd.tracking.storage import upload_folder

    model_dir = Path(model_dir)
    digest = file_digest(model_dir)
    with tracker.stage(MODEL_REGISTRATION.id, {"name": name, "model_dir": str(model_dir), "gates": gates.model_dump(),
                                              "artifact_root": artifact_root}) as stage_run:
        if artifact_root.startswith("s3://"):
            manifest = upload_folder(model_dir, f"{artifact_root.rstrip('/')}/models/{name}/{digest[:16]}")
            source = manifest["uri"]
        else:
            stage_run.log_artifacts([model_dir], "model")
            source = f"{tracker.client.get_run(stage_run.run_id).info.artifact_uri}/model"
        tags = {**lineage_tags(tracker), "caopd.base_model": base_model, WEIGHTS_TAG: digest,
                f"{RUN_TAG}model-registration": stage_run.run_id}
        result = register_version(tracker.client, name, source, stage_run.run_id, metrics, tags,
                                  tracker.pipeline_run_id, gates, tracker.uri)
        stage_run.set_tags({"caopd.registered_version": str(result["version"])})
    return result


def tracker_if_configured(settings: Mapping[str, Any], pipeline_run_id: str, local_dir: str | Path,
                          required: bool = False) -> Tracker | None:
    """A tracker when a tracking URI is configured (the settings or $MLFLOW_TRACKING_URI), else None — unless
    ``required`` (registration), which then uses the local SQLite store in ``local_dir``."""
    import os

    from caopd.config.tracking import TrackingConfig

    cfg = TrackingConfig(**{**settings, "pipeline_run_id": pipeline_run_id or settings.get("pipeline_run_id", "")})
    if not required and not (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    return Tracker(cfg, local_dir)
