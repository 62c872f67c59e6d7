"""Decode tokens/s on one GPU for the ~1.2B Llama shape, before vs now, as a fraction of the HBM floor.

    python bench/bench_gpu_decode.py                       # batch 32 and 128, 128 prompt + 512 new tokens
    python bench/bench_gpu_decode.py --batches 32 --new-tokens 64 --shape tiny   # a quick run (CPU too)

Issue 10's GPU goal: decode tokens/s for the 1.2B shape (bench_generation.llama_1b_shape, bf16) at
batch 32 and 128, before and after, as a fraction of the HBM floor; >= 10x the 1,255 tokens/s the
old loop gave at batch 32 on an H100. Every row greedy and forced to the full length (min = max new
tokens), unpadded prompts, the same weights for every decoder. "same tokens": the share of greedy
tokens equal to a reference's. eager vs before: they differ in bf16 rounding, and a random model's
near-flat logits turn that into other tokens. graphs vs the eager step over all S cache slots
(`AllSlots`, untimed), the computation the graph captured: must be 100%. (Against the timed eager
step, which reads only the filled slots, softmax rounds differently: 6-7% equal tokens on the H100.)

    before   megatron's own forward with its StaticInferenceContext (`MegatronKVCache`)
    eager    the fast decoder (`KVCacheForward`: `stage_decoder.StageDecoder`), no CUDA graph
    graphs   the same with its decode step captured in a CUDA graph (`CudaGraphDecode`, the default)

The HBM floor of a decode step is reading every weight once plus the KV cache written so far
(keys and values of all layers, at the mean length P + N/2), at the card's peak bandwidth
(--hbm-tbs, default from the device name: H100 SXM 3.35, H100 PCIe 2.0, H200 4.8, A100 2.0 TB/s).
floor tok/s = batch / floor step time; "of floor" = measured / floor (prefill included in the
measured time, so a slight underestimate). The eager step reads only the cache filled so far; the
captured one reads all P + N slots every step (static shapes), so its own ceiling is lower: for the
1.2B shape, 128 + 512 tokens, about 91% of the floor at batch 32 and 79% at batch 128.
tok/s = batch * new tokens / wall time of a generation; ms/step = wall time / new tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

HBM_TBS = {"H200": 4.8, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0}


def hbm_tbs(name: str) -> float:
    for key, tbs in HBM_TBS.items():  # most specific first
        if all(part in name for part in key.split()):
            return tbs
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--shape", choices=("1.2b", "tiny"), default="1.2b")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per decoder (best is reported)")
    parser.add_argument("--hbm-tbs", type=float, default=None, help="peak HBM bandwidth, TB/s")
    parser.add_argument("--decoders", default="before,eager,graphs", help="which of before, eager, graphs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import bench_generation

    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model, unwrap
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo import decode
    from alfred_train.ppo.generation import SamplingParams, generate_all

    start = time.perf_counter()

    def progress(what: str) -> None:  # to stderr, with the time since start: where a slow run spends it
        print(f"[{time.perf_counter() - start:6.1f} s] {what}", file=sys.stderr, flush=True)

    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    device = torch.device(runtime.device)
    length = args.prompt_len + args.new_tokens
    shape = (bench_generation.llama_1b_shape if args.shape == "1.2b" else bench_generation.tiny_shape)(length)
    bf16 = device.type == "cuda"
    model = unwrap(build_model(shape, ParallelConfig(), kind="lm", bf16=bf16, backend=choose_backend("sdpa"),
                               device=runtime.device, seed=1)[0])
    params = sum(p.numel() for p in model.parameters())
    width = 2 if bf16 else 4
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tbs = args.hbm_tbs or hbm_tbs(name)
    progress(f"model built ({params / 1e6:,.1f}M parameters)")
    decoders = {"before": decode.MegatronKVCache, "eager": decode.KVCacheForward, "graphs": decode.CudaGraphDecode}
    decoders = {k: v for k, v in decoders.items() if k in args.decoders.split(",")
                and (k != "graphs" or device.type == "cuda")}
    full = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, greedy=True)

    class AllSlots(decode.KVCacheForward):
        """The eager step over all S cache slots, as the captured one: the reference for graphs' tokens."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.width = None

    kw = dict(eod_id=2, vocab_size=shape.vocab_size, seed=0)

    def floor_rate(batch: int) -> float:
        """Tokens/s if a step only read the weights and the mean KV cache at peak bandwidth."""
        head_dim = shape.hidden_size // shape.num_attention_heads
        groups = shape.num_query_groups or shape.num_attention_heads
        mean_len = args.prompt_len + args.new_tokens / 2
        kv_bytes = 2 * shape.num_layers * groups * head_dim * mean_len * batch * width
        return batch / ((params * width + kv_bytes) / (tbs * 1e12)) if tbs else float("nan")

    def generation(ids, mask, cls, params=full):
        return generate_all([model], runtime, ids, mask, params, decoder=cls, **kw)

    def timed_run(ids, mask, cls):
        warm = SamplingParams(max_new_tokens=8, min_new_tokens=8, greedy=True)
        generation(ids, mask, cls, warm)  # kernels, cuBLAS workspaces, graph pool
        progress(f"{cls.__name__} batch {ids.shape[0]}: warmed up")
        out = {}
        def run():
            out["g"] = generation(ids, mask, cls)

        return min(bench_generation.timed(run) for _ in range(args.repeats)), out["g"].response_ids.cpu()

    print(f"device: {name}, HBM {tbs:g} TB/s, torch {torch.__version__}; {args.shape} shape "
          f"({params / 1e6:,.1f}M parameters, {'bf16' if bf16 else 'fp32'}), {args.prompt_len} prompt + "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}")
    first = "vs " + next(iter(decoders))
    head = f"{'batch':>5}  {'decoder':<8}{'tok/s':>10}{'ms/step':>10}{'of floor':>10}{first:>11}{'same tokens':>13}"
    print(head)
    print("-" * len(head), flush=True)  # each row as soon as it is measured: a cut-off run keeps what it got
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(3, shape.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            floor, before, previous = floor_rate(batch), None, None
            for label, cls in decoders.items():
                seconds, tokens = timed_run(ids, mask, cls)
                rate = batch * args.new_tokens / seconds
                before = before or rate
                reference = generation(ids, mask, AllSlots).response_ids.cpu() if label == "graphs" else previous
                same = 1.0 if reference is None else float((tokens == reference).float().mean())
                previous = tokens
                fell_back = label == "graphs" and decode.CudaGraphDecode.capture_failed
                note = "  (capture failed: decoded eagerly)" if fell_back else ""
                print(f"{batch:>5}  {label:<8}{rate:>10.0f}{seconds / args.new_tokens * 1e3:>10.2f}"
                      f"{rate / floor:>9.1%}{rate / before:>10.1f}x{same:>12.1%}{note}", flush=True)
            print(f"{batch:>5}  {'floor':<8}{floor:>10.0f}{batch / floor * 1e3:>10.2f}{1:>9.1%}{'-':>11}{'-':>13}",
                  flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
