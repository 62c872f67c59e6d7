"""Tensor-name mapping between Hugging Face Llama / Falcon checkpoints and our global megatron tensors.

Our side is named by *global* megatron keys with the layer number spelled out, the way a
TP=1/PP=1 model's sharded state dict would name them one layer at a time, e.g.

    decoder.layers.3.self_attention.linear_qkv.weight      (g*(q/g+2)*d, h)
    decoder.layers.3.mlp.linear_fc1.layer_norm_weight      (h,)
    embedding.word_embeddings.weight                       (V_padded, h)

Each `Rule` ties one such tensor to the Hugging Face tensors it is made of, with the function in
each direction, so import and export are one table read two ways:

    llama (prefix model.layers.i.)             ours (prefix decoder.layers.i.)
    input_layernorm.weight                     self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.weight              self_attention.linear_qkv.weight   (grouped, below)
    self_attn.o_proj.weight                    self_attention.linear_proj.weight
    post_attention_layernorm.weight            mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight                  mlp.linear_fc1.weight              ([gate; up])
    mlp.down_proj.weight                       mlp.linear_fc2.weight

    falcon (prefix transformer.h.i.)
    ln_attn.{weight,bias} | input_layernorm.*  self_attention.linear_qkv.layer_norm_{weight,bias}
    ln_mlp.{weight,bias}  (2 LayerNorms only)  mlp.linear_fc1.layer_norm_{weight,bias}
    self_attention.query_key_value.weight      self_attention.linear_qkv.weight   (same layout)
    self_attention.dense.weight                self_attention.linear_proj.weight
    mlp.dense_h_to_4h.weight / dense_4h_to_h   mlp.linear_fc1.weight / linear_fc2.weight

megatron's fused QKV rows are grouped per key/value group g (of G groups, each head d rows):
    [q heads of group g (H/G of them), k_g, v_g]  for g = 0..G-1          # (G*(H/G+2)*d, h)
which is exactly Falcon's `query_key_value` layout (new decoder architecture, and Falcon-7B's
multi-query [q..., k, v] with G=1), so Falcon needs no permutation; Llama's separate q/k/v are
interleaved into it. Both use rotate-half RoPE, like megatron, so no row permutation inside heads.
Vocabulary rows are zero-padded to `padded_vocab_size` on import and dropped on export.

Each rule also states the shape of every Hugging Face tensor it reads, dimension by dimension,
with the quantity each dimension follows from ("hidden", "ffn", "kv" = G*d rows, "vocab",
"labels"), so an import can compare the safetensors headers with config.json before reading any
weight and name the config field a mismatch points at (`hf_config.shape_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from alfred_train.models.build import ModelShape

Tensor = torch.Tensor
Dim = tuple[int, str]  # (size, what it follows from: "hidden" | "ffn" | "kv" | "vocab" | "labels")


@dataclass(frozen=True)
class Rule:
    ours: str  # global megatron name, layer number spelled out
    hf: tuple[str, ...]  # the Hugging Face tensors it is made of
    to_ours: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]
    optional: bool = False  # may be absent on the HF side (then `missing` gives its value)
    missing: Callable[[], Tensor] | None = None
    hf_shapes: tuple[tuple[Dim, ...], ...] = ()  # the shape of each `hf` tensor, as config.json implies


def _dims(shape: ModelShape) -> tuple[Dim, Dim, Dim, Dim]:
    """hidden (h), ffn, kv rows (G*d) and vocabulary (V) of `shape`, each with its source."""
    d = shape.hidden_size // shape.num_attention_heads
    return ((shape.hidden_size, "hidden"), (shape.ffn_hidden_size, "ffn"),
            (shape.num_query_groups * d, "kv"), (shape.vocab_size, "vocab"))


def _same(ts: list[Tensor]) -> Tensor:
    return ts[0]


def _one(t: Tensor) -> list[Tensor]:
    return [t]


def qkv_to_grouped(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """Separate q (H*d, h), k (G*d, h), v (G*d, h) -> megatron's grouped (G*(H/G+2)*d, h)."""
    hidden = q.shape[1]
    d = q.shape[0] // heads
    q = q.reshape(groups, heads // groups * d, hidden)  # (G, H/G*d, h)
    k = k.reshape(groups, d, hidden)  # (G, d, h)
    v = v.reshape(groups, d, hidden)  # (G, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # (G*(H/G+2)*d, h)


def grouped_to_qkv(qkv: Tensor, heads: int, groups: int) -> list[Tensor]:
    """Inverse of `qkv_to_grouped`: -> [q (H*d, h), k (G*d, h), v (G*d, h)]."""
    hidden = qkv.shape[1]
    d = qkv.shape[0] // (heads + 2 * groups)
    per = heads // groups
    x = qkv.reshape(groups, per + 2, d, hidden)  # (G, H/G+2, d, h)
    q = x[:, :per].reshape(heads * d, hidden)
    k = x[:, per].reshape(groups * d, hidden)
    v = x[:, per + 1].reshape(groups * d, hidden)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _pad_rows(padded: int) -> Callable[[list[Tensor]], Tensor]:
    def pad(ts: list[Tensor]) -> Tensor:
        t = ts[0]  # (V, h)
        if t.shape[0] > padded:
            raise ValueError(f"vocabulary rows {t.shape[0]} exceed the padded size {padded}")
        out = t.new_zeros((padded, *t.shape[1:]))  # (V_padded, h)
        out[: t.shape[0]] = t
        return out
    return pad


def _drop_rows(vocab: int) -> Callable[[Tensor], list[Tensor]]:
    return lambda t: [t[:vocab].contiguous()]


def _layer_rules(shape: ModelShape, i: int) -> list[Rule]:
    ours = f"decoder.layers.{i}."
    h, ffn, kv, _ = _dims(shape)
    if shape.arch == "llama":
        hf = f"model.layers.{i}."
        heads, groups = shape.num_attention_heads, shape.num_query_groups
        return [
            Rule(ours + "self_attention.linear_qkv.layer_norm_weight", (hf + "input_layernorm.weight",), _same, _one,
                 hf_shapes=((h,),)),
            Rule(ours + "self_attention.linear_qkv.weight",
                 tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
                 lambda ts: qkv_to_grouped(*ts, heads=heads, groups=groups),
                 lambda t: grouped_to_qkv(t, heads=heads, groups=groups),
                 hf_shapes=((h, h), (kv, h), (kv, h))),  # q (H*d = h, h), k and v (G*d, h)
            Rule(ours + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), _same, _one,
                 hf_shapes=((h, h),)),
            Rule(ours + "mlp.linear_fc1.layer_norm_weight", (hf + "post_attention_layernorm.weight",), _same, _one,
                 hf_shapes=((h,),)),
            Rule(ours + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                 lambda ts: torch.cat(ts, dim=0),  # (2*ffn, h) = [gate; up]
                 lambda t: [c.contiguous() for c in t.chunk(2, dim=0)],
                 hf_shapes=((ffn, h), (ffn, h))),
            Rule(ours + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), _same, _one,
                 hf_shapes=((h, ffn),)),
        ]
    hf = f"transformer.h.{i}."
    attn_norm = "ln_attn" if shape.parallel_layernorms == 2 else "input_layernorm"
    rules = [Rule(ours + f"self_attention.linear_qkv.layer_norm_{p}", (hf + f"{attn_norm}.{p}",), _same, _one,
                  hf_shapes=((h,),)) for p in ("weight", "bias")]
    if shape.parallel_layernorms == 2:
        rules += [Rule(ours + f"mlp.linear_fc1.layer_norm_{p}", (hf + f"ln_mlp.{p}",), _same, _one,
                       hf_shapes=((h,),)) for p in ("weight", "bias")]
    qkv = (h[0] + 2 * kv[0], "kv")  # G*(H/G+2)*d = H*d + 2*G*d rows
    return rules + [
        Rule(ours + "self_attention.linear_qkv.weight", (hf + "self_attention.query_key_value.weight",), _same, _one,
             hf_shapes=((qkv, h),)),
        Rule(ours + "self_attention.linear_proj.weight", (hf + "self_attention.dense.weight",), _same, _one,
             hf_shapes=((h, h),)),
        Rule(ours + "mlp.linear_fc1.weight", (hf + "mlp.dense_h_to_4h.weight",), _same, _one, hf_shapes=((ffn, h),)),
        Rule(ours + "mlp.linear_fc2.weight", (hf + "mlp.dense_4h_to_h.weight",), _same, _one, hf_shapes=((h, ffn),)),
    ]


