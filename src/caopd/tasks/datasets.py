"""Datasets as a task's examples: a ``datasets.save_to_disk`` folder, JSONL or Parquet, confined to the data root.

Anything wrong raises :class:`~caopd.errors.CaopdInputError` naming the file, the row and, where there is one, the
field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caopd.errors import CaopdInputError
from caopd.io import PathLike, read_jsonl, read_parquet
from caopd.tasks.base import Example, Task

# Where users' datasets may live; a platform sets it to the mounted data volume so that a path typed into the
# Kubeflow UI cannot read the pod's other files.
DATA_ROOT_ENV = "CAOPD_DATA_ROOT"


def load_rows(path: PathLike) -> list[dict[str, Any]]:
    """All rows of a dataset as plain dicts; the format follows from the path.

    A folder is a ``datasets.save_to_disk`` Dataset; ``.jsonl`` is one JSON object per line; ``.parquet``
    is a Parquet file. An empty dataset is an error here because every stage needs at least one row.
    """
    path = Path(path)
    if not path.exists():
        raise CaopdInputError("does not exist", file=str(path))
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        rows = read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = read_parquet(path)
    else:
        raise CaopdInputError(f"unknown dataset format {path.suffix!r}: use a datasets.save_to_disk folder, "
                              ".jsonl or .parquet", file=str(path))
    if not rows:
        raise CaopdInputError("dataset is empty", file=str(path))
    return rows


def confined_path(path: PathLike, root: PathLike | None) -> Path:
    """A user's dataset path, resolved inside ``root`` (a relative path is taken from it; symlinks are followed)
    and refused when it lands outside; unchanged when there is no root."""
    if not root:
        return Path(path)
    base = Path(root).resolve()
    given = Path(path).expanduser()
    full = (given if given.is_absolute() else base / given).resolve()
    if not full.is_relative_to(base):
        raise CaopdInputError(f"dataset path resolves to {full}, outside the data root {base} ({DATA_ROOT_ENV}); "
                              "put the dataset under the root", file=str(path))
    return full


def load_examples(path: PathLike, task: Task) -> list[Example]:
    """Load a dataset and validate it into the task's examples (errors name file, row and field)."""
    return task.examples_from_rows(load_rows(path), source=str(path))


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` Dataset; a DatasetDict is refused because the split must be chosen."""
    splits = _dataset_dict_splits(path)
    if splits == []:
        raise CaopdInputError("is a DatasetDict with no splits", file=str(path))
    if splits is not None:
        raise CaopdInputError(f"is a DatasetDict with splits {', '.join(splits)}; pass one split folder, "
                              f"e.g. {path / splits[0]}", file=str(path))
    import datasets  # slow to import; only folder datasets need it

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CaopdInputError(f"not a datasets.save_to_disk folder ({err})", file=str(path)) from None
    return dataset.to_list()


def _dataset_dict_splits(path: Path) -> list[str] | None:
    """The split names when ``path`` is a saved DatasetDict, else None."""
    marker = path / "dataset_dict.json"
    if not marker.is_file():
        return None
    try:
        return [str(s) for s in json.loads(marker.read_text(encoding="utf-8")).get("splits", [])]
    except (ValueError, AttributeError):
        return sorted(p.name for p in path.iterdir() if p.is_dir())

