"""Fill a model at any TP/PP from global tensors, and gather a TP=1/PP=1 model into global tensors.

Both walk `model.sharded_state_dict()`: every `ShardedTensor` knows its global key, global shape
and offset, so a rank copies the slice `global[offset : offset + local_shape]` of each global
tensor into its shard, whatever the layout. Tensors of the transformer layers are stacked along a
prepended layer axis (`prepend_axis_num == 1`, `global_offset[0]` = global layer number); we name
them one layer at a time (see `convert/hf.py`):

    decoder.layers.self_attention.linear_qkv.weight @ layer 3  ->  decoder.layers.3.self_attention...
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

Tensor = torch.Tensor
LAYERS = "decoder.layers."


def _sharded_tensors(chunk) -> Iterator:
    """Every floating-point ShardedTensor of a chunk, with ShardedTensorFactories built."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def walk(sh):
        if isinstance(sh, ShardedTensorFactory):
            built = sh.build()
            for item in (nested_values(built) if isinstance(built, (dict, list)) else [built]):
                yield from walk(item)
        elif isinstance(sh, ShardedTensor) and sh.data is not None and sh.data.is_floating_point():
            yield sh

    for sh in nested_values(chunk.sharded_state_dict()):
        yield from walk(sh)


def layer_name(sh) -> str:
    """The per-layer global name of a ShardedTensor (layer number spelled out)."""
    if sh.prepend_axis_num == 1 and sh.key.startswith(LAYERS):
        return f"{LAYERS}{sh.global_offset[0]}.{sh.key[len(LAYERS):]}"
    if sh.prepend_axis_num:
        raise ValueError(f"{sh.key}: unexpected {sh.prepend_axis_num} prepended axes")
    return sh.key


def _local_index(sh) -> tuple[slice, ...]:
    """This shard's slice of the (per-layer) global tensor."""
    p = sh.prepend_axis_num
    return tuple(slice(off, off + size) for off, size in zip(sh.global_offset[p:], sh.local_shape))


@torch.no_grad()
def fill_from_globals(chunks: list, global_tensor: Callable[[str], Tensor]) -> int:
    """Copy each shard of every chunk from `global_tensor(name)`; returns the number of tensors set."""
    count = 0
    for chunk in chunks:
        cache: dict[str, Tensor] = {}  # a global tensor feeds several shards (e.g. [gate; up])
        for sh in _sharded_tensors(chunk):
            name = layer_name(sh)
            if name not in cache:
                cache[name] = global_tensor(name)
            full = cache[name]
            expected = tuple(sh.global_shape[sh.prepend_axis_num:])
            if tuple(full.shape) != expected:
                raise ValueError(f"{name}: source shape {tuple(full.shape)} != model shape {expected}")
            sh.data.copy_(full[_local_index(sh)].to(sh.data.dtype))
            count += 1
    return count


@torch.no_grad()
def gather_globals(chunks: list) -> dict[str, Tensor]:
    """The global tensors of a model held whole by this process (TP=1, PP=1)."""
    out: dict[str, Tensor] = {}
    for chunk in chunks:
        for sh in _sharded_tensors(chunk):
            name = layer_name(sh)
            if name not in out:
                out[name] = sh.data.new_zeros(tuple(sh.global_shape[sh.prepend_axis_num:]))
            out[name][_local_index(sh)] = sh.data.detach()
    return out
