"""Rows of a data file, JSONL or Parquet, each with the place a user finds it again.

    rows(path) -> iterator of Row(where, value)
        .jsonl / .json   one JSON value per non-blank line; where = "path:LINE" (from 1); a .json
                         file that is one JSON array: its items, where = "path:item N"
        .jsonl.gz        the same, gzip-compressed (hh-rlhf and oasst1 ship so)
        .parquet         one mapping per table row (pyarrow); where = "path:row ROW" (from 1)
A line that is not valid JSON, or not UTF-8, comes back as a Row whose `error` says so (the caller
decides whether that stops the run or is skipped and counted, see `formats.BadRecords`); a file that
cannot be read on (not gzip, a truncated or damaged gzip stream) raises ConfigError naming it and the
line. `column_names(path)` is the first row's keys (JSONL) or the Parquet schema's names, for
telling a file's format.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from alfred_train.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 4096  # rows decoded at a time: memory stays flat on 100k-row hub shards


@dataclass(frozen=True)
class Row:
    where: str  # "path:LINE" or "path:row ROW"
    value: Any  # the parsed JSON value / the row as a dict; None when `error` is set
    error: Optional[str] = None  # e.g. "invalid JSON (Expecting value at column 1)"


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"data file {path} is a directory; name its files (a glob such as {path}/*.parquet "
                          "takes a hub dataset's shards)")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; check the data.* paths in the config")
    if not path.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        raise ConfigError(f"data file {path}: unknown file type {path.suffix!r}; use .jsonl, .jsonl.gz or .parquet")


BOM = "\ufeff"


def lone_surrogate(text: str, value: Any) -> str | None:
    """What is wrong with a JSON value holding an unpaired UTF-16 surrogate escape (a string cut
    through an emoji, "\\ud83d"): valid JSON, but no tokenizer can encode it. None when there is none."""
    if "\\ud" not in text.lower():  # only an escape can write one
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        code = f"\\u{ord(err.object[err.start]):04x}"
        return f"holds an unpaired UTF-16 surrogate ({code}: text cut through an emoji?)"
    return None


def _refuse_other_container(path: Path) -> None:
    """A gzip or Parquet file under a .jsonl/.json name read as "not UTF-8 text" line by line."""
    if path.suffix == ".gz":
        return
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError:
        return  # reading it says what is wrong
    if magic.startswith(b"\x1f\x8b"):
        raise ConfigError(f"data file {path} is gzip-compressed; rename it to {path.name}.gz")
    if magic == b"PAR1":
        raise ConfigError(f"data file {path} is a Parquet file; rename it to {path.stem}.parquet")


def _open_bytes(path: Path):
    """The file's bytes, gunzipped when its name ends in .gz."""
    return gzip.open(path) if path.suffix == ".gz" else path.open("rb")


def _json_array_rows(path: Path) -> Iterator[Row] | None:
    """The items of a `.json` file that is one JSON array (Alpaca's alpaca_data.json, a hub export);
    None when it is not one (JSONL named .json)."""
    if not path.name.endswith((".json", ".json.gz")):
        return None
    try:
        with _open_bytes(path) as f:
            head = f.read(4096).removeprefix(BOM.encode()).lstrip()
            if not head.startswith(b"["):
                return None
            text = head + f.read()
        items = json.loads(text)
    except (OSError, EOFError, zlib.error):
        return None  # jsonl_rows says what is wrong with the file
    except UnicodeDecodeError as err:
        raise ConfigError(f"data file {path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                          "re-save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"data file {path}: an invalid JSON array ({err.msg} at line {err.lineno} column "
                          f"{err.colno}); fix it, or write one JSON object per line (JSONL)") from None
    if not isinstance(items, list):
        return None
    text = text.decode("utf-8")
    return (Row(f"{path}:item {i}", None, bad) if (bad := lone_surrogate(text, value)) else Row(f"{path}:item {i}", value)
            for i, value in enumerate(items, 1))


def jsonl_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSONL file whatever its name (`generate --prompts` takes any); gzip when it ends in .gz.
    A `.json` file that is one JSON array gives its items, where = "path:item N" (from 1).

    Lines are decoded one by one, so a line that is not UTF-8 is one bad row, not an unreadable file.
    A line ends at \\n, \\r\\n or a bare \\r (JSON holds no raw carriage return in a value)."""
    _refuse_other_container(path)
    array = _json_array_rows(path)
    if array is not None:
        yield from array
        return
    line_no = 0
    try:
        with _open_bytes(path) as f:
            for raw in (line for chunk in f for line in chunk.splitlines()):
                line_no += 1
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    byte = f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"
                    yield Row(where, None, f"not UTF-8 text ({byte}); re-save the file as UTF-8")
                    continue
                if line_no == 1:
                    line = line.removeprefix(BOM)  # Windows tools (Notepad, PowerShell) write one
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    yield Row(where, None, f"invalid JSON ({err.msg} at column {err.colno})")
                    continue
                yield Row(where, None, surrogate) if (surrogate := lone_surrogate(line, value)) else Row(where, value)
    except gzip.BadGzipFile as err:
        if line_no == 0:
            raise ConfigError(f"data file {path} is not gzip-compressed; rename it to {path.name[:-3]} "
                              "if it is plain JSONL, or compress it with gzip") from None
        raise ConfigError(f"data file {path}:{line_no + 1}: the gzip stream is damaged ({err}); "
                          "download or compress the file again") from None
    except (EOFError, zlib.error) as err:
        what = "ends early (truncated)" if isinstance(err, EOFError) else f"is damaged ({err})"
        raise ConfigError(f"data file {path}:{line_no + 1}: the gzip stream {what}; "
                          "download or compress the file again") from None
    except OSError as err:
        raise ConfigError(f"data file {path}: cannot read it ({err.strerror or err})") from None


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # a dependency of alfred-train: only a broken install lacks it
        raise ConfigError(f"reading {path} needs pyarrow; pip install pyarrow==26.0.1") from err
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise ConfigError(f"data file {path} is not a readable Parquet file ({err})") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    row_no = 0
    batches = _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a damaged data page behind a sound footer: ArrowInvalid, OSError (snappy)
            raise ConfigError(f"data file {path}: rows after {row_no} cannot be read ({err}); download or write "
                              "the file again") from None
        if batch is None:
            return
        for value in batch.to_pylist():
            row_no += 1
            yield Row(f"{path}:row {row_no}", value)


def rows(path: str | Path) -> Iterator[Row]:
    path = Path(path)
    _check_file(path)
    return _parquet_rows(path) if path.suffix in PARQUET_SUFFIXES else jsonl_rows(path)


def column_names(path: str | Path) -> list[str]:
    """The keys a format is told by: Parquet schema names, or the first JSON object's keys."""
    path = Path(path)
    _check_file(path)
    if path.suffix in PARQUET_SUFFIXES:
        return list(_parquet_file(path).schema_arrow.names)
    for row in jsonl_rows(path):
        if isinstance(row.value, dict):
            return list(row.value)
    return []
