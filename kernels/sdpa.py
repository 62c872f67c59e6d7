"""One call into torch's `scaled_dot_product_attention` for every attention of alfred-train that
uses it: megatron's core-attention slot (`attention.SDPAAttention`) and the fast decoder's prefill
and scoring (`ppo/stage_decoder.py`). Pure torch: importing it loads no megatron-core."""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor


# On CPU a masked causal call over at least this many queries runs as two query halves: the first half
# reads only the first half of the keys (the rest are hidden from it), 3/4 of the work. torch's CPU flash
# kernel skips nothing of a mask (it computes every score, then masks), nor, below 512 keys, of is_causal.
# Measured (B=16, 4 heads, d=32, 2 threads; bench/RESULTS.md), forward + backward: 6.7 -> 5.8 ms at 128
# tokens, 22.1 -> 17.9 at 256, 72 -> 55 at 512; at 32 tokens the split costs more than it saves.
CPU_CAUSAL_SPLIT_MIN = 64


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool, scale: float,
         expand_kv: Optional[bool] = None, causal_mask: bool = False) -> Tensor:
    """`scaled_dot_product_attention` of q (b, np, sq, hn) over k, v (b, ng, sk, hn), np % ng == 0.

    With a mask and grouped KV heads (np > ng) on CUDA, k and v are expanded to np heads first
    (expand_kv; default: exactly then). Flash attention takes no mask, and torch's memory-efficient
    kernel took no grouped heads before pytorch#191085 (July 2026; the GPU machines' torch 2.11 is
    older), so SDPA would fall back to its math kernel: O(sq * sk) memory per head (GiBs for a
    64 x 1,024-token prefill of 16 heads). The copies cost (np / ng - 1) x the keys and values, far
    less. Elsewhere grouped heads go in as they are (`enable_gqa`: CUDA flash and CPU flash take
    them, the CPU one with a mask too).

    causal_mask: the mask hides every key after its query (causal plus padding, sq == sk); on CPU
    such a call runs in two query halves (CPU_CAUSAL_SPLIT_MIN), with the same result."""
    groups = k.shape[1]
    if expand_kv is None:
        expand_kv = mask is not None and q.shape[1] != groups and q.is_cuda
    if expand_kv and q.shape[1] != groups:
        k, v = (t.repeat_interleave(q.shape[1] // groups, dim=1) for t in (k, v))  # head j reads group j // (np/ng)
    attend = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=is_causal, scale=scale,
                     enable_gqa=q.shape[1] != k.shape[1])
    sq = q.shape[2]
    if mask is None or not causal_mask or q.is_cuda or sq < CPU_CAUSAL_SPLIT_MIN or k.shape[2] != sq:
        return attend(q, k, v, attn_mask=mask)
    half = sq // 2  # queries [0, half) see keys [0, half) only
    first = attend(q[:, :, :half], k[:, :, :half], v[:, :, :half], attn_mask=mask[..., :half, :half])
    return torch.cat([first, attend(q[:, :, half:], k, v, attn_mask=mask[..., half:, :])], dim=2)
