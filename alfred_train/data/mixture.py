"""What a stage reads: `data.train` / `data.valid` / `data.prompts`, one file or a weighted mixture.

    data:
      train: data/sft.jsonl                 # one file, in data.format (auto: told by its keys)
      train:                                # or a mixture, each file with its own format and weight
        - {path: oasst1/train.parquet, format: oasst1, weight: 1.0}
        - {path: hh-rlhf/train.jsonl, weight: 0.5}     # format: data.format
        - {path: dolly-15k.jsonl, weight: 2.0}

A path may be a glob (`train-*.parquet`): its files, sorted, form one entry.
Weight = copies of a file's records per pass: 2 puts every record in twice, 0.5 a seeded half
(floor(w) whole copies plus a seeded round((w - floor(w)) * n) of the records). The held-out split
(`data.valid_fraction`, without data.valid) is drawn before weighting, so an up-weighted record
never lands on both sides. A mixture of several files is shuffled (seeded) after weighting; a single
file keeps its order (the stages shuffle on their own). Each file's counts are logged.
"""

from __future__ import annotations

import glob
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alfred_train.config import DataConfig, DataFiles, DataSource
from alfred_train.data import formats
from alfred_train.data.formats import BadRecords, Kind
from alfred_train.errors import ConfigError

log = logging.getLogger("alfred_train")


@dataclass(frozen=True)
class SourceRecords:
    source: DataSource
    format: str  # resolved (never "auto")
    records: list
    skipped: list[str]  # "path:line: problem" of the bad records skipped


def sources(files: DataFiles, default_format: str) -> tuple[DataSource, ...]:
    """The mixture form of `files` (a single path is one source of weight 1)."""
    if isinstance(files, str):
        return (DataSource(files, default_format, 1.0),)
    return tuple(DataSource(s.path, s.format or default_format, s.weight) for s in files)


def check_formats(d: DataConfig, kind: Kind) -> None:
    """What the config says about a stage's data, checked before any file is read (and by --dry-run):
    a stage that trains on data.train has one, and explicit formats can give `kind`."""
    if kind != "prompt" and d.train is None and not d.synthetic:
        raise ConfigError(f"data.train: the {formats.KIND_WORDS[kind]} this stage trains on come from data.train, "
                          "which is not set; set it to a file or a mixture (or data.synthetic: true)")
    for key, files in (("data.train", d.train), ("data.valid", d.valid), ("data.prompts", d.prompts)):
        if files is None or (key == "data.prompts") != (kind == "prompt"):
            continue
        for i, source in enumerate(sources(files, d.format)):
            where = "data.format" if isinstance(files, str) and source.format == d.format else f"{key}[{i}].format"
            formats.check_kind(source.format, kind, where)


def paths(pattern: str) -> list[str]:
    """A path, or the sorted files a glob matches (hub datasets ship shards: train-0000*-of-00010.parquet).
    A file that exists is itself, whatever its name holds (sft[v2].jsonl)."""
    if not any(c in pattern for c in "*?[") or Path(pattern).exists():
        return [pattern]
    found = sorted(glob.glob(pattern))
    if not found:
        raise ConfigError(f"data file pattern {pattern} matches no file; check the data.* paths in the config")
    return found


def unreachable(files: Optional[DataFiles], default_format: str, key: str) -> list[str]:
    """"key: path" (key[i] in a mixture) of each source of `files` that does not exist here (a glob:
    that matches nothing): a dry run on a laptop notes them instead of reading the data."""
    if files is None:
        return []
    missing = []
    for i, source in enumerate(sources(files, default_format)):
        if not (Path(source.path).exists() or glob.glob(source.path)):
            missing.append(f"{key}{'' if isinstance(files, str) else f'[{i}]'}: {source.path}")
    return missing


def read_source(source: DataSource, kind: Kind, d: DataConfig) -> SourceRecords:
    """Every record of one mixture entry (all files of a glob, each read in its format)."""
    bad = BadRecords(skip=d.skip_bad_records)
    fmt, records = None, []
    for path in paths(source.path):
        fmt, found = formats.read(path, source.format or d.format, kind, bad, d.languages)
        records += found
    if bad.found:
        log.warning("%s: skipped %d bad record(s) (data.skip_bad_records), first: %s",
                    source.path, len(bad.found), bad.found[0])
    if not records:
        raise ConfigError(f"data file {source.path} ({fmt}) gives no {formats.KIND_WORDS[kind]}"
                          + (f" in data.languages {list(d.languages)}" if d.languages and fmt == "oasst1" else "")
                          + "; add records or point the config elsewhere")
    return SourceRecords(source, fmt, records, bad.found)


