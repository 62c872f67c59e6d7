"""Generation tokens/s at PP=2 (two processes, gloo, CPU): before vs now, measured in the same run.

    python bench/bench_pp_generation.py [--batch 16] [--prompt-len 64] [--new-tokens 64] [--repeats 5]

The TRL reference shape (4 layers -> 2 per stage, hidden 128, vocab 512), fp32, greedy, forced to the
full length; each stage one thread. Interleaved runs, medians:

    before   megatron's forward + StaticInferenceContext on each stage, the CPU adapter's mode on
             every call (the loop before issue 10)
    unpipelined  the fast decoder (`stage_decoder.StageDecoder`) on each stage, the adapter suspended,
             each token through the stages one after the other
    now      the same with the batch split into 2 row groups in flight (`ppo/pipelined.py`)
    unpipelined compiled, now compiled   the same two with each stage's decode step compiled by
             torch.compile (`ppo.compile_decode`; compiled in the first, untimed run)

Both return the same tokens (checked). tokens/s = batch * new tokens / wall time of a generation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path


def worker(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    warnings.filterwarnings("ignore")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_vs_hf

    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model
    from alfred_train.parallel import cpu as cpu_adapter
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo import generation

    rt = init_runtime(ParallelDims(1, 2, 1))
    seed_everything(0, rt)
    torch.set_num_threads(1)
    shape = bench_vs_hf.trl_shape(prompt_len + new_tokens)
    chunks = build_model(shape, ParallelConfig(tp=1, pp=2), kind="lm", bf16=False, backend=choose_backend("sdpa"),
                         device=rt.device, seed=1)
    ids = torch.randint(3, 512, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    params = generation.SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, greedy=True)
    kw = dict(eod_id=2, vocab_size=512, seed=0)
    real = cpu_adapter.suspended

    def before():
        cpu_adapter.suspended = contextlib.nullcontext
        try:
            return generation.generate(chunks, rt, ids, mask, params, decoder=generation.MegatronKVCache, **kw)[0]
        finally:
            cpu_adapter.suspended = real

    def fast(pipelined: bool, compiled: bool = False):
        return generation.generate_all(chunks, rt, ids, mask, params, pipelined=pipelined, compiled=compiled,
                                       **kw).response_ids

    runs = {"before": before, "unpipelined": partial(fast, False), "now": partial(fast, True),
            "unpipelined compiled": partial(fast, False, True), "now compiled": partial(fast, True, True)}
    tokens = {k: fn() for k, fn in runs.items()}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    if rt.rank == 0:
        tok = batch * new_tokens
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"PP=2 (2 processes, 1 thread each), B={batch}, {prompt_len}+{new_tokens} tokens, fp32, greedy; "
              f"median of {repeats} interleaved runs; same tokens: "
              f"{all(torch.equal(tokens['before'], t) for t in tokens.values())}")
        print(f"{'decoder':<22}{'seconds':>9}{'tok/s':>9}{'vs before':>11}")
        for k in runs:
            print(f"{k:<22}{med[k]:>9.3f}{tok / med[k]:>9.0f}{med['before'] / med[k]:>10.2f}x")
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from alfred_train.parallel.spawn import spawn_local

    code = spawn_local(["--worker", str(args.batch), str(args.prompt_len), str(args.new_tokens), str(args.repeats)], 2,
                       script=__file__)
    if code:
        raise SystemExit(f"workers failed: exit code {code}")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*(int(x) for x in sys.argv[2:6]))
    else:
        main()
