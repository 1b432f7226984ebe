"""Model weights to S3-compatible storage through boto3: multipart for large files, a sha256 per file.

The client follows the standard AWS variables (credentials, region) plus ``MLFLOW_S3_ENDPOINT_URL`` for a
non-AWS endpoint — the same settings MLflow's own S3 artifact store reads, so one configuration serves both.
A model version then points at the uploaded folder instead of re-sending the weights through the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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
