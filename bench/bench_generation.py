"""Rollout tokens/s with the KV cache vs full re-forward, measured side by side in one run.

    python bench/bench_generation.py          # CPU: tiny config (4 layers, hidden 64), 128 + 128 tokens
    python bench/bench_generation.py --gpu    # also a ~1.2B Llama shape in bf16 on the GPU

Both paths run the same greedy loop (`ppo.generation`), forced to the full length
(min_new_tokens = max_new_tokens), from the same left-padded prompts: the KV-cache path prefills
the prompt once and then feeds one token per step; the reference re-runs the whole sequence every
step. tokens/s = batch * new_tokens / wall time of the whole generation (prefill included); the
KV-cache time is the best of 3 runs (it is short, and this CPU is shared), the re-forward one run.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def tiny_shape(max_seq_len: int):
    from alfred_train.models.build import ModelShape

    # configs/tiny-sft.yaml with the tiny tokenizer (512 ids)
    return ModelShape(arch="llama", num_layers=4, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, vocab_size=512, padded_vocab_size=512, max_seq_len=max_seq_len,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.2)


def llama_1b_shape(max_seq_len: int):
    from alfred_train.models.build import ModelShape

    # Llama-3.2-1B-like trunk with a 32k vocabulary: ~1.2B parameters
    return ModelShape(arch="llama", num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                      num_query_groups=8, vocab_size=32000, padded_vocab_size=32000, max_seq_len=max_seq_len,
                      rotary_base=500000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name, shape, runtime, *, batch, prompt_len, new_tokens, bf16, seed, repeats=3):
    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model, unwrap
    from alfred_train.ppo.generation import SamplingParams, generate, generate_full_reforward

    chunks = [unwrap(c) for c in build_model(shape, ParallelConfig(), kind="lm", bf16=bf16, backend=choose_backend("sdpa"),
                                             device=runtime.device, seed=seed)]
    params = [p.numel() for c in chunks for p in c.parameters()]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape.vocab_size, (batch, prompt_len), generator=gen)  # (B, P)
    mask = torch.ones_like(ids)
    mask[::2, : prompt_len // 4] = 0  # half the rows left-padded by a quarter
    full = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens, greedy=True)
    kw = dict(eod_id=2, vocab_size=shape.vocab_size, seed=0)
    generate(chunks, runtime, ids, mask, SamplingParams(max_new_tokens=4, greedy=True), **kw)  # warm-up
    out = {}
    t_kv = min(timed(lambda: out.__setitem__("kv", generate(chunks, runtime, ids, mask, full, **kw)))
               for _ in range(repeats))
    t_full = timed(lambda: out.__setitem__("full", generate_full_reforward(chunks, runtime, ids, mask, full, **kw)))
    agree = (out["kv"][0] == out["full"][0]).float().mean().item()
    tokens = batch * new_tokens
    return dict(model=f"{name} ({sum(params) / 1e6:.1f}M, {'bf16' if bf16 else 'fp32'})", batch=batch,
                prompt=prompt_len, new=new_tokens, kv=tokens / t_kv, full=tokens / t_full, ratio=t_full / t_kv,
                agree=agree)


def print_table(rows) -> None:
    head = (f"{'model':<34} {'B':>4} {'prompt+new':>11} {'KV cache tok/s':>15} {'re-forward tok/s':>17} "
            f"{'ratio':>7} {'same tokens':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<34} {r['batch']:>4} {r['prompt']:>5}+{r['new']:<5} {r['kv']:>15.1f} {r['full']:>17.1f} "
              f"{r['ratio']:>6.1f}x {r['agree']:>11.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rollouts generated together (ppo.rollout_micro_batch)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gpu", action="store_true", help="also the ~1.2B Llama shape in bf16 (needs CUDA)")
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 is fastest for this overhead-bound model on a shared machine")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    if runtime.cpu:
        torch.set_num_threads(args.threads)
    length = args.prompt_len + args.new_tokens
    try:
        rows = [measure("tiny llama (4L, h64)", tiny_shape(length), runtime, batch=args.batch,
                        prompt_len=args.prompt_len, new_tokens=args.new_tokens, bf16=False, seed=1)]
        if args.gpu:
            if runtime.cpu:
                raise SystemExit("--gpu needs a CUDA device")
            rows.append(measure("llama ~1.2B (16L, h2048)", llama_1b_shape(length), runtime, batch=args.gpu_batch,
                                prompt_len=args.prompt_len, new_tokens=args.new_tokens, bf16=True, seed=None))
        print(f"device: {torch.cuda.get_device_name() if not runtime.cpu else 'cpu'}, "
              f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
        print_table(rows)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
