"""Worker: logits of several checkpoints' policies (full or LoRA) at one TP/PP, on fixed tokens.

    RANK=.. WORLD_SIZE=.. python tests/workers/lora_logits.py TP PP OUT_DIR CKPT [CKPT ...]

Writes OUT_DIR/<i>.pt: the (2, 24, vocab) logits of CKPT number i (tokens: seed 0, ids < vocab).
One launch for several checkpoints: each launch costs seconds.
"""

import sys
from pathlib import Path

import torch
from logits import policy_logits  # tests/workers/logits.py (this script's directory is on sys.path)


def main():
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    tp, pp, out_dir, ckpts = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    runtime = init_runtime(ParallelDims(tp, pp, 1))
    for i, ckpt in enumerate(ckpts):
        logits = policy_logits(ckpt, tp, pp, runtime)
        if logits is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(logits, out_dir / f"{i}.pt")
    shutdown()


if __name__ == "__main__":
    main()
