"""Checkpoint sync with S3, made safe by a manifest written last.

A checkpoint folder `iter_0000010/` is uploaded to `s3://bucket/prefix/iter_0000010/` file by file,
with retries, and `manifest.json` goes up only after every file is there. A checkpoint counts as
*complete* when its manifest exists and every object it lists is present with the listed size;
a download also checks each file's sha256. An upload cut off half-way therefore has no manifest
(or, if objects were deleted later, a manifest that does not verify) and is never used on resume.

Manifest layout (`manifest.json`, also written locally by `write_manifest`)::

    {"format": 1, "files": [{"path": "common.pt", "size": 1234, "sha256": "ab.."}, ...]}

`path` is relative to the checkpoint folder with `/` separators; `manifest.json` itself is not listed.

The caller passes a boto3 S3 client (`boto3.client("s3", endpoint_url=...)`): credentials come from
boto3's usual chain and are never read, printed or stored here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from alfred_train.atomic import write_text
from alfred_train.checkpointing.manifest import MANIFEST, MANIFEST_FORMAT, ManifestError, check_manifest
from alfred_train.checkpointing.manifest import sha256_of as _sha256
from alfred_train.errors import AlfredError

_ITER_DIR = re.compile(r"^iter_(\d+)$")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")

T = TypeVar("T")


class CheckpointSyncError(AlfredError):
    """An S3 checkpoint could not be uploaded or downloaded intact."""


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/key` split in two; `key` has no leading and no trailing `/`."""

    bucket: str
    key: str

    def child(self, name: str) -> "S3Location":
        return S3Location(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/a/b/` -> S3Location("bucket", "a/b"); raises ValueError on another shape."""
    match = _S3_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an S3 URI of the form s3://bucket/prefix")
    return S3Location(match.group(1), (match.group(2) or "").strip("/"))


# ---------------------------------------------------------------------------------------------
# Manifests


def build_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """Manifest of every file under `ckpt_dir` (recursively, sorted), `manifest.json` excluded."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointSyncError(f"checkpoint folder {root} does not exist")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)})
    return {"format": MANIFEST_FORMAT, "files": files}


def write_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """Write `<ckpt_dir>/manifest.json` (atomically: temp file + rename) and return it.

    Call it after every file of the checkpoint is written and closed.
    """
    manifest = build_manifest(ckpt_dir)
    target = Path(ckpt_dir) / MANIFEST
    write_text(target, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_manifest(manifest: Any, where: str) -> list[dict]:
    try:
        return check_manifest(manifest, where)
    except ManifestError as err:
        raise CheckpointSyncError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Retries


def _with_retries(action: Callable[[], T], *, what: str, retries: int, backoff_s: float) -> T:
    """Run `action`, retrying `retries` more times on S3/network errors with doubling sleeps."""
    from boto3.exceptions import S3UploadFailedError

    for attempt in range(retries + 1):
        try:
            return action()
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as err:
            if attempt == retries:
                raise CheckpointSyncError(
                    f"{what} failed after {retries + 1} attempts: {type(err).__name__}: {err}"
                ) from err
            time.sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Upload


def upload_checkpoint(
    local_ckpt_dir: str | os.PathLike,
    s3_uri: str,
    client: Any,
    retries: int = 3,
    backoff_s: float = 1.0,
) -> dict:
    """Upload one checkpoint folder to `s3_uri` (its own prefix, e.g. `s3://b/run/iter_0000010`).

    Every file goes up with `client.upload_file` (multipart for large shards), each retried up to
    `retries` times; `manifest.json` is put last, so a reader never sees a manifest before the files
    it lists. Writes the local manifest too. Returns the manifest; raises CheckpointSyncError when a
    file cannot be uploaded (the remote prefix is then left without a manifest: never used).
    """
    root = Path(local_ckpt_dir)
    dest = parse_s3_uri(s3_uri)
    manifest = write_manifest(root)
    for entry in manifest["files"]:
        target = dest.child(entry["path"])
        _with_retries(
            lambda: client.upload_file(str(root / entry["path"]), target.bucket, target.key),
            what=f"upload of {target}",
            retries=retries,
            backoff_s=backoff_s,
        )
    body = json.dumps(manifest, indent=1).encode()
    target = dest.child(MANIFEST)
    _with_retries(
        lambda: client.put_object(Bucket=target.bucket, Key=target.key, Body=body),
        what=f"upload of {target}",
        retries=retries,
        backoff_s=backoff_s,
    )
    return manifest


# ---------------------------------------------------------------------------------------------
# Finding the newest complete checkpoint


def list_iter_prefixes(root: S3Location, client: Any) -> list[tuple[int, S3Location]]:
    """(iteration, location) of every `iter_N/` directly under `root`, newest first."""
    found = []
    prefix = f"{root.key}/" if root.key else ""
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=root.bucket, Prefix=prefix, Delimiter="/"
    ):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"][len(prefix) :].rstrip("/")
            match = _ITER_DIR.match(name)
            if match:
                found.append((int(match.group(1)), root.child(name)))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _read_manifest(loc: S3Location, client: Any) -> list[dict] | None:
    """Files listed by `loc/manifest.json`, or None when there is no manifest."""
    manifest = read_remote_manifest(loc, client)
    return None if manifest is None else manifest["files"]


def read_remote_manifest(loc: S3Location, client: Any) -> dict | None:
    """`loc/manifest.json` (checked), or None when there is none."""
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.child(MANIFEST).key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError as err:
        raise CheckpointSyncError(f"{loc.child(MANIFEST)} is not JSON: {err}") from err
    _check_manifest(manifest, str(loc.child(MANIFEST)))
    return manifest


def _remote_sizes(loc: S3Location, client: Any) -> dict[str, int]:
    """Relative path -> size of every object under `loc/`."""
    sizes = {}
    prefix = f"{loc.key}/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(prefix) :]] = obj["Size"]
    return sizes


def verify_remote(s3_uri: str, client: Any) -> bool:
    """True when `s3_uri/manifest.json` exists and lists only objects present with their sizes."""
    loc = parse_s3_uri(s3_uri)
    files = _read_manifest(loc, client)
    if files is None:
        return False
    sizes = _remote_sizes(loc, client)
    return all(sizes.get(f["path"]) == f["size"] for f in files)


def latest_complete(s3_uri: str, client: Any) -> str | None:
    """S3 URI of the newest `iter_N` under `s3_uri` whose manifest verifies, or None.

    `s3_uri` is the checkpoints root (the parent of the `iter_N/` prefixes). Newer prefixes that
    have no manifest, or whose manifest lists a missing or wrong-sized object, are skipped.
    """
    for _, loc in list_iter_prefixes(parse_s3_uri(s3_uri), client):
        if verify_remote(str(loc), client):
            return str(loc)
    return None


# ---------------------------------------------------------------------------------------------
# Download


def download_checkpoint(
    s3_uri: str,
    local_dir: str | os.PathLike,
    client: Any,
    retries: int = 3,
    backoff_s: float = 1.0,
) -> Path:
    """Download the checkpoint at `s3_uri` into `local_dir` and verify it against its manifest.

    Files land in a temporary sibling folder first; only when every size and sha256 matches is it
    renamed to `local_dir` (which must not exist yet), so a failed download leaves nothing behind.
    Raises CheckpointSyncError on a missing manifest or any mismatch. Returns `Path(local_dir)`.
    """
    loc = parse_s3_uri(s3_uri)
    target = Path(local_dir)
    if target.exists():
        raise CheckpointSyncError(f"{target} already exists: download into a new folder")
    manifest = read_remote_manifest(loc, client)
    if manifest is None:
        raise CheckpointSyncError(f"{loc} has no {MANIFEST}: an incomplete upload, not a checkpoint")
    files = manifest["files"]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for entry in files:
            path = staging / entry["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            source = loc.child(entry["path"])
            _with_retries(
                lambda: client.download_file(source.bucket, source.key, str(path)),
                what=f"download of {source}",
                retries=retries,
                backoff_s=backoff_s,
            )
            size, digest = path.stat().st_size, _sha256(path)
            if size != entry["size"] or digest != entry["sha256"]:
                raise CheckpointSyncError(
                    f"{source}: size/sha256 {size}/{digest[:12]} does not match the manifest "
                    f"({entry['size']}/{entry['sha256'][:12]})"
                )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# What the trainer uses while it runs (checkpointing/mirror.py)


def make_client(max_attempts: int = 10) -> Any:
    """A boto3 S3 client with botocore's own retries ("standard" mode: throttling and transient
    errors, with backoff). Endpoint and credentials from the environment (AWS_ENDPOINT_URL_S3,
    the instance role, ...)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}))


