"""Worker: load a checkpoint's policy at a given TP/PP and write its logits on fixed tokens.

    RANK=.. WORLD_SIZE=.. python tests/workers/logits.py CKPT TP PP OUT.pt
"""

import sys

import torch


def policy_logits(ckpt, tp: int, pp: int, runtime):
    """The (2, 24, vocab) logits of `ckpt`'s policy (full or LoRA) on fixed tokens (seed 0, ids <
    vocab), on the last stage's TP rank 0; None on every other rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from alfred_train.config import ParallelConfig
    from alfred_train.models.from_checkpoint import build_from_checkpoint
    from alfred_train.training import run_schedule

    chunks, shape, _ = build_from_checkpoint(ckpt, ParallelConfig(tp=tp, pp=pp), runtime, backend_name="sdpa")
    tokens = torch.randint(0, shape.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)

    def forward_step(data_iterator, model):
        next(data_iterator)
        logits = model(tokens, positions, None)  # (b, s, V/tp)

        def collect(output):
            full = gather_from_tensor_model_parallel_region(output)[..., : shape.vocab_size]
            return output.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": full.detach()}
        return logits, collect

    for c in chunks:
        c.eval()
    with torch.no_grad():
        reports = run_schedule(chunks, [None], forward_step, seq_len=24, micro_batch_size=2, forward_only=True)
    return reports[0]["logits"] if runtime.is_last_stage and runtime.tp_rank == 0 else None


def main():
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    ckpt, tp, pp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    runtime = init_runtime(ParallelDims(tp, pp, 1))
    logits = policy_logits(ckpt, tp, pp, runtime)
    if logits is not None:
        torch.save(logits, out)
    shutdown()


if __name__ == "__main__":
    main()
