"""A synthetic task a tiny model learns on CPU in minutes: cheerful word lists.

Prompt:   "Write a word list about the sea."
Response: LIST_LEN lowercase words separated by spaces, each either a word of the prompt's topic
          ("fish wave boat ...") or a cheerful word ("happy", "sunny", ...), e.g.
          "fish happy wave sand sunny boat".
Property (ground truth, `property_score`): the share of cheerful words,
    score = #cheerful words / max(#words, LIST_LEN)        in [0, 1]
so a list of LIST_LEN cheerful words scores 1 and a shorter answer cannot beat a full one.

Why this property:
- a reward model reads it from a bag of tokens (every cheerful word is a single piece of the
  shipped tiny tokenizer; topic words take 1-4), so a few hundred preference pairs give high
  held-out accuracy;
- SFT responses mix 0..LIST_LEN cheerful words, weighted towards few (mean score ~0.36), so the
  SFT policy samples both kinds and PPO has room to raise the score towards 1;
- short sequences for fast CPU steps: [BOS] prompt response EOD is at most 37 tokens with the
  shipped tiny tokenizer and the stackllama template (29 plain, 46 tulu; vicuna's default
  system line alone adds ~80, avoid it here).
Every generator is a pure function of (n, seed).
"""

from __future__ import annotations

import random
import re

from alfred_train.data.datasets import write_jsonl

__all__ = [
    "CHEERFUL_WORDS",
    "LIST_LEN",
    "TOPIC_WORDS",
    "make_preference_pairs",
    "make_prompts",
    "make_sft_records",
    "property_score",
    "write_jsonl",
]

LIST_LEN = 6  # words per response
CHEERFUL_WORDS = ("happy", "bright", "kind", "warm", "calm", "sunny", "sweet", "gentle", "merry", "lovely")
TOPIC_WORDS = {
    "the sea": ("fish", "wave", "boat", "sand", "shell", "tide", "ship", "crab"),
    "the forest": ("tree", "leaf", "moss", "bird", "fox", "root", "branch", "fern"),
    "the city": ("street", "car", "tower", "bus", "bridge", "shop", "road", "train"),
    "the farm": ("cow", "barn", "hay", "pig", "goat", "field", "horse", "corn"),
    "space": ("star", "moon", "planet", "comet", "rocket", "orbit", "sun", "dust"),
    "the kitchen": ("pan", "knife", "bread", "spoon", "oven", "plate", "cup", "pot"),
    "winter": ("snow", "ice", "frost", "coat", "sled", "scarf", "cold", "wind"),
    "music": ("song", "drum", "piano", "note", "guitar", "beat", "choir", "flute"),
}
PROMPT = "Write a word list about {topic}."
# SFT quality mix: relative frequency of 0, 1, ..., LIST_LEN cheerful words in a response.
SFT_CHEERFUL_WEIGHTS = (3, 3, 3, 2, 1, 1, 1)

# Share of preference pairs whose rejected list is cut short (1..LIST_LEN-1 words): without them
# the reward model never sees a short answer and PPO finds that a lone cheerful word scores well.
SHORT_REJECTED_SHARE = 0.3

_CHEERFUL = frozenset(CHEERFUL_WORDS)


def property_score(response: str) -> float:
    """Share of cheerful words: #cheerful / max(#words, LIST_LEN); words are [a-z]+ runs, lowercased."""
    words = re.findall(r"[a-z]+", response.lower())
    return sum(word in _CHEERFUL for word in words) / max(len(words), LIST_LEN)


def _word_list(rng: random.Random, topic: str, n_cheerful: int) -> str:
    words = rng.sample(CHEERFUL_WORDS, n_cheerful) + rng.sample(TOPIC_WORDS[topic], LIST_LEN - n_cheerful)
    rng.shuffle(words)
    return " ".join(words)


def _topic(rng: random.Random) -> str:
    return rng.choice(sorted(TOPIC_WORDS))


def make_sft_records(n: int, seed: int) -> list[dict]:
    """n {"prompt", "response"} records of mixed quality (see SFT_CHEERFUL_WEIGHTS)."""
    rng = random.Random(f"sft:{seed}")
    records = []
    for _ in range(n):
        topic = _topic(rng)
        n_cheerful = rng.choices(range(LIST_LEN + 1), weights=SFT_CHEERFUL_WEIGHTS)[0]
        records.append({"prompt": PROMPT.format(topic=topic), "response": _word_list(rng, topic, n_cheerful)})
    return records


def make_preference_pairs(n: int, seed: int) -> list[dict]:
    """n {"prompt", "chosen", "rejected"} records; chosen has strictly more cheerful words, and
    SHORT_REJECTED_SHARE of the rejected lists are cut to fewer than LIST_LEN words.

    The two cheerful counts are two distinct values drawn uniformly from 0..LIST_LEN, so
    property_score(chosen) > property_score(rejected) on every pair.
    """
    rng = random.Random(f"pairs:{seed}")
    records = []
    for _ in range(n):
        topic = _topic(rng)
        low, high = sorted(rng.sample(range(LIST_LEN + 1), 2))
        rejected = _word_list(rng, topic, low)
        if rng.random() < SHORT_REJECTED_SHARE:  # a list cut short scores lower, so the RM learns it
            rejected = " ".join(rejected.split()[: rng.randint(1, LIST_LEN - 1)])
        records.append(
            {
                "prompt": PROMPT.format(topic=topic),
                "chosen": _word_list(rng, topic, high),
                "rejected": rejected,
            }
        )
    return records


def make_prompts(n: int, seed: int) -> list[dict]:
    """n {"prompt"} records for PPO rollouts."""
    rng = random.Random(f"prompts:{seed}")
    return [{"prompt": PROMPT.format(topic=_topic(rng))} for _ in range(n)]
