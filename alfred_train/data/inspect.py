"""`alfred-train data inspect FILE`: what a stage would read from one data file, before a run.

    alfred-train data inspect FILE [--format F] [--kind sft|preference|prompt] [--template T]
                                   [--tokenizer PATH] [--languages en,fr]

Prints the format (told or given), the record count, a histogram of token lengths as the stage
encodes them ([BOS] prompt response EOD; for a pair the longer side), three rendered examples, and
every bad record as "path:line: problem". Exit 0 when every record is good, 2 when any is bad.
The kind defaults to what the format is mostly used for (pairs for hh-rlhf and
stack-exchange-paired, SFT for oasst1, dolly, alpaca and sharegpt; records: told by the first record's keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np

from alfred_train.data import files, formats
from alfred_train.data.datasets import encode_prompt, encode_scored, encode_sft
from alfred_train.data.records import PreferencePair, SFTExample
from alfred_train.data.templates import TEMPLATES, get_template
from alfred_train.errors import ConfigError

DEFAULT_KIND = {"hh-rlhf": "preference", "stack-exchange-paired": "preference", "oasst1": "sft", "dolly": "sft",
                "alpaca": "sft", "sharegpt": "sft"}
NO_LIMIT = 1 << 30  # encode without truncation
HISTOGRAM_BINS = 10
BAR_WIDTH = 40
EXAMPLES = 3
EXAMPLE_CHARS = 2000  # longer examples are cut


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="look at training data before a run")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data_sub.add_parser("inspect", help="record count, token lengths, examples and bad records of a file")
    p.add_argument("file", help=".jsonl or .parquet file")
    p.add_argument("--format", default="auto", choices=("auto", *formats.FORMATS))
    p.add_argument("--kind", choices=get_args(formats.Kind), help="records to read (default: by format)")
    p.add_argument("--template", default="stackllama", choices=sorted(TEMPLATES))
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: the shipped tiny one)")
    p.add_argument("--languages", default="", help="oasst1: comma-separated languages to keep, e.g. en,fr")
    p.set_defaults(func=run)


def _default_kind(path: str, fmt: str) -> str:
    if fmt in DEFAULT_KIND:
        return DEFAULT_KIND[fmt]
    for row in files.rows(path):
        if isinstance(row.value, dict):
            if "chosen" in row.value:
                return "preference"
            messages = row.value.get("messages")
            last = messages[-1] if isinstance(messages, list) and messages else None
            ends_with_reply = isinstance(last, dict) and last.get("role") == "assistant"
            return "sft" if "response" in row.value or ends_with_reply else "prompt"
    return "sft"


def token_length(record, tokenizer, template) -> int:
    if isinstance(record, SFTExample):
        return len(encode_sft(tokenizer, template, record, NO_LIMIT)[0])
    if isinstance(record, PreferencePair):
        return max(len(encode_scored(tokenizer, template, record.context, reply, NO_LIMIT))
                   for reply in (record.chosen, record.rejected))
    return len(encode_prompt(tokenizer, template, record.context, NO_LIMIT))


def histogram(lengths: list[int]) -> list[str]:
    """Equal-width bins from 0 to the longest, '#' bars scaled to the fullest bin, then percentiles."""
    top = max(lengths)
    counts, edges = np.histogram(lengths, bins=HISTOGRAM_BINS, range=(0, max(top, HISTOGRAM_BINS)))
    width = len(str(int(edges[-1])))
    lines = []
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * round(BAR_WIDTH * count / counts.max())
        lines.append(f"  {int(low):>{width}} - {int(high):>{width}} | {bar:<{BAR_WIDTH}} {count}")
    p50, p95 = np.percentile(lengths, [50, 95])
    lines.append(f"  min {min(lengths)}, median {p50:.0f}, p95 {p95:.0f}, max {top}")
    return lines


def render(record, template) -> str:
    prompt = template.render_context(record.context)
    if isinstance(record, SFTExample):
        return prompt + template.response_prefix + record.response
    if isinstance(record, PreferencePair):
        return f"{prompt}\n[chosen] {record.chosen}\n[rejected] {record.rejected}"
    return prompt


def report(path: str, fmt: str, kind: str, template_name: str, tokenizer, languages=()) -> tuple[list[str], int]:
    """(lines to print, number of bad records); a file that gives no record is refused, as by the run."""
    told = fmt == "auto"
    if told:
        fmt = formats.detect(path)
    kind = kind or _default_kind(path, fmt)
    formats.check_kind(fmt, kind, key=f"{path} ({fmt})")
    bad = formats.BadRecords(skip=True)
    _, records = formats.read(path, fmt, kind, bad, tuple(languages))
    template = get_template(template_name)
    lines = [f"{path}: format {fmt}{' (told by its keys)' if told else ''}, {formats.KIND_WORDS[kind]}, "
             f"template {template_name}",
             f"records: {len(records):,}" + (f" ({len(bad.found)} bad, listed below)" if bad.found else "")]
    if records:
        lines.append(f"token lengths ({getattr(tokenizer, 'path', tokenizer)}):")
        lines += histogram([token_length(r, tokenizer, template) for r in records])
    for i, record in enumerate(records[:EXAMPLES], start=1):
        lines.append(f"--- example {i}")
        text = render(record, template)
        lines.append(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " [...]")
    if bad.found:
        lines.append(f"--- {len(bad.found)} bad record(s)")
        lines += bad.found
    if not records:  # as the run refuses it
        raise ConfigError(f"{path} ({fmt}) gives no {formats.KIND_WORDS[kind]}"
                          + (f" in --languages {','.join(languages)}" if languages else "")
                          + (f" ({len(bad.found)} bad record(s), first: {bad.found[0]})" if bad.found else ""))
    return lines, len(bad.found)


def run(args) -> int:
    from alfred_train.data.corpus import TINY_SP_MODEL_PATH
    from alfred_train.data.tokenizer import load_tokenizer

    if not Path(args.file).exists():
        raise ConfigError(f"data file {args.file} does not exist")
    tokenizer = load_tokenizer(args.tokenizer or TINY_SP_MODEL_PATH)
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    lines, n_bad = report(args.file, args.format, args.kind, args.template, tokenizer, languages)
    print("\n".join(lines))
    return 2 if n_bad else 0
