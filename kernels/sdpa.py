"""One call into torch's `scaled_dot_product_attention` for every attention of alfred-train that
uses it: megatron's core-attention slot (`attention.SDPAAttention`) and the fast decoder's prefill
and scoring (`ppo/stage_decoder.py`). Pure torch: importing it loads no megatron-core."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool, scale: float,
         expand_kv: Optional[bool] = None) -> Tensor:
    """`scaled_dot_product_attention` of q (b, np, sq, hn) over k, v (b, ng, sk, hn), np % ng == 0.

    With a mask and grouped KV heads (np > ng) on CUDA, k and v are expanded to np heads first
    (expand_kv; default: exactly then). Flash attention takes no mask, and torch's memory-efficient
    kernel took no grouped heads before pytorch#191085 (July 2026; the GPU machines' torch 2.11 is
    older), so SDPA would fall back to its math kernel: O(sq * sk) memory per head (GiBs for a
    64 x 1,024-token prefill of 16 heads). The copies cost (np / ng - 1) x the keys and values, far
    less. Elsewhere grouped heads go in as they are (`enable_gqa`: CUDA flash and CPU flash take
    them, the CPU one with a mask too)."""
    groups = k.shape[1]
    if expand_kv is None:
        expand_kv = mask is not None and q.shape[1] != groups and q.is_cuda
    if expand_kv and q.shape[1] != groups:
        k, v = (t.repeat_interleave(q.shape[1] // groups, dim=1) for t in (k, v))  # head j reads group j // (np/ng)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
