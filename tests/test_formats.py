"""Public dataset formats (hh-rlhf, oasst1, dolly, stack-exchange-paired) in JSONL and Parquet,
format detection, bad records, weighted mixtures, and `alfred-train data inspect`. In-process, fast."""

from __future__ import annotations

import json
import logging

import pytest

from alfred_train import cli
from alfred_train.config import DataSource, load_config
from alfred_train.data import formats, mixture
from alfred_train.data.formats import BadRecords
from alfred_train.data.records import Message, PreferencePair, PromptExample, SFTExample
from alfred_train.data.templates import get_template, render_prompt
from alfred_train.errors import ConfigError
from tests import format_fixtures as fx
from tests.helpers import ROOT

TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")
U, A = "user", "assistant"


def read(path, kind, fmt="auto", skip=False, languages=()):
    bad = BadRecords(skip=skip)
    found_fmt, records = formats.read(path, fmt, kind, bad, languages)
    return found_fmt, records, bad.found


def test_hh_rlhf_pairs_sft_and_prompts_from_jsonl_and_parquet(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant: Blue.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant: No."}
    context = (Message(U, "Hi"), Message(A, "Hello!"), Message(U, "A colour?"))
    for name in ("hh.jsonl", "hh.parquet"):
        path = fx.write(tmp_path / name, [row])
        assert read(path, "preference") == ("hh-rlhf", [PreferencePair(context, "Blue.", "No.")], [])
        assert read(path, "sft")[1] == [SFTExample(context, "Blue.")]
        assert read(path, "prompt")[1] == [PromptExample(context)]
    # the reply after the last "Assistant:" keeps its inner blank lines
    row = {"chosen": "\n\nHuman: List two.\n\nAssistant: one\n\ntwo", "rejected": "\n\nHuman: List two.\n\nAssistant: "}
    pair = read(fx.write(tmp_path / "multi.jsonl", [row]), "preference")[1][0]
    assert (pair.chosen, pair.rejected) == ("one\n\ntwo", "")


def test_hh_rlhf_bad_records_name_file_line_and_can_be_skipped(tmp_path):
    good = fx.hh_rlhf_rows(2)
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}
    path = fx.write(tmp_path / "hh.jsonl", [good[0], differ, {"chosen": good[1]["chosen"]}, good[1]])
    with pytest.raises(ConfigError) as err:
        read(path, "preference")
    assert str(err.value).startswith(f"{path}:2: 'chosen' and 'rejected' differ before their last Assistant turn")
    assert "data.skip_bad_records: true" in str(err.value) and "\n" not in str(err.value)
    fmt, records, found = read(path, "preference", skip=True)
    assert len(records) == 2 and [f.split(": ")[0] for f in found] == [f"{path}:2", f"{path}:3"]
    assert "missing 'rejected'" in found[1]
    not_a_transcript = fx.write(tmp_path / "x.parquet", [{"chosen": "hello", "rejected": "there"}])
    with pytest.raises(ConfigError, match=r"x.parquet:row 1: 'chosen' is not a Human/Assistant transcript"):
        read(not_a_transcript, "preference", fmt="hh-rlhf")
    two_humans = {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}
    with pytest.raises(ConfigError, match=r"'chosen' turn 2 should be 'Assistant:'"):
        read(fx.write(tmp_path / "y.jsonl", [two_humans]), "preference")


def test_oasst1_best_path_threads_ranked_pairs_prompts_and_languages(tmp_path):
    rows = fx.oasst1_rows(2)  # tree 0 in en, tree 1 in fr
    rows.append({**rows[0], "message_id": "t0-gone", "parent_id": "t0-p", "rank": None, "text": "deleted reply",
                 "role": "assistant", "deleted": True})
    rows.append({**rows[0], "message_id": "t0-r2", "parent_id": "t0-p", "role": "assistant", "text": "third",
                 "rank": 2})
    path = fx.write(tmp_path / "oasst1.parquet", rows)
    by_id = {r["message_id"]: r["text"] for r in rows}
    p0, a0, b0, q0, c0 = (by_id[f"t0-{k}"] for k in "pabqc")
    fmt, sft, _ = read(path, "sft")
    assert fmt == "oasst1" and len(sft) == 4  # two assistant turns on each tree's best path
    assert sft[0] == SFTExample((Message(U, p0),), a0)  # rank 0 although second in the file
    assert sft[1] == SFTExample((Message(U, p0), Message(A, a0), Message(U, q0)), c0)
    pairs = read(path, "preference")[1]
    assert pairs[:3] == [PreferencePair((Message(U, p0),), a0, b0), PreferencePair((Message(U, p0),), a0, "third"),
                         PreferencePair((Message(U, p0),), b0, "third")]  # 3 ranked replies: 3 pairs
    assert len(pairs) == 4 and all("deleted reply" not in (p.chosen, p.rejected) for p in pairs)
    prompts = read(path, "prompt")[1]
    assert prompts[:2] == [PromptExample((Message(U, p0),)), PromptExample((Message(U, p0), Message(A, a0), Message(U, q0)))]
    french = read(path, "sft", languages=("fr",))[1]
    assert len(french) == 2 and french[0].context[0].content == by_id["t1-p"]