LM_HEAD = "lm_head.weight"  # an untied output layer (both families)


def embedding_name(shape: ModelShape) -> str:
    return "model.embed_tokens.weight" if shape.arch == "llama" else "transformer.word_embeddings.weight"


def rules_for(shape: ModelShape, kind: str, *, tied: bool = False) -> list[Rule]:
    """Every tensor of the model: kind "lm" (vocabulary head) or "scalar" (score head).

    tied: the HF checkpoint stores no `lm_head.weight`; our output layer copies the embedding.
    """
    llama = shape.arch == "llama"
    embed = embedding_name(shape)
    h, _, _, vocab = _dims(shape)
    pad, drop = _pad_rows(shape.padded_vocab_size), _drop_rows(shape.vocab_size)
    rules = [Rule("embedding.word_embeddings.weight", (embed,), pad, drop, hf_shapes=((vocab, h),))]
    for i in range(shape.num_layers):
        rules += _layer_rules(shape, i)
    if llama:
        rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _same, _one, hf_shapes=((h,),)))
    else:
        rules += [Rule(f"decoder.final_layernorm.{p}", (f"transformer.ln_f.{p}",), _same, _one, hf_shapes=((h,),))
                  for p in ("weight", "bias")]
    if kind == "scalar":
        one = (1, "labels")
        rules += [Rule("output_layer.weight", ("score.weight",), _same, _one, hf_shapes=((one, h),)),  # (1, h)
                  Rule("output_layer.bias", ("score.bias",), _same, _one, optional=True,
                       missing=lambda: torch.zeros(1), hf_shapes=((one,),))]  # transformers' score head has no bias
    else:
        rules.append(Rule("output_layer.weight", (embed if tied else LM_HEAD,), pad, drop, hf_shapes=((vocab, h),)))
    return rules


IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved, not a weight


def unexpected_hf_tensors(rules: list[Rule], hf_names: list[str], *, tied: bool = False) -> list[str]:
    """HF tensors no rule reads (e.g. biases the config did not announce); buffers excepted.
    tied: an `lm_head.weight` is a copy of the embedding (checked by the caller), not extra."""
    known = {n for r in rules for n in r.hf} | ({LM_HEAD} if tied else set())
    return [n for n in hf_names if n not in known and not n.endswith(IGNORED_HF_SUFFIXES)]


def hf_from_ours(rules: list[Rule], ours: dict[str, Tensor], *, tied: bool = False) -> dict[str, Tensor]:
    """Export: every HF tensor from our global tensors (`rules_for(..., tied=False)`).

    tied: write `lm_head.weight` only when it differs from the embedding (transformers re-ties it).
    An optional tensor (the score bias) is written only when it is not all zeros.
    """
    out = {}
    for rule in rules:
        t = ours[rule.ours]
        if rule.optional and not t.any():
            continue
        for name, part in zip(rule.hf, rule.to_hf(t)):
            out[name] = part
    if tied:
        out.pop(LM_HEAD, None)
    return out