def upload_files(local_ckpt_dir: str | os.PathLike, entries: list[dict], s3_uri: str, client: Any,
                 retries: int = 3, backoff_s: float = 1.0) -> None:
    """Upload the listed manifest entries of one checkpoint folder (not the manifest itself)."""
    root, dest = Path(local_ckpt_dir), parse_s3_uri(s3_uri)
    for entry in entries:
        target = dest.child(entry["path"])
        _with_retries(lambda: client.upload_file(str(root / entry["path"]), target.bucket, target.key),
                      what=f"upload of {target}", retries=retries, backoff_s=backoff_s)


def put_manifest(manifest: dict, s3_uri: str, client: Any, retries: int = 3, backoff_s: float = 1.0) -> None:
    """Put `manifest.json` under `s3_uri`: call it after every file it lists is uploaded."""
    target = parse_s3_uri(s3_uri).child(MANIFEST)
    body = json.dumps(manifest, indent=1).encode()
    _with_retries(lambda: client.put_object(Bucket=target.bucket, Key=target.key, Body=body),
                  what=f"upload of {target}", retries=retries, backoff_s=backoff_s)


def delete_prefix(loc: S3Location, client: Any) -> None:
    """Delete every object under `loc/`, the manifest first (so a reader never sees a manifest
    whose files are going)."""
    manifest_key = loc.child(MANIFEST).key
    client.delete_object(Bucket=loc.bucket, Key=manifest_key)
    keys = [k for k in _remote_sizes(loc, client)]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=loc.bucket, Delete={
            "Objects": [{"Key": loc.child(k).key} for k in keys[i:i + 1000]], "Quiet": True})


def prune_remote(s3_uri: str, keep: int, client: Any, protect: str) -> list[str]:
    """Keep the newest `keep` `iter_N` prefixes under `s3_uri` by step; never `protect` (the
    checkpoint just uploaded). Returns the URIs removed."""
    removed = []
    for _, loc in list_iter_prefixes(parse_s3_uri(s3_uri), client)[keep:]:
        if str(loc) != protect.rstrip("/"):
            delete_prefix(loc, client)
            removed.append(str(loc))
    return removed