def test_oasst1_bad_rows(tmp_path):
    rows = fx.oasst1_rows(1)
    orphan = {**rows[1], "message_id": "x", "parent_id": "nowhere"}
    no_text = {k: v for k, v in rows[2].items() if k != "text"}
    reply_to_reply = {**rows[1], "message_id": "y", "parent_id": rows[1]["message_id"]}
    path = fx.write(tmp_path / "oasst1.jsonl", [*rows, orphan, no_text, reply_to_reply])
    _, records, found = read(path, "sft", skip=True)
    assert found == [f"{path}:7: 'text' missing (oasst1 rows need 'message_id', 'parent_id', 'role' (prompter|assistant) and 'text')",
                     f"{path}:6: parent_id 'nowhere' is not in the file",
                     f"{path}:8: a assistant message replies to a assistant message (roles must alternate)"]
    assert len(records) == 2


def test_oasst1_nan_ranks_repeated_ids_and_parent_loops(tmp_path):
    """A NaN rank (pandas' null) was a traceback; a repeated message_id multiplied the records (a file
    read twice: 100 pairs became 800); a parent_id loop hung the reader forever."""
    rows = fx.oasst1_rows(2)
    pairs = read(fx.write(tmp_path / "once.jsonl", rows), "preference")[1]
    nan = [{**r, "rank": float("nan")} if r["rank"] is None else r for r in rows]
    assert read(fx.write(tmp_path / "nan.jsonl", nan), "preference")[1] == pairs
    twice = fx.write(tmp_path / "twice.jsonl", rows + rows)
    _, records, found = read(twice, "preference", skip=True)
    assert records == pairs and len(found) == len(rows)
    assert found[0] == f"{twice}:{len(rows) + 1}: message_id {rows[0]['message_id']!r} repeats the one of {twice}:1"
    loop = [{**rows[0], "message_id": "a", "parent_id": "b", "role": "prompter"},
            {**rows[1], "message_id": "b", "parent_id": "a"}]
    loops = fx.write(tmp_path / "loop.jsonl", rows + loop)
    _, records, found = read(loops, "preference", skip=True)
    assert records == pairs and found == [
        f"{loops}:{len(rows) + i}: its chain of parent_ids loops (through message_id {m!r}) and reaches no root"
        for i, m in ((1, "a"), (2, "b"))], found


