"""Readers of our records form (JSONL or Parquet) with file:line errors, and the token encodings each
stage trains on.

Readers return typed records (`records.py`); a malformed line raises `ConfigError` naming the file
and line, e.g. "data/train.jsonl:17: missing key 'response' (each line needs 'prompt' and
'response', or 'messages')". Blank lines are skipped.

Encodings (ids are plain lists; BOS is prepended when the tokenizer has one):
    encode_sft(...)     -> (input_ids, loss_mask)  [BOS] prompt response EOD, mask 0..0 1..1 1
    encode_prompt(...)  -> [BOS] prompt                                      (PPO rollouts)
    encode_scored(...)  -> [BOS] prompt response EOD, always ending at EOD    (reward model)
The prompt's tokens are those it has alone (without the spaces that end its cue, `cue_text`): the
loss-mask boundary is exact, and it is the token boundary the policy meets at generation time,
where it continues `encode_prompt(...)`. The response is tokenized as in the whole text where that
keeps the prompt's tokens, else as a continuation, so that the tokens decode to exactly prompt +
response: encoded on its own, sentencepiece's dummy prefix put a second space after StackLLaMA's
"Answer: " ("Answer:  An") and a space before Tulu's responses, and byte-level BPE dropped Vicuna's
("ASSISTANT:An").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from alfred_train.atomic import replacing
from alfred_train.data import files
from alfred_train.data.records import (
    Context,
    PreferencePair,
    PromptExample,
    SFTExample,
    parse_preference,
    parse_prompt,
    parse_sft,
)
from alfred_train.data.templates import PromptTemplate, render_prompt
from alfred_train.data.tokenizer import Tokenizer
from alfred_train.errors import ConfigError

T = TypeVar("T")


def _read(path: str | Path, parse: Callable[[Any, str], T]) -> list[T]:
    """Every record of a file in our records form; the first bad one raises (see formats.py for the
    public formats, mixtures and data.skip_bad_records)."""
    records = []
    for row in files.rows(path):
        if row.error:
            raise ConfigError(f"{row.where}: {row.error}")
        records.append(parse(row.value, row.where))
    if not records:
        raise ConfigError(f"data file {path} has no records; add JSON lines or point the config elsewhere")
    return records


def read_sft_jsonl(path: str | Path) -> list[SFTExample]:
    return _read(path, parse_sft)


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    return _read(path, parse_preference)


def read_prompt_jsonl(path: str | Path) -> list[PromptExample]:
    return _read(path, parse_prompt)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, UTF-8, keys in insertion order; creates parent directories. Written
    to a temporary file beside `path` and renamed: a failure leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _bos(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def cue_text(prompt: str) -> str:
    """The prompt the model is given: without the spaces that end a cue ("Answer: "). Tokenizers join
    a space to the word after it ("▁An", "ĠAn"), so they belong to the response's first token: the
    prompt's tokens end at the colon, and the policy generates "▁An" there as SFT trained it
    (left on the prompt, they were a lone "▁" token no text is ever written with)."""
    return prompt.rstrip(" ")


def encode_continued(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the tokens of the prompt's `cue_text` alone, and the response's
    after them, which decode to prompt + response (see the module docstring)."""
    cue = cue_text(prompt)
    prompt, response = cue, prompt[len(cue):] + response
    prompt_ids = tokenizer.encode(prompt)
    if not response:
        return prompt_ids, []
    joint = tokenizer.encode(prompt + response)
    if joint[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids):]
    return prompt_ids, tokenizer.encode_continuation(response)


def encode_sft(
    tokenizer: Tokenizer,
    template: PromptTemplate,
    record: SFTExample | Mapping[str, Any],
    max_len: int,
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one SFT example, both of length min(L, max_len).

    input_ids = [BOS] + encode(prompt) + encode(response) + [EOD]
    loss_mask =  [0]  +     0 ... 0    +     1 ... 1      +  [1]
    Sequences longer than max_len are cut on the right, which drops the EOD (the response did not
    end there); an example whose prompt fills max_len carries no loss (mask all 0).
    """
    text = render_prompt(template, record)
    prompt_ids, response_ids = encode_continued(tokenizer, text.prompt, template.response_prefix + text.response)
    prompt_ids, response_ids = _bos(tokenizer) + prompt_ids, response_ids + [tokenizer.eod_id]
    input_ids = prompt_ids + response_ids
    loss_mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    return input_ids[:max_len], loss_mask[:max_len]


def encode_prompt(tokenizer: Tokenizer, template: PromptTemplate, context: Context, max_len: int) -> list[int]:
    """[BOS] + encode(prompt); a prompt longer than max_len keeps BOS and its last tokens."""
    bos = _bos(tokenizer)
    if max_len <= len(bos):
        raise ConfigError(f"max prompt length {max_len} leaves no room for prompt tokens; raise it")
    prompt_ids = tokenizer.encode(cue_text(template.render_context(context)))
    return bos + prompt_ids[-(max_len - len(bos)) :]


def encode_scored(
    tokenizer: Tokenizer, template: PromptTemplate, context: Context, response: str, max_len: int
) -> list[int]:
    """[BOS] + encode(prompt) + encode(response), cut to max_len - 1, then EOD: always ends at EOD.

    The reward model reads its score at the last position, so EOD must survive truncation.
    """
    prompt_ids, response_ids = encode_continued(tokenizer, template.render_context(context),
                                                template.response_prefix + response)
    ids = _bos(tokenizer) + prompt_ids + response_ids
    return ids[: max_len - 1] + [tokenizer.eod_id]


def encode_preference(
    tokenizer: Tokenizer, template: PromptTemplate, pair: PreferencePair, max_len: int
) -> tuple[list[int], list[int]]:
    """(chosen_ids, rejected_ids), each `encode_scored` of the pair's context and one response."""
    return (
        encode_scored(tokenizer, template, pair.context, pair.chosen, max_len),
        encode_scored(tokenizer, template, pair.context, pair.rejected, max_len),
    )
