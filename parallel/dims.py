"""Parallel sizes and which global ranks form which group.

megatron-core's `parallel_state` orders ranks "tp-cp-ep-dp-pp": tensor-parallel ranks are adjacent,
then data-parallel, then pipeline stages. Worked example, 16 GPUs with tp=2, pp=4, dp=2
(two nodes of 8 GPUs: TP pairs never cross a node):

    TP groups : [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
    DP groups : [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
    PP groups : [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]

so global rank r has tp_rank = r % tp, dp_rank = (r // tp) % dp, pp_rank = r // (tp * dp).
Alfred-40B: tp=8 (one p4d node), pp=4, dp=4 -> 128 GPUs, 16 nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from alfred_train.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    vpp: int | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def check(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel: dp({self.dp}) * tp({self.tp}) * pp({self.pp}) = {self.world_size} != "
                f"WORLD_SIZE({world_size}); change parallel.dp/tp/pp or the number of processes")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of global `rank` in megatron-core's tp-dp-pp order."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)
