"""The tiny English corpus and the tiny sentencepiece model shipped in `assets/`.

`corpus_lines()` is a pure function: a fixed set of hand-written sentences, sentences generated
from the synthetic task's vocabulary (so each of its words is one or two tokens), and examples of
the task in every prompt template. Rebuild both assets with

    python -m alfred_train.data.corpus

which rewrites assets/tiny_corpus.txt and trains assets/tiny_sp.model (vocab TINY_VOCAB_SIZE)
with `train_sentencepiece`; the tests check the shipped files match what this code produces.
"""

from __future__ import annotations

import random
from pathlib import Path

from alfred_train.data.synthetic import CHEERFUL_WORDS, TOPIC_WORDS, make_preference_pairs, make_sft_records
from alfred_train.data.templates import TEMPLATES, render_prompt
from alfred_train.data.tokenizer import train_sentencepiece

ASSETS_DIR = Path(__file__).parent / "assets"
TINY_CORPUS_PATH = ASSETS_DIR / "tiny_corpus.txt"
TINY_SP_MODEL_PATH = ASSETS_DIR / "tiny_sp.model"
# The templates the shipped corpus was built with; templates added later (stable-vicuna) stay out so
# the shipped tokenizer does not change (their text still encodes, through byte fallback if need be).
CORPUS_TEMPLATES = ("plain", "stackllama", "tulu", "vicuna")
TINY_VOCAB_SIZE = 512  # 4 special ids + 256 byte-fallback pieces + 252 learned pieces

HAND_WRITTEN = (
    "The morning was quiet, and the light came slowly over the hills.",
    "She opened the window and listened to the birds in the garden.",
    "A good question is often worth more than a quick answer.",
    "He wrote a short list of things to buy at the market.",
    "The children ran down the road to see the old train.",
    "Please answer the question in one or two sentences.",
    "The river was cold, but the sun was warm on our faces.",
    "We cooked bread in the oven and ate it with soup.",
    "The teacher asked the class to write a word list about the farm.",
    "At night the stars looked close enough to touch.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "Every word in the list should be about the topic.",
    "The boat left the harbour before the tide turned.",
    "They played a song on the piano while it snowed outside.",
    "The city was loud, with cars and buses on every street.",
    "In the forest the moss was soft and green under the trees.",
    "Write the answer first, and then explain how you found it.",
    "The little fox hid behind a root when the horse came by.",
    "Winter brought frost to the windows and ice to the pond.",
    "A kind word can make a long day feel short.",
    "The rocket climbed into orbit and the crowd cheered.",
    "My grandmother kept every spoon, cup and plate she was given.",
    "The choir sang a gentle song at the end of the evening.",
    "He counted one, two, three, four, five, and then he stopped.",
    "The numbers 10, 20 and 30 were written on the board.",
    "Is this the right way to the bridge, or should we take the bus?",
    "What is the capital of France? The capital of France is Paris.",
    "Can you help me write a short poem about the sea?",
    "Thank you for your help, that was a very clear answer.",
    "The user asked a question and the assistant answered it.",
    "Keep your answer short, simple and true.",
    "The weather today is sunny with a light wind from the west.",
    "Our team trained a small model on a small amount of text.",
    "It was a bright and happy day, and everyone felt calm.",
    "The shop on the corner sells bread, fish and fresh corn.",
    "A comet crossed the sky and the moon was full.",
    "The goat and the cow shared the field behind the barn.",
    "She wore a warm coat and a red scarf to go sledding.",
    "The drum kept the beat while the guitar played the tune.",
)
SENTENCE_FORMS = (
    "The {cheer} {word} was part of {topic}.",
    "We saw a {word} and a {other} when we visited {topic}.",
    "Write a word list about {topic}.",
    "A {cheer} day with a {word} is a {cheer2} day.",
    "There is a {word} near the {other}, and it looks {cheer}.",
    "When I think of {topic}, I think of a {word}.",
    "Question: What do you like about {topic}? Answer: the {word} and the {other}.",
)


def _generated_sentences(rng: random.Random, count: int) -> list[str]:
    lines = []
    topics = sorted(TOPIC_WORDS)
    for _ in range(count):
        topic = rng.choice(topics)
        word, other = rng.sample(TOPIC_WORDS[topic], 2)
        cheer, cheer2 = rng.sample(CHEERFUL_WORDS, 2)
        form = rng.choice(SENTENCE_FORMS)
        line = form.format(topic=topic, word=word, other=other, cheer=cheer, cheer2=cheer2)
        lines.append(line[0].upper() + line[1:])
    return lines


def _task_examples() -> list[str]:
    """The synthetic task rendered in every template, one line each (newlines shown as spaces)."""
    lines = []
    records = make_sft_records(24, seed=11)
    for i, record in enumerate(records):
        template = TEMPLATES[CORPUS_TEMPLATES[i % len(CORPUS_TEMPLATES)]]
        text = render_prompt(template, record)
        lines.append((text.prompt + text.response).replace("\n", " ").strip())
    for pair in make_preference_pairs(16, seed=12):
        lines.append(f"{pair['prompt']} {pair['chosen']}")
        lines.append(f"{pair['prompt']} {pair['rejected']}")
    return lines


def corpus_lines() -> list[str]:
    """The tiny corpus: HAND_WRITTEN, 300 generated sentences, then 56 task examples."""
    return list(HAND_WRITTEN) + _generated_sentences(random.Random(1234), 300) + _task_examples()


def build_tiny_assets(out_dir: Path = ASSETS_DIR) -> tuple[Path, Path]:
    """Write `tiny_corpus.txt` and train `tiny_sp.model` in out_dir; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / TINY_CORPUS_PATH.name
    corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    model = train_sentencepiece(corpus, out_dir / TINY_SP_MODEL_PATH.stem, TINY_VOCAB_SIZE)
    (out_dir / f"{TINY_SP_MODEL_PATH.stem}.vocab").unlink(missing_ok=True)  # text dump, not needed
    _strip_paths(model)
    return corpus, model


def _strip_paths(model: Path) -> None:
    """Keep only file names in the model's recorded trainer options, so the bytes do not depend on
    the directory it was built in."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    spec = proto.trainer_spec
    spec.model_prefix = Path(spec.model_prefix).name
    spec.input[:] = [Path(p).name for p in spec.input]
    model.write_bytes(proto.SerializeToString())


if __name__ == "__main__":
    for path in build_tiny_assets():
        print(f"wrote {path} ({path.stat().st_size} bytes)")
