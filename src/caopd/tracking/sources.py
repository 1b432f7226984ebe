"""Where a stage's inputs come from when its pod has no local copy: datasets from ``s3://BUCKET/KEY``, base models
from an ``s3://`` folder or the MLflow registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), local paths as
before (datasets confined to the data root).

Every fetch gives a local path and the content's sha256 (:func:`caopd.io.file_digest`, so a downloaded file or
folder digests exactly as the original did), checked against what the source claims: the upload manifest's per-file
sha256s, the model version's ``caopd.weights_sha256`` tag. :func:`source_tags` turns a fetch into MLflow tags, which
``lineage_tags`` carries from the stage runs onto the registered model version.

Downloads land in a cache keyed by content — the objects' ETags and sizes as S3 lists them, or a registered
version's weights digest — so a changed object is fetched again and an unchanged one never is. Each entry is
downloaded into a hidden temp folder and renamed into place only when complete and verified: a crash or a failed
check never leaves a half-downloaded file where a later run would take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from caopd.errors import CaopdInputError, CaopdServiceError
from caopd.io import PathLike, file_digest
from caopd.models.packaged import PACKAGED_MODELS
from caopd.tasks.datasets import confined_path
from caopd.tracking.identity import redact_uri, refusal
from caopd.tracking.storage import (
    download_file,
    download_folder,
    head_object,
    list_folder,
    s3_client,
)
from caopd.tracking.tracker import connect

SOURCE_TAG = "caopd.source."  # caopd.source.<role>[.sha256|.resolved|.version|...]
WEIGHTS_TAG = "caopd.weights_sha256"  # on a model version: the registered folder's file_digest
CACHE_ENV = "CAOPD_CACHE_DIR"
MODELS_SCHEME = "models:/"
DATASET_SUFFIXES = (".jsonl", ".parquet")
_ENTRY_FILE = "fetched.json"  # beside the payload in a cache entry: its name and digest
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_ROLE = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots: the tag key's parts stay unambiguous


@dataclass(frozen=True)
class Fetched:
    """A fetched input: what the user gave, where it is now, what it holds."""

    source: str  # as given: a path, s3://..., models:/..., a hub id
    path: str  # the local file or folder to read (a hub id or "tiny" unchanged: the loader resolves those)
    digest: str  # sha256 of the content as caopd.io.file_digest computes it; "" for a hub id
    resolved: str  # what the source pointed at: models:/NAME/VERSION for a registered model, else the source
    details: Mapping[str, str] = field(default_factory=dict)  # registered models: name, version, alias, uri


def default_cache_dir() -> Path:
    """$CAOPD_CACHE_DIR, else caopd/sources under the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caopd" / "sources"


