"""Falcon's decoder layer ("new decoder architecture", Falcon-40B/180B) on megatron-core.

megatron-core's `TransformerLayer` runs attention, then the MLP on the attention's output. Falcon
computes both from the *same* input and adds them to the residual together:

    x_attn = LN_attn(x)                 # (s, b, h)
    x_mlp  = LN_mlp(x)                  # (s, b, h)   (Falcon-7B: one LayerNorm, x_mlp = x_attn)
    out    = x + Attention(x_attn) + MLP(x_mlp)

The spec reuses megatron's local (or TE) attention and MLP modules; only the wiring changes.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class FalconLayer(TransformerLayer):
    """Parallel attention + MLP from two LayerNorms of the same input (no biases, no dropout)."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask=None, **kwargs):
        residual = hidden_states  # (s, b, h)
        attn_in = self.input_layernorm(hidden_states)
        one_norm = isinstance(self.pre_mlp_layernorm, IdentityOp)
        mlp_in = attn_in if one_norm else self.pre_mlp_layernorm(hidden_states)
        attn_out, attn_bias = self.self_attention(
            attn_in, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        mlp_out, mlp_bias = self.mlp(mlp_in)
        out = residual + attn_out + mlp_out
        for bias in (attn_bias, mlp_bias):
            if bias is not None:
                out = out + bias
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, context


def falcon_layer_spec(base: ModuleSpec, parallel_layernorms: int) -> ModuleSpec:
    """Turn a GPT layer spec (local or TE, LayerNorm, GELU MLP) into Falcon's parallel layer."""
    spec = copy.deepcopy(base)
    spec.module = FalconLayer
    if parallel_layernorms == 1:
        spec.submodules.pre_mlp_layernorm = IdentityOp
    return spec


__all__ = ["FalconLayer", "falcon_layer_spec"]
