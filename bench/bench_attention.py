"""Forward+backward time of each usable attention backend, measured side by side in one run.

    python bench/bench_attention.py            # CPU: small shapes, fp32, ~20 s
    python bench/bench_attention.py --iters 20 # GPU: B=4, S=2048, 32 heads x 128, bf16

Every backend that `choose_backend` accepts on this machine (te, flash, sdpa, eager) runs the same
inputs through its core-attention module, causal, in the megatron layout (s, b, heads, head_dim).
FLOPs follow flash-attn's benchmark convention: forward = 4 * B * S * S * H * D, halved for the
causal mask, and backward = 2.5 x forward, so fwd+bwd = 3.5 x forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError
from alfred_train.kernels.backends import choose_backend

# (batch, seq, heads, query_groups, head_dim)
CPU_SHAPES = [(2, 256, 8, 8, 64), (2, 256, 8, 2, 64), (1, 512, 8, 8, 64)]
GPU_SHAPES = [(4, 2048, 32, 32, 128), (4, 2048, 32, 8, 128)]


def setup_megatron() -> None:
    """One-process model-parallel state: eager (DotProductAttention) reads megatron's globals."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from alfred_train.parallel import cpu

    cpu.install()  # no-op with CUDA
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # dropout is 0: no RNG


def build(backend, heads, groups, head_dim, dtype):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
        num_query_groups=groups, attention_dropout=0.0, hidden_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
    )
    module = backend.core_attention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    return module.to(dtype)


def time_fwd_bwd(module, shape, device, dtype, iters: int) -> float:
    """Median milliseconds of one causal forward+backward."""
    b, s, heads, groups, head_dim = shape
    q = torch.randn(s, b, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(s, b, groups, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(s, b, groups, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(s, b, heads * head_dim, device=device, dtype=dtype)
    times = []
    for step in range(iters + 2):  # 2 warm-up steps
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        module(q, k, v, None).backward(grad_out)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return 1e3 * statistics.median(times)


def causal_fwd_bwd_flops(shape) -> float:
    b, s, heads, _, head_dim = shape
    return 3.5 * 4 * b * s * s * heads * head_dim / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10, help="timed steps per backend and shape")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="megatron")  # deprecation noise at import/build
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    setup_megatron()

    backends = []
    for name in ("te", "flash", "sdpa", "eager"):
        try:
            backends.append(choose_backend(name))
        except ConfigError as err:
            print(f"skipped {name}: {err}")
    print(f"device={device} dtype={str(dtype).removeprefix('torch.')} iters={args.iters} causal")
    print(f"{'backend':<8} {'B x S x heads/groups x dim':<28} {'ms fwd+bwd':>11} {'TFLOP/s':>9}")
    for shape in shapes:
        for backend in backends:
            module = build(backend, *shape[2:], dtype)
            ms = time_fwd_bwd(module, shape, device, dtype, args.iters)
            tflops = causal_fwd_bwd_flops(shape) / (ms * 1e-3) / 1e12
            b, s, heads, groups, head_dim = shape
            label = f"{b} x {s} x {heads}/{groups} x {head_dim}"
            print(f"{backend.name:<8} {label:<28} {ms:>11.2f} {tflops:>9.3f}")
            del module
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
