"""S3 checkpoint sync against a real moto server: manifests, retries, cut-off uploads."""

from __future__ import annotations

import hashlib
import json

import pytest
from botocore.exceptions import EndpointConnectionError
from launch_fixtures import boto_client

from alfred_train.launch import s3

BUCKET = "ckpts"
ROOT = f"s3://{BUCKET}/runs/tiny/checkpoints"


def make_checkpoint(path, step: int) -> dict[str, bytes]:
    """A fake but real-sized distributed checkpoint folder; returns its files' bytes."""
    files = {
        "common.pt": bytes([step]) * 1000,
        "metadata.json": json.dumps({"step": step}).encode(),
        "__0_0.distcp": bytes(range(256)) * (20 + step),
        "sub/__1_0.distcp": b"x" * (3000 + step),
    }
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return files


class FailingAfter:
    """An S3 client whose upload_file fails (every retry too) once `ok_uploads` files went up."""

    def __init__(self, client, ok_uploads: int, transient: bool = False):
        self.client, self.ok_uploads, self.transient = client, ok_uploads, transient
        self.calls = 0

    def upload_file(self, *args, **kwargs):
        self.calls += 1
        if self.transient and self.calls % 2 == 1:  # every file's first attempt fails
            raise EndpointConnectionError(endpoint_url="http://injected")
        if not self.transient and self.calls > self.ok_uploads:
            raise EndpointConnectionError(endpoint_url="http://injected")
        return self.client.upload_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


@pytest.fixture
def client(moto):
    c = boto_client("s3", moto)
    c.create_bucket(Bucket=BUCKET)
    return c


def test_manifest_lists_sizes_and_hashes(tmp_path):
    files = make_checkpoint(tmp_path, 1)
    manifest = s3.write_manifest(tmp_path)
    assert [f["path"] for f in manifest["files"]] == sorted(files)
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path["sub/__1_0.distcp"]["size"] == 3001
    assert by_path["common.pt"]["sha256"] == hashlib.sha256(bytes([1]) * 1000).hexdigest()
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert s3.write_manifest(tmp_path) == manifest  # manifest.json does not list itself


def test_upload_cut_off_is_never_used(client, tmp_path):
    make_checkpoint(tmp_path / "iter_0000010", 10)
    s3.upload_checkpoint(tmp_path / "iter_0000010", f"{ROOT}/iter_0000010", client, backoff_s=0)
    assert s3.latest_complete(ROOT, client) == f"{ROOT}/iter_0000010"

    # iter 20: the connection dies after 2 of 4 files; retries cannot help.
    make_checkpoint(tmp_path / "iter_0000020", 20)
    flaky = FailingAfter(client, ok_uploads=2)
    with pytest.raises(s3.CheckpointSyncError, match="iter_0000020/.*failed after 3 attempts"):
        s3.upload_checkpoint(tmp_path / "iter_0000020", f"{ROOT}/iter_0000020", flaky, retries=2, backoff_s=0)
    assert flaky.calls == 2 + 3  # 2 files went up, the third was tried 1 + 2 times
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/tiny/checkpoints/iter_0000020/")["Contents"]]
    assert len(keys) == 2 and not any(k.endswith("manifest.json") for k in keys)
    assert s3.latest_complete(ROOT, client) == f"{ROOT}/iter_0000010"

    # Resume downloads the complete one, checksums verified, and only that.
    out = s3.download_checkpoint(s3.latest_complete(ROOT, client), tmp_path / "restore", client)
    assert (out / "metadata.json").read_text() == json.dumps({"step": 10})
    assert (out / "sub/__1_0.distcp").read_bytes() == b"x" * 3010
    with pytest.raises(s3.CheckpointSyncError, match="no manifest.json"):
        s3.download_checkpoint(f"{ROOT}/iter_0000020", tmp_path / "bad", client)
    assert not (tmp_path / "bad").exists()


def test_transient_failures_are_retried(client, tmp_path):
    make_checkpoint(tmp_path / "iter_0000005", 5)
    flaky = FailingAfter(client, ok_uploads=0, transient=True)
    manifest = s3.upload_checkpoint(tmp_path / "iter_0000005", f"{ROOT}/iter_0000005", flaky, backoff_s=0)
    assert flaky.calls == 2 * len(manifest["files"]) == 8
    assert s3.latest_complete(ROOT, client) == f"{ROOT}/iter_0000005"


def test_manifest_with_missing_or_altered_objects_is_skipped(client, tmp_path):
    for step in (3, 7, 12):
        make_checkpoint(tmp_path / f"iter_{step:07d}", step)
        s3.upload_checkpoint(tmp_path / f"iter_{step:07d}", f"{ROOT}/iter_{step:07d}", client, backoff_s=0)
    # A prefix that is not a checkpoint and a newer prefix with a manifest but a missing object.
    client.put_object(Bucket=BUCKET, Key="runs/tiny/checkpoints/latest", Body=b"12")
    client.delete_object(Bucket=BUCKET, Key="runs/tiny/checkpoints/iter_0000012/common.pt")
    assert s3.latest_complete(ROOT, client) == f"{ROOT}/iter_0000007"
    # iter 7 truncated (size differs) -> falls back to iter 3.
    client.put_object(Bucket=BUCKET, Key="runs/tiny/checkpoints/iter_0000007/common.pt", Body=b"short")
    assert s3.latest_complete(ROOT, client) == f"{ROOT}/iter_0000003"
    # Same size, different bytes: the listing cannot tell, the download's sha256 does.
    client.put_object(Bucket=BUCKET, Key="runs/tiny/checkpoints/iter_0000003/common.pt", Body=b"\0" * 1000)
    with pytest.raises(s3.CheckpointSyncError, match="common.pt: size/sha256"):
        s3.download_checkpoint(f"{ROOT}/iter_0000003", tmp_path / "restore", client, backoff_s=0)
    assert not (tmp_path / "restore").exists()
    assert s3.latest_complete(f"s3://{BUCKET}/nothing/here", client) is None


def test_s3_uri_parsing():
    assert s3.parse_s3_uri("s3://my-bucket/a/b/") == s3.S3Location("my-bucket", "a/b")
    assert str(s3.parse_s3_uri("s3://my-bucket").child("x")) == "s3://my-bucket/x"
    with pytest.raises(ValueError, match="not an S3 URI"):
        s3.parse_s3_uri("https://my-bucket/a")
