"""What the CPU adapter's global function mode costs: forward+backward and a generation, mode on vs off.

    python bench/bench_cpu_adapter.py [--threads 1] [--repeats 7]

TRL's reference shape (4 layers, hidden 128, vocab 512), one process, fp32. Forward+backward: a
plain `GPTModel` forward of (B=16, 128) tokens, a token-mean loss, backward (no schedule, no
optimizer: those are where megatron makes its literal CUDA requests and need the mode). Generation:
16 x (64 + 64) tokens, greedy, with our decoder. Each pair runs interleaved (on, off, on, off, ...);
medians. "off" = inside `parallel.cpu.suspended()`, as the decode loop runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import bench_vs_hf

    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model, unwrap
    from alfred_train.parallel import cpu as cpu_adapter
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo.generation import SamplingParams, attention_mask_for, generate, position_ids_from_mask

    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    torch.set_num_threads(args.threads)
    shape = bench_vs_hf.trl_shape(128)
    model = unwrap(build_model(shape, ParallelConfig(), kind="lm", bf16=False, backend=choose_backend("sdpa"),
                               device=runtime.device, seed=1)[0])
    ids = torch.randint(3, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    real = torch.ones_like(ids)
    positions, mask = position_ids_from_mask(real), attention_mask_for(real, 128)

    def forward_backward():
        model.zero_grad()
        logits = model(ids, positions, mask)  # (B, S, V)
        logits.float().logsumexp(-1).mean().backward()

    params = SamplingParams(max_new_tokens=64, min_new_tokens=64, greedy=True)

    def generation():
        generate([model], runtime, ids[:, :64], real[:, :64], params, eod_id=2, vocab_size=512, seed=0)

    rows = []
    for name, fn in (("forward+backward (16 x 128)", forward_backward), ("generation (16 x (64+64))", generation)):
        times = {"on": [], "off": []}
        real_suspended = cpu_adapter.suspended
        for i in range(args.repeats + 1):
            for mode in ("on", "off"):
                if mode == "on":
                    cpu_adapter.suspended = contextlib.nullcontext  # the loop keeps the mode too
                ctx = real_suspended() if mode == "off" else contextlib.nullcontext()
                t0 = time.perf_counter()
                with ctx:
                    fn()
                if i:  # the first round is warm-up
                    times[mode].append(time.perf_counter() - t0)
                cpu_adapter.suspended = real_suspended
        rows.append((name, statistics.median(times["on"]), statistics.median(times["off"])))
    shutdown()
    print(f"CPU adapter on vs suspended, threads={args.threads}, median of {args.repeats} interleaved runs")
    head = f"{'what':<30}{'mode on (s)':>12}{'off (s)':>10}{'on/off':>8}"
    print(head)
    print("-" * len(head))
    for name, on, off in rows:
        print(f"{name:<30}{on:>12.4f}{off:>10.4f}{on / off:>7.2f}x")


if __name__ == "__main__":
    main()
