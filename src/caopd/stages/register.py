"""Stage 5 — model registration into the MLflow model registry (a local SQLite store unless a server is named).

The version points at the weights (uploaded straight to S3 when the artifact root is s3://), carries its
lineage and metrics as tags, and gets the ``challenger`` alias when the gates pass against the champion.
Registering again for the same pipeline run returns the existing version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caopd.config.stages import RegisterConfig
from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.models.loading import check_checkpoint_folder
from caopd.tracking.tracker import Tracker, redact_uri


def run_registration(cfg: RegisterConfig, tracker: Tracker) -> dict[str, Any]:
    """Register the model in the tracker's registry, linked to the stage runs of the tracker's pipeline run."""
    from caopd.tracking.stage_runs import register_in_mlflow

    model_dir = Path(cfg.model_dir)
    if not model_dir.is_dir():
        raise CaopdInputError("checkpoint folder does not exist", file=str(model_dir))
    check_checkpoint_folder(model_dir)
    missing = [k for k in ("accuracy", "ece", "brier") if k not in cfg.metrics]
    if missing:
        raise CaopdInputError(f"metrics lack {missing}; pass the evaluation summary", field="metrics")
    metrics = {k: float(cfg.metrics[k]) for k in METRIC_KEYS if cfg.metrics.get(k) is not None}
    result = register_in_mlflow(tracker, cfg.name, model_dir, metrics, cfg.base_model, cfg.gates,
                                tracker.artifact_root)
    return {**result, "tracking_uri": redact_uri(tracker.uri), "pipeline_run_id": tracker.pipeline_run_id}