# --- the cache ------------------------------------------------------------------------------------------------------
def _cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _cached(entry: Path) -> tuple[Path, str] | None:
    """The payload and digest of a complete cache entry (a partial one never carries this name)."""
    try:
        meta = json.loads((entry / _ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return None
    payload = entry / meta["payload"]
    return (payload, meta["digest"]) if payload.exists() else None


def _fill(entry: Path, payload: str, download: Callable[[Path], None]) -> tuple[Path, str]:
    """``download(target)`` into a hidden temp folder beside ``entry``, digest it, then rename the folder to
    ``entry``; a run that finished the same entry first wins and ours is discarded (same content)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        download(partial / payload)
        digest = file_digest(partial / payload)
        (partial / _ENTRY_FILE).write_text(json.dumps({"payload": payload, "digest": digest}))
        try:
            os.rename(partial, entry)
        except OSError:  # the entry exists: another run's complete one, or a damaged one to replace
            if _cached(entry) is None:
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(partial, entry)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    found = _cached(entry)
    if found is None:  # pragma: no cover - the rename above either succeeded or found a complete entry
        raise CaopdServiceError(f"cache entry {entry} was not written")
    return found


# --- S3 -------------------------------------------------------------------------------------------------------------
def _split(source: str, field: str) -> tuple[str, str]:
    bucket, _, key = source[len("s3://"):].partition("/")
    if not bucket or not key.strip("/"):
        raise CaopdInputError(f"expected s3://BUCKET/KEY, got {source!r}", field=field)
    return bucket, key


def _fetch_s3_folder(uri: str, cache: Path, payload: str, client: Any, field: str) -> tuple[Path, str]:
    """A folder under an S3 prefix, verified against its manifest when it has one."""
    uri = uri.rstrip("/")
    objects = list_folder(uri, client, field)
    if not objects:
        raise CaopdInputError(f"{uri}: no objects under this prefix", field=field)
    key = _cache_key(payload, sorted((name, o["etag"], o["size"]) for name, o in objects.items()))
    return _cached(cache / key) or _fill(
        cache / key, payload, lambda target: download_folder(uri, target, client, field, objects))


def _fetch_s3_dataset(source: str, cache: Path, client: Any, field: str) -> tuple[Path, str]:
    bucket, key = _split(source, field)
    name = PurePosixPath(key.rstrip("/")).name
    if key.endswith("/"):
        return _fetch_s3_folder(source, cache, name, client, field)
    head = head_object(source, client, field)
    if head is None:  # no such object: a save_to_disk folder given without its trailing "/"?
        if list_folder(source, client, field):
            return _fetch_s3_folder(source, cache, name, client, field)
        raise CaopdInputError(f"{source}: no such object or folder in S3", field=field)
    if PurePosixPath(key).suffix not in DATASET_SUFFIXES:
        raise CaopdInputError(f"{source}: unknown dataset format {PurePosixPath(key).suffix!r}: use .jsonl, .parquet "
                              "or a datasets.save_to_disk folder (a prefix ending in '/')", field=field)
    entry = cache / _cache_key(name, head.get("ETag", ""), int(head.get("ContentLength", 0)))

    def download(target: Path) -> None:
        download_file(source, target, client, field)
        claimed = (head.get("Metadata") or {}).get("sha256")  # upload_folder records one per object
        if claimed and file_digest(target) != claimed:
            raise CaopdInputError(f"{name}: sha256 does not match the object's sha256 metadata", file=source,
                                  field=field)

    return _cached(entry) or _fill(entry, name, download)


# --- datasets -------------------------------------------------------------------------------------------------------
def fetch_dataset(source: str | PathLike, data_root: PathLike | None = None, cache_dir: PathLike | None = None, *,
                  field: str = "data", client: Any = None) -> Fetched:
    """A dataset from a local path (confined to ``data_root``) or ``s3://BUCKET/KEY`` (a .jsonl or .parquet object;
    a prefix ending in "/" is a ``datasets.save_to_disk`` folder). The local file keeps the key's name, so the
    format still follows from the suffix. ``field`` is the config field errors name."""
    source = str(source)
    if source.startswith("s3://"):
        cache = Path(cache_dir or default_cache_dir()) / "datasets"
        path, digest = _fetch_s3_dataset(source, cache, client or s3_client(), field)
        return Fetched(source, str(path), digest, source)
    if _SCHEME.match(source):
        raise CaopdInputError(f"{source!r}: unsupported dataset source; use a path under the data root or "
                              "s3://BUCKET/KEY", field=field)
    try:
        path = confined_path(source, data_root)
    except CaopdInputError as err:
        raise CaopdInputError(err.detail, file=err.file, field=field) from None
    if not path.exists():
        raise CaopdInputError("does not exist", file=source, field=field)
    return Fetched(source, str(path), file_digest(path), source)


# --- models ---------------------------------------------------------------------------------------------------------
def parse_model_reference(source: str, field: str = "model") -> tuple[str, str, str]:
    """``models:/NAME@ALIAS`` → (NAME, "", ALIAS); ``models:/NAME/VERSION`` → (NAME, VERSION, "")."""
    rest = source[len(MODELS_SCHEME):]
    name, sep, alias = rest.partition("@")
    version = ""
    if not sep:
        name, _, version = rest.partition("/")
    if not name or "/" in name or not (alias or version.isdigit()):
        raise CaopdInputError(f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {source!r}", field=field)
    return name, version, alias


def _mlflow_client(tracking_uri: str, source: str, field: str, connect_timeout_s: float) -> tuple[Any, str]:
    """A registry client as a tracker's (the given URI or $MLFLOW_TRACKING_URI, this process's credentials, bounded
    retries, the server checked first so a dead one fails within ``connect_timeout_s``)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise CaopdInputError(f"{source}: a registered model needs the MLflow server: set MLFLOW_TRACKING_URI or "
                              "the tracking URI", field=field)
    return connect(uri, connect_timeout_s), uri


def _model_version(client: Any, uri: str, source: str, name: str, version: str, alias: str, field: str) -> Any:
    from mlflow.exceptions import MlflowException

    missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        refused = refusal(err, uri, f"READ on registered model '{name}'")
        if refused is not None:
            raise refused from None
        if err.error_code not in missing:
            message = str(err.message).splitlines()[0][:300]
            raise CaopdServiceError(f"MLflow at {redact_uri(uri)}: {redact_uri(message)}") from None
    except OSError as err:
        raise CaopdServiceError(f"MLflow at {redact_uri(uri)} is not reachable: {type(err).__name__}") from None
    try:  # say what exists, so the user can fix the reference
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:
        raise CaopdInputError(f"{source}: no registered model {name!r}", field=field) from None
    have = ", ".join(f"{a}→{v}" for a, v in sorted(aliases.items())) or "none"
    what = f"alias {alias!r}" if alias else f"version {version}"
    raise CaopdInputError(f"{source}: model {name!r} has no {what} (aliases: {have})", field=field)


def _download_artifacts(artifact_uri: str, tracking_uri: str, field: str) -> Callable[[Path], None]:
    def download(target: Path) -> None:
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        target.mkdir(parents=True)
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(target),
                                                           tracking_uri=tracking_uri, registry_uri=tracking_uri))
        except MlflowException as err:
            message = str(err.message).splitlines()[0][:300]
            raise CaopdServiceError(f"downloading {redact_uri(artifact_uri)}: {redact_uri(message)}") from None
        if got != target:  # a folder artifact lands as target/<its name>: lift its content up
            for item in list(got.iterdir()):
                os.rename(item, target / item.name)
            shutil.rmtree(got)

    return download


