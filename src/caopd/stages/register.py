"""Stage 5 — model registration into a local registry folder (MLflow's registry comes with the tracking work).

A version is a copy of the checkpoint plus a record of where it came from and how it scored.
Registering the same weights again returns the existing version instead of adding a duplicate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from caopd.data import atomic_dir, file_digest, write_json
from caopd.errors import CaopdInputError
from caopd.models.loading import check_checkpoint_folder

RECORD = "record.json"


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("caopd-tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="registered model name")
    model_dir: str = Field(..., description="the trained checkpoint folder")
    registry_dir: str = Field(..., description="the local registry root")
    metrics: dict[str, Any] = Field(default_factory=dict, description="evaluation metrics of this model")
    lineage: dict[str, Any] = Field(default_factory=dict, description="data digests, base model, stage summaries")


def run_registration(cfg: RegisterConfig) -> dict[str, Any]:
    model_dir = Path(cfg.model_dir)
    if not model_dir.is_dir():
        raise CaopdInputError("checkpoint folder does not exist", file=str(model_dir))
    check_checkpoint_folder(model_dir)
    digest = file_digest(model_dir)
    root = Path(cfg.registry_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    versions = sorted((p for p in root.iterdir() if p.name.startswith("v") and (p / RECORD).is_file()),
                      key=lambda p: int(p.name[1:]))
    for existing in versions:
        record = json.loads((existing / RECORD).read_text())
        if record["model_digest"] == digest:
            return {**record, "created": False}
    version = int(versions[-1].name[1:]) + 1 if versions else 1
    record = {"name": cfg.name, "version": version, "model_digest": digest, "metrics": cfg.metrics,
              "lineage": cfg.lineage, "path": str(root / f"v{version}" / "model")}
    with atomic_dir(root / f"v{version}") as tmp:
        shutil.copytree(model_dir, Path(tmp) / "model")
        write_json(Path(tmp) / RECORD, record)
    return {**record, "created": True}
