"""`alfred-train generate`: sample completions from any of our checkpoints at any TP/PP.

    alfred-train generate CKPT_DIR [parallel.tp=2 parallel.pp=2] --prompts IN.jsonl --output OUT.jsonl
        [--max-new-tokens N] [--greedy | --temperature T --top-p P --top-k K] [--template NAME]
        [--batch-size B] [--compile-decode]

(`parallel.*` overrides come right after CKPT_DIR, as they follow CONFIG in `alfred-train sft`.)

CKPT_DIR is a checkpoint, a `checkpoints/` root or a run directory (the latest checkpoint). The
model is rebuilt from the checkpoint alone: `meta.json` state.model (the ModelShape) and
state.tokenizer (else the tiny shipped tokenizer, or --tokenizer), then the model named by --model
(default `policy`) is loaded, resharded to the requested layout. With tp * pp > 1 and no launcher,
local worker processes are spawned. --batch-size rows decode together, continuously batched (a
row whose completion ends takes the next prompt at once); each prompt's draws are keyed by its
index in the file, so the output does not depend on --batch-size.

Input records: {"prompt": "text"} (or chat `messages`), rendered through --template (default: the
template recorded in the run's config.yaml next to the checkpoint, else `plain`) and encoded as
[BOS] + tokens; or {"prompt_ids": [ids]} used as given. Output records, in input order:
{"prompt", "completion", "completion_ids" (without the EOD), "finish_reason": "eod" | "length"}.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from alfred_train.errors import ConfigError

SAMPLING_FLAGS = ("temperature", "top_p", "top_k")
QUEUE_CHUNK = 32  # prompts per continuously batched queue: 32 x --batch-size


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample completions for a JSONL prompt file from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint dir, checkpoints/ root or run dir")
    p.add_argument("overrides", nargs="*", metavar="parallel.KEY=VALUE",
                   help="layout, right after CHECKPOINT: e.g. parallel.tp=2 parallel.pp=2")
    p.add_argument("--prompts", required=True, help="JSONL: {'prompt': text} or {'prompt_ids': [ids]} per line")
    p.add_argument("--output", required=True, help="JSONL written with prompt, completion, completion_ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling options)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, help="0 = off")
    p.add_argument("--template", help="prompt template (default: the run's data.template, else plain)")
    p.add_argument("--model", default="policy", help="model name inside the checkpoint")
    p.add_argument("--tokenizer", help="tokenizer file/dir (default: the one recorded in the checkpoint)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows decoded together; a row whose completion ends takes the next prompt at once")
    p.add_argument("--compile-decode", action="store_true",
                   help="CPU: compile the decode step with torch.compile (as ppo.compile_decode; ~10-20 s once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU")
    p.add_argument("--attention-backend", default="sdpa", help="sdpa | eager (generation needs padding masks)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from alfred_train.checkpoint import resolve_checkpoint
    from alfred_train.parallel.init import detect_launch_env
    from alfred_train.parallel.spawn import LAUNCHER_PID

    parallel = parallel_config(args.overrides)
    sampling_params(args)  # refuse bad flags before any process starts
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output(args.prompts, args.output)
    ckpt = resolve_checkpoint(args.checkpoint)
    inputs = None
    if detect_launch_env().rank == 0 and LAUNCHER_PID not in os.environ:  # not again in our own workers
        check_checkpoint(ckpt, args.model)
        inputs = read_inputs(args, ckpt)  # tokenizer, template and prompts, before a process starts or a model is built
    world = parallel.tp * parallel.pp
    if world > 1 and detect_launch_env().launcher == "single":
        from alfred_train.parallel.spawn import spawn_local

        return spawn_local(_argv(args), world)
    return _run_worker(args, parallel, inputs)


def check_checkpoint(ckpt: Path, model: str) -> None:
    """`ckpt` against its manifest, then the LoRA bases its `model` loads: a corrupted checkpoint
    generated wrong text (exit 0), a truncated one died in a traceback."""
    from alfred_train.checkpoint import read_meta
    from alfred_train.checkpointing import manifest
    from alfred_train.models import lora_checkpoint

    manifest.refuse_damaged(ckpt, named="", fix="generate from a sound checkpoint", before="loading")
    meta = read_meta(ckpt)
    if model not in (held := meta.get("models") or []):
        raise ConfigError(f"--model {model}: {ckpt} holds {held}; pick one of them with --model")
    lora_checkpoint.check_bases(ckpt, meta, [model], named="", verify=True)


def check_output(prompts: str, output: str) -> None:
    """Refuse an --output that would overwrite the --prompts file, or that cannot be written."""
    from alfred_train.atomic import check_writable

    out, src = Path(output), Path(prompts)
    check_writable(out, "--output", ".jsonl file")  # here, not after the whole decode
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise ConfigError(f"--output {output} is the --prompts file and would overwrite it; "
                          "write the completions to another path")


def parallel_config(overrides: list[str]):
    """`parallel.*` overrides -> ParallelConfig (strict, same parser as run configs); dp must be 1."""
    from alfred_train.config import ParallelConfig, from_dict, load_dict

    data = load_dict(None, overrides)
    other = sorted(set(data) - {"parallel"})
    if other:
        raise ConfigError(f"generate takes only parallel.* overrides, got {', '.join(other)}")
    parallel = from_dict(ParallelConfig, data.get("parallel", {}), "parallel")
    if parallel.dp != 1 or parallel.vpp is not None or parallel.sequence_parallel:
        raise ConfigError("generate runs one replica without virtual stages or sequence parallelism: "
                          "set parallel.dp=1, parallel.vpp=null, parallel.sequence_parallel=false")
    return parallel


def sampling_params(args):
    from alfred_train.ppo.generation import SamplingParams

    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.greedy and given:
        raise ConfigError(f"--greedy takes no sampling options; drop {', '.join(given)} or --greedy")
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0, greedy=args.greedy)


def _argv(args) -> list[str]:
    argv = ["generate", args.checkpoint, *args.overrides, "--prompts", args.prompts, "--output", args.output,
            "--max-new-tokens", str(args.max_new_tokens), "--min-new-tokens", str(args.min_new_tokens),
            "--model", args.model, "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--precision", args.precision, "--attention-backend", args.attention_backend]
    for flag in ("greedy", "compile_decode"):
        if getattr(args, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    for name in (*SAMPLING_FLAGS, "template", "tokenizer"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


@dataclass(frozen=True)
class PromptRecord:
    text: str  # the prompt as given (or rendered / decoded)
    ids: list[int]  # what the model conditions on


def read_prompts(path: str | Path, tokenizer, template, max_len: int) -> list[PromptRecord]:
    """Prompt records of a JSONL file; errors name file:line. Prompts keep their last max_len tokens."""
    from alfred_train.data.datasets import encode_prompt
    from alfred_train.data.files import jsonl_rows
    from alfred_train.data.records import parse_prompt

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    records = []
    for row in jsonl_rows(path):
        where, obj = row.where, row.value
        if row.error:
            raise ConfigError(f"{where}: {row.error}")
        if isinstance(obj, dict) and "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not (isinstance(ids, list) and ids and all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size for i in ids)):
                raise ConfigError(f"{where}: prompt_ids must be a non-empty list of token ids in "
                                  f"[0, {tokenizer.vocab_size})")
            ids = ids[-max_len:]
            records.append(PromptRecord(obj.get("prompt") or tokenizer.decode(ids), ids))
        else:
            example = parse_prompt(obj, where)
            text = obj["prompt"] if isinstance(obj.get("prompt"), str) else template.render_context(example.context)
            records.append(PromptRecord(text, encode_prompt(tokenizer, template, example.context, max_len)))
    if not records:
        raise ConfigError(f"--prompts {path}: no records")
    return records


def left_pad(batch: list[list[int]], pad_id: int):
    """(ids (B, P), mask (B, P)) with each row right-aligned; P = the longest row."""
    import torch

    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def run_template(ckpt: Path) -> str:
    """data.template from the run's config.yaml (run_dir/checkpoints/iter_N), else `plain`."""
    import yaml

    config = ckpt.parent.parent / "config.yaml"
    if config.is_file():
        data = yaml.safe_load(config.read_text()) or {}
        name = (data.get("data") or {}).get("template")
        if isinstance(name, str):
            return name
    return "plain"


