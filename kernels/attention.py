"""Core-attention modules that plug into megatron-core's `core_attention` slot.

Both classes are drop-in replacements for `megatron.core.transformer.dot_product_attention.
DotProductAttention`: same constructor, same `forward(query, key, value, attention_mask,
attn_mask_type=None, attention_bias=None, packed_seq_params=None)`, same layouts:

    query          (sq, b, np, hn)   np = attention heads on this TP rank
    key, value     (sk, b, ng, hn)   ng = query groups (KV heads) on this TP rank, np % ng == 0
    attention_mask bool, broadcastable to (b, np, sq, sk), True = masked out (megatron convention)
    returns        (sq, b, np * hn)

    out = softmax(q k^T * softmax_scale + mask) v,  query head j reads KV head j // (np / ng)

Masking (the same rule for every call, training or KV-cache decoding):
  * causal when the layer was built causal or the call says causal. Causality is aligned
    bottom-right: query i (of sq) sees keys 0 .. sk - sq + i. With sq == sk this is the usual
    lower triangle; during KV-cache decoding megatron passes the new token(s) as the query and the
    whole cache as key/value (sq < sk), and with sq == 1 nothing is masked.
    megatron 0.16.1's `Attention._adjust_key_value_for_inference` overrides the mask type to
    `no_mask` once `sequence_len_offset > 0`; that is only right for sq == 1, so the layer's own
    (construction-time) causal type is honoured as well, which also covers multi-token steps.
  * an `attention_mask` given by the caller is applied on top (union of masked positions).

`apply_query_key_layer_scaling` divides the scores by layer_number before a fp32 softmax and
multiplies them back inside it (an fp16 overflow guard); the product is unchanged, so the
scale used here is `softmax_scale` (default 1/sqrt(hn)) alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from alfred_train.errors import ConfigError
from alfred_train.kernels.sdpa import sdpa

CAUSAL_MASK_TYPES = frozenset(
    {AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding_causal}
)


def bottom_right_causal_mask(sq: int, sk: int, device: torch.device) -> Tensor:
    """Boolean (sq, sk) mask, True = may attend: query i sees keys j <= sk - sq + i."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


class _CoreAttention(MegatronModule):
    """Shared constructor: head counts per TP rank, softmax scale, unsupported-option checks."""

    backend_name = "base"

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        _reject_unsupported(config, attention_dropout, self.backend_name)

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.hidden_size_per_attention_head = config.kv_channels
        self.softmax_scale = (
            1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        )

    def _is_causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        return self.attn_mask_type in CAUSAL_MASK_TYPES or attn_mask_type in CAUSAL_MASK_TYPES


def _reject_unsupported(config: TransformerConfig, attention_dropout, backend: str) -> None:
    """Options DotProductAttention has that these kernels do not: fail at build time."""
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    fix = "or set model.attention_backend=eager"
    if dropout != 0.0:
        raise ConfigError(
            f"attention_dropout={dropout} is not supported by the {backend} attention backend: "
            f"set the model's attention dropout to 0 {fix}"
        )
    if config.context_parallel_size != 1:
        raise ConfigError(
            f"context parallelism is not supported by the {backend} attention backend: "
            "set model.attention_backend=te"
        )
    if config.window_size is not None:
        raise ConfigError(f"sliding-window attention is not supported by {backend}: {fix}")
    if config.softmax_type != "vanilla":
        raise ConfigError(f"softmax_type={config.softmax_type!r} is not supported by {backend}: {fix}")


def _reject_extras(attention_bias, packed_seq_params, backend: str) -> None:
    if attention_bias is not None:
        raise ValueError(f"{backend} attention does not take attention_bias; pass None")
    if packed_seq_params is not None:
        raise ValueError(
            f"{backend} attention does not take packed sequences (thd); use the te backend"
        )


class SDPAAttention(_CoreAttention):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention` (any device)."""

    backend_name = "sdpa"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        _reject_extras(attention_bias, packed_seq_params, self.backend_name)
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # (b, np, sq, hn)
        k = key.permute(1, 2, 0, 3)  # (b, ng, sk, hn)
        v = value.permute(1, 2, 0, 3)  # (b, ng, sk, hn)

        causal = self._is_causal(attn_mask_type)
        allowed = None  # bool, True = attend, broadcastable to (b, np, sq, sk)
        if attention_mask is not None:
            allowed = ~attention_mask
            if causal:
                allowed = allowed & bottom_right_causal_mask(sq, sk, query.device)
        elif causal and sq != sk and sq > 1:
            allowed = bottom_right_causal_mask(sq, sk, query.device)  # (sq, sk)
        out = sdpa(
            q, k, v, allowed,
            is_causal=causal and allowed is None and sq == sk,  # top-left == bottom-right here
            scale=self.softmax_scale,
        )  # (b, np, sq, hn)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # (sq, b, np*hn)


class FlashAttention(_CoreAttention):
    """Core attention through flash-attn 2's `flash_attn_func` (CUDA, fp16/bf16 only).

    flash-attn aligns its causal mask bottom-right when sq != sk (flash-attn >= 2.1) and reads
    GQA key/value heads natively. It takes no arbitrary mask: `attention_mask` must be None.
    """

    backend_name = "flash"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from flash_attn import flash_attn_func  # lazy: only importable on GPU machines

        self._flash_attn_func = flash_attn_func

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        _reject_extras(attention_bias, packed_seq_params, self.backend_name)
        if attention_mask is not None:
            raise ValueError(
                "flash attention takes no attention_mask (causal only); pass attention_mask=None "
                "or set model.attention_backend=sdpa"
            )
        sq, b, np_, hn = query.shape
        out = self._flash_attn_func(
            query.transpose(0, 1),  # (b, sq, np, hn)
            key.transpose(0, 1),  # (b, sk, ng, hn)
            value.transpose(0, 1),  # (b, sk, ng, hn)
            dropout_p=0.0,
            softmax_scale=self.softmax_scale,
            causal=self._is_causal(attn_mask_type),
        )  # (b, sq, np, hn)
        return out.transpose(0, 1).reshape(sq, b, np_ * hn)  # (sq, b, np*hn)