def test_a_held_out_fraction_keeps_conversations_whole(tmp_path):
    """valid_fraction was drawn record by record: every held-out oasst1 pair had its prompt and both
    replies in training pairs, and a record repeated in the file was in both sets."""
    rows = fx.oasst1_rows(20)
    for r in rows:
        if r["parent_id"] is None:
            r["text"] += f" ({r['message_tree_id']})"  # 20 distinct trees
    path = fx.write(tmp_path / "oasst1.jsonl", [*rows, *({**r, "message_id": f"{r['message_id']}-b", "rank": 2,
                                                          "text": "another reply"} for r in rows if r["rank"] == 1)])
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={path}", "data.valid_fraction=0.25"])
    train, valid = mixture.load_train_valid(cfg.data, "preference", seed=0)  # 3 pairs per prompt
    assert len(valid) == 15 and not {r.context for r in valid} & {r.context for r in train}
    # SFT examples at every depth of one tree stay on one side: a held-out follow-up's context held
    # the first reply it trained on
    train, valid = mixture.load_train_valid(cfg.data, "sft", seed=0)
    assert any(len(r.context) > 1 for r in valid) and len(valid) == 10  # 5 trees x 2 turns
    assert not {r.context[0] for r in valid} & {r.context[0] for r in train}
    repeated = fx.write(tmp_path / "twice.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(40)] * 2)
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={repeated}", "data.valid_fraction=0.1"])
    train, valid = mixture.load_train_valid(cfg.data, "sft", seed=0)
    assert len(valid) == 8 and not {r.context for r in valid} & {r.context for r in train}
    # across a mixture too: the same records in two entries (a file and its Parquet copy) were held out
    # of one and trained on from the other, 38 of 40 held-out SFT examples
    copy = fx.write(tmp_path / "twice.parquet", [{"prompt": f"p{i}", "response": "r"} for i in range(40)] * 2)
    mix = f"data.train=[{{path: {repeated}, weight: 1}}, {{path: {copy}, weight: 1}}]"
    train, valid = mixture.load_train_valid(load_config(TINY_SFT, ["data.synthetic=false", mix,
                                                                   "data.valid_fraction=0.1"]).data, "sft", seed=0)
    assert valid and not {r.context for r in valid} & {r.context for r in train}


def test_dolly_folds_context_into_the_prompt_and_has_no_pairs(tmp_path):
    path = fx.write(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}])
    fmt, sft, _ = read(path, "sft")
    assert fmt == "dolly" and sft == [SFTExample((Message(U, "Summarise.\n\nA long text."),), "Short."),
                                      SFTExample((Message(U, "Say hi."),), "Hi.")]
    assert read(path, "prompt")[1][0] == PromptExample((Message(U, "Summarise.\n\nA long text."),))
    with pytest.raises(ConfigError, match=r"dolly.jsonl \(told by its keys\): dolly has no preference pairs; "
                                          r"use a file in one of records, hh-rlhf, oasst1, stack-exchange-paired"):
        read(path, "preference")
    # an empty instruction is an SFT example (its response teaches), but no prompt: the policy answered the template
    blank = fx.write(tmp_path / "blank.jsonl", [{"instruction": " ", "context": "", "response": "Hi.", "category": "x"}])
    assert len(read(blank, "sft")[1]) == 1
    assert read(blank, "prompt", skip=True)[2] == [f"{blank}:1: the prompt is empty (only whitespace); fill it or "
                                                   "remove the record"]


def test_alpaca_json_arrays_and_sharegpt_conversations(tmp_path):
    """Alpaca as published (alpaca_data.json: one indented JSON array; the hub's parquet) and Vicuna's
    ShareGPT dumps read as themselves; they said "no JSON object" and "cannot tell the data format"."""
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "input": "",
                                                                       "output": "Hi."}]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(rows, indent=4))
    for path in (array, fx.write(tmp_path / "alpaca.parquet", rows)):
        fmt, sft, _ = read(path, "sft")
        assert fmt == "alpaca" and sft == [SFTExample((Message(U, "Add.\n\n2 and 3"),), "5"),
                                           SFTExample((Message(U, "Say hi."),), "Hi.")]
        assert read(path, "prompt")[1][1] == PromptExample((Message(U, "Say hi."),))
    found = read(array, "sft", fmt="alpaca", skip=True)
    assert len(found[1]) == 2
    array.write_text(json.dumps(rows + [{"instruction": "No output."}]))
    assert read(array, "sft", skip=True)[2] == [f"{array}:item 3: missing 'output' ({formats.ALPACA_FORM})"]
    array.write_text('[{"instruction": "x", "output": "y"},\n')
    with pytest.raises(ConfigError, match=r"alpaca_data.json: an invalid JSON array \(Expecting value at line 2"):
        read(array, "sft")
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
             {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye?"}, {"from": "gpt", "value": "Bye"},
             {"from": "human", "value": "unanswered"}]
    path = fx.write(tmp_path / "sharegpt.jsonl", [{"id": "a", "conversations": turns},
                                                  {"id": "b", "conversations": turns[:1]},
                                                  {"id": "c", "conversations": turns[1:3] + turns[2:3]}])
    fmt, sft, bad = read(path, "sft", skip=True)
    context = (Message("system", "Be brief."), Message(U, "Hi"), Message(A, "Hello"), Message(U, "Bye?"))
    assert fmt == "sharegpt" and sft == [SFTExample(context, "Bye")]
    assert bad == [f"{path}:2: 'conversations' has no gpt reply ({formats.SHAREGPT_FORM})",
                   f"{path}:3: conversations[2], the last reply, follows a gpt turn, not a human turn "
                   f"({formats.SHAREGPT_FORM})"]
    assert read(path, "prompt", skip=True)[1] == [PromptExample(context + (Message(A, "Bye"), Message(U, "unanswered"))),
                                                  PromptExample((Message(U, "Hi"),))]
    with pytest.raises(ConfigError, match=r"sharegpt has no preference pairs"):
        read(path, "preference")


