"""The fast decoder's forwards compiled by `torch.compile` (inductor) on CPU: `ppo.compile_decode`.

A small decode step is mostly per-op cost: some thirty small ops per layer (RMSNorm, RoPE, the
cache write, the key-bias softmax, SwiGLU, residual adds), each a dispatcher call and a pass over
memory, around a few matmuls. Inductor fuses the elementwise ops into a handful of C++ loops:

    decode_step(decoder, x, slots, key_bias)   `StageDecoder.forward` of one token per row, static
                                               shapes (the step attends over the whole cache)
    score(decoder, ids, mask)                  `StageDecoder.score`, a whole-sequence forward

Measured on the 4-layer hidden-128 model, 16 rows, 128 + 128 tokens, 2 threads (bench_vs_hf.py,
bench_vs_trl.py): a decode step 2.3 -> 1.4 ms, a scoring forward (16 x 256) 90 -> 75 ms.

Compilation happens at the first call of a new shape (seconds: ~20 s cold, ~2 s from inductor's
on-disk cache); after a second shape torch marks the changing dimensions dynamic, so later prompt
lengths do not compile again. Results equal the eager forward up to float rounding (fused ops sum in
another order), so a greedy token may differ where two logits tie to ~1e-6. Any failure to compile
(no C++ compiler, an op inductor rejects) logs one warning and that function runs eagerly from
then on, in this process. GPU decoding captures CUDA graphs instead (decode.CudaGraphDecode).
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
        # a compiled piece may have run before a later one failed to compile: running the whole function
        # again is safe, its one side effect (the KV cache write at each row's slot) writes the same values
        except Exception as err:  # noqa: BLE001
            self.failed = True
            log.warning("generation: torch.compile of the %s failed (%s: %s); running it eagerly",
                        self.what, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return self.fn(*args)


BACKEND = "inductor"  # torch.compile's backend; the tests name a failing one to check the fallback

decode_step = _Compiled(StageDecoder.forward, "decode step")
score = _Compiled(StageDecoder.score, "scoring forward")