def weighted(records: list, weight: float, rng: random.Random) -> list:
    """floor(weight) copies, plus a seeded round(frac * n) of the records (in file order)."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    extra = sorted(rng.sample(range(len(records)), round(frac * len(records))))
    return records * whole + [records[i] for i in extra]


def _mix(parts: list[tuple[SourceRecords, list]], seed: int, what: str) -> list:
    """Weight each part and, for several files, shuffle them together; logs the shares."""
    rng = random.Random(seed)
    mixed = [(part, len(records), weighted(records, part.source.weight, rng)) for part, records in parts]
    total = sum(len(records) for _, _, records in mixed)
    for part, n_read, records in mixed:
        log.info("%s: %s (%s, weight %g): %d records -> %d (%.0f%%)", what, part.source.path, part.format,
                 part.source.weight, n_read, len(records), 100 * len(records) / max(total, 1))
    out = [r for _, _, records in mixed for r in records]
    if not out:
        raise ConfigError(f"{what}: the weights leave no records; raise the weights")
    if len(mixed) > 1:
        rng.shuffle(out)
    return out


def load(files: DataFiles, kind: Kind, d: DataConfig, seed: int, what: str) -> list:
    """Every record of `files` (weighted and mixed) as `kind`."""
    parts = [read_source(s, kind, d) for s in sources(files, d.format)]
    return _mix([(p, p.records) for p in parts], seed, what)


def load_train_valid(d: DataConfig, kind: Kind, seed: int) -> tuple[list, list]:
    """(train, valid): data.valid when given, else a seeded `valid_fraction` of each training file."""
    parts = [read_source(s, kind, d) for s in sources(d.train, d.format)]
    if d.valid:
        return _mix([(p, p.records) for p in parts], seed, "data.train"), load(d.valid, kind, d, seed, "data.valid")
    rng = random.Random(seed)
    drawn = [(part, *_held_out(part.records, d.valid_fraction, rng)) for part in parts]
    # a conversation held out of one file is held out of them all: the same records in two entries (a
    # file and its Parquet copy, a file listed twice) were held out of one and trained on from the other
    held_out = {_opening(part.records[i].context) for part, _, held in drawn for i in held}
    train_parts, valid = [], []
    for part, order, held in drawn:
        valid += [part.records[i] for i in order if i in held]
        train_parts.append((part, [part.records[i] for i in order
                                   if i not in held and _opening(part.records[i].context) not in held_out]))
    return _mix(train_parts, seed, "data.train"), valid


def _held_out(records: list, fraction: float, rng: random.Random) -> tuple[list[int], set[int]]:
    """(a seeded order of `records`' indices, those of a `fraction` of them held out), held out by
    conversation: the records whose context opens alike (the same first user turn, after the same
    system turns) are held out together or not at all: one Stack Exchange question's answer pairs,
    one oasst1 tree's ranked replies and its SFT examples at every depth, a record repeated in the
    file. Drawn record by record, every held-out oasst1 pair had its prompt and both replies in
    training pairs; grouped by whole context, a deeper turn of a tree held out had its earlier
    replies in training. A conversation that would leave no training records is not taken."""
    conversations: dict = {}
    for i, record in enumerate(records):
        conversations.setdefault(_opening(record.context), []).append(i)
    groups = list(conversations.values())
    rng.shuffle(groups)
    target, held = int(len(records) * fraction), set()
    for members in groups:
        if len(held) >= target:
            break
        if len(held) + len(members) < len(records):
            held.update(members)
    return [i for members in groups for i in members], held


def _opening(context: tuple) -> tuple:
    """A context's system turns and first user turn: what every turn of one conversation shares."""
    first_user = next((i for i, m in enumerate(context) if m.role == "user"), len(context) - 1)
    return context[:first_user + 1]


def load_prompts(d: DataConfig, seed: int, held_out: int) -> Optional[tuple[list, list]]:
    """PPO prompts (train, held out): data.prompts, else the contexts of data.train; None when
    neither is set. The held-out ones are the first `held_out` distinct prompts (in file order; of
    several files, a seeded shuffle of their records), taken before the weights copy any, and the
    training prompts keep no copy of them: a Stack Exchange question with five answer pairs is one
    prompt, held out or trained on, never both. Fewer than `held_out` when fewer are distinct."""
    files = d.prompts if d.prompts is not None else d.train
    if files is None:
        return None
    parts = [read_source(s, "prompt", d) for s in sources(files, d.format)]
    pool = [r for part in parts for r in part.records]
    if len(parts) > 1:
        random.Random(seed).shuffle(pool)
    held, seen = [], set()
    for record in pool:
        if len(held) == held_out:
            break
        if record.context not in seen:
            seen.add(record.context)
            held.append(record)
    rest = [(part, [r for r in part.records if r.context not in seen]) for part in parts]
    if not any(records for _, records in rest):
        return [], held
    return _mix(rest, seed, "data.prompts" if d.prompts else "data.train"), held
