"""alfred_train.data: tokenizers, templates, JSONL errors, encoding masks, packing, sampling, synthetic task."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from alfred_train.data.corpus import TINY_CORPUS_PATH, TINY_SP_MODEL_PATH, build_tiny_assets
from alfred_train.data.datasets import (
    cue_text,
    encode_preference,
    encode_prompt,
    encode_sft,
    read_preference_jsonl,
    read_prompt_jsonl,
    read_sft_jsonl,
    write_jsonl,
)
from alfred_train.data.packing import collate_pairs, pack_examples, pad_batch, pad_examples
from alfred_train.data.records import Message, PreferencePair, SFTExample
from alfred_train.data.sampler import epoch_order, iterate_batches, sampler
from alfred_train.data.sft_dataset import SFTDataset
from alfred_train.data.synthetic import (
    LIST_LEN,
    make_preference_pairs,
    make_prompts,
    make_sft_records,
    property_score,
)
from alfred_train.data.templates import VICUNA_SYSTEM, get_template, render_prompt
from alfred_train.data.tokenizer import HFJsonTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from alfred_train.errors import ConfigError

ROUNDTRIP_TEXTS = [
    "Write a word list about the sea.",
    "Question: Who are you?\n\nAnswer: ",
    "Héllo wörld, ½ 😀 Ωmega\n\n  two  spaces\tand a tab",
    "<|user|>\nhi\n<|assistant|>\n",
]


@pytest.fixture(scope="module")
def tiny_sp():
    return load_tokenizer(TINY_SP_MODEL_PATH)


def _write_hf_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer.json like Falcon's: 11 specials first, so <|endoftext|> has id 11."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [f">>SPECIAL{i}<<" for i in range(11)] + ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TINY_CORPUS_PATH.read_text().splitlines(), trainer)
    tok.save(str(path))
    return path


# ---------------------------------------------------------------- tokenizers


def test_train_sentencepiece_is_deterministic_and_roundtrips(tmp_path):
    first = train_sentencepiece(TINY_CORPUS_PATH, tmp_path / "a" / "sp", 512)
    second = train_sentencepiece(TINY_CORPUS_PATH, tmp_path / "b" / "sp", 512)
    tok_a, tok_b = SentencePieceTokenizer(first), SentencePieceTokenizer(second)
    corpus = TINY_CORPUS_PATH.read_text().splitlines()
    assert [tok_a.encode(line) for line in corpus] == [tok_b.encode(line) for line in corpus]
    assert (tok_a.vocab_size, tok_a.pad_id, tok_a.bos_id, tok_a.eos_id, tok_a.eod_id) == (512, 0, 1, 2, 2)
    for text in ROUNDTRIP_TEXTS + corpus[:50]:
        assert tok_a.decode(tok_a.encode(text)) == text
    # byte fallback: a character absent from the corpus encodes to its UTF-8 bytes, not <unk> (3)
    assert 3 not in tok_a.encode("😀") and len(tok_a.encode("😀")) >= 4


def test_shipped_tiny_assets_match_the_builder(tmp_path):
    corpus, model = build_tiny_assets(tmp_path)
    assert corpus.read_bytes() == TINY_CORPUS_PATH.read_bytes()
    assert model.read_bytes() == TINY_SP_MODEL_PATH.read_bytes()
    assert TINY_CORPUS_PATH.stat().st_size < 100_000 and len(TINY_CORPUS_PATH.read_text().splitlines()) >= 300


def test_hf_tokenizer_json_eod_looked_up_by_string(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "tokenizer.json")
    for source in (path, tmp_path):  # the file, or the directory holding it
        tok = load_tokenizer(source)
        assert isinstance(tok, HFJsonTokenizer)
        assert (tok.eod_id, tok.eos_id, tok.pad_id, tok.bos_id) == (11, 11, 11, None)
    assert tok.vocab_size == 400
    for text in ROUNDTRIP_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert 11 not in tok.encode("a b c")  # encode adds no special tokens
    literal = tok.encode("say <|endoftext|> now")  # text, not a special token: it was EOD (11) mid-response
    assert 11 not in literal and tok.decode(literal) == "say <|endoftext|> now"
    with pytest.raises(ConfigError, match=r"has no token '<\|nope\|>' for eod"):
        HFJsonTokenizer(path, special_tokens={"eod": "<|nope|>"})
    with pytest.raises(ConfigError, match="unknown special token role"):
        HFJsonTokenizer(path, special_tokens={"sep": "<|endoftext|>"})


def test_hf_tokenizer_special_tokens_from_its_tokenizer_config(tmp_path):
    """A Llama-3 or Mistral tokenizer.json has no '<|endoftext|>': it could not be used (the error
    named a special_tokens argument no config key reaches). Its tokenizer_config.json names them."""
    import json

    path = _write_hf_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": ">>SPECIAL0<<", "eos_token": {"content": ">>SPECIAL1<<", "lstrip": False}, "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.eod_id, tok.pad_id) == (0, 1, 1, 1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(ConfigError, match=r"has no token '<\|eot_id\|>' for eos; put the model's tokenizer_config"):
        load_tokenizer(path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer_config.json is not valid JSON"):
        load_tokenizer(path)


def test_load_tokenizer_picks_by_name_and_contents(tmp_path):
    _write_hf_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(TINY_SP_MODEL_PATH.read_bytes())
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)  # Llama dirs ship both
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot tell the tokenizer type"):
        load_tokenizer(tmp_path / "vocab.txt")



def test_damaged_tokenizer_files_are_config_errors(tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_text("garbage\n")
    with pytest.raises(ConfigError, match=r"tokenizer.model is not a valid SentencePiece model"):
        load_tokenizer(garbage)
    not_a_tokenizer = tmp_path / "tokenizer.json"
    not_a_tokenizer.write_text('{"a": 1}\n')
    with pytest.raises(ConfigError, match=r"tokenizer.json is not a valid Hugging Face tokenizer file \(.+\)") as err:
        load_tokenizer(not_a_tokenizer)
    assert "\n" not in str(err.value)
    garbage.unlink()
    with pytest.raises(ConfigError, match="not a valid Hugging Face tokenizer file"):  # found in a directory too
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- templates


def test_single_turn_templates_exact_strings():
    record = {"prompt": "Name a colour.", "response": "Blue."}
    expected = {
        "stackllama": "Question: Name a colour.\n\nAnswer: ",
        "tulu": "<|user|>\nName a colour.\n<|assistant|>\n",
        "vicuna": VICUNA_SYSTEM + " USER: Name a colour. ASSISTANT:",
        "plain": "Name a colour.",
    }
    for name, prompt in expected.items():
        text = render_prompt(get_template(name), record)
        assert (text.prompt, text.response) == (prompt, "Blue.")
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")
    with pytest.raises(ConfigError, match="unknown prompt template 'alpaca'; set data.template / --template to one of"):
        get_template("alpaca")


def test_multi_turn_templates():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Bye."},
        ]
    }
    tulu = render_prompt(get_template("tulu"), record)
    assert tulu.prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nBye?\n<|assistant|>\n"
    assert tulu.response == "Bye."
    vicuna = render_prompt(get_template("vicuna"), record)
    assert vicuna.prompt == "Be brief. USER: Hi ASSISTANT: Hello USER: Bye? ASSISTANT:"
    stack = render_prompt(get_template("stackllama"), record)
    assert stack.prompt == "Be brief.\n\nQuestion: Hi\n\nAnswer: Hello\n\nQuestion: Bye?\n\nAnswer: "
    prompt_only = render_prompt(get_template("tulu"), {"messages": record["messages"][1:4]})
    assert prompt_only.prompt == "<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nBye?\n<|assistant|>\n"
    assert prompt_only.response == ""


# ---------------------------------------------------------------- encoding


def test_encode_sft_masks_prompt_and_appends_eod(tiny_sp):
    template = get_template("tulu")
    record = {"prompt": "Write a word list about the sea.", "response": "happy fish wave"}
    ids, mask = encode_sft(tiny_sp, template, record, max_len=100)
    prompt = "<|user|>\nWrite a word list about the sea.\n<|assistant|>\n"
    prompt_ids = [tiny_sp.bos_id] + tiny_sp.encode(prompt)  # its own tokens: what the policy continues
    assert ids[:len(prompt_ids)] == prompt_ids and ids[-1] == tiny_sp.eod_id
    assert tiny_sp.decode(ids) == prompt + "happy fish wave"
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert tiny_sp.decode([t for t, m in zip(ids, mask) if m]) == "happy fish wave"
    cut_ids, cut_mask = encode_sft(tiny_sp, template, record, max_len=len(ids) - 1)
    assert cut_ids == ids[:-1] and cut_mask == mask[:-1] and tiny_sp.eod_id not in cut_ids


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level", "metaspace"])
def test_the_trained_tokens_read_as_the_template_writes_them(tmp_path, tiny_sp, kind):
    """Encoded on its own, a response got sentencepiece's dummy-prefix space: "Answer:  An apple."
    (StackLLaMA), "<|assistant|>\n An apple." (Tulu); byte-level BPE dropped Vicuna's space
    ("ASSISTANT:An apple."). Now every template's tokens decode to exactly its text, and the
    prompt's tokens are the ones the policy is given when it generates (a cue's last space goes
    with the response's first word: no lone "▁" token ends a prompt)."""
    tok = {"sentencepiece": lambda: tiny_sp,
           "byte-level": lambda: load_tokenizer(_write_hf_tokenizer(tmp_path / "tokenizer.json")),
           "metaspace": lambda: load_tokenizer(_write_metaspace_tokenizer(tmp_path / "tokenizer.json"))}[kind]()
    cues = {"stackllama": "Answer: An apple.", "tulu": "<|assistant|>\nAn apple.",
            "vicuna": "ASSISTANT: An apple.", "stable-vicuna": "### Assistant: An apple."}
    record = {"prompt": "Name a fruit.", "response": "An apple."}
    for name, ending in cues.items():
        template = get_template(name)
        ids, mask = encode_sft(tok, template, record, max_len=200)
        text = tok.decode(ids)
        assert text.endswith(ending) and text.count("  ") == 0, (name, text)
        prompt_ids = _bos_ids(tok) + tok.encode(cue_text(render_prompt(template, record).prompt))
        assert ids[:len(prompt_ids)] == prompt_ids and mask.index(1) == len(prompt_ids), name
        scored = encode_preference(tok, template, PreferencePair(((Message("user", "Name a fruit."),)), "An apple.",
                                                                 "A pear."), max_len=200)[0]
        assert scored == ids, name  # the reward model reads the very tokens SFT trained on
        assert encode_prompt(tok, template, (Message("user", "Name a fruit."),), 200) == prompt_ids, name


