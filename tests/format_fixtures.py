"""Small files in the public datasets' published forms, built from the synthetic task.

No hub downloads here: each builder writes what the real dataset's rows look like (same keys, same
transcript / tree conventions), with the synthetic word-list task as content so a tiny replica of a
seed recipe has something learnable. Parquet files are written with pyarrow, as the hubs ship them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alfred_train.data.synthetic import make_preference_pairs, make_sft_records


def write(path: Path, rows: list[dict]) -> Path:
    """.parquet through pyarrow, .gz as gzipped JSONL, anything else as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh_rlhf_rows(n: int, seed: int = 0) -> list[dict]:
    """Anthropic/hh-rlhf: two transcripts, one earlier exchange, different last Assistant turns."""
    rows = []
    for pair in make_preference_pairs(n, seed):
        context = f"\n\nHuman: Hello.\n\nAssistant: Hello, how can I help?\n\nHuman: {pair['prompt']}"
        rows.append({"chosen": f"{context}\n\nAssistant: {pair['chosen']}",
                     "rejected": f"{context}\n\nAssistant: {pair['rejected']}"})
    return rows


def stack_exchange_rows(n: int, seed: int = 0) -> list[dict]:
    """lvwerra/stack-exchange-paired: question, date, response_j (preferred), response_k, scores."""
    return [{"qid": i, "question": p["prompt"], "date": "2023/01/01", "metadata": ["https://x.stackexchange.com"],
             "response_j": p["chosen"], "response_k": p["rejected"]}
            for i, p in enumerate(make_preference_pairs(n, seed))]


def dolly_rows(n: int, seed: int = 0) -> list[dict]:
    """databricks-dolly-15k: instruction, context (often empty), response, category."""
    return [{"instruction": r["prompt"], "context": "Use lowercase words." if i % 2 else "",
             "response": r["response"], "category": "brainstorming"}
            for i, r in enumerate(make_sft_records(n, seed))]


def oasst1_rows(n_trees: int, seed: int = 0, languages=("en", "fr")) -> list[dict]:
    """OpenAssistant/oasst1 flat table: per tree a prompt, two ranked replies, a follow-up prompt
    under the best reply and one reply to it. Tree t is in languages[t % len(languages)]."""
    rows = []
    for t, pair in enumerate(make_preference_pairs(n_trees, seed)):
        lang = languages[t % len(languages)]

        def msg(mid, parent, role, text, rank=None):
            rows.append({"message_id": f"t{t}-{mid}", "parent_id": parent and f"t{t}-{parent}",
                         "message_tree_id": f"t{t}-p", "role": role, "text": text, "lang": lang,
                         "rank": rank, "deleted": False, "review_result": True})

        msg("p", None, "prompter", pair["prompt"])
        msg("b", "p", "assistant", pair["rejected"], rank=1)  # file order is not rank order
        msg("a", "p", "assistant", pair["chosen"], rank=0)
        msg("q", "a", "prompter", "Another one, please.")
        msg("c", "q", "assistant", pair["chosen"])
    return rows
