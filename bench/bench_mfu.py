"""Model FLOPs utilization of one bf16 training step of a ~1.1B Llama through our stack, per attention backend.

    python bench/bench_mfu.py                 # CUDA: TinyLlama-1.1B shape, seq 2048, every usable backend
    python bench/bench_mfu.py --cpu           # a tiny fp32 shape on CPU (checks the script, numbers mean little)

The step is the one SFT trains with: `build_model` -> `wrap_ddp` -> `build_optimizer` /
`build_scheduler` -> `Trainable.step(micro_batches, lm_forward_step)` (megatron-core's schedule,
gradient accumulation over `--accum` micro-batches, fp32 main grads, Adam on fp32 master weights,
grad-norm clip), one process (`init_runtime(ParallelDims(1, 1, 1))`). Data is random token ids,
already on the GPU, loss on every token.

FLOPs per token (PaLM appendix B / torchtitan's convention; causal masking is not discounted):
    F = 6 * N + 12 * L * h * S
    N = parameters taking part in matrix products = all parameters - the input embedding (V x h);
        the untied output layer (h x V) is counted, as are the (negligible) norm weights
    L layers, h hidden size (heads * head_dim), S sequence length
MFU = F * tokens / step time / peak, peak = 989e12 FLOP/s (H100 SXM dense bf16, no sparsity).
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import torch

H100_BF16_PEAK = 989e12  # FLOP/s, dense (the datasheet's 1979 counts 2:4 sparsity)


def tinyllama_shape(seq_len: int):
    from alfred_train.models.build import ModelShape

    # TinyLlama-1.1B: 22 layers, h 2048, 32 heads in 4 KV groups, SwiGLU ffn 5632, 32k vocabulary
    return ModelShape(arch="llama", num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32,
                      num_query_groups=4, vocab_size=32000, padded_vocab_size=32000, max_seq_len=seq_len,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)


def tiny_shape(seq_len: int):
    from alfred_train.models.build import ModelShape

    return ModelShape(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, vocab_size=512, padded_vocab_size=512, max_seq_len=seq_len,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)


def flops_per_token(matmul_params: int, shape, seq_len: int) -> float:
    """F = 6 N + 12 L h S (module docstring)."""
    return 6.0 * matmul_params + 12.0 * shape.num_layers * shape.hidden_size * seq_len


def matmul_param_count(chunks, shape) -> int:
    """All parameters minus the input embedding table (padded_vocab x h)."""
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return total - shape.padded_vocab_size * shape.hidden_size


def random_micro_batches(shape, micro_batch: int, accum: int, seq_len: int, device) -> list:
    from alfred_train.data.packing import SFTBlocks

    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(3, shape.vocab_size, (micro_batch * accum, seq_len + 1), generator=gen)  # (N, S+1)
    positions = torch.arange(seq_len).expand(micro_batch * accum, seq_len)  # (N, S)
    blocks = SFTBlocks(tokens=stream[:, :-1].to(device), labels=stream[:, 1:].to(device),
                       loss_mask=torch.ones(micro_batch * accum, seq_len, device=device),
                       position_ids=positions.contiguous().to(device))
    return [blocks.select(range(i, i + micro_batch)) for i in range(0, len(blocks), micro_batch)]


def sync(runtime) -> None:
    if not runtime.cpu:
        torch.cuda.synchronize()


def build_trainable(shape, backend, runtime, bf16: bool, steps: int):
    from alfred_train.config import OptimConfig, ParallelConfig
    from alfred_train.models.build import build_model
    from alfred_train.training import Trainable, build_optimizer, build_scheduler, wrap_ddp

    optim_cfg = OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2)
    chunks = build_model(shape, ParallelConfig(), kind="lm", bf16=bf16, backend=backend, device=runtime.device, seed=None)
    n_matmul = matmul_param_count(chunks, shape)
    chunks = wrap_ddp(chunks, zero=False)
    optimizer = build_optimizer(chunks, optim_cfg, bf16=bf16, zero=False)
    return Trainable(chunks, optimizer, build_scheduler(optimizer, optim_cfg, steps), runtime), n_matmul


def measure(trainable, n_matmul, shape, runtime, *, micro_batch, accum, seq_len, warmup, steps, peak) -> dict:
    """Time `steps` optimizer steps after `warmup` ones; synchronize around the timed window."""
    from alfred_train.stages.sft import lm_forward_step

    batches = random_micro_batches(shape, micro_batch, accum, seq_len, runtime.device)
    kw = dict(seq_len=seq_len, micro_batch_size=micro_batch)
    if not runtime.cpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        result = trainable.step(batches, lm_forward_step, **kw)
    sync(runtime)
    t0 = time.perf_counter()
    for _ in range(steps):
        result = trainable.step(batches, lm_forward_step, **kw)
    sync(runtime)
    step_time = (time.perf_counter() - t0) / steps
    tokens = micro_batch * accum * seq_len
    flops = flops_per_token(n_matmul, shape, seq_len) * tokens / step_time
    return dict(micro_batch=micro_batch, accum=accum, step_time=step_time, tokens_per_s=tokens / step_time,
                tflops=flops / 1e12, mfu=flops / peak, loss=result.loss, ok=result.ok,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if not runtime.cpu else float("nan"))


def profile_step(trainable, shape, runtime, *, micro_batch, accum, seq_len, row_limit=25) -> None:
    """One more step under torch.profiler: where device time goes (top ops by self device time)."""
    from torch.profiler import ProfilerActivity, profile

    from alfred_train.stages.sft import lm_forward_step

    batches = random_micro_batches(shape, micro_batch, accum, seq_len, runtime.device)
    activities = [ProfilerActivity.CPU] + ([] if runtime.cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        trainable.step(batches, lm_forward_step, seq_len=seq_len, micro_batch_size=micro_batch)
        sync(runtime)
    key = "self_cpu_time_total" if runtime.cpu else "self_device_time_total"
    print(f"profile of one step, micro-batch {micro_batch} x {accum}:")
    print(prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=60))


def usable_backends(requested: list[str]) -> list:
    from alfred_train.errors import ConfigError
    from alfred_train.kernels.backends import choose_backend

    found = []
    for name in requested:
        try:
            found.append(choose_backend(name))
        except ConfigError as err:
            print(f"skip backend {name}: {err}")
    return found


def bench_backend(backend, shape, runtime, args, peak) -> list[dict]:
    """Every micro-batch size in `args.micro_batches` that fits, on one model; OOM sizes are reported."""
    trainable, n_matmul = build_trainable(shape, backend, runtime, bf16=not runtime.cpu,
                                          steps=len(args.micro_batches) * (args.warmup + args.steps) + 1)
    rows = []
    for mb in args.micro_batches:
        try:
            row = measure(trainable, n_matmul, shape, runtime, micro_batch=mb, accum=args.accum,
                          seq_len=args.seq_len, warmup=args.warmup, steps=args.steps, peak=peak)
        except torch.cuda.OutOfMemoryError:
            row = dict(micro_batch=mb, accum=args.accum, oom=True)
        if args.profile and not row.get("oom") and not rows:
            profile_step(trainable, shape, runtime, micro_batch=mb, accum=args.accum, seq_len=args.seq_len)
        gc.collect()
        if not runtime.cpu:
            torch.cuda.empty_cache()
        rows.append(dict(backend=backend.name, params=n_matmul, **row))
    del trainable
    gc.collect()
    if not runtime.cpu:
        torch.cuda.empty_cache()
    return rows


def print_table(rows, flops_note: str) -> None:
    head = (f"{'backend':<8} {'micro-batch':>11} {'accum':>5} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} "
            f"{'MFU':>6} {'peak GiB':>9} {'loss':>7}")
    print(flops_note)
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("oom"):
            print(f"{r['backend']:<8} {r['micro_batch']:>11} {r['accum']:>5}   out of memory")
            continue
        print(f"{r['backend']:<8} {r['micro_batch']:>11} {r['accum']:>5} {r['step_time']:>8.3f} "
              f"{r['tokens_per_s']:>10.0f} {r['tflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f} "
              f"{r['loss']:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shape on CPU (checks the script runs)")
    parser.add_argument("--backends", default="te,flash,sdpa,eager", help="tried in order; missing ones skipped")
    parser.add_argument("--micro-batches", default="8,4,2", help="micro-batch sizes to measure, each that fits")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="profile one step of each backend's first size")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK / 1e12)
    args = parser.parse_args()
    args.micro_batches = [int(x) for x in args.micro_batches.split(",")]
    if not args.cpu and not torch.cuda.is_available():
        print("bench_mfu: no CUDA device; nothing measured (use --cpu for a tiny CPU run)")
        return
    if args.cpu:
        args.seq_len, args.micro_batches = min(args.seq_len, 64), [2]
    warnings.filterwarnings("ignore")

    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    shape = tiny_shape(args.seq_len) if args.cpu else tinyllama_shape(args.seq_len)
    peak = args.peak_tflops * 1e12
    try:
        rows = []
        for backend in usable_backends(args.backends.split(",")):
            rows += bench_backend(backend, shape, runtime, args, peak)
        device = "cpu" if runtime.cpu else torch.cuda.get_device_name()
        n = rows[0]["params"] if rows else 0
        note = (f"device: {device}, torch {torch.__version__}; {shape.num_layers}L h{shape.hidden_size} "
                f"{shape.num_attention_heads}/{shape.num_query_groups} heads ffn {shape.ffn_hidden_size} "
                f"V {shape.padded_vocab_size}, S {args.seq_len}; N (matmul params) = {n / 1e6:.1f}M; "
                f"F/token = 6N + 12LhS = {flops_per_token(n, shape, args.seq_len) / 1e9:.2f} GFLOP; "
                f"peak {args.peak_tflops:.0f} TFLOP/s; {args.warmup} warm-up + {args.steps} timed steps")
        print_table(rows, note)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
