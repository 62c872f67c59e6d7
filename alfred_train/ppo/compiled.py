"""The fast decoder's decode step compiled by `torch.compile` (inductor), on CPU: `ppo.compile_decode`.

A small decode step is mostly per-op cost: some thirty small ops per layer (RMSNorm, RoPE, the
cache write, the key-bias softmax, SwiGLU, residual adds), each a dispatcher call and a pass over
memory, around a few matmuls. Inductor fuses the elementwise ops into a handful of C++ loops:

    decode_step(decoder, x, slots, key_bias)   `StageDecoder.forward` of one token per row, static
                                               shapes (the step attends over the whole cache)

Measured on the 4-layer hidden-128 model, 16 rows, 128 + 128 tokens, 2 threads (bench_vs_hf.py):
a decode step 2.3 -> 1.4 ms. Compiled at its first call (~10-20 s cold, a few seconds from
inductor's on-disk cache); a second prompt length or row count recompiles it once with dynamic
sizes (torch's automatic dynamic shapes; ~10% slower than static, still ~35% faster than eager).

Tried and left eager, measured on the same model (16 x 256 tokens):
  * scoring (`StageDecoder.score`): 90 -> 75 ms with static shapes, but the sequence length changes
    every iteration and four models score, so static shapes recompile all along, and dynamic
    shapes lose the gain (144 ms against 130 eager);
  * the policy and value updates (megatron's forward and backward): the same updates, 10-12%
    faster, but megatron's forward does not trace whole (RoPE asks `torch.cuda.current_device()`,
    a layer warns about its TP group, the activation-offloading context manager cannot be split),
    so it breaks into pieces that recompile per model and shape: a 3-iteration tiny run took 60 s
    instead of 7. Our own `StageDecoder` traces in one graph.

Results equal the eager ones up to float rounding (fused ops sum in another order), so a greedy
token may differ where two logits tie to ~1e-6. Any failure to compile (no C++ compiler, an op
inductor rejects) logs one warning and the step runs eagerly from then on, in this process. GPU
decoding captures CUDA graphs instead (decode.CudaGraphDecode); there `ppo.compile_decode` is not used.
"""

from __future__ import annotations

import logging

import torch

from alfred_train.ppo.stage_decoder import StageDecoder

log = logging.getLogger("alfred_train")


class _Compiled:
    """`fn` compiled on first use; eager for good after a compilation failure (one warning)."""

    def __init__(self, fn, what: str):
        self.fn, self.what = fn, what
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, backend=BACKEND)
        try:
            return self.compiled(*args)
        # a compiled piece may have run before a later one failed to compile: running the whole step again
        # is safe, its one side effect (the KV cache write at each row's slot) writes the same values
        except Exception as err:  # noqa: BLE001
            self.failed = True
            log.warning("ppo.compile_decode: torch.compile of the %s failed (%s: %s); running it eagerly",
                        self.what, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                        extra={"rank_local": True})
            return self.fn(*args)


BACKEND = "inductor"  # torch.compile's backend; the tests name a failing one to check the fallback

# static shapes first (the fastest code); a second prompt length or row count recompiles it once with
# dynamic sizes (torch's automatic dynamic shapes)
decode_step = _Compiled(StageDecoder.forward, "decode step")
