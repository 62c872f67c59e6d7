"""Typed records read from JSONL, and the checks that turn one JSON object into one of them.

Vocabulary used across `alfred_train.data`:
- context: the conversation before the response, as a tuple of `Message`s ending with a user turn.
  A `{"prompt": str}` record is the one-message context `(Message("user", prompt),)`.
- response: the text the model is trained to produce (SFT), or is scored on (RM).
- example: one SFT record; pair: one preference record; prompt: one PPO prompt record.

Accepted JSON forms (one object per line):
- SFT: {"prompt": str, "response": str} or {"messages": [...]} whose last message is the
  assistant's response.
- preference: {"prompt": str, "chosen": str, "rejected": str}; {"messages": [...], "chosen": str,
  "rejected": str}; or {"chosen": [...], "rejected": [...]} two conversations equal up to their
  last assistant message (hh-rlhf in chat form).
- prompt: {"prompt": str} or {"messages": [...]} ending with a user message.
Every check raises `ConfigError("<where>: <problem> (<what a line needs>)")`; `where` is
"path:line" when reading a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from alfred_train.errors import ConfigError

ROLES = ("system", "user", "assistant")

SFT_FORM = "each line needs 'prompt' and 'response', or 'messages'"
PAIR_FORM = (
    "each line needs 'prompt', 'chosen' and 'rejected' strings, or 'chosen' and 'rejected' message lists"
)
PROMPT_FORM = "each line needs 'prompt', or 'messages' ending with a user message"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


Context = tuple[Message, ...]


@dataclass(frozen=True)
class SFTExample:
    context: Context  # ends with a user message
    response: str


@dataclass(frozen=True)
class PreferencePair:
    context: Context  # ends with a user message
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptExample:
    context: Context  # ends with a user message


def _string(obj: Mapping[str, Any], key: str, where: str, form: str) -> str:
    if key not in obj:
        raise ConfigError(f"{where}: missing key '{key}' ({form})")
    value = obj[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string, got {type(value).__name__} ({form})")
    return value


def _messages(value: Any, key: str, where: str, form: str) -> Context:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty list of messages ({form})")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ConfigError(
                f"{where}: {key}[{i}] must be an object with a string 'content' "
                f"and a 'role' in {', '.join(ROLES)}"
            )
        if item.get("role") not in ROLES:
            role = item.get("role")
            raise ConfigError(f"{where}: {key}[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        messages.append(Message(item["role"], item["content"]))
    return tuple(messages)


def _check_context(context: Context, key: str, where: str, form: str) -> Context:
    if not context or context[-1].role != "user":
        raise ConfigError(
            f"{where}: the turns before the response in '{key}' must end with a user message ({form})"
        )
    return context


def _split_response(conversation: Context, key: str, where: str, form: str) -> tuple[Context, str]:
    if conversation[-1].role != "assistant":
        raise ConfigError(f"{where}: the last message of '{key}' must be the assistant's response ({form})")
    return _check_context(conversation[:-1], key, where, form), conversation[-1].content


def _require_object(obj: Any, where: str, form: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__} ({form})")
    return obj


def _prompt_context(obj: Mapping[str, Any], where: str, form: str) -> Context:
    """Context from 'messages' (a user-ending list) or from the 'prompt' string."""
    if "messages" in obj:
        context = _messages(obj["messages"], "messages", where, form)
        if context[-1].role != "user":
            raise ConfigError(f"{where}: 'messages' must end with a user message ({form})")
        return context
    return (Message("user", _string(obj, "prompt", where, form)),)


def parse_sft(obj: Any, where: str) -> SFTExample:
    obj = _require_object(obj, where, SFT_FORM)
    if "messages" in obj:
        conversation = _messages(obj["messages"], "messages", where, SFT_FORM)
        return SFTExample(*_split_response(conversation, "messages", where, SFT_FORM))
    prompt = _string(obj, "prompt", where, SFT_FORM)
    return SFTExample((Message("user", prompt),), _string(obj, "response", where, SFT_FORM))


def parse_preference(obj: Any, where: str) -> PreferencePair:
    obj = _require_object(obj, where, PAIR_FORM)
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        sides = {}
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise ConfigError(f"{where}: missing key '{key}' ({PAIR_FORM})")
            sides[key] = _split_response(_messages(obj[key], key, where, PAIR_FORM), key, where, PAIR_FORM)
        (chosen_context, chosen), (rejected_context, rejected) = sides["chosen"], sides["rejected"]
        if chosen_context != rejected_context:
            raise ConfigError(
                f"{where}: 'chosen' and 'rejected' must share every message but the last ({PAIR_FORM})"
            )
        return PreferencePair(chosen_context, chosen, rejected)
    context = _prompt_context(obj, where, PAIR_FORM)
    chosen, rejected = (_string(obj, key, where, PAIR_FORM) for key in ("chosen", "rejected"))
    return PreferencePair(context, chosen, rejected)


def parse_prompt(obj: Any, where: str) -> PromptExample:
    return checked_prompt(PromptExample(_prompt_context(_require_object(obj, where, PROMPT_FORM), where, PROMPT_FORM)),
                          where)


def checked_prompt(example: PromptExample, where: str) -> PromptExample:
    """`example`, refused when its last user message is empty: the policy would answer the chat
    template alone (every format's prompts pass here)."""
    if not example.context[-1].content.strip():
        raise ConfigError(f"{where}: the prompt is empty (only whitespace); fill it or remove the record")
    return example
