"""Continuous batching vs static micro-batches on a realistic length mix, CPU.

    python bench/bench_continuous_batching.py [--prompts 64] [--rows 16] [--new-tokens 128] [--repeats 3] [--pp 2]

A length mix without a trained model: a tiny Llama (4 layers, hidden 128) over a 64-id vocabulary
with small weights samples nearly uniformly, so EOD (one id of 64) ends a response after a
geometric number of tokens: lengths spread from 1 to max_new_tokens (mean ~50 of 128, ~13% run to
the cap). The same prompts and seed go through both modes (same tokens per prompt, checked):

    static      --rows prompts at a time, each micro-batch held by its longest response
    continuous  --rows rows; a row that ends takes the next prompt at once

With --pp 2: two processes (gloo, one thread each), the model in two stages, both modes decoded
pipelined (`ppo/pipelined.py`: the rows as two groups in flight), and a third mode for reference:
continuous, not pipelined (each token through the stages one after the other).

Reported: useful tokens/s (response tokens up to EOD / wall time) and slot utilisation (useful
tokens / slot-steps); interleaved runs, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (one process each)")
    args = parser.parse_args()
    if args.pp > 1 and "RANK" not in os.environ:  # one process per stage, the same command line
        from alfred_train.parallel.spawn import spawn_local

        raise SystemExit(spawn_local(sys.argv[1:], args.pp, script=__file__))
    warnings.filterwarnings("ignore")

    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import ModelShape, build_model, unwrap
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo.generation import SamplingParams, generate_all

    runtime = init_runtime(ParallelDims(1, args.pp, 1))
    pipelined = args.pp > 1
    seed_everything(0, runtime)
    torch.set_num_threads(args.threads)
    shape = ModelShape(arch="llama", num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                       num_query_groups=4, vocab_size=64, padded_vocab_size=128,
                       max_seq_len=args.prompt_len + args.new_tokens, rotary_base=10000, norm_eps=1e-5,
                       parallel_layernorms=2, init_std=0.002)
    model = unwrap(build_model(shape, ParallelConfig(pp=args.pp), kind="lm", bf16=False,
                               backend=choose_backend("sdpa"), device=runtime.device, seed=1)[0])
    ids = torch.randint(3, 64, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    kw = dict(eod_id=2, vocab_size=shape.vocab_size, seed=5)

    def static():
        parts = [generate_all([model], runtime, ids[i:i + args.rows], mask[i:i + args.rows], params,
                              keys=torch.arange(i, min(i + args.rows, args.prompts)), pipelined=pipelined, **kw)
                 for i in range(0, args.prompts, args.rows)]
        width = args.new_tokens
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        return (torch.cat([pad(p.response_ids * p.response_mask) for p in parts]),
                torch.cat([pad(p.response_mask) for p in parts]), sum(p.slot_steps for p in parts))

    def continuous(pipelined=pipelined):
        g = generate_all([model], runtime, ids, mask, params, slots=args.rows, pipelined=pipelined, **kw)
        pad = lambda t: torch.nn.functional.pad(t, (0, args.new_tokens - t.shape[1]))  # noqa: E731
        return pad(g.response_ids * g.response_mask), pad(g.response_mask), g.slot_steps

    runs = {"static": static, "continuous": continuous}
    if pipelined:
        runs["cont. unpiped"] = lambda: continuous(pipelined=False)
    results = {k: fn() for k, fn in runs.items()}  # warm-up, and the tokens to compare
    same = all(torch.equal(results["static"][0], r[0]) and torch.equal(results["static"][1], r[1])
               for r in results.values())
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            if pipelined:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    shutdown()
    if runtime.rank != 0:
        return
    lengths = results["static"][1].sum(1).float()
    useful = float(lengths.sum())
    print(f"{args.prompts} prompts of {args.prompt_len} tokens, {args.rows} rows, up to {args.new_tokens} new tokens, "
          f"threads={args.threads}, pp={args.pp}{' (pipelined)' if pipelined else ''}; response lengths "
          f"min {int(lengths.min())} / median {int(lengths.median())} / max {int(lengths.max())}; "
          f"same tokens in every mode: {same}; median of {args.repeats} interleaved runs")
    head = f"{'mode':<14}{'seconds':>9}{'useful tok/s':>14}{'slot utilisation':>18}"
    print(head)
    print("-" * len(head))
    for k in runs:
        t = statistics.median(times[k])
        print(f"{k:<14}{t:>9.3f}{useful / t:>14.0f}{useful / results[k][2]:>18.1%}")
    t_s, t_c = statistics.median(times["static"]), statistics.median(times["continuous"])
    print(f"continuous batching gain: {t_s / t_c:.2f}x")


if __name__ == "__main__":
    main()
