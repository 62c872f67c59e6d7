"""Optimizer states in a checkpoint: the sharded state dict megatron-core saves and loads, the torch
Adam details its distributed optimizer needs around that, and which layout changes a resume's
optimizer states can follow (`reshard_problem`).

ZeRO (the distributed optimizer) is saved "dp_reshardable": each rank writes its own DP shard, with
no gather. megatron-core 0.16.1 also has "fully_reshardable" (resumable at any TP/PP), but it gathers
a TP/PP shard's whole optimizer state on every save (about 15 GB per shard for the 40B recipe at
TP=8 x PP=4), so a resume at another TP/PP stays refused for ZeRO runs.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def prime(optimizer) -> None:
    """Materialize torch Adam's lazy state (with its per-parameter `step`) by one step at lr=0 on
    zero gradients; parameters do not change. megatron-core 0.16.1's distributed optimizer needs
    that state to build its load template when Adam is torch's (no TE/apex FusedAdam)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if len(inner.state):
            continue
        saved = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, saved):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = None


def adam_step(optimizer) -> float | None:
    """torch Adam's per-parameter step count (the same for every parameter)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
    return None


def set_adam_step(optimizer, step: float) -> None:
    """Restore the step count: megatron-core 0.16.1's distributed optimizer loads it only into a
    state it allocates itself, not into the primed one (see `prime`)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


# megatron-core 0.16.1's distributed optimizer keys its state "optimizer.distributed.dp_group_idx_N...",
# the same for every model, so two in one checkpoint (PPO's policy and value) collided. Since this
# format (meta.json "optimizer_keys") those keys carry the model's name; older checkpoints still load.
KEYS = "per-model"


def sharded(optimizer, model_sd: dict, is_loading: bool, prefix: str = "") -> dict:
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    merged = {f"{chunk}/{k}": v for chunk, sd in model_sd.items() for k, v in sd.items()}  # vpp chunks share local names
    # The distributed optimizer (ZeRO) is saved per DP shard ("dp_reshardable"): megatron-core
    # 0.16.1's default fully-sharded format rejects fp32 params (flattened_range unsupported).
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    with torch.no_grad():
        sd = optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=metadata)

    def named(item):
        if isinstance(item, ShardedBase) and item.key.startswith("optimizer.distributed."):
            item.key = prefix + item.key
        return item

    return dict_list_map_inplace(named, sd) if prefix else sd


def reshard_problem(saved: dict, now: dict) -> str | None:
    """Why optimizer states saved at layout `saved` cannot be resumed at layout `now`; None if they can.

    megatron-core's plain optimizer keeps each state tensor beside its parameter, sharded as the
    weight is (`optim_state_to_sharding_state`), so it reshards across TP, PP and DP as the weights
    do. The distributed optimizer (parallel.zero) saves the DP shards of its flat buffers
    (`dp_reshardable`, see `sharded`): the buffers' layout is fixed by TP and PP, so it
    reshards across DP only. The two optimizers' formats differ, and vpp changes the model chunks."""
    zero = bool(saved.get("zero"))
    if zero != bool(now["zero"]):
        return (f"parallel.zero={str(zero).lower()} when saved (the plain and the distributed optimizer store "
                f"their states differently); resume with parallel.zero={str(zero).lower()}")
    if (saved.get("vpp") or 1) != (now.get("vpp") or 1):
        return f"parallel.vpp={saved.get('vpp')} when saved; resume with parallel.vpp={saved.get('vpp')}"
    if zero and (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"]):
        return (f"ZeRO optimizer states saved at parallel.tp={saved.get('tp')} parallel.pp={saved.get('pp')} "
                f"reshard across parallel.dp only; resume at tp={saved.get('tp')} pp={saved.get('pp')} (any dp)")
    return None
