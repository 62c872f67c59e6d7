"""Deterministic data-parallel sampling with a resumable position.

Every epoch e visits the N samples in the order perm_e = permutation(N) drawn from
numpy's PCG64 seeded with (seed, e); the same on every rank, so no communication is needed.
Global batch k of the epoch is perm_e[k*G : (k+1)*G] (G = global_batch; the N mod G samples left
over are skipped that epoch, and land elsewhere in the next one). DP rank r takes the contiguous
slice [r*G/D : (r+1)*G/D] of it (D = dp_size), which it then splits into micro-batches.

Example, N=10, G=4, D=2, seed=0: an epoch has 2 global batches; perm_0 = [4 6 2 7 3 5 9 0 8 1],
so batch 0 is [4 6 2 7]: rank 0 gets [4 6], rank 1 gets [2 7]; batch 1 is [3 5 9 0]; 8 and 1 sit out epoch 0.

The position is `consumed_samples` (global samples used so far, always a multiple of G), as in
Megatron: it is saved in checkpoints, and `iterate_batches(..., consumed_samples=c)` continues with
exactly the batches a run that never stopped would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from alfred_train.errors import ConfigError


@dataclass(frozen=True)
class RankBatch:
    indices: list[int]  # this DP rank's sample indices in the global batch, length G/D
    epoch: int
    consumed_samples: int  # global samples consumed once this batch is done: save it to resume


def check_enough(num_samples: int, global_batch: int, held_out: float = 0.0) -> None:
    """One global batch fits in the dataset (checked before any model is built, and by --dry-run);
    `held_out`: the data.valid_fraction the training samples are left from, named when it is set."""
    if num_samples < global_batch:
        fraction = f", lower data.valid_fraction ({held_out:g} is held out)" if held_out else ""
        raise ConfigError(
            f"the dataset has {num_samples} samples, fewer than train.global_batch_size ({global_batch}); "
            f"lower the batch size{fraction} or add data"
        )


def _check(num_samples: int, global_batch: int, dp_rank: int, dp_size: int) -> None:
    if global_batch % dp_size != 0:
        raise ConfigError(
            f"train.global_batch_size ({global_batch}) must be divisible by the data-parallel size dp ({dp_size})"
        )
    check_enough(num_samples, global_batch)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """perm_e: the visiting order of epoch `epoch`, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()


def sampler(num_samples: int, global_batch: int, dp_rank: int, dp_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's indices for each of the N // G global batches of one epoch."""
    _check(num_samples, global_batch, dp_rank, dp_size)
    order = epoch_order(num_samples, seed, epoch)
    per_rank = global_batch // dp_size
    return [
        order[k * global_batch + dp_rank * per_rank : k * global_batch + (dp_rank + 1) * per_rank]
        for k in range(num_samples // global_batch)
    ]


def iterate_batches(
    num_samples: int, global_batch: int, dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0
) -> Iterator[RankBatch]:
    """Endless stream of this rank's batches, across epochs, starting after `consumed_samples`."""
    _check(num_samples, global_batch, dp_rank, dp_size)
    if consumed_samples < 0 or consumed_samples % global_batch != 0:
        raise ConfigError(
            f"consumed_samples={consumed_samples} is not a multiple of train.global_batch_size ({global_batch}); "
            "resume with the global batch size the checkpoint was trained with"
        )
    batches_per_epoch = num_samples // global_batch
    epoch, first = divmod(consumed_samples // global_batch, batches_per_epoch)
    while True:
        rank_batches = sampler(num_samples, global_batch, dp_rank, dp_size, seed, epoch)
        for k in range(first, batches_per_epoch):
            yield RankBatch(rank_batches[k], epoch, (epoch * batches_per_epoch + k + 1) * global_batch)
        epoch, first = epoch + 1, 0