def _model_folder(path: Path, digest: str) -> tuple[Path, str]:
    """A run's artifact root with the model under ``model/`` (how runs log it) → that folder and its digest."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model", file_digest(path / "model")
    return path, digest


def _fetch_registered(source: str, cache: Path, tracking_uri: str, mlflow_client: Any, client: Any, field: str,
                      connect_timeout_s: float) -> Fetched:
    name, version, alias = parse_model_reference(source, field)
    if mlflow_client is None:
        mlflow_client, tracking_uri = _mlflow_client(tracking_uri, source, field, connect_timeout_s)
    found = _model_version(mlflow_client, tracking_uri, source, name, version, alias, field)
    uri, claimed = found.source, (found.tags or {}).get(WEIGHTS_TAG, "")
    pinned = f"{MODELS_SCHEME}{name}/{found.version}"
    if uri.startswith("s3://"):
        fetched = _fetch_s3_folder(uri, cache, "model", client or s3_client(), field)
    else:  # runs:/, mlflow-artifacts:/ ...: keyed by the weights digest when the version states one
        entry = cache / _cache_key("model", claimed or uri)
        fetched = _cached(entry) or _fill(entry, "model", _download_artifacts(uri, tracking_uri, field))
    folder, digest = _model_folder(*fetched)
    if claimed and digest != claimed:
        raise CaopdInputError(f"{source}: the weights at {redact_uri(uri)} digest to {digest[:16]}…, but {pinned} "
                              f"states {WEIGHTS_TAG} {claimed[:16]}…; the folder changed after registration",
                              field=field)
    return Fetched(source, str(folder), digest, pinned,
                   {"name": name, "version": str(found.version), "alias": alias, "uri": uri})


def fetch_model(source: str | PathLike, cache_dir: PathLike | None = None, *, tracking_uri: str = "",
                mlflow_client: Any = None, client: Any = None, field: str = "model",
                connect_timeout_s: float = 30.0) -> Fetched:
    """A base model: a local folder, a hub id or "tiny" pass through unchanged; ``s3://BUCKET/FOLDER`` is
    downloaded (checked against its manifest); ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` is resolved in
    the MLflow registry (``mlflow_client``, else ``tracking_uri`` or $MLFLOW_TRACKING_URI) and its source downloaded,
    which must digest to the version's ``caopd.weights_sha256`` when it states one."""
    source = str(source)
    cache = Path(cache_dir or default_cache_dir()) / "models"
    if source.startswith(MODELS_SCHEME):
        return _fetch_registered(source, cache, tracking_uri, mlflow_client, client, field, connect_timeout_s)
    if source.startswith("s3://"):
        _split(source, field)
        folder, digest = _model_folder(*_fetch_s3_folder(source, cache, "model", client or s3_client(), field))
        return Fetched(source, str(folder), digest, source)
    if _SCHEME.match(source):
        raise CaopdInputError(f"{source!r}: unsupported model source; use a folder, a hub id, s3://BUCKET/FOLDER, "
                              "models:/NAME@ALIAS or models:/NAME/VERSION", field=field)
    if source in PACKAGED_MODELS:
        return Fetched(source, source, file_digest(PACKAGED_MODELS[source]), source)
    local = Path(source).expanduser()
    return Fetched(source, source, file_digest(local) if local.exists() else "", source)


# --- lineage --------------------------------------------------------------------------------------------------------
def source_tags(role: str, fetched: Fetched) -> dict[str, str]:
    """MLflow tags for one input: ``caopd.source.<role>`` = the source as given, ``.sha256`` = its digest,
    ``.resolved`` = what it resolved to when that differs (models:/NAME/VERSION), and for a registered model its
    ``.name``, ``.version``, ``.alias`` and ``.uri``. URIs are redacted of credentials."""
    if not _ROLE.match(role):
        raise ValueError(f"source role {role!r}: letters, digits, '_' and '-' only")
    key = f"{SOURCE_TAG}{role}"
    tags = {key: redact_uri(fetched.source)}
    if fetched.digest:
        tags[f"{key}.sha256"] = fetched.digest
    if fetched.resolved and fetched.resolved != fetched.source:
        tags[f"{key}.resolved"] = redact_uri(fetched.resolved)
    tags.update({f"{key}.{name}": redact_uri(value) for name, value in fetched.details.items() if value})
    return {k: v[:5000] for k, v in tags.items()}  # MLflow's tag value limit


def sources_from_tags(tags: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``caopd.source.*`` tags → role → {"source", "sha256", "resolved", ...}: the inverse of :func:`source_tags`."""
    out: dict[str, dict[str, str]] = {}
    for key, value in sorted(tags.items()):
        if key.startswith(SOURCE_TAG):
            role, _, part = key[len(SOURCE_TAG):].partition(".")
            out.setdefault(role, {})[part or "source"] = value
    return out
