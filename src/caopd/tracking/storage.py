"""Model weights and datasets to and from S3-compatible storage through boto3: multipart for large files, a sha256
per file in a manifest, checked again on the way down.

The client follows the standard AWS variables (credentials, region) plus ``MLFLOW_S3_ENDPOINT_URL`` for a
non-AWS endpoint — the same settings MLflow's own S3 artifact store reads, so one configuration serves both.
A model version then points at the uploaded folder instead of re-sending the weights through the server.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from caopd.errors import CaopdInputError, CaopdServiceError
from caopd.io import file_digest

MANIFEST = "caopd-manifest.json"
MULTIPART_THRESHOLD = 8 * 1024 * 1024


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise CaopdInputError(f"expected s3://BUCKET/PREFIX, got {uri!r}", field="artifact_root")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)


def upload_folder(local_dir: str | Path, uri: str, client: Any = None) -> dict[str, Any]:
    """Upload every file under ``local_dir`` to ``uri`` (multipart above 8 MiB) and a manifest of sha256s last,
    so a folder with a manifest is complete. Returns the manifest (``uri``, ``files``, ``digest``)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    local = Path(local_dir)
    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
    manifest = {"uri": uri.rstrip("/"), "files": {name: file_digest(p) for name, p in files.items()},
                "digest": file_digest(local)}
    try:
        for name, path in files.items():
            client.upload_file(str(path), bucket, f"{prefix}/{name}".lstrip("/"), Config=config,
                               ExtraArgs={"Metadata": {"sha256": manifest["files"][name]}})
        client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}".lstrip("/"),
                          Body=json.dumps(manifest, indent=2).encode())
    except (BotoCoreError, ClientError) as err:
        # botocore messages name the bucket and key, never the credentials.
        raise CaopdServiceError(f"upload to {uri} failed: {err}") from None
    return manifest


# --- downloads: the other direction, for pods that have no local copy --------------------------------------------
_MISSING = ("NoSuchKey", "NoSuchBucket", "404", "NotFound")


@contextlib.contextmanager
def s3_errors(uri: str, field: str) -> Iterator[None]:
    """A missing bucket or key is the user's input (``field`` names it); anything else — no endpoint, refused
    credentials — is the service's, with botocore's one line (it names bucket and key, never the credentials)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise CaopdInputError(f"{uri}: not found in S3 ({code})", field=field) from None
        raise CaopdServiceError(f"S3 refused a request for {uri} ({code or err}); check the AWS credentials and "
                                f"MLFLOW_S3_ENDPOINT_URL") from None
    except BotoCoreError as err:
        raise CaopdServiceError(f"S3 at {os.environ.get('MLFLOW_S3_ENDPOINT_URL') or 'AWS'} is not reachable for "
                                f"{uri}: {err}") from None


def head_object(uri: str, client: Any = None, field: str = "data") -> dict[str, Any] | None:
    """``ETag``, ``ContentLength`` and ``Metadata`` of the object at ``uri``; None when there is none."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    client = client or s3_client()
    with s3_errors(uri, field):
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code", "")) in _MISSING:
                return None
            raise


def list_folder(uri: str, client: Any = None, field: str = "model") -> dict[str, dict[str, Any]]:
    """Relative name → ``{"key", "etag", "size"}`` of every object under the folder ``uri`` (folder markers, keys
    ending in "/", left out). A name that would climb out of the folder (``..``) is refused: the bucket's keys must
    not choose where files land on the pod."""
    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    start = f"{prefix}/" if prefix else ""
    found: dict[str, dict[str, Any]] = {}
    with s3_errors(uri, field):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for item in page.get("Contents", []):
                name = item["Key"][len(start):]
                if not name or name.endswith("/"):
                    continue
                if ".." in PurePosixPath(name).parts or name.startswith("/"):
                    raise CaopdInputError(f"{uri}: object key {item['Key']!r} leaves the folder", field=field)
                found[name] = {"key": item["Key"], "etag": item.get("ETag", ""), "size": int(item.get("Size", 0))}
    return found


def download_file(uri: str, dest: str | Path, client: Any = None, field: str = "data") -> None:
    """The object at ``uri`` to the file ``dest`` (multipart above 8 MiB)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3_uri(uri)
    client = client or s3_client()
    config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with s3_errors(uri, field):
        client.download_file(bucket, key, str(dest), Config=config)


def download_folder(uri: str, local_dir: str | Path, client: Any = None, field: str = "model",
                    objects: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """Every object under ``uri`` into ``local_dir``, checked against the folder's manifest when it has one (as
    :func:`upload_folder` writes it): each file's sha256, and no file missing or added. The manifest itself is not
    written into ``local_dir``, so the folder digests as the one that was uploaded. Returns name → sha256.

    ``objects`` is :func:`list_folder`'s answer when the caller already has it."""
    client = client or s3_client()
    objects = list_folder(uri, client, field) if objects is None else objects
    if not objects:
        raise CaopdInputError(f"{uri}: no objects under this prefix", field=field)
    manifest = None
    if MANIFEST in objects:
        bucket, _ = split_s3_uri(uri)
        with s3_errors(uri, field):
            body = client.get_object(Bucket=bucket, Key=objects[MANIFEST]["key"])["Body"].read()
        try:
            manifest = json.loads(body)["files"]
            if not isinstance(manifest, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise CaopdInputError("not a caopd manifest (a JSON object with 'files')", file=f"{uri}/{MANIFEST}",
                                  field=field) from None
    local = Path(local_dir)
    digests: dict[str, str] = {}
    for name in sorted(objects):
        if name == MANIFEST:
            continue
        if manifest is not None and name not in manifest:
            raise CaopdInputError(f"{name} is not listed in {MANIFEST}; the folder changed after upload",
                                  file=f"{uri}/{name}", field=field)
        download_file(f"{uri.rstrip('/')}/{name}", local / name, client, field)
        digests[name] = file_digest(local / name)
        if manifest is not None and digests[name] != manifest[name]:
            raise CaopdInputError(f"{name}: sha256 {digests[name][:16]}… does not match {manifest[name][:16]}… in "
                                  f"{MANIFEST}; the file changed after upload or the download was corrupted",
                                  file=f"{uri}/{name}", field=field)
    missing = sorted(set(manifest or {}) - set(digests))
    if missing:
        raise CaopdInputError(f"{missing[0]} is listed in {MANIFEST} but missing under {uri}",
                              file=f"{uri}/{missing[0]}", field=field)
    return digests
