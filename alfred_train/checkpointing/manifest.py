"""The manifest: what a complete checkpoint holds, checked before anything loads it.

`manifest.json` lists every file of a checkpoint with its size and sha256, each computed by the
rank that wrote the file, while it fsyncs it (so the manifest describes bytes that are on disk)::

    {"format": 1, "step": 10, "nodes": 2,
     "files": [{"path": "__3_0.distcp", "size": 1955567, "sha256": "ab..", "node": 1}, ...]}

`node` says which node's directory the file was written in (always 0 in the shared layout; see
`site.py`). The same manifest is written into every node's copy, so copies that meet in one place
(S3) agree on it. `path` is relative with `/` separators; `manifest.json` itself is not listed.

Who hashes what: rank r its `__r_*.distcp` shards and `rng/rank_r.*`; global rank 0 every other
file (`.metadata`, `common.pt`, `metadata.json`, `meta.json`), which it writes itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from alfred_train.atomic import fsync_dir, write_text
from alfred_train.errors import AlfredError, ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng/rank_(\d+)\.[a-z]+)$")


class ManifestError(AlfredError):
    """A manifest that is missing, unreadable, or malformed."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_manifest(manifest: Any, where: str) -> list[dict]:
    """The manifest's file entries, after checking its shape; raises ManifestError."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{where}: not a format-{MANIFEST_FORMAT} checkpoint manifest")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and {"path", "size", "sha256"} <= f.keys() for f in files):
        raise ManifestError(f"{where}: manifest 'files' must list path/size/sha256 entries")
    for f in files:
        if f["path"].startswith("/") or ".." in f["path"].split("/"):
            raise ManifestError(f"{where}: manifest path {f['path']!r} leaves the checkpoint")
    return files


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST}") from None
    except (OSError, ValueError) as err:
        raise ManifestError(f"{MANIFEST} is unreadable ({type(err).__name__})") from None
    check_manifest(manifest, MANIFEST)
    return manifest


# ---------------------------------------------------------------------------------------------
# Writing


def own_files(ckpt_dir: Path, rank: int) -> list[Path]:
    """The files of `ckpt_dir` this rank hashes (see the module docstring)."""
    mine = []
    for path in sorted(p for p in Path(ckpt_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt_dir).as_posix()
        if rel == MANIFEST:
            continue
        match = _RANK_FILE.match(rel)
        owner = int(match.group(1) or match.group(2)) if match else 0
        if owner == rank:
            mine.append(path)
    return mine


def seal(ckpt_dir: Path, paths: list[Path], threads: int = 8) -> list[dict]:
    """fsync each file and describe it (path, size, sha256); files in parallel threads."""
    def one(path: Path) -> dict:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
            os.fsync(f.fileno())
            size = f.tell()
        return {"path": path.relative_to(ckpt_dir).as_posix(), "size": size, "sha256": digest.hexdigest()}

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        return list(pool.map(one, paths))


def gather(entries: list[dict], *, step: int, node: int, nodes: int) -> dict:
    """Collective: every rank's entries, tagged with its node, into one manifest on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (node, entries))
    files = sorted(({**e, "node": n} for n, es in parts for e in es), key=lambda e: e["path"])
    return {"format": MANIFEST_FORMAT, "step": step, "nodes": nodes, "files": files}


def publish(tmp: Path, final: Path, manifest: dict, node: int) -> str | None:
    """Write the manifest into `tmp`, check this node's files are there, fsync, rename to `final`.

    Returns what is wrong with this node's part (then nothing is renamed), or None.
    """
    for entry in manifest["files"]:
        if entry["node"] != node:
            continue
        path = tmp / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{entry['path']} is missing or has another size than its writer reported"
    write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n", durable=True)
    for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(folder)
    fsync_dir(tmp)
    replaced = final.with_name(f".old-{final.name}")  # a checkpoint of this step from before a resume
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)  # never half-deleted under its real name
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return None


# ---------------------------------------------------------------------------------------------
# Checking


def problems(ckpt_dir: Path, *, expect_step: int | None = None, threads: int = 8, hashes: bool = True) -> list[str]:
    """What is wrong with `ckpt_dir` against its manifest (empty: sound). Sizes first, then sha256
    of every file, hashed by `threads` threads (hashlib releases the GIL); hashes=False: sizes only."""
    try:
        manifest = read_manifest(ckpt_dir)
    except ManifestError as err:
        return [str(err)]
    if expect_step is not None and manifest.get("step") not in (None, expect_step):
        return [f"{MANIFEST} is for step {manifest['step']}"]
    found, to_hash = [], []
    for entry in manifest["files"]:
        path = Path(ckpt_dir) / entry["path"]
        if not path.is_file():
            found.append(f"{entry['path']} is missing")
        elif (size := path.stat().st_size) != entry["size"]:
            found.append(f"{entry['path']} has {size} bytes, the manifest says {entry['size']}")
        else:
            to_hash.append(entry)
    if found or not hashes:
        return found
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(lambda e: sha256_of(Path(ckpt_dir) / e["path"]), to_hash))
    return [f"{e['path']} does not match its sha256 (corrupted)" for e, d in zip(to_hash, digests) if d != e["sha256"]]


ANOTHER = " (an earlier iter_*, or a fresh copy of this one)"


def refuse_damaged(ckpt_dir: Path, *, named: str, fix: str, before: str, other: str = ANOTHER) -> None:
    """ConfigError ("{named}{ckpt_dir} is damaged: ...; {fix}{other}") when `ckpt_dir`'s files do not
    match its manifest (`problems`); one written before manifests existed is used unchecked, with a
    warning that it cannot be checked `before` loading or exporting it."""
    if not (Path(ckpt_dir) / MANIFEST).is_file():
        logging.getLogger("alfred_train").warning("%s%s has no %s: its files cannot be checked before %s", named,
                                                  ckpt_dir, MANIFEST, before)
        return
    if found := problems(Path(ckpt_dir)):
        raise ConfigError(f"{named}{ckpt_dir} is damaged: {'; '.join(found[:3])}; {fix}{other}")
