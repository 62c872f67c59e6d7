"""Public dataset formats, read as published, turned into the typed records of `records.py`.

Every format gives each kind of record a stage asks for (kind: "sft" | "preference" | "prompt"):

    format                 keys it is told by                        sft             preference        prompt
    records                prompt/messages/chosen+rejected (ours)    see records.py  see records.py    the context
    hh-rlhf                chosen, rejected: "\n\nHuman: .. \n\nAssistant: .." transcripts
                                                                      chosen          shared context,   the shared
                                                                                      last turns        context
    oasst1                 message_id, parent_id, role, text (+ lang, rank, message_tree_id: the flat
                           message table; see oasst1.py)              best-ranked     ranked sibling    every prompter
                                                                      thread, each    replies           message's thread
                                                                      assistant turn
    dolly                  instruction, context, response, category   "instruction\n\ncontext" -> response;  prompt: same
    alpaca                 instruction, input, output                 "instruction\n\ninput" -> output;  prompt: same
    sharegpt               conversations: [{from: human|gpt|system, value}]
                                                                      the turns up to   -              up to the last
                                                                      the last reply                   human turn
    stack-exchange-paired  question, response_j (preferred), response_k
                                                                      question ->     (question, j, k)  question
                                                                      response_j
A kind a format cannot give (dolly has no preference pairs) is a `ConfigError` naming data.format.
`detect(path)` tells the format from the first object's keys (data.format: auto).

Bad records: each conversion raises `ConfigError("<path:line>: <what the record lacks>")`; a
`BadRecords` collector stops at the first one (exit 2) or, with data.skip_bad_records, keeps
counting and reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

from alfred_train.data import files
from alfred_train.data.records import (
    Context,
    Message,
    PreferencePair,
    PromptExample,
    SFTExample,
    checked_prompt,
    parse_preference,
    parse_prompt,
    parse_sft,
)
from alfred_train.errors import ConfigError

Kind = Literal["sft", "preference", "prompt"]
FORMATS = ("records", "hh-rlhf", "oasst1", "dolly", "alpaca", "sharegpt", "stack-exchange-paired")
STAGE_KINDS: dict[str, Kind] = {"sft": "sft", "rm": "preference", "ppo": "prompt"}


@dataclass
class BadRecords:
    """Where bad records go: raised at once (skip=False) or kept as "path:line: problem" lines."""

    skip: bool
    found: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        if not self.skip:
            raise ConfigError(f"{message} (fix it, or set data.skip_bad_records: true to skip such records)")
        self.found.append(message)

    def convert(self, rows: Iterable[files.Row], parse: Callable[[Any, str], Any]) -> list:
        """parse(value, where) of every row; the rows that fail go to `add`."""
        out = []
        for row in rows:
            if row.error:
                self.add(f"{row.where}: {row.error}")
                continue
            try:
                out.append(parse(row.value, row.where))
            except ConfigError as err:
                self.add(str(err))
        return out


# ---------------------------------------------------------------------------------------------
# Field checks shared by the row-wise formats.

def _object(value: Any, where: str, form: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {type(value).__name__} ({form})")
    return value


def _text(obj: Mapping[str, Any], key: str, where: str, form: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if key not in obj or value is None:
        raise ConfigError(f"{where}: missing '{key}' ({form})")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string, got {type(value).__name__} ({form})")
    return value


def _user(text: str) -> Context:
    return (Message("user", text),)


# ---------------------------------------------------------------------------------------------
# hh-rlhf (Anthropic/hh-rlhf): two transcripts that differ only in the last assistant turn.

HH_FORM = "hh-rlhf needs 'chosen' and 'rejected' transcripts of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_transcript(text: str, key: str, where: str) -> tuple[Context, str]:
    """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> (context ending with a user turn, last assistant reply)."""
    parts = _HH_TURN.split(text)  # [before, role, body, role, body, ...]
    if parts[0].strip() or len(parts) < 5:
        raise ConfigError(f"{where}: '{key}' is not a Human/Assistant transcript ({HH_FORM})")
    turns = [Message("user" if role == "Human" else "assistant", body) for role, body in zip(parts[1::2], parts[2::2])]
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            name = "Human" if expected == "user" else "Assistant"
            raise ConfigError(f"{where}: '{key}' turn {i + 1} should be '{name}:' (turns alternate, Human first)")
    if turns[-1].role != "assistant":
        raise ConfigError(f"{where}: '{key}' does not end with an Assistant turn ({HH_FORM})")
    return tuple(turns[:-1]), turns[-1].content


def _hh_pair(value: Any, where: str) -> PreferencePair:
    obj = _object(value, where, HH_FORM)
    (context, chosen), (rejected_context, rejected) = (
        parse_transcript(_text(obj, key, where, HH_FORM), key, where) for key in ("chosen", "rejected"))
    if context != rejected_context:
        raise ConfigError(f"{where}: 'chosen' and 'rejected' differ before their last Assistant turn ({HH_FORM})")
    return PreferencePair(context, chosen, rejected)


# ---------------------------------------------------------------------------------------------
# Instruction formats: an instruction, an optional passage folded into the prompt after a blank
# line, a response. dolly (databricks-dolly-15k): instruction, context, response; alpaca
# (tatsu-lab/alpaca, alpaca_data.json, gpt4all-style copies): instruction, input, output.

DOLLY_FORM = "dolly needs 'instruction' and 'response' strings ('context' optional)"
ALPACA_FORM = "alpaca needs 'instruction' and 'output' strings ('input' optional)"


def _instruction_format(passage: str, response: str, form: str) -> dict[str, Callable[[Any, str], Any]]:
    """The SFT and prompt parsers of an instruction format whose keys are `passage` and `response`."""
    def prompt_text(obj: Mapping[str, Any], where: str) -> str:
        instruction = _text(obj, "instruction", where, form)
        extra = _text(obj, passage, where, form, optional=True)
        return f"{instruction}\n\n{extra}" if extra.strip() else instruction

    def sft(value: Any, where: str) -> SFTExample:
        obj = _object(value, where, form)
        return SFTExample(_user(prompt_text(obj, where)), _text(obj, response, where, form))

    def prompt(value: Any, where: str) -> PromptExample:
        return PromptExample(_user(prompt_text(_object(value, where, form), where)))

    return {"sft": sft, "prompt": prompt}


# ---------------------------------------------------------------------------------------------
# sharegpt (Vicuna's ShareGPT dumps): {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}.

SHAREGPT_FORM = "sharegpt needs 'conversations': a list of {'from': 'human' | 'gpt' | 'system', 'value': text}"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "assistant": "assistant", "system": "system"}


def _sharegpt_turns(value: Any, where: str) -> Context:
    turns = _object(value, where, SHAREGPT_FORM).get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: 'conversations' must be a non-empty list ({SHAREGPT_FORM})")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConfigError(f"{where}: conversations[{i}] must be an object with a string 'value' ({SHAREGPT_FORM})")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise ConfigError(f"{where}: conversations[{i}] is from {turn.get('from')!r}; use one of "
                              f"{', '.join(SHAREGPT_ROLES)}")
        out.append(Message(SHAREGPT_ROLES[turn["from"]], turn["value"]))
    return tuple(out)


def _sharegpt_sft(value: Any, where: str) -> SFTExample:
    """The conversation up to its last reply (a question left unanswered at the end is dropped)."""
    turns = _sharegpt_turns(value, where)
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last is None:
        raise ConfigError(f"{where}: 'conversations' has no gpt reply ({SHAREGPT_FORM})")
    if last == 0 or turns[last - 1].role != "user":
        before = "nothing" if last == 0 else f"a {dict(user='human', assistant='gpt').get(r := turns[last - 1].role, r)} turn"
        raise ConfigError(f"{where}: conversations[{last}], the last reply, follows {before}, not a human turn "
                          f"({SHAREGPT_FORM})")
    return SFTExample(turns[:last], turns[last].content)


def _sharegpt_prompt(value: Any, where: str) -> PromptExample:
    """The conversation up to its last human turn."""
    turns = _sharegpt_turns(value, where)
    last = max((i for i, t in enumerate(turns) if t.role == "user"), default=None)
    if last is None:
        raise ConfigError(f"{where}: 'conversations' has no human turn ({SHAREGPT_FORM})")
    return PromptExample(turns[:last + 1])


# ---------------------------------------------------------------------------------------------
# stack-exchange-paired (lvwerra/stack-exchange-paired): response_j is preferred to response_k.

SE_FORM = "stack-exchange-paired needs 'question', 'response_j' and 'response_k' strings"


def _se_pair(value: Any, where: str) -> PreferencePair:
    obj = _object(value, where, SE_FORM)
    question, j, k = (_text(obj, key, where, SE_FORM) for key in ("question", "response_j", "response_k"))
    return PreferencePair(_user(question), j, k)


def _se_sft(value: Any, where: str) -> SFTExample:
    obj = _object(value, where, SE_FORM)
    return SFTExample(_user(_text(obj, "question", where, SE_FORM)), _text(obj, "response_j", where, SE_FORM))


def _se_prompt(value: Any, where: str) -> PromptExample:
    return PromptExample(_user(_text(_object(value, where, SE_FORM), "question", where, SE_FORM)))


# ---------------------------------------------------------------------------------------------
# records (ours): a preference record also gives an SFT example (chosen) and a prompt (context).

def _is_pair(value: Any) -> bool:
    return isinstance(value, dict) and "chosen" in value and "response" not in value


def _records_sft(value: Any, where: str) -> SFTExample:
    if _is_pair(value):
        pair = parse_preference(value, where)
        return SFTExample(pair.context, pair.chosen)
    return parse_sft(value, where)


def _records_prompt(value: Any, where: str) -> PromptExample:
    if _is_pair(value):
        return PromptExample(parse_preference(value, where).context)
    messages = value.get("messages") if isinstance(value, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        return PromptExample(parse_sft(value, where).context)
    return parse_prompt(value, where)


def _sft_of(parse_pair):
    """SFT example of a pair format: the context and the chosen reply."""
    def parse(value: Any, where: str) -> SFTExample:
        pair = parse_pair(value, where)
        return SFTExample(pair.context, pair.chosen)
    return parse


def _prompt_of(parse_pair):
    """Prompt of a pair format: the shared context."""
    def parse(value: Any, where: str) -> PromptExample:
        return PromptExample(parse_pair(value, where).context)
    return parse


ROW_PARSERS: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "records": {"sft": _records_sft, "preference": parse_preference, "prompt": _records_prompt},
    "hh-rlhf": {"sft": _sft_of(_hh_pair), "preference": _hh_pair, "prompt": _prompt_of(_hh_pair)},
    "dolly": _instruction_format("context", "response", DOLLY_FORM),
    "alpaca": _instruction_format("input", "output", ALPACA_FORM),
    "sharegpt": {"sft": _sharegpt_sft, "prompt": _sharegpt_prompt},
    "stack-exchange-paired": {"sft": _se_sft, "preference": _se_pair, "prompt": _se_prompt},
}
KIND_WORDS = {"sft": "SFT examples", "preference": "preference pairs", "prompt": "prompts"}


def check_kind(fmt: str, kind: Kind, key: str = "data.format") -> None:
    """A format that cannot give `kind` (dolly -> preference pairs) is a config error."""
    if fmt in ROW_PARSERS and kind not in ROW_PARSERS[fmt]:
        able = [f for f in FORMATS if f not in ROW_PARSERS or kind in ROW_PARSERS[f]]
        raise ConfigError(f"{key}: {fmt} has no {KIND_WORDS[kind]}; use a file in one of {', '.join(able)}")


# ---------------------------------------------------------------------------------------------
# Telling the format, and reading a file.

def format_of_keys(obj: Mapping[str, Any]) -> str | None:
    keys = set(obj)
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst1"
    if {"question", "response_j", "response_k"} <= keys:
        return "stack-exchange-paired"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "conversations" in keys and "messages" not in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys and not keys & {"prompt", "messages"} and isinstance(obj["chosen"], str):
        return "hh-rlhf"
    if keys & {"prompt", "messages", "chosen"}:
        return "records"
    return None


def detect(path: str | Path) -> str:
    """The format of `path`, told by the keys of its first object (data.format: auto)."""
    first_bad, seen = None, 0
    for seen, row in enumerate(files.rows(path), 1):
        if isinstance(row.value, dict):
            if "message_tree_id" in row.value and isinstance(row.value.get("prompt"), dict):
                raise ConfigError(f"{row.where}: an oasst1 trees export (*.trees.jsonl, one nested tree per line); "
                                  "use the flat message table (*.messages.jsonl, or the hub's parquet): format oasst1")
            fmt = format_of_keys(row.value)
            if fmt is None:
                raise ConfigError(f"{row.where}: cannot tell the data format from the keys "
                                  f"{sorted(row.value)}; set data.format to one of {', '.join(FORMATS)}")
            return fmt
        first_bad = first_bad or (row.error and f"{row.where}: {row.error}")
    if first_bad:  # every line unreadable: say why the first one is, not only that no object was found
        raise ConfigError(f"data file {path} has no readable JSON object to tell its format by ({first_bad})")
    if not seen:
        raise ConfigError(f"data file {path} is empty: it holds no records; check the data.* paths")
    raise ConfigError(f"data file {path} has no JSON object to tell its format by (its rows are "
                      f"{type(row.value).__name__}s); write one JSON object per record")


def read(path: str | Path, fmt: str, kind: Kind, bad: BadRecords, languages: tuple[str, ...] = ()) -> tuple[str, list]:
    """(format, records of `kind`) of one file; fmt "auto" is detected first."""
    if fmt == "auto":
        fmt = detect(path)
        check_kind(fmt, kind, f"{path} (told by its keys)")
    check_kind(fmt, kind)
    if fmt == "oasst1":
        from alfred_train.data import oasst1

        return fmt, oasst1.records(files.rows(path), kind, bad, languages)
    parse = ROW_PARSERS[fmt][kind]
    if kind == "prompt":
        parse = _nonempty(parse)
    return fmt, bad.convert(files.rows(path), parse)


def _nonempty(parse: Callable[[Any, str], PromptExample]) -> Callable[[Any, str], PromptExample]:
    return lambda value, where: checked_prompt(parse(value, where), where)