def test_empty_files_and_files_of_non_objects_say_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"empty.jsonl is empty: it holds no records; check the data.\* paths"):
        formats.detect(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match=r"empty.parquet is empty"):
        formats.detect(fx.write(tmp_path / "empty.parquet", []))
    (tmp_path / "texts.jsonl").write_text('"a"\n"b"\n')
    with pytest.raises(ConfigError, match=r"no JSON object to tell its format by \(its rows are strs\); write one "
                                          r"JSON object per record"):
        formats.detect(tmp_path / "texts.jsonl")


def test_stack_exchange_paired_and_the_stackllama_template(tmp_path):
    path = fx.write(tmp_path / "se.parquet", fx.stack_exchange_rows(3))
    row = fx.stack_exchange_rows(3)[0]
    fmt, pairs, _ = read(path, "preference")
    assert fmt == "stack-exchange-paired" and pairs[0] == PreferencePair((Message(U, row["question"]),),
                                                                         row["response_j"], row["response_k"])
    sft = read(path, "sft")[1][0]
    text = render_prompt(get_template("stackllama"), sft)
    # TRL's prepare_sample_text: f"Question: {question}\n\nAnswer: {response_j}"
    assert text.prompt + text.response == f"Question: {row['question']}\n\nAnswer: {row['response_j']}"
    assert read(path, "prompt")[1][1] == PromptExample((Message(U, fx.stack_exchange_rows(3)[1]["question"]),))


def test_stable_vicuna_template():
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]}
    text = render_prompt(get_template("stable-vicuna"), record)
    assert text.prompt == "### Human: Hi\n### Assistant: Hello\n### Human: Bye?\n### Assistant:"


def test_detection_by_keys_and_records_as_every_kind(tmp_path):
    built = {"hh-rlhf": fx.hh_rlhf_rows(2), "oasst1": fx.oasst1_rows(1), "dolly": fx.dolly_rows(2),
             "stack-exchange-paired": fx.stack_exchange_rows(2),
             "records": [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]}
    for fmt, rows in built.items():
        assert formats.detect(fx.write(tmp_path / f"{fmt}.parquet", rows)) == fmt
        assert formats.detect(fx.write(tmp_path / f"{fmt}.jsonl", rows)) == fmt
    # a chat-form pair gives an SFT example (chosen) and a prompt (context), as hh-rlhf does
    assert read(tmp_path / "records.jsonl", "sft")[1] == [SFTExample((Message(U, "q"),), "a")]
    assert read(tmp_path / "records.jsonl", "prompt")[1] == [PromptExample((Message(U, "q"),))]
    with pytest.raises(ConfigError, match=r"odd.jsonl:1: cannot tell the data format from the keys \['text'\]; "
                                          r"set data.format to one of records, hh-rlhf"):
        formats.detect(fx.write(tmp_path / "odd.jsonl", [{"text": "x"}]))
    with pytest.raises(ConfigError, match=r"unknown file type '.csv'; use .jsonl, .jsonl.gz or .parquet"):
        formats.detect(fx.write(tmp_path / "data.csv", [{"text": "x"}]))
    (tmp_path / "shards.jsonl").mkdir()  # it said "does not exist"
    with pytest.raises(ConfigError, match=r"shards.jsonl is a directory; name its files \(a glob such as"):
        formats.detect(tmp_path / "shards.jsonl")