def _bos_ids(tok) -> list[int]:
    return [tok.bos_id] if tok.bos_id is not None else []


def _write_metaspace_tokenizer(path: Path) -> Path:
    """A tokenizer.json like Llama's HF one: Metaspace prepends "▁" to a text's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=list(string.printable))
    tok.train_from_iterator(TINY_CORPUS_PATH.read_text().splitlines(), trainer)
    tok.save(str(path))
    return path


def test_encode_without_bos_and_scored_sequences_end_at_eod(tmp_path, tiny_sp):
    hf = load_tokenizer(_write_hf_tokenizer(tmp_path / "tokenizer.json"))
    ids, mask = encode_sft(hf, get_template("plain"), {"prompt": "ab", "response": "cd"}, max_len=100)
    assert ids[:len(hf.encode("ab"))] == hf.encode("ab") and ids[-1] == 11 and hf.decode(ids) == "abcd"  # no BOS
    assert mask == [0] * len(hf.encode("ab")) + [1] * (len(ids) - len(hf.encode("ab")))
    pair_file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "happy", "rejected": "fish"}])
    pair = read_preference_jsonl(pair_file)[0]
    chosen, rejected = encode_preference(tiny_sp, get_template("plain"), pair, max_len=4)
    assert len(chosen) <= 4 and chosen[-1] == tiny_sp.eod_id and rejected[-1] == tiny_sp.eod_id
    long_prompt = (Message("user", "word " * 50),)
    prompt_ids = encode_prompt(tiny_sp, get_template("plain"), long_prompt, max_len=8)
    assert len(prompt_ids) == 8 and prompt_ids[0] == tiny_sp.bos_id
    assert prompt_ids[1:] == tiny_sp.encode(("word " * 50).rstrip())[-7:]  # left-truncated, BOS kept


# ---------------------------------------------------------------- packing


def test_pack_examples_by_hand():
    examples = [([1, 10, 11, 12, 2], [0, 0, 0, 1, 1]), ([1, 20, 21, 2], [0, 0, 1, 1]), ([1, 30, 2], [0, 0, 1])]
    blocks = pack_examples(examples, seq_len=4)  # stream of 12 tokens -> (12 - 1) // 4 = 2 blocks
    assert blocks.tokens.tolist() == [[1, 10, 11, 12], [2, 1, 20, 21]]
    assert blocks.labels.tolist() == [[10, 11, 12, 2], [1, 20, 21, 2]]
    assert blocks.loss_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert blocks.select([1]).labels.tolist() == [[1, 20, 21, 2]]
    with pytest.raises(ConfigError, match="too few for one packed block of data.seq_len=16"):
        pack_examples(examples, seq_len=16)


def test_pad_examples_by_hand():
    blocks = pad_examples([([1, 10, 11, 2], [0, 0, 1, 1]), ([1, 20, 21, 22, 23, 2], [0, 1, 1, 1, 1, 1])], 4, pad_id=0)
    assert blocks.tokens.tolist() == [[1, 10, 11, 2], [1, 20, 21, 22]]
    assert blocks.labels.tolist() == [[10, 11, 2, 0], [20, 21, 22, 23]]
    assert blocks.loss_mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]


def test_pad_batch_and_pairs():
    batch = pad_batch([[5, 6, 2], [7, 2]], pad_id=0, eod_id=2)
    assert batch.ids.tolist() == [[5, 6, 2], [7, 2, 0]] and batch.eod_index.tolist() == [2, 1]
    fixed = pad_batch([[7, 2]], pad_id=9, eod_id=2, seq_len=4)
    assert fixed.ids.tolist() == [[7, 2, 9, 9]] and fixed.eod_index.tolist() == [1]
    pairs = collate_pairs([([3, 2], [4, 4, 2]), ([5, 2], [6, 2])], pad_id=0, eod_id=2)
    assert pairs.ids.tolist() == [[3, 2, 0], [5, 2, 0], [4, 4, 2], [6, 2, 0]]  # chosen rows, then rejected
    assert pairs.ids[torch.arange(4), pairs.eod_index].tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="does not end with EOD"):
        pad_batch([[5, 6]], pad_id=0, eod_id=2)
    with pytest.raises(ValueError, match="more than seq_len=2"):
        pad_batch([[5, 6, 2]], pad_id=0, eod_id=2, seq_len=2)


# ---------------------------------------------------------------- sampling


def test_sampler_slices_are_disjoint_and_cover_each_global_batch():
    n, g, d, seed = 10, 4, 2, 0
    assert epoch_order(n, seed, 0) == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]  # the sampler.py docstring example
    for epoch in (0, 1):
        order = epoch_order(n, seed, epoch)
        per_rank = [sampler(n, g, rank, d, seed, epoch) for rank in range(d)]
        assert per_rank == [sampler(n, g, rank, d, seed, epoch) for rank in range(d)]  # deterministic
        for k in range(n // g):
            slices = [per_rank[rank][k] for rank in range(d)]
            assert set(slices[0]).isdisjoint(slices[1]) and [len(s) for s in slices] == [2, 2]
            assert slices[0] + slices[1] == order[k * g : (k + 1) * g]
    assert epoch_order(n, seed, 0) != epoch_order(n, seed, 1) != epoch_order(n, seed + 1, 1)


def test_sampler_resumes_at_consumed_samples_across_epochs():
    def take(rank, consumed, count):
        stream = iterate_batches(10, 4, rank, 2, seed=7, consumed_samples=consumed)
        return [next(stream) for _ in range(count)]

    full = take(1, 0, 7)  # 2 global batches per epoch: epochs 0, 0, 1, 1, 2, 2, 3
    assert [b.epoch for b in full] == [0, 0, 1, 1, 2, 2, 3]
    assert [b.consumed_samples for b in full] == [4, 8, 12, 16, 20, 24, 28]
    assert take(1, full[2].consumed_samples, 4) == full[3:7]
    with pytest.raises(ConfigError, match="consumed_samples=6 is not a multiple of train.global_batch_size"):
        take(0, 6, 1)
    with pytest.raises(ConfigError, match=r"global_batch_size \(6\) must be divisible by the data-parallel size dp"):
        sampler(10, 6, 0, 4, 0, 0)
    with pytest.raises(ConfigError, match="12 samples, fewer than"):
        sampler(12, 16, 0, 2, 0, 0)


def test_sft_dataset_is_deterministic_and_batches_have_rank_shapes(tiny_sp):
    from alfred_train.data.records import parse_sft

    examples = [parse_sft(r, "synthetic") for r in make_sft_records(64, seed=3)]
    template = get_template("stackllama")
    a = SFTDataset.build(examples, tiny_sp, template, seq_len=32, seed=5)
    b = SFTDataset.build(examples, tiny_sp, template, seq_len=32, seed=5)
    assert torch.equal(a.blocks.tokens, b.blocks.tokens) and torch.equal(a.blocks.loss_mask, b.blocks.loss_mask)
    total = sum(len(encode_sft(tiny_sp, template, e, 33)[0]) for e in examples)
    assert len(a) == (total - 1) // 32
    assert torch.equal(a.blocks.labels[:-1, -1], a.blocks.tokens[1:, 0])  # labels cross block edges
    assert torch.equal(a.blocks.labels[:, :-1], a.blocks.tokens[:, 1:])
    position, rows = next(a.batches(global_batch=8, dp_rank=1, dp_size=2, seed=0))
    assert rows.tokens.shape == rows.loss_mask.shape == (4, 32) and position.indices == a.sampler(8, 1, 2, 0, 0)[0]
    padded = SFTDataset.build(examples, tiny_sp, template, seq_len=40, pack=False, seed=5)
    assert len(padded) == 64 and (padded.blocks.tokens[:, 0] == tiny_sp.bos_id).all()


# ---------------------------------------------------------------- JSONL errors


def _lines(tmp_path, *lines, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = _lines(tmp_path, good, "", good, json.dumps({"prompt": "p", "answer": "r"}))
    with pytest.raises(ConfigError) as err:
        read_sft_jsonl(path)
    form = "each line needs 'prompt' and 'response', or 'messages'"
    assert str(err.value) == f"{path}:4: missing key 'response' ({form})"
    with pytest.raises(ConfigError, match=r"train.jsonl:2: invalid JSON"):
        read_sft_jsonl(_lines(tmp_path, good, '{"prompt": "p", '))
    with pytest.raises(ConfigError, match=r"train.jsonl:1: 'response' must be a string, got int"):
        read_sft_jsonl(_lines(tmp_path, json.dumps({"prompt": "p", "response": 3})))
    with pytest.raises(ConfigError, match=r"train.jsonl:1: messages\[1\] has role 'bot'"):
        bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
        read_sft_jsonl(_lines(tmp_path, json.dumps(bad_role)))
    with pytest.raises(ConfigError, match=r"train.jsonl:1: the last message of 'messages' must be the assistant's"):
        read_sft_jsonl(_lines(tmp_path, json.dumps({"messages": [{"role": "user", "content": "a"}]})))
    with pytest.raises(ConfigError, match=r"train.jsonl:1: expected a JSON object, got list"):
        read_sft_jsonl(_lines(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="has no records"):
        read_sft_jsonl(_lines(tmp_path, ""))


def test_preference_and_prompt_forms(tmp_path):
    user = {"role": "user", "content": "q"}
    pairs = read_preference_jsonl(_lines(
        tmp_path,
        json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        json.dumps({"chosen": [user, {"role": "assistant", "content": "good"}],
                    "rejected": [user, {"role": "assistant", "content": "bad"}]}),
    ))
    assert pairs[0] == pairs[1] and (pairs[0].context, pairs[0].chosen) == ((Message("user", "q"),), "good")
    mismatched = {"chosen": [user, {"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ConfigError, match="pairs.jsonl:1: 'chosen' and 'rejected' must share every message but"):
        read_preference_jsonl(_lines(tmp_path, json.dumps(mismatched), name="pairs.jsonl"))
    with pytest.raises(ConfigError, match="pairs.jsonl:1: missing key 'rejected'"):
        read_preference_jsonl(_lines(tmp_path, json.dumps({"prompt": "q", "chosen": "a"}), name="pairs.jsonl"))
    prompts = read_prompt_jsonl(_lines(tmp_path, json.dumps({"prompt": "q"}), json.dumps({"messages": [user]})))
    assert prompts[0] == prompts[1]
    ends_with_assistant = {"messages": [user, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ConfigError, match="prompts.jsonl:1: 'messages' must end with a user message"):
        read_prompt_jsonl(_lines(tmp_path, json.dumps(ends_with_assistant), name="prompts.jsonl"))
    for empty in ({"prompt": " \n "}, {"messages": [{"role": "user", "content": ""}]}):  # were rolled out from
        with pytest.raises(ConfigError, match=r"prompts.jsonl:2: the prompt is empty \(only whitespace\)"):
            read_prompt_jsonl(_lines(tmp_path, json.dumps({"prompt": "q"}), json.dumps(empty), name="prompts.jsonl"))


# ---------------------------------------------------------------- synthetic task


def test_property_score_by_hand():
    assert property_score("happy sunny calm warm kind merry") == 1.0
    assert property_score("fish wave boat sand shell tide") == 0.0
    assert property_score("fish Happy, wave sunny boat sand") == pytest.approx(2 / 6)
    assert property_score("happy") == pytest.approx(1 / LIST_LEN)  # short answers cannot win
    assert property_score("happy " * 12) == 1.0 and property_score("") == 0.0


def test_synthetic_records_are_deterministic_mixed_and_short(tmp_path, tiny_sp):
    sft = make_sft_records(400, seed=0)
    assert sft == make_sft_records(400, seed=0) and sft != make_sft_records(400, seed=1)
    scores = [property_score(r["response"]) for r in sft]
    assert 0.25 < sum(scores) / len(scores) < 0.5  # mixed quality: room for PPO to improve
    assert min(scores) == 0.0 and max(scores) == 1.0 and sum(s >= 0.5 for s in scores) > 50
    pairs = make_preference_pairs(300, seed=0)
    assert all(property_score(p["chosen"]) > property_score(p["rejected"]) for p in pairs)
    assert len({p["chosen"] for p in pairs}) > 250
    prompts = make_prompts(20, seed=0)
    assert len(prompts) == 20 and all(p["prompt"].startswith("Write a word list about ") for p in prompts)
    template = get_template("stackllama")
    assert max(len(encode_sft(tiny_sp, template, r, 1000)[0]) for r in sft) < 48
    loaded = read_sft_jsonl(write_jsonl(tmp_path / "sft.jsonl", sft[:5]))
    assert loaded[0] == SFTExample((Message("user", sft[0]["prompt"]),), sft[0]["response"])


def test_sft_dataset_counts_the_examples_it_cuts(tiny_sp):
    """Examples longer than seq_len + 1 were cut without a word (95% of every response dropped)."""
    template = get_template("plain")
    examples = [SFTExample((Message("user", "hi"),), "word " * n) for n in (2, 200, 300)]
    built = SFTDataset.build(examples, tiny_sp, template, seq_len=32)
    assert (built.cut, built.no_loss) == (2, 0)
    assert SFTDataset.build(examples[:1] * 8, tiny_sp, template, seq_len=32).cut == 0
