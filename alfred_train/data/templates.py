"""Prompt templates: how a conversation context becomes the prompt text a response follows.

A template is picked once by name (`get_template(config.data.template)`) and then renders every
record. `render_prompt` returns the prompt text and the response text separately, so token-level
loss masks can be built by encoding the two parts on their own (see `datasets.encode_sft`).

Single-turn renderings (prompt P, response R; the model is trained on R after the prompt text):
    stackllama  "Question: P\n\nAnswer: "                                 (StackLLaMA, TRL)
    tulu        "<|user|>\nP\n<|assistant|>\n"   the trailing newline matters (Tulu 2 / 2.5)
    vicuna      "<VICUNA_SYSTEM> USER: P ASSISTANT:"                      (FastChat vicuna_v1.1)
    stable-vicuna "### Human: P\n### Assistant:"                          (StableVicuna-13B, CarperAI)
    plain       "P"
Vicuna's two cues end at the colon, as FastChat's generation prompt does; the trained response
follows them after a space (`response_prefix`: "ASSISTANT: R", "### Assistant: R").
Multi-turn contexts render every earlier turn in the same style and end with the assistant cue.
Templates are text-only and tokenizer-independent: earlier assistant turns are NOT followed by an
EOS string ("</s>" in the original Tulu/Vicuna formats, whose spelling depends on the tokenizer);
only the trained response is followed by the real EOD token id, appended at encoding time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from alfred_train.data.records import (
    Context,
    Message,
    PreferencePair,
    PromptExample,
    SFTExample,
    parse_prompt,
    parse_sft,
)
from alfred_train.errors import ConfigError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    render_context: Callable[[Context], str]  # context (ends with a user turn) -> prompt text
    response_prefix: str = ""  # text between the cue and a trained response ("ASSISTANT: An apple.")


@dataclass(frozen=True)
class RenderedText:
    prompt: str  # everything the model conditions on, up to and including the assistant cue
    response: str  # the text trained on / scored ("" for a prompt-only record)


def _stackllama(context: Context) -> str:
    style = {"system": "{}\n\n", "user": "Question: {}\n\n", "assistant": "Answer: {}\n\n"}
    return "".join(style[m.role].format(m.content) for m in context) + "Answer: "


def _tulu(context: Context) -> str:
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in context) + "<|assistant|>\n"


def _vicuna(context: Context) -> str:
    system, turns = VICUNA_SYSTEM, context
    if context[0].role == "system":
        system, turns = context[0].content, context[1:]
    role_names = {"user": "USER", "assistant": "ASSISTANT", "system": "SYSTEM"}
    return system + " " + "".join(f"{role_names[m.role]}: {m.content} " for m in turns) + "ASSISTANT:"


def _stable_vicuna(context: Context) -> str:
    """StableVicuna's card: "### Human: your prompt here\n### Assistant:"; earlier replies end their line."""
    style = {"system": "{}\n", "user": "### Human: {}\n", "assistant": "### Assistant: {}\n"}
    return "".join(style[m.role].format(m.content) for m in context) + "### Assistant:"


def _plain(context: Context) -> str:
    return "\n".join(m.content for m in context)


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate("stackllama", _stackllama),
        PromptTemplate("tulu", _tulu),
        PromptTemplate("vicuna", _vicuna, response_prefix=" "),
        PromptTemplate("stable-vicuna", _stable_vicuna, response_prefix=" "),
        PromptTemplate("plain", _plain),
    )
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; set data.template / --template to one of "
                          f"{', '.join(TEMPLATES)}")
    return TEMPLATES[name]


Record = Union[SFTExample, PromptExample, PreferencePair, Mapping[str, Any]]


def _as_example(record: Record) -> Union[SFTExample, PromptExample, PreferencePair]:
    if not isinstance(record, Mapping):
        return record
    messages = record.get("messages")
    has_response = "response" in record or (
        isinstance(messages, list) and messages and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "assistant"
    )
    return parse_sft(record, "<record>") if has_response else parse_prompt(record, "<record>")


def render_prompt(template: PromptTemplate, record: Record) -> RenderedText:
    """Prompt text and response text of one record.

    `record` is a parsed `SFTExample` / `PromptExample` (response ""), or a raw JSON mapping in
    either form. For a `PreferencePair` use `render_context` and the two responses directly.
    """
    example = _as_example(record)
    if isinstance(example, PreferencePair):
        raise TypeError("render_prompt takes one response; render a PreferencePair's context with render_context")
    response = example.response if isinstance(example, SFTExample) else ""
    return RenderedText(template.render_context(example.context), response)


def single_turn(prompt: str) -> Context:
    """The context of a `{"prompt": ...}` record."""
    return (Message("user", prompt),)
