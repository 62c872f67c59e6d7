"""`checkpoint.s3_uri`: every completed checkpoint is copied to S3, and a run whose local directory
lacks it resumes from S3.

Upload (after the local checkpoint is complete and `latest` has moved): every rank uploads the
files it wrote and hashed (in parallel, each from its node's directory), then rank 0 puts the same
`manifest.json` last, checks that every listed object is there with its size, and keeps the newest
`checkpoint.keep` checkpoints in S3 by step. An upload that fails after boto3's and our retries
is logged; the local checkpoint stays complete and the next save uploads again.

Download (resume): S3 checkpoints newer than the newest sound local one are tried newest first;
each node's directory owner downloads the whole checkpoint (every node's files: a load reads
across them), checks every file's sha256 against the manifest, and renames it into place.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from alfred_train.atomic import fsync_dir
from alfred_train.checkpointing.site import Site

log = logging.getLogger("alfred_train")


def sync_errors():
    from botocore.exceptions import BotoCoreError, ClientError

    from alfred_train.launch.s3 import CheckpointSyncError

    return (CheckpointSyncError, BotoCoreError, ClientError, OSError)


def upload(ckpt_dir: Path, s3_root: str, manifest: dict, mine: list[dict], runtime, *, keep: int) -> bool:
    """Collective: copy the checkpoint `ckpt_dir` to `s3_root/<its name>/`, manifest last."""
    from alfred_train.launch import s3

    dest = str(s3.parse_s3_uri(s3_root).child(ckpt_dir.name))
    problem = None
    try:
        s3.upload_files(ckpt_dir, mine, dest, s3.make_client())
    except sync_errors() as err:
        problem = f"rank {runtime.rank}: {err}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    problems = [p for p in problems if p]
    ok = not problems
    if runtime.is_main:
        try:
            if ok:
                client = s3.make_client()
                s3.put_manifest(manifest, dest, client)
                if not s3.verify_remote(dest, client):
                    raise s3.CheckpointSyncError(f"{dest} does not verify against its manifest after upload")
                removed = s3.prune_remote(s3_root, keep, client, protect=dest)
                log.info("uploaded %s to %s%s", ckpt_dir.name, dest, f"; removed {len(removed)} older" if removed else "")
        except sync_errors() as err:
            ok, problems = False, [str(err)]
        if not ok:
            log.error("S3 copy of %s not made (%s); the local checkpoint is complete, the next save uploads again",
                      ckpt_dir.name, "; ".join(problems))
    return ok


def fetch_newer(s3_root: str, root: Path, newest_local: int | None, runtime, site: Site,
                damaged: list[str]) -> int | None:
    """Collective: download the newest sound S3 checkpoint newer than `newest_local` into `root`;
    returns its step, or None. Each one that fails to verify is added to `damaged`."""
    from alfred_train.checkpoint import iter_name
    from alfred_train.launch import s3

    candidates, error = None, None
    if runtime.is_main:
        try:
            listed = s3.list_iter_prefixes(s3.parse_s3_uri(s3_root), s3.make_client())
            candidates = [(step, str(loc)) for step, loc in listed if newest_local is None or step > newest_local]
        except sync_errors() as err:
            error = (f"checkpoint.s3_uri: cannot list {s3_root} ({type(err).__name__}: {err}); a run lists it before "
                     "its first step, to resume from it: fix the URI or the access, or remove checkpoint.s3_uri")
    box = [(candidates, error)]
    dist.broadcast_object_list(box, src=0)
    candidates, error = box[0]
    if error:
        failed = s3.CheckpointSyncError(error)
        failed.raised_on_every_rank = True  # rank 0 says it (each rank's line ran into the others')
        raise failed
    for step, uri in candidates:
        problem = None
        if site.owner:
            try:
                problem = _download(uri, root, iter_name(step), s3.make_client())
            except sync_errors() as err:
                problem = str(err)
        bad = site.problems_everywhere(problem)
        if not bad:
            if runtime.is_main:
                log.info("downloaded %s from %s (verified)", iter_name(step), uri)
            return step
        damaged.append(f"{uri}: {'; '.join(bad)}")
    return None


def _download(uri: str, root: Path, name: str, client) -> str | None:
    """Download and verify `uri` into `root/name` (replacing a damaged local copy); a problem or None."""
    from alfred_train.launch import s3

    if not s3.verify_remote(uri, client):
        return "no manifest, or an object it lists is missing or has another size"
    staging = root / f".s3-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    s3.download_checkpoint(uri, staging, client)
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync_dir(root)
    return None
