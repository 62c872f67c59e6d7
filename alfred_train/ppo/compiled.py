"""The fast decoder's forwards compiled by `torch.compile` (inductor), on CPU: `ppo.compile`.

A small decode step is mostly per-op cost: some thirty small ops per layer (RMSNorm, RoPE, the
cache write, the key-bias softmax, SwiGLU, residual adds), each a dispatcher call and a pass over
memory, around a few matmuls. Inductor fuses the elementwise ops into a handful of C++ loops:

    decode_step(decoder, x, slots, key_bias)   `StageDecoder.forward` of one token per row, static
                                               shapes (the step attends over the whole cache)
    score(decoder, ids, mask)                  `StageDecoder.score`, a whole-sequence forward

Measured on the 4-layer hidden-128 model, 16 rows, 128 + 128 tokens, 2 threads (bench_vs_hf.py,
bench_vs_trl.py): a decode step 2.3 -> 1.4 ms, a scoring forward (16 x 256) 90 -> 75 ms.

Not compiled: the policy and value updates (megatron's forward and backward). They compile and
give the same updates (10-12% faster here), but megatron's forward does not trace whole: RoPE asks
`torch.cuda.current_device()`, a layer warns about its TP group, the activation-offloading context
manager cannot be split, so the graph breaks into pieces that recompile per model and shape (a
3-iteration tiny run took 60 s instead of 7). Our own `StageDecoder` traces in one graph.

Compilation happens at the first call of a new shape (seconds: ~20 s cold, ~2 s from inductor's
on-disk cache). Results equal the eager ones up to float rounding (fused ops sum in another
order), so a greedy token may differ where two logits tie to ~1e-6. Any failure to compile (no C++
compiler, an op inductor rejects) logs one warning and that function runs eagerly from then on, in
this process. GPU decoding captures CUDA graphs instead (decode.CudaGraphDecode); on a GPU
`ppo.compile` is not used.
"""

from __future__ import annotations

import logging

import torch

from alfred_train.ppo.stage_decoder import StageDecoder

log = logging.getLogger("alfred_train")


class _Compiled:
    """`fn` compiled on first use; eager for good after a compilation failure (one warning)."""

    def __init__(self, fn, what: str, dynamic: bool | None = None):
        self.fn, self.what, self.dynamic = fn, what, dynamic
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, backend=BACKEND, dynamic=self.dynamic)
        try:
            return self.compiled(*args)
        # a compiled piece may have run before a later one failed to compile: running the whole function
        # again is safe, its one side effect (the decode step's KV cache write) writes the same values
        except Exception as err:  # noqa: BLE001
            self.failed = True
            log.warning("ppo.compile: torch.compile of the %s failed (%s: %s); running it eagerly",
                        self.what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return self.fn(*args)


BACKEND = "inductor"  # torch.compile's backend; the tests name a failing one to check the fallback

# static shapes first (the fastest code); a second prompt length or row count recompiles it once with
# dynamic sizes (torch's automatic dynamic shapes)
decode_step = _Compiled(StageDecoder.forward, "decode step")
# sequence lengths change every iteration and four models score: dynamic shapes from the start, one
# compiled graph per kind of model (LM or scalar head, trainable or frozen)
score = _Compiled(StageDecoder.score, "scoring forward", dynamic=True)