def test_mixture_config_weights_and_held_out_split(tmp_path, caplog):
    distinct = {"question": lambda r, i: {**r, "question": f"{r['question']} ({i})"},  # one context each
                "chosen": lambda r, i: {k: v.replace("Hello.", f"Hello {i}.") for k, v in r.items()},
                "instruction": lambda r, i: {**r, "instruction": f"{r['instruction']} ({i})"}}
    se, hh, dolly = (fx.write(tmp_path / name, [distinct[key](r, i) for i, r in enumerate(rows)]) for name, key, rows in [
        ("se.parquet", "question", fx.stack_exchange_rows(40)), ("hh.jsonl", "chosen", fx.hh_rlhf_rows(20)),
        ("dolly.jsonl", "instruction", fx.dolly_rows(10))])
    cfg = load_config(TINY_SFT, ["data.synthetic=false", "data.valid_fraction=0.1",
                                 f"data.train=[{{path: {se}, weight: 0.5}}, {{path: {hh}, format: hh-rlhf, weight: 2}},"
                                 f" {{path: {dolly}}}]"])
    assert cfg.data.train[1] == DataSource(str(hh), "hh-rlhf", 2.0)
    with caplog.at_level(logging.INFO, logger="alfred_train"):
        train, valid = mixture.load_train_valid(cfg.data, "sft", seed=3)
    # held out first (4 + 2 + 1), then weighted: 36 * 0.5 + 18 * 2 + 9 * 1
    assert (len(train), len(valid)) == (18 + 36 + 9, 7)
    assert not {id(r) for r in valid} & {id(r) for r in train}  # an up-weighted record never on both sides
    assert "hh.jsonl (hh-rlhf, weight 2): 18 records -> 36 (57%)" in caplog.text
    again, _ = mixture.load_train_valid(cfg.data, "sft", seed=3)
    assert again == train  # seeded
    single = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={hh}"])
    assert single.data.train == str(hh) and len(mixture.load(single.data.train, "preference", single.data, 0, "t")) == 20
    for override, message in [(f"data.train=[{{path: {se}, weight: 0}}]", r"data.train\[0\].weight: must be > 0"),
                              (f"data.train=[{{path: {se}, wieght: 1}}]", r"data.train\[0\].wieght: unknown key"),
                              ("data.train=[]", "data.train: an empty mixture")]:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY_SFT, ["data.synthetic=false", override])


def test_gzip_jsonl_and_globbed_shards_as_the_hubs_ship_them(tmp_path):
    import gzip

    rows = fx.hh_rlhf_rows(6)
    for part in ("helpful-base", "harmless-base"):  # Anthropic/hh-rlhf: <subset>/train.jsonl.gz
        (tmp_path / part).mkdir()
        with gzip.open(tmp_path / part / "train.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={tmp_path}/*/train.jsonl.gz"])
    assert len(mixture.load(cfg.data.train, "preference", cfg.data, 0, "data.train")) == 6
    with pytest.raises(ConfigError, match=r"nowhere/\*.parquet matches no file"):
        mixture.load(f"{tmp_path}/nowhere/*.parquet", "sft", cfg.data, 0, "data.train")


def test_every_line_ending_reads_as_lines(tmp_path):
    records = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() for i in range(3)]
    for name, end in (("unix", b"\n"), ("windows", b"\r\n"), ("classic-mac", b"\r")):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(end.join(records) + end)
        _, got, _ = read(path, "sft")
        assert [r.context[0].content for r in got] == ["q0", "q1", "q2"], name  # a bare \r once made one line


