"""Loading datasets and writing artifacts: the one home for file IO.

Inputs come from a ``datasets.save_to_disk`` folder, JSONL, or Parquet; anything wrong with them raises
:class:`~caopd.errors.CaopdInputError` naming the file, the row and, where there is one, the field.
Artifacts are written atomically (a temp file in the same directory, then ``os.replace``), so a crash or a
serialization error never leaves a half-written file for a cached pipeline step to pick up. Digests make
artifacts comparable across runs for lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from caopd.errors import CaopdInputError

PathLike = str | os.PathLike[str]

_CHUNK = 1 << 20


# ---------------------------------------------------------------- reading


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped and an empty file gives no rows.

    Errors name the row (0-based, counting non-blank lines, as task validation does) and the 1-based line.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    try:
        handle = path.open("rb")
    except OSError as err:
        raise CaopdInputError(f"cannot read ({err.strerror})", file=str(path)) from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            row = len(rows)
            try:
                text = raw.decode("utf-8")
                if line_no == 1:
                    text = text.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors write
            except UnicodeDecodeError as err:
                raise CaopdInputError(f"line {line_no}: not UTF-8 (byte {err.start})", file=str(path),
                                      row=row) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise CaopdInputError(f"line {line_no}: invalid JSON ({err.msg} at column {err.colno})",
                                      file=str(path), row=row) from None
            if not isinstance(value, dict):
                raise CaopdInputError(f"line {line_no}: expected a JSON object, got {type(value).__name__}",
                                      file=str(path), row=row)
            rows.append(value)
    return rows


def read_parquet(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a Parquet file as plain Python values."""
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise CaopdInputError(f"not a readable Parquet file ({err})", file=str(path)) from None


def read_json(path: PathLike) -> Any:
    """One JSON document (summaries, configs)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise CaopdInputError(f"cannot read ({err.strerror})", file=str(path)) from None
    except UnicodeDecodeError as err:
        raise CaopdInputError(f"not UTF-8 (byte {err.start})", file=str(path)) from None
    except json.JSONDecodeError as err:
        raise CaopdInputError(f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                              file=str(path)) from None


# ---------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    """Make the non-JSON values stages produce (numpy scalars and arrays, paths) serializable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_default, **options)


def _temp_sibling(path: Path, tag: str) -> Path:
    """A unique hidden name beside ``path``: same filesystem, so ``os.replace`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}")


@contextmanager
def atomic_file(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        with tmp.open("xb") as handle:  # "x": honours the umask, unlike mkstemp's 0600
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> str:
    """Write one JSON object per line, atomically; returns the file's sha256."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write((_dumps(row) + "\n").encode("utf-8"))
    return file_digest(path)


def write_text(path: PathLike, text: str) -> str:
    """Write a UTF-8 text file (a report, a table), atomically; returns the file's sha256."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))
    return file_digest(path)


def write_json(path: PathLike, obj: Any) -> str:
    """Write one indented JSON document, atomically; returns the file's sha256."""
    with atomic_file(path) as handle:
        handle.write((_dumps(obj, indent=2) + "\n").encode("utf-8"))
    return file_digest(path)


def write_parquet(path: PathLike, rows: Iterable[Mapping[str, Any]], schema: pa.Schema | None = None) -> str:
    """Write rows as Parquet, atomically; ``schema`` states column types (needed for zero rows).

    Returns the file's sha256.
    """
    table = pa.Table.from_pylist([dict(row) for row in rows], schema=schema)
    with atomic_file(path) as handle:
        pq.write_table(table, handle)
    return file_digest(path)


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it becomes ``path``, on error it is removed.

    An existing ``path`` is replaced only after the new folder is complete, so a checkpoint folder is
    always either the old one or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _temp_sibling(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------- digests


def file_digest(path: PathLike) -> str:
    """sha256 hex of a file's bytes; for a folder, of its files' relative paths and digests.

    The folder digest depends only on content and names (sorted, POSIX separators), not on mtimes or the
    folder's location, so the same checkpoint digests the same everywhere.
    """
    path = Path(path)
    if not path.exists():
        raise CaopdInputError("does not exist", file=str(path))
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digest = hashlib.sha256()
    files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    for relative in sorted(files):
        digest.update(f"{relative}\0{file_digest(files[relative])}\n".encode())
    return digest.hexdigest()


def rows_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 hex of rows' content, independent of file format and of key order within a row."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update((_dumps(row, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8"))
    return digest.hexdigest()
