"""Stage 0 — data preparation: the train and eval prompt sets every later stage reads.

Either the user's datasets (a ``load_from_disk`` folder, .jsonl or .parquet), validated by the task and copied
so that the run keeps exactly what it trained on, or — when no source is given — synthetic arithmetic problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caopd.config.stages import (
    CONTINUAL_EVAL,
    CONTINUAL_TRAIN,
    DATA_PREPARATION,
    EVAL,
    OOD,
    SUMMARY,
    TRAIN,
    DataConfig,
)
from caopd.io import read_json, write_json, write_jsonl
from caopd.stages.sources import Found, dataset_path
from caopd.tasks import get_task
from caopd.tasks.arithmetic import generate_rows
from caopd.tasks.datasets import load_rows


def _rows(cfg: DataConfig, source: str, n: int, seed: int, prefix: str, role: str,
          found: Found) -> list[dict[str, Any]]:
    if source:
        rows = load_rows(dataset_path(source, role, found, cfg.data_root, field=role))
        get_task(cfg.task).examples_from_rows(rows, source=source)  # validate now, not three stages later
        return rows
    weights = cfg.in_domain_weights()
    return generate_rows(n, seed, list(weights), list(weights.values()), id_prefix=prefix)


def _kind_rows(cfg: DataConfig, kinds: list[str], n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Prompts of ``kinds``, weighted as in ``kind_weights`` (equally where it gives them no positive weight)."""
    weights = [cfg.kind_weights.get(kind, 0.0) for kind in kinds]
    if not sum(weights) > 0:
        weights = [1.0] * len(kinds)
    return generate_rows(n, seed, kinds, weights, id_prefix=prefix)


def _ood_rows(cfg: DataConfig, found: Found) -> list[dict[str, Any]]:
    """Your OOD set, validated by its task; or prompts of the held-out kinds."""
    if cfg.ood_source:
        rows = load_rows(dataset_path(cfg.ood_source, "ood_source", found, cfg.data_root, field="ood_source"))
        get_task(cfg.ood_task or cfg.task).examples_from_rows(rows, source=cfg.ood_source)
        return rows
    return _kind_rows(cfg, cfg.ood_kinds, cfg.n_eval, cfg.seed + 20_000, "ood")


def run_data_preparation(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    # Every set is read and validated before the first file is written: a bad row leaves nothing behind.
    found: Found = {}
    train = _rows(cfg, cfg.train_source, cfg.n_train, cfg.seed, "train", "train_source", found)
    evaluation = _rows(cfg, cfg.eval_source, cfg.n_eval, cfg.seed + 10_000, "eval", "eval_source", found)
    ood = _ood_rows(cfg, found) if cfg.ood_kinds or cfg.ood_source else None
    task_b = {CONTINUAL_TRAIN: _kind_rows(cfg, cfg.continual_kinds, cfg.n_train, cfg.seed + 30_000, "b_train"),
              CONTINUAL_EVAL: _kind_rows(cfg, cfg.continual_kinds, cfg.n_eval, cfg.seed + 40_000, "b_eval")} \
        if cfg.continual_kinds else {}
    out = Path(out_dir)
    summary = {"stage": DATA_PREPARATION.id, "config": cfg.model_dump(), "sources": found, "n_train": len(train),
               "n_eval": len(evaluation),
               "outputs": {TRAIN: write_jsonl(out / TRAIN, train), EVAL: write_jsonl(out / EVAL, evaluation)}}
    if ood is not None:
        summary["n_ood"] = len(ood)
        summary["outputs"][OOD] = write_jsonl(out / OOD, ood)
    for name, rows in task_b.items():
        summary["outputs"][name] = write_jsonl(out / name, rows)
    write_json(out / SUMMARY, summary)
    return summary


def ood_set(data_dir: str | Path) -> tuple[str, str] | None:
    """The prepared OOD set of a data folder and the task that verifies it, or None when the run has none."""
    folder = Path(data_dir)
    if not (folder / OOD).is_file():
        return None
    config = read_json(folder / SUMMARY)["config"]
    return str(folder / OOD), config.get("ood_task") or config["task"]