def read_inputs(args, ckpt: Path):
    """(tokenizer, prompt records): the tokenizer against the checkpoint's vocabulary, the template,
    every prompt line, and room for --max-new-tokens in the model's max_seq_len; no weight is read."""
    from alfred_train.data.templates import get_template
    from alfred_train.data.tokenizer import load_tokenizer
    from alfred_train.models.from_checkpoint import checkpoint_shape, checkpoint_tokenizer, load_meta

    path, meta = load_meta(ckpt)
    tokenizer = load_tokenizer(args.tokenizer or checkpoint_tokenizer(meta))
    shape = checkpoint_shape(path, meta)
    if tokenizer.vocab_size > shape.vocab_size:  # fewer: padded rows, never sampled
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids, more than the checkpoint's model "
                          f"({shape.vocab_size}): pass the training tokenizer with --tokenizer")
    max_prompt = shape.max_seq_len - args.max_new_tokens
    if max_prompt < 2:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                          f"model's max_seq_len ({shape.max_seq_len}); lower it")
    template = get_template(args.template or run_template(ckpt))
    return tokenizer, read_prompts(args.prompts, tokenizer, template, max_prompt)


def _load_policy(args, ckpt: Path, parallel, runtime):
    from alfred_train.models.build import unwrap
    from alfred_train.models.from_checkpoint import build_from_checkpoint

    bf16 = args.precision == "bf16" or (args.precision == "auto" and not runtime.cpu)
    chunks, _, _ = build_from_checkpoint(ckpt, parallel, runtime, name=args.model, kind="lm",
                                         backend_name=args.attention_backend, bf16=bf16)
    return [unwrap(c) for c in chunks]