def test_undecodable_lines_and_broken_gzip_are_one_line_errors(tmp_path, capsys):
    import gzip

    good = json.dumps({"prompt": "cafe", "response": "x"}).encode()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n' + good + b"\n")
    with pytest.raises(ConfigError) as err:
        read(latin1, "sft")
    assert str(err.value) == (f"{latin1}:1: not UTF-8 text (byte 0xe9 at column 16); re-save the file as UTF-8 "
                              "(fix it, or set data.skip_bad_records: true to skip such records)")
    fmt, records, found = read(latin1, "sft", skip=True)  # one bad line is one skipped record
    assert len(records) == 1 and records[0].context[0].content == "cafe" and found[0].startswith(f"{latin1}:1: ")
    not_gz = tmp_path / "not.jsonl.gz"
    not_gz.write_bytes(good + b"\n")
    with pytest.raises(ConfigError, match=r"not.jsonl.gz is not gzip-compressed; rename it to not.jsonl"):
        read(not_gz, "sft")
    whole = gzip.compress(b"".join(good + b"\n" for _ in range(2000)))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=r"cut.jsonl.gz:\d+: the gzip stream ends early \(truncated\)"):
        read(truncated, "sft", skip=True)  # the rest of the file is lost: skipping cannot help
    for path in (not_gz, truncated):  # the CLI: one line, exit 2
        assert cli.main(["data", "inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"alfred-train: error: data file {path}") and len(err.splitlines()) == 1


def test_ppo_prompts_default_to_the_contexts_of_train(tmp_path):
    hh = fx.write(tmp_path / "hh.parquet", fx.hh_rlhf_rows(6))
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={hh}"])
    train, held = mixture.load_prompts(cfg.data, seed=0, held_out=2)
    assert len(train) == 4 and len(held) == 2 and held[0].context[-1].content.startswith("Write a word list")


def test_held_out_ppo_prompts_are_not_trained_on(tmp_path):
    """They were drawn after the weights copied records and the files were shuffled together: with
    weight 2, 20 of 32 held-out prompts were training prompts too. A prompt repeated in the file
    (one question, several answer pairs) is one prompt: held out or trained on, never both."""
    rows = [{"prompt": f"Write word list {i}."} for i in range(6)]
    a = fx.write(tmp_path / "a.jsonl", rows + rows)  # every prompt twice
    b = fx.write(tmp_path / "b.jsonl", [{"prompt": f"Name colour {i}."} for i in range(12)])
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.prompts=[{{path: {a}, weight: 2}}, {{path: {b}}}]"])
    train, held = mixture.load_prompts(cfg.data, seed=0, held_out=4)
    held_texts = {p.context[-1].content for p in held}
    assert len(held_texts) == 4 and not held_texts & {p.context[-1].content for p in train}
    from_a = sum(text.startswith("Write") for text in held_texts)
    assert len(train) == 2 * 2 * (6 - from_a) + (12 - (4 - from_a)), (len(train), from_a)


def test_rm_on_dolly_is_refused_at_config_time(tmp_path, capsys):
    dolly = fx.write(tmp_path / "dolly.jsonl", fx.dolly_rows(4))
    code = cli.main(["rm", TINY_SFT, "data.synthetic=false", f"data.train=[{{path: {dolly}, format: dolly}}]",
                     "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "data.train[0].format: dolly has no preference pairs" in err and "Traceback" not in err
    assert cli.main(["sft", TINY_SFT, "data.synthetic=false", f"data.train={dolly}", "data.format=dolly",
                     "train.micro_batch_size=1", "train.global_batch_size=1", "--dry-run"]) == 0  # 4 rows, read


def test_data_inspect_counts_histogram_examples_and_bad_records(tmp_path, capsys):
    rows = fx.hh_rlhf_rows(12)
    rows[4] = {"chosen": rows[4]["chosen"]}
    path = fx.write(tmp_path / "hh.parquet", rows)
    code = cli.main(["data", "inspect", str(path), "--template", "tulu"])
    out = capsys.readouterr().out
    assert code == 2
    assert f"{path}: format hh-rlhf (told by its keys), preference pairs, template tulu" in out
    assert "records: 11 (1 bad, listed below)" in out
    assert out.count("--- example") == 3 and "<|user|>\nHello.\n<|assistant|>\nHello, how can I help?\n" in out
    assert out.count(" | ") == 10 and "median" in out
    assert f"{path}:row 5: missing 'rejected'" in out
    good = fx.write(tmp_path / "dolly.jsonl", fx.dolly_rows(5))
    assert cli.main(["data", "inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "format dolly (told by its keys), SFT examples" in out and "records: 5\n" in out
    assert "Question: Write a word list" in out  # the stackllama default template


def test_synthetic_stages_still_read_as_before(tmp_path):
    # the single-file path keeps the old split: same seed, same held-out records
    from alfred_train.data.synthetic import make_sft_records

    path = tmp_path / "sft.jsonl"  # distinct prompts: a context repeated is held out whole (see below)
    path.write_text("".join(json.dumps({**r, "prompt": f"{r['prompt']} ({i})"}) + "\n"
                            for i, r in enumerate(make_sft_records(40, 0))))
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train={path}", "data.valid_fraction=0.25"])
    train, valid = mixture.load_train_valid(cfg.data, "sft", seed=1234)
    import random
    order = list(range(40))
    random.Random(1234).shuffle(order)
    records = read(path, "sft")[1]
    assert valid == [records[i] for i in order[:10]] and train == [records[i] for i in order[10:]]


def test_a_bad_record_stops_a_stage_with_one_line_and_exit_2(tmp_path):
    from tests.helpers import run_cli

    rows = fx.stack_exchange_rows(8)
    rows[2] = {k: v for k, v in rows[2].items() if k != "response_k"}
    path = fx.write(tmp_path / "se.parquet", rows)
    proc = run_cli("rm", TINY_SFT, "parallel.tp=1", "data.synthetic=false", f"data.train={path}",
                   f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"alfred-train: error: {path}:row 3: missing 'response_k' (stack-exchange-paired needs "
                      "'question', 'response_j' and 'response_k' strings) (fix it, or set "
                      "data.skip_bad_records: true to skip such records)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()  # nothing built, nothing written


def test_windows_bom_and_lone_surrogates_in_jsonl_and_json_arrays(tmp_path):
    """A BOM (Notepad, PowerShell) made record 1 invalid JSON, and a whole .json array unreadable; a
    lone surrogate escape (a string cut through an emoji) passed reading and crashed the tokenizer."""
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for name in ("bom.jsonl", "bom.json"):
        assert read(tmp_path / name, "sft")[1] == [SFTExample((Message(U, f"q{i}"),), f"a{i}") for i in range(3)], name
    cut = lines.replace('"a1"', '"a1 \\ud83d"')  # valid JSON, no encodable text
    (tmp_path / "cut.jsonl").write_text(cut)
    (tmp_path / "cut.json").write_text(json.dumps(rows).replace('"a1"', '"a1 \\ud83d"'))
    for name, where in (("cut.jsonl", "cut.jsonl:2"), ("cut.json", "cut.json:item 2")):
        with pytest.raises(ConfigError, match=rf"{where}: holds an unpaired UTF-16 surrogate \(\\ud83d"):
            read(tmp_path / name, "sft")
        _, records, bad = read(tmp_path / name, "sft", skip=True)
        assert len(records) == 2 and len(bad) == 1


def test_a_damaged_parquet_page_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [f"question {i} " * 20 for i in range(400)],
                             "response": [f"answer {i} " * 20 for i in range(400)]}), path, row_group_size=100)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):  # the footer (metadata) stays whole
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"d.parquet: rows after \d+ cannot be read"):
        read(path, "sft", fmt="records")


def test_an_existing_file_with_glob_characters_is_read_as_itself(tmp_path):
    path = fx.write(tmp_path / "sft[v2].jsonl", [{"prompt": "q", "response": "a"}])
    assert mixture.paths(str(path)) == [str(path)]
    cfg = load_config(TINY_SFT, ["data.synthetic=false", f"data.train='{path}'"])
    assert mixture.unreachable(cfg.data.train, cfg.data.format, "data.train") == []
    with pytest.raises(ConfigError, match=r"data.train\[0\].weight: expected a finite number, got inf"):
        load_config(TINY_SFT, ["data.synthetic=false", f"data.train=[{{path: '{path}', weight: .inf}}]"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].weight: must be > 0 and at most 1000"):
        load_config(TINY_SFT, ["data.synthetic=false", f"data.train=[{{path: '{path}', weight: 1e6}}]"])


def test_gzip_or_parquet_under_a_jsonl_name_and_an_inspect_of_nothing(tmp_path, capsys):
    """Both read as "not UTF-8 text; re-save as UTF-8"; `data inspect` exited 0 on a file the run refuses."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_bytes(gzip.compress(b'{"prompt": "q", "response": "a"}\n'))
    pq.write_table(pa.table({"prompt": ["q"], "response": ["a"]}), tmp_path / "b.jsonl")
    for name, words in (("a.jsonl", "is gzip-compressed; rename it to a.jsonl.gz"),
                        ("b.jsonl", "is a Parquet file; rename it to b.parquet")):
        with pytest.raises(ConfigError, match=words):
            read(tmp_path / name, "sft")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert cli.main(["data", "inspect", str(blank), "--format", "records", "--kind", "sft"]) == 2
    err = capsys.readouterr().err
    assert "gives no SFT examples" in err and len(err.strip().splitlines()) == 1, err


def test_oasst1_trees_export_and_a_large_valid_fraction_are_named(tmp_path):
    from alfred_train.data.sampler import check_enough

    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export",
            "prompt": {"message_id": "m1", "role": "prompter", "text": "Hi", "replies": []}}
    path = fx.write(tmp_path / "2023-04-12_oasst_ready.trees.jsonl", [tree])
    with pytest.raises(ConfigError, match=r"trees.jsonl:1: an oasst1 trees export .* use the flat message table"):
        formats.detect(path)
    with pytest.raises(ConfigError, match=r"lower the batch size, lower data.valid_fraction \(0.99 is held out\)"):
        check_enough(2, 4, 0.99)
