"""Files replaced whole: a reader, or the next run after a crash, never sees half of one.

Every small file alfred-train rewrites (config.yaml, a checkpoint's manifest and `latest`, the
requeue record, an export's record, eval results, JSONL written by `data`, metrics.jsonl cut back
on resume, plots) goes through `replacing`: written under a temporary name beside it, renamed
onto it (POSIX rename: atomic), the temporary removed if the writing fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from alfred_train.errors import ConfigError


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


def check_writable(path: str | os.PathLike, key: str, what: str) -> None:
    """ConfigError naming `key` unless a `what` (".json file", ...) can be written at `path`: not a
    directory, no file where one of its folders goes, a folder this process may write in (created
    here, so that a run finds out before its work, not after)."""
    from alfred_train.checkpointing.site import file_in_the_way

    path = Path(path)
    if blocked := file_in_the_way(path.parent):  # also a name the OS cannot look up, named
        raise ConfigError(f"{key} {path}: {blocked} is a file, not a directory; name another path")
    try:
        if path.is_dir():
            raise ConfigError(f"{key} {path} is a directory; name a {what} to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise ConfigError(f"{key} {path}: cannot write there ({err.strerror or err}); name a writable path") from None
