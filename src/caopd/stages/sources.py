"""Where a stage's inputs come from: local paths, ``s3://`` objects and folders, registered models (``models:/``).

A stage hands every dataset and base model it reads to these functions, which fetch what is remote (cached by content,
digests verified; ``caopd.tracking.sources``) and note each input under a role in ``found``. The stage puts ``found``
in its summary (``sources``); the stage's MLflow run then carries them as ``caopd.source.<role>`` tags, and the model
version registered from the run carries them on (its lineage). ``models:/`` references resolve in the tracking
server's registry ($MLFLOW_TRACKING_URI, which the stage commands and components set from their tracking settings).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from caopd.tracking.sources import fetch_dataset, fetch_model

Found = dict[str, dict[str, Any]]


def dataset_path(source: str, role: str, found: Found, data_root: str | None = None, field: str = "data") -> str:
    """The local path of a dataset source (a local path confined to ``data_root``, or ``s3://``), noted in
    ``found[role]``."""
    fetched = fetch_dataset(source, data_root, field=field)
    found[role] = asdict(fetched)
    return fetched.path


def model_path(source: str, role: str, found: Found, field: str = "model") -> str:
    """What the model loader takes for a model source: a local folder (downloaded for ``s3://`` and ``models:/``), a
    hub id or an alias of the packaged models, noted in ``found[role]``."""
    fetched = fetch_model(source, field=field)
    found[role] = asdict(fetched)
    return fetched.path