def _run_worker(args, parallel, inputs=None) -> int:
    """inputs: `read_inputs`' (tokenizer, prompts) when this process has read them already."""
    import torch

    from alfred_train.checkpoint import resolve_checkpoint
    from alfred_train.data.datasets import write_jsonl
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown
    from alfred_train.ppo.generation import generate_all

    params = sampling_params(args)
    ckpt = resolve_checkpoint(args.checkpoint)
    runtime = init_runtime(ParallelDims(parallel.tp, parallel.pp, 1), backend=parallel.backend)
    try:
        tokenizer, prompts = inputs or read_inputs(args, ckpt)
        models = _load_policy(args, ckpt, parallel, runtime)
        out, useful, slot_steps = [], 0.0, 0
        # continuous batching: --batch-size rows decode together and a row that ends takes the queue's next
        # prompt; the queue is cut into chunks so that a huge prompt file is not padded and held at once
        chunk = args.batch_size * QUEUE_CHUNK
        for start in range(0, len(prompts), chunk):
            queue = prompts[start:start + chunk]
            ids, mask = left_pad([p.ids for p in queue], tokenizer.pad_id)
            keys = torch.arange(start, start + len(queue))  # a prompt's draws do not depend on --batch-size
            done = generate_all(models, runtime, ids, mask, params, eod_id=tokenizer.eod_id,
                                vocab_size=tokenizer.vocab_size, seed=args.seed, keys=keys, pad_id=tokenizer.pad_id,
                                slots=args.batch_size, compiled=args.compile_decode)
            useful, slot_steps = useful + float(done.response_mask.sum()), slot_steps + done.slot_steps
            for prompt, row, row_mask in zip(queue, done.response_ids.cpu(), done.response_mask.cpu()):
                tokens = row[row_mask.bool()].tolist()
                finished = bool(tokens) and tokens[-1] == tokenizer.eod_id
                tokens = tokens[:-1] if finished else tokens
                out.append({"prompt": prompt.text, "completion": tokenizer.decode(tokens),
                            "completion_ids": tokens, "finish_reason": "eod" if finished else "length"})
        if runtime.is_main:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(args.output, out)
            print(f"generate: {len(out)} completions written to {args.output} (slot utilisation "
                  f"{useful / max(slot_steps, 1):.0%}: completion tokens / rows x decode steps)", flush=True)
        torch.distributed.barrier()
        return 0
    finally:
        shutdown()
