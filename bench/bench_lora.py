"""LoRA vs full fine-tuning: trainable parameters, gradient + optimizer memory and step time.

    python bench/bench_lora.py                   # CPU: the tiny shape and a ~100M Llama; a few minutes
    python bench/bench_lora.py --write-results   # also writes the table into bench/RESULTS.md
    python bench/bench_lora.py --gpu             # CUDA, bf16: adds the 1.1B shape of bench_mfu.py

One process (TP=PP=DP=1). Each row builds the model the way the stages do (`build_model`, then with
LoRA `lora.attach` + `init_adapters`, then `wrap_ddp` and `build_optimizer`) and times
`Trainable.step(micro_batches, sft.lm_forward_step)` on random tokens (median of the timed steps
after the warm-up). Memory is counted from the tensors themselves, not estimated:
- grads: megatron DDP's gradient buffers (fp32, one element per trainable parameter);
- optimizer: every tensor in Adam's state (m and v) plus fp32 main copies of bf16 weights.
Full fine-tuning and LoRA rows run alternately in one process, so they compare directly.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## LoRA vs full fine-tuning (bench_lora.py)"


def shapes(gpu: bool) -> dict:
    from bench_mfu import tinyllama_shape

    from alfred_train.models.build import ModelShape

    def llama(layers, h, heads, groups, ffn, vocab, seq):
        return ModelShape(arch="llama", num_layers=layers, hidden_size=h, ffn_hidden_size=ffn,
                          num_attention_heads=heads, num_query_groups=groups, vocab_size=vocab,
                          padded_vocab_size=128 * -(-vocab // 128), max_seq_len=seq, rotary_base=10000,
                          norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)

    out = {"tiny (configs/tiny-sft.yaml)": (llama(4, 64, 4, 2, 256, 512, 64), 8, 64),  # (shape, micro-batch, seq)
           "~100M (12 x 768, vocab 8k)": (llama(12, 768, 12, 12, 2048, 8192, 256), 2, 128)}
    if gpu:
        out["1.1B (bench_mfu.py)"] = (tinyllama_shape(2048), 4, 2048)
    return out


def build(shape, runtime, *, lora_targets, rank: int, bf16: bool):
    from alfred_train.config import OptimConfig, ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models import lora
    from alfred_train.models.build import build_model
    from alfred_train.training import Trainable, build_optimizer, build_scheduler, wrap_ddp

    backend = choose_backend("sdpa")
    chunks = build_model(shape, ParallelConfig(), kind="lm", bf16=bf16, backend=backend, device=runtime.device, seed=1)
    if rank:
        spec = lora.AdapterSpec({t: {"rank": rank, "scale": 2.0} for t in lora_targets}, 0.0)
        lora.attach(chunks, spec, kind="lm")
        lora.init_adapters(chunks, 1)
    chunks = wrap_ddp(chunks, zero=False)
    optim = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0)
    optimizer = build_optimizer(chunks, optim, bf16=bf16, zero=False)
    return Trainable(chunks, optimizer, build_scheduler(optimizer, optim, 100), runtime)


def memory(trainable) -> tuple[int, int, int, int]:
    """(all params, trainable params, grad buffer bytes, optimizer state bytes)."""
    params = [p for c in trainable.chunks for p in c.parameters()]
    grads = sum(b.grad_data.nbytes for c in trainable.chunks for b in c.buffers)
    state = 0
    for opt in getattr(trainable.optimizer, "chained_optimizers", [trainable.optimizer]):
        for s in opt.optimizer.state.values():
            state += sum(v.nbytes for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        for group in getattr(opt, "fp32_from_float16_groups", []):  # bf16: fp32 main copies
            state += sum(p.nbytes for p in group)
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), grads, state)


def time_steps(trainable, shape, runtime, micro_batch: int, seq: int, warmup: int, steps: int) -> float:
    from bench_mfu import random_micro_batches, sync

    from alfred_train.stages.sft import lm_forward_step

    batches = random_micro_batches(shape, micro_batch, 1, seq, runtime.device)
    times = []
    for i in range(warmup + steps):
        sync(runtime)
        t0 = time.perf_counter()
        trainable.step(batches, lm_forward_step, seq_len=seq, micro_batch_size=micro_batch)
        sync(runtime)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> str:
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    import os

    runtime = init_runtime(ParallelDims(1, 1, 1))
    bf16 = not runtime.cpu
    load_before = os.getloadavg()[0]
    modes = [("full fine-tuning", 0, ()),
             (f"LoRA r={args.rank} attention (qkv, proj)", args.rank, ("linear_qkv", "linear_proj")),
             (f"LoRA r={args.rank} all linears", args.rank, ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))]
    lines = ["| model | mode | params | trainable | grads | optimizer state | step s | vs full |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    try:
        for name, (shape, micro_batch, seq) in shapes(args.gpu).items():
            full_time = None
            for mode, rank, targets in modes:
                trainable = build(shape, runtime, lora_targets=targets, rank=rank, bf16=bf16)
                step = time_steps(trainable, shape, runtime, micro_batch, seq, args.warmup, args.steps)
                total, trained, grads, state = memory(trainable)
                full_time = full_time or step
                lines.append(f"| {name} | {mode} | {total / 1e6:,.2f}M | {trained / 1e6:,.3f}M "
                             f"({trained / total:.2%}) | {_mib(grads)} | {_mib(state)} | {step:.3f} | "
                             f"{step / full_time:.2f}x |")
                print(lines[-1], flush=True)
                del trainable
    finally:
        shutdown()
    dtype = "bf16 (fp32 grads and main params)" if bf16 else "fp32"
    return (f"One process, {dtype}, Adam; micro-batch x seq: tiny 8 x 64, ~100M 2 x 128"
            + (", 1.1B 4 x 2048" if args.gpu else "") + f"; median of {args.steps} steps after {args.warmup} "
            f"warm-up; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}.\n\n" + "\n".join(lines))


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.2f} MiB"


def write_results(text: str) -> None:
    import os

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}"
    section = (f"{HEADING}\n\nMeasured {datetime.date.today().isoformat()} with `python bench/bench_lora.py` on "
               f"{machine} (shared with other work: step times are indicative).\n\n{text}\n")
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING in old:
        head, _, rest = old.partition(HEADING)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        new = head + section + tail
    else:
        new = old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="CUDA + bf16, with the 1.1B shape")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    text = run(args)
    print(text)
    if args.write_results:
        write_results(text)


if __name__ == "__main__":
    main()
