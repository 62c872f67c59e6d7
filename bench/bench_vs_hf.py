"""Our rollout generation vs Hugging Face `generate` on the same model and batch, one process, CPU.

    python bench/bench_vs_hf.py [--batch 16] [--prompt-len 64] [--new-tokens 64] [--threads 1] [--repeats 5]

The model is TRL's reference shape (../shared/peers: Llama, 4 layers, hidden 128, 4 heads, ffn 344,
vocab 512), built by us and exported with our own converter into a transformers `LlamaForCausalLM`,
so both sides run the very same weights. Every row forces the full length (min = max new tokens),
unpadded prompts (HF and we then agree on positions), fp32. Ours, compiled and HF alternate (ours,
compiled, HF, ours, ...), then the old loop runs --repeats times; each figure is the median over --repeats; the machine
may be shared, so only same-run ratios mean much.

    ours     `ppo.generation.generate` (the decode loop of `stage_decoder.StageDecoder`, CPU adapter suspended)
    compiled the same with its decode step compiled by torch.compile (`ppo.compile_decode`; compiled
             once in the warm-up run, not timed)
    before   megatron's own forward with its StaticInferenceContext and the CPU adapter on every call
             (the loop as it was before issue 10: `MegatronKVCache`)
    HF       `LlamaForCausalLM.generate` (KV cache, SDPA), transformers 5.23
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import torch


def trl_shape(max_seq_len: int):
    from alfred_train.models.build import ModelShape

    return ModelShape(arch="llama", num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                      num_query_groups=4, vocab_size=512, padded_vocab_size=512, max_seq_len=max_seq_len,
                      rotary_base=10000, norm_eps=1e-5, parallel_layernorms=2, init_std=0.02)


def hf_twin(model, shape):
    """transformers' LlamaForCausalLM holding `model`'s weights (TP=1), via our converter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alfred_train.convert.hf import hf_from_ours, rules_for
    from alfred_train.convert.hf_config import hf_config_from_shape

    cfg = hf_config_from_shape(shape, "lm", tied=False, dtype="float32", bos_id=None, eos_id=None, pad_id=None)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    from alfred_train.convert.mcore import gather_globals

    ours = gather_globals([model])
    missing, unexpected = hf.load_state_dict(hf_from_ours(rules_for(shape, "lm"), ours), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (robust on a shared machine, with --threads 1)")
    args = parser.parse_args()
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[args.clock]
    warnings.filterwarnings("ignore")

    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model, unwrap
    from alfred_train.parallel import cpu as cpu_adapter
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo import generation

    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    torch.set_num_threads(args.threads)
    shape = trl_shape(args.prompt_len + args.new_tokens)
    model = unwrap(build_model(shape, ParallelConfig(), kind="lm", bf16=False, backend=choose_backend("sdpa"),
                               device=runtime.device, seed=1)[0])
    hf = hf_twin(model, shape)
    ids = torch.randint(3, shape.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    n = args.new_tokens
    rows = []
    for greedy in (True, False):
        params = generation.SamplingParams(max_new_tokens=n, min_new_tokens=n, greedy=greedy)
        kw = dict(eod_id=2, vocab_size=shape.vocab_size, seed=0)

        def ours():
            return generation.generate([model], runtime, ids, mask, params, **kw)[0]

        def compiled():
            return generation.generate([model], runtime, ids, mask, params, compiled=True, **kw)[0]

        def before():
            real = cpu_adapter.suspended
            cpu_adapter.suspended = contextlib.nullcontext  # the adapter's mode on every call, as before
            try:
                return generation.generate([model], runtime, ids, mask, params, decoder=generation.MegatronKVCache,
                                           **kw)[0]
            finally:
                cpu_adapter.suspended = real

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=not greedy,
                                  top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=None)
            return out[:, args.prompt_len:]

        runs = {"ours": ours, "compiled": compiled, "before": before, "HF": hf_generate}
        times = {k: [] for k in runs}
        outs = {}
        for k, fn in runs.items():
            outs[k] = fn()  # warm-up
        # ours and HF alternate; the old loop runs after them (interleaved three ways, its megatron
        # allocations slowed both others by ~20% here)
        for pair in (("ours", "compiled", "HF"), ("before",)):
            for _ in range(args.repeats):
                for k in pair:
                    t0 = clock()
                    runs[k]()
                    times[k].append(clock() - t0)
        tok = args.batch * n
        med = {k: statistics.median(v) for k, v in times.items()}
        same = [(outs[k] == outs["HF"]).float().mean().item() if greedy else float("nan") for k in ("ours", "compiled")]
        rows.append((("greedy" if greedy else "sampled"), med, tok, same))
    shutdown()
    print(f"B={args.batch}, {args.prompt_len}+{n} tokens, fp32, threads={args.threads}, clock={args.clock}, "
          f"torch {torch.__version__}, "
          f"median of {args.repeats} interleaved runs")
    head = f"{'decoding':<9}{'ours tok/s':>12}{'compiled':>10}{'before':>8}{'HF tok/s':>10}{'ours/HF':>9}" \
           f"{'compiled/HF':>13}{'ours/before':>13}{'same tokens as HF (ours, compiled)':>36}"
    print(head)
    print("-" * len(head))
    for name, med, tok, same in rows:
        print(f"{name:<9}{tok / med['ours']:>12.0f}{tok / med['compiled']:>10.0f}{tok / med['before']:>8.0f}"
              f"{tok / med['HF']:>10.0f}{med['HF'] / med['ours']:>8.2f}x{med['HF'] / med['compiled']:>12.2f}x"
              f"{med['before'] / med['ours']:>12.2f}x{same[0]:>24.1%}, {same[1]:.1%}")


if __name__ == "__main__":
    main()
