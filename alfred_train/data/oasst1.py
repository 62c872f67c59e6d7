"""oasst1 (OpenAssistant/oasst1) as published: a flat table of messages forming conversation trees.

Row (one message): message_id, parent_id (None for a tree's first prompt), message_tree_id,
role ("prompter" -> user, "assistant"), text, lang, rank (0 = best among its siblings, None =
unranked), and optionally deleted / review_result. Vocabulary: a *thread* is the path from a tree's
root prompt down to a message; a message's *context* is its thread without itself.

What each kind reads from the trees (in the order the trees first appear in the file):
- sft: per tree, the best-ranked path: from the root prompt take the best-ranked child at every
  turn (lowest rank; unranked children after ranked ones, then file order). Each assistant
  message on that path is one SFTExample (its context -> its text), so every turn is trained on.
- preference: per prompter message, every two ranked assistant replies with different ranks
  give one pair (lower rank chosen): n ranked replies give n*(n-1)/2 pairs.
- prompt: every prompter message, with its thread as context.
Messages marked deleted or review_result false, and (with data.languages) messages in other
languages, are left out with everything below them. Bad rows (missing keys, an unknown role, a
parent not in the file, two prompts or two replies in a row, a repeated message_id, a parent_id
chain that loops) are reported with their row. A NaN rank (pandas' null) is unranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from alfred_train.data.files import Row
from alfred_train.data.formats import BadRecords, Kind
from alfred_train.data.records import Context, Message, PreferencePair, PromptExample, SFTExample
from alfred_train.errors import ConfigError

FORM = "oasst1 rows need 'message_id', 'parent_id', 'role' (prompter|assistant) and 'text'"
ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class OasstMessage:
    id: str
    parent_id: Optional[str]
    role: str  # "user" | "assistant"
    text: str
    rank: Optional[int]  # among siblings: 0 best; None unranked
    order: int  # position in the file: breaks ties
    where: str
    kept: bool  # False: deleted, failed review, or another language

    def best_first_key(self) -> tuple:
        return (self.rank is None, self.rank or 0, self.order)


def _message(row: Row, order: int, languages: tuple[str, ...]) -> OasstMessage:
    obj, where = row.value, row.where
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object ({FORM})")
    for key in ("message_id", "role", "text"):
        if not isinstance(obj.get(key), str):
            problem = "missing" if obj.get(key) is None else f"not a string ({type(obj[key]).__name__})"
            raise ConfigError(f"{where}: '{key}' {problem} ({FORM})")
    if "parent_id" not in obj or not (obj["parent_id"] is None or isinstance(obj["parent_id"], str)):
        raise ConfigError(f"{where}: 'parent_id' must be present, a message id or null ({FORM})")
    if obj["role"] not in ROLES:
        raise ConfigError(f"{where}: role {obj['role']!r} is neither 'prompter' nor 'assistant'")
    rank = obj.get("rank")
    if isinstance(rank, float) and math.isnan(rank):  # unranked, as pandas writes a null of a float column
        rank = None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank != int(rank)):
        raise ConfigError(f"{where}: 'rank' must be a whole number or null, got {rank!r}")
    lang_ok = not languages or obj.get("lang") in languages
    kept = lang_ok and not obj.get("deleted") and obj.get("review_result") is not False
    return OasstMessage(obj["message_id"], obj["parent_id"], ROLES[obj["role"]], obj["text"],
                        None if rank is None else int(rank), order, where, kept)


class Forest:
    """The kept messages of a table, linked to their children; bad rows reported to `bad`."""

    def __init__(self, rows: Iterable[Row], bad: BadRecords, languages: tuple[str, ...]):
        messages: list[OasstMessage] = []
        self.by_id: dict[str, OasstMessage] = {}
        for row in rows:
            if row.error:
                bad.add(f"{row.where}: {row.error}")
                continue
            try:
                m = _message(row, len(messages), languages)
            except ConfigError as err:
                bad.add(str(err))
                continue
            if m.id in self.by_id:  # a file read twice, or two exports concatenated
                bad.add(f"{m.where}: message_id {m.id!r} repeats the one of {self.by_id[m.id].where}")
                continue
            self.by_id[m.id] = m
            messages.append(m)
        self.children: dict[str, list[OasstMessage]] = {}
        self.roots: list[OasstMessage] = []
        for m in messages:
            problem = self._link_problem(m) or self._loop_problem(m)
            if problem:
                bad.add(f"{m.where}: {problem}")
            elif m.kept and self._reachable(m):
                (self.children.setdefault(m.parent_id, []) if m.parent_id else self.roots).append(m)
        for siblings in self.children.values():
            siblings.sort(key=OasstMessage.best_first_key)

    def _link_problem(self, m: OasstMessage) -> Optional[str]:
        if m.parent_id is None:
            return None if m.role == "user" else "a tree must start with a prompter message (parent_id is null)"
        parent = self.by_id.get(m.parent_id)
        if parent is None:
            return f"parent_id {m.parent_id!r} is not in the file"
        if parent.role == m.role:
            return f"a {m.role} message replies to a {parent.role} message (roles must alternate)"
        return None

    def _loop_problem(self, m: OasstMessage) -> Optional[str]:
        """A parent_id chain that comes back to a message it passed (it would never reach a root)."""
        seen = {m.id}
        while m.parent_id is not None and m.parent_id in self.by_id:
            if m.parent_id in seen:
                return f"its chain of parent_ids loops (through message_id {m.parent_id!r}) and reaches no root"
            seen.add(m.parent_id)
            m = self.by_id[m.parent_id]
        return None

    def _reachable(self, m: OasstMessage) -> bool:
        """Every ancestor kept (a dropped message drops the messages below it)."""
        while m.parent_id is not None:
            m = self.by_id[m.parent_id]
            if not m.kept or self._link_problem(m):
                return False
        return True

    def thread(self, m: OasstMessage) -> Context:
        """Root .. m, as messages."""
        path = [m]
        while path[-1].parent_id is not None:
            path.append(self.by_id[path[-1].parent_id])
        return tuple(Message(x.role, x.text) for x in reversed(path))

    def walk(self) -> Iterable[OasstMessage]:
        """Every reachable kept message, tree by tree, depth first."""
        stack = list(reversed(self.roots))
        while stack:
            m = stack.pop()
            yield m
            stack.extend(reversed(self.children.get(m.id, [])))


def _best_path_examples(forest: Forest) -> list[SFTExample]:
    examples = []
    for root in forest.roots:
        path, m = [Message("user", root.text)], root
        while forest.children.get(m.id):
            m = forest.children[m.id][0]  # best first
            if m.role == "assistant":
                examples.append(SFTExample(tuple(path), m.text))
            path.append(Message(m.role, m.text))
    return examples


def _sibling_pairs(forest: Forest) -> list[PreferencePair]:
    pairs = []
    for prompt in forest.walk():
        if prompt.role != "user":
            continue
        ranked = [m for m in forest.children.get(prompt.id, []) if m.rank is not None]
        context = forest.thread(prompt)
        for i, better in enumerate(ranked):
            pairs.extend(PreferencePair(context, better.text, worse.text)
                         for worse in ranked[i + 1:] if worse.rank > better.rank)
    return pairs


def _prompts(forest: Forest) -> list[PromptExample]:
    return [PromptExample(forest.thread(m)) for m in forest.walk() if m.role == "user"]


def records(rows: Iterable[Row], kind: Kind, bad: BadRecords, languages: tuple[str, ...] = ()) -> list[Any]:
    forest = Forest(rows, bad, languages)
    return {"sft": _best_path_examples, "preference": _sibling_pairs, "prompt": _prompts}[kind](forest)
