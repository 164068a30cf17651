"""S3 storage for model bundles: upload a directory with a sha256 manifest, download and verify.

The manifest (`MANIFEST.json` beside the files, {"files": {relative path: {sha256, size}}})
is written last, so a reader that finds it finds every file it names. A download checks
every file against it and fails naming the file (key and local path) whose bytes differ;
nothing half-verified is left at the destination (files land in a temporary folder that is
renamed into place only after all checks pass).

Large files go up and down in parts (boto3's managed transfers, `TransferSettings`); each
request is retried by botocore (standard mode, exponential back-off), and a whole-file
transfer that still fails on a connection error is retried by tenacity.

The endpoint comes from S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or
MLFLOW_S3_ENDPOINT_URL (first set wins), so the same code talks to AWS, MinIO or a local
`moto_server`. Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID, profiles, roles).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.core.config import help_field

MANIFEST = "MANIFEST.json"
ENDPOINT_VARS = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MiB = 1 << 20


class StorageError(RuntimeError):
    """An S3 transfer problem; the message names the bucket/key and the local file."""


class ChecksumMismatch(StorageError):
    """A downloaded file's sha256 differs from the manifest's."""


@dataclass(frozen=True)
class TransferSettings:
    multipart_threshold_bytes: int = help_field(64 * MiB, "files from this size up go in parts")
    multipart_chunksize_bytes: int = help_field(16 * MiB, "part size (S3's minimum is 5 MiB)")
    max_concurrency: int = help_field(4, "parallel part transfers per file")
    max_attempts: int = help_field(5, "botocore attempts per request (standard retry mode)")
    file_attempts: int = help_field(3, "attempts per whole-file transfer after botocore gives up")
    connect_timeout_s: float = help_field(10.0, "TCP connect timeout")
    read_timeout_s: float = help_field(120.0, "socket read timeout")

    def __post_init__(self) -> None:
        if self.multipart_chunksize_bytes < 5 * MiB:
            raise ValueError(f"multipart_chunksize_bytes={self.multipart_chunksize_bytes}: S3 refuses parts "
                             f"under 5 MiB ({5 * MiB})")
        if self.max_attempts < 1 or self.file_attempts < 1:
            raise ValueError("max_attempts and file_attempts must be >= 1")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix/" -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise StorageError(f"{uri!r}: expected s3://bucket[/prefix]")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def endpoint_url(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return next((env[k] for k in ENDPOINT_VARS if env.get(k)), None)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(local_dir: Path) -> dict[str, Any]:
    """{"files": {posix relative path: {sha256, size}}} for every regular file under local_dir."""
    files = {}
    for p in sorted(local_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(local_dir).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    if not files:
        raise StorageError(f"{local_dir}: no files to upload")
    return {"files": files}


def client(settings: TransferSettings = TransferSettings()) -> Any:
    """A boto3 S3 client for the configured endpoint, with botocore's retries and timeouts."""
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                 connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                 # path-style works with every S3-protocol server (MinIO, moto) and with AWS.
                 s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_url(), config=cfg)


def _transfer_config(settings: TransferSettings) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=settings.multipart_threshold_bytes,
                          multipart_chunksize=settings.multipart_chunksize_bytes,
                          max_concurrency=settings.max_concurrency, use_threads=settings.max_concurrency > 1)


def _retrying(settings: TransferSettings, fn: Any, *args: Any) -> Any:
    """Retry a whole-file transfer on connection-level failures only: a missing key or a
    refused credential will not get better by trying again."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

    transient = (BotoConnectionError, S3UploadFailedError, S3TransferFailedError, ConnectionError)
    return retry(stop=stop_after_attempt(settings.file_attempts), wait=wait_exponential(multiplier=0.5, max=10),
                 retry=retry_if_exception_type(transient), reraise=True)(fn)(*args)


def upload_dir(local_dir: Path | str, uri: str, settings: TransferSettings = TransferSettings(),
               s3: Any = None) -> dict[str, Any]:
    """Upload every file under local_dir to uri/<relative path>, then the manifest. Each object
    carries its sha256 as metadata too. Returns the manifest."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    bucket, prefix = parse_s3_uri(uri)
    s3 = s3 or client(settings)
    manifest = build_manifest(local_dir)
    transfer = _transfer_config(settings)
    for rel, info in manifest["files"].items():
        key = f"{prefix}/{rel}" if prefix else rel
        try:
            _retrying(settings, s3.upload_file, str(local_dir / rel), bucket, key,
                      {"Metadata": {"sha256": info["sha256"]}}, None, transfer)
        except Exception as e:  # boto3 wraps everything; name the file, keep the cause
            raise StorageError(f"upload {local_dir / rel} -> s3://{bucket}/{key} failed: {e}") from e
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    put = functools.partial(s3.put_object, Bucket=bucket, Key=key, Body=body, ContentType="application/json")
    try:
        _retrying(settings, put)
    except Exception as e:
        raise StorageError(f"upload manifest -> s3://{bucket}/{key} failed: {e}") from e
    return manifest


def read_manifest(uri: str, s3: Any) -> dict[str, Any]:
    bucket, prefix = parse_s3_uri(uri)
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        raise StorageError(f"s3://{bucket}/{key}: cannot read the manifest ({e}); was this uploaded "
                           "with steps.core.storage.upload_dir?") from e
    try:
        manifest = json.loads(body)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StorageError(f"s3://{bucket}/{key}: not a manifest (expected {{\"files\": {{path: {{sha256, size}}}}}})")
    return manifest


def download_dir(uri: str, local_dir: Path | str, settings: TransferSettings = TransferSettings(),
                 s3: Any = None) -> dict[str, Any]:
    """Download every file the manifest at uri names into local_dir and verify its sha256.
    Raises ChecksumMismatch naming the first file that differs; local_dir is replaced only
    when every file checks out. Returns the manifest."""
    local_dir = Path(local_dir)
    bucket, prefix = parse_s3_uri(uri)
    s3 = s3 or client(settings)
    manifest = read_manifest(uri, s3)
    transfer = _transfer_config(settings)
    tmp = local_dir.with_name(local_dir.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, info in manifest["files"].items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise StorageError(f"s3://{bucket}/{prefix}/{MANIFEST}: unsafe path {rel!r}")
            key = f"{prefix}/{rel}" if prefix else rel
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                _retrying(settings, s3.download_file, bucket, key, str(dest), None, None, transfer)
            except Exception as e:
                raise StorageError(f"download s3://{bucket}/{key} -> {local_dir / rel} failed: {e}") from e
            got = sha256_file(dest)
            if got != info["sha256"]:
                raise ChecksumMismatch(f"{rel}: checksum mismatch for s3://{bucket}/{key} (local {local_dir / rel}): "
                                       f"manifest sha256 {info['sha256']}, downloaded {got} "
                                       f"({dest.stat().st_size} bytes, manifest says {info['size']})")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if local_dir.exists():
            shutil.rmtree(local_dir)
        tmp.rename(local_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
