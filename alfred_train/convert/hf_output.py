"""The Hugging Face directories `convert mcore-to-hf` and `convert apply-delta` write: whole or not at all.

    OUT_DIR/alfred-export.json   {"by": "mcore-to-hf", "files": {every file it wrote: bytes}, ...what from}

OUT_DIR must be new, empty, or an earlier export (it holds alfred-export.json). Anything else, a
downloaded base model or a run directory, is refused before any weight is read: an export into it
deleted its model*.safetensors and tokenizer files. The export is written to a sibling staging
directory (same filesystem) and moved in only when whole, so a failure or a kill leaves OUT_DIR as
it was. Into an earlier export: its record is first rewritten as incomplete (naming the files of
both), its files are removed, the new ones moved in, and the record written last; files it did not
write (a model card) stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from alfred_train.atomic import write_text
from alfred_train.errors import ConfigError

RECORD = "alfred-export.json"


def read_record(out_dir: Path) -> dict | None:
    """The record of an earlier export in `out_dir`, or None."""
    try:
        record = json.loads((Path(out_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def output_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot take an export (None: new, empty, or an earlier export)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        return f"output {out_dir} is a file, not a directory; name a directory to write into"
    if not out_dir.is_dir() or not any(out_dir.iterdir()) or read_record(out_dir) is not None:
        return None
    return (f"output {out_dir} is not empty and holds no earlier export (no {RECORD}): an export would replace "
            "its weights and tokenizer files; name a new or empty directory")


def cannot_write(out_dir: Path, err: OSError) -> str:
    """The one-line error for an output that cannot be written (no permission, read-only, name too long)."""
    return f"output {out_dir}: cannot write there ({err.strerror or err}); name a writable directory"


def staging_dir(out_dir: Path) -> Path:
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.export-tmp"


@contextlib.contextmanager
def staged(out_dir: str | Path, record: dict) -> Iterator[Path]:
    """An empty staging directory for the export into `out_dir`; moved into `out_dir` (with
    `record` and its file list) when the block ends, removed when it raises. An output that cannot
    be written (no permission, a read-only filesystem) is a ConfigError here, before the block."""
    out = Path(out_dir)
    if problem := output_problem(out):
        raise ConfigError(problem)
    stage = staging_dir(out)
    shutil.rmtree(stage, ignore_errors=True)  # what a killed export left
    try:
        stage.mkdir(parents=True)
    except OSError as err:
        raise ConfigError(cannot_write(out, err)) from None
    try:
        yield stage
        _commit(stage, out, record)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _files(root: Path) -> dict[str, int]:
    """Every file under `root` but the record: relative path -> size in bytes."""
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != RECORD}


def is_whole(out_dir: Path) -> bool:
    """An earlier export is all there: every file its record lists, at its size (a reused export
    with a file deleted or cut short went on to a transformers traceback)."""
    record = read_record(out_dir) or {}
    files = record.get("files")
    if not isinstance(files, dict) or record.get("incomplete"):
        return False
    return all((Path(out_dir) / name).is_file() and (Path(out_dir) / name).stat().st_size == size
               for name, size in files.items())


def _write_record(out: Path, record: dict) -> None:
    write_text(out / RECORD, json.dumps(record, indent=2) + "\n")


def _commit(stage: Path, out: Path, record: dict) -> None:
    new = _files(stage)
    record = {**record, "files": new}
    if not out.exists() or not any(out.iterdir()):
        _write_record(stage, record)
        os.replace(stage, out)  # onto an empty directory too (POSIX rename)
        return
    old = [f for f in (read_record(out) or {}).get("files") or {}
           if isinstance(f, str) and ".." not in f.split("/") and not f.startswith("/")]
    _write_record(out, {"by": record.get("by"), "incomplete": True, "files": {**dict.fromkeys(old, None), **new}})
    for name in old:
        (out / name).unlink(missing_ok=True)
    for name in sorted({str(Path(f).parent) for f in old} - {"."}, key=len, reverse=True):
        with contextlib.suppress(OSError):  # a folder the earlier export made, if nothing else is in it
            (out / name).rmdir()
    for name in new:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, out / name)
    _write_record(out, record)
