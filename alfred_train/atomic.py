"""Files replaced whole: a reader, or the next run after a crash, never sees half of one.

Every small file alfred-train rewrites (config.yaml, a checkpoint's manifest and `latest`, the
requeue record, an export's record, eval results, JSONL written by `data`, metrics.jsonl cut back
on resume, plots) goes through `replacing`: written under a temporary name beside it, renamed
onto it (POSIX rename: atomic), the temporary removed if the writing fails.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = False, binary: bool = False):
    """Yield a file open for writing at `.NAME.tmp` beside `path`; when the block ends without an
    error, rename it onto `path`. durable: fsync the file before the rename and the folder after
    it (a checkpoint's manifest and `latest`: they must survive a power loss once written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    with replacing(path, durable=durable) as f:
        f.write(text)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
