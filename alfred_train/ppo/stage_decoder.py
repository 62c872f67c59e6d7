"""The fast forward of one pipeline stage: its layers run straight on their weights (decode and scoring).

Why not `GPTModel.forward` with megatron's `StaticInferenceContext` (kept as `MegatronKVCache` in
decode.py, the reference and the fallback)? A tiny decode step is ~95% overhead there: module
wrappers, RoPE cos/sin recomputed for every layer and step, the cache re-sliced and keys re-rotated,
a new mask per step. Here the same math is a short list of tensor ops per layer:

    x (B, s, h) -> norm -> qkv = x W_qkv^T                 (B, s, ng, (np/ng + 2) hn), megatron's
                                                            per-group "q.. k v" layout
                -> q (B, s, np, hn), k, v (B, s, ng, hn) -> RoPE by cache slot (table built once)
                -> k, v written into this stage's cache (L, B, ng, S, hn) at slots [start, start + s)
                -> SDPA(q, cache, mask) -> proj (+ TP all-reduce) -> residual; MLP likewise
    last stage: final norm -> logits shard (B, s, V/tp) -> TP all-gather -> (B, s, V)

A decode step attends over the first w slots of the cache (B, ng, w, hn), and an additive
(B, 1, 1, w) key bias (-inf) hides padding and not-yet-written slots. Eagerly, w = the slots filled so
far; a captured or compiled step takes w = S, the whole cache: static shapes, the same kernel sequence
every step (what a CUDA graph needs). Slot-based RoPE (not position ids) is megatron's rule too; q.k
depends only on slot differences, which left padding shifts equally.

Supported: megatron's local layer spec (torch norms), llama (RMSNorm, SwiGLU) and Falcon's parallel
layer (LayerNorm, GELU), no linear biases, num_query_groups divisible by TP; LoRA adapters
(models/lora.py: each delta added where its forward hook adds it), except on Falcon's parallel layer.
`unsupported_reason` names what is not; generation and scoring then use megatron's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alfred_train.kernels.sdpa import sdpa


def unsupported_reason(model, tp: int) -> str | None:
    """Why `StageDecoder` cannot run this model chunk (None: it can)."""
    from megatron.core.transformer.identity_op import IdentityOp

    cfg = model.config
    checks = [
        (cfg.add_bias_linear or cfg.add_qkv_bias, "linear biases"),
        (cfg.num_query_groups % tp != 0, "fewer query groups than TP ranks"),
        (getattr(cfg, "multi_latent_attention", False), "multi-latent attention"),
        (cfg.rotary_interleaved, "interleaved RoPE"),
        (getattr(model, "position_embedding_type", None) != "rope", "no RoPE"),
        (cfg.fp32_residual_connection or cfg.apply_residual_connection_post_layernorm, "residual options"),
        (cfg.normalization not in ("RMSNorm", "LayerNorm"), f"normalization {cfg.normalization}"),
        # models/lora.py adds each adapter's delta in a forward hook on the wrapped linear; the fast
        # decoder adds the same deltas itself (`_column`, `_row`), but not inside Falcon's one reduce
        (getattr(model, "lora_spec", None) is not None and
         any(type(layer).__name__ == "FalconLayer" for layer in model.decoder.layers),
         "LoRA adapters on Falcon's parallel layers"),
        # PPO's frozen copies (reference, reward) of an adapted model turn its adapters off in a wrapper
        (type(model).__name__ == "AdaptersOff", "a frozen copy of an adapted model"),
    ]
    for bad, what in checks:
        if bad:
            return what
    for layer in model.decoder.layers:
        att = layer.self_attention
        if type(layer).__name__ not in ("TransformerLayer", "FalconLayer"):
            return f"layer type {type(layer).__name__}"
        if isinstance(layer.input_layernorm, IdentityOp) or type(att.linear_qkv).__name__ != "ColumnParallelLinear":
            return "fused (Transformer Engine) layer norm + linear"
        if not isinstance(getattr(att, "q_layernorm", None) or IdentityOp(), IdentityOp) or \
                not isinstance(getattr(att, "k_layernorm", None) or IdentityOp(), IdentityOp):
            return "q/k layer norms"
        if getattr(att.config, "attention_output_gate", False):
            return "gated attention"
    return None


@dataclass(frozen=True)
class _Linear:
    """One linear of a layer: this rank's weight shard and its LoRA adapter (models/lora.py), if any."""

    weight: torch.Tensor
    adapter: torch.nn.Module | None


@dataclass(frozen=True)
class _Layer:
    """What a decode step reads of one layer, looked up once per generation, not once per step
    (module attribute lookups are a tenth of a small CPU step)."""

    input_norm: object  # x -> normed x
    pre_mlp_norm: object | None  # None: Falcon's parallel layer feeds its MLP the attention's input norm
    qkv: _Linear
    proj: _Linear
    fc1: _Linear
    fc2: _Linear
    falcon: bool  # Falcon's parallel layer: x + Attention(LN(x)) + MLP(LN'(x)), one TP reduce


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight


class StageDecoder:
    """This stage's layers + a KV cache for B rows of up to S = P + N slots.

    `forward` runs a prompt (prefill, slots 0 .. P-1, some or all rows) or one token per row (each
    row at its own slot): x is token ids (B, s) on the first stage, the previous stage's hidden
    states (B, s, h) otherwise; returns hidden states (B, s, h), or logits (B, s, V) (gathered
    over TP) of the newest position (B, 1, V) on the last stage.
    """

    def __init__(self, model, runtime, batch: int, max_len: int, cache: bool = True):
        cfg = model.config
        self.model, self.runtime = model, runtime
        self.tp = runtime.dims.tp
        self.heads = cfg.num_attention_heads // self.tp  # np on this TP rank
        self.groups = cfg.num_query_groups // self.tp  # ng
        self.head_dim = cfg.kv_channels  # hn
        self.scale = model.decoder.layers[0].self_attention.core_attention.softmax_scale \
            if self.model.decoder.layers else self.head_dim ** -0.5
        self.gated = cfg.gated_linear_unit
        self.activation = cfg.activation_func
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.layers = [self._plan(layer) for layer in model.decoder.layers]
        self.final_norm = self._norm_fn(model.decoder.final_layernorm) if model.post_process else None
        cache_shape = (len(self.layers), batch, self.groups, max_len, self.head_dim)  # (L, B, ng, S, hn)
        self.row_index = torch.arange(batch, device=self.device)  # (B,)
        # cache=False: whole sequences only (scoring), nothing kept; per layer: (B, ng, S, hn) views
        self.keys = list(torch.zeros(cache_shape, dtype=self.dtype, device=self.device)) if cache else None
        self.values = list(torch.zeros(cache_shape, dtype=self.dtype, device=self.device)) if cache else None
        emb = model.rotary_pos_emb.get_emb(max_len).to(self.device)[:, 0, 0, :]  # (S, rot) float32
        half = emb.shape[-1] // 2
        self.rot_dim = emb.shape[-1]
        self.cos = emb.cos().to(self.dtype)  # (S, rot): megatron's cos(freqs).to(dtype)
        sin = emb.sin().to(self.dtype)
        # rotate_half(t) * sin == roll(t, half) * [-sin_1, sin_2]: the same products, one op fewer
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # (S, rot)

    # ----------------------------------------------------------------- the layers' weights

    def _norm_fn(self, norm):
        """The layer's torch norm; fp32 RMSNorm spelled out (torch's fused CPU kernel costs ~30 us per
        small call, the four ops of `_rms_norm` ~8 us; same formula, rounding may differ in the last bit)."""
        if self.dtype == torch.float32 and isinstance(norm, torch.nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(self.dtype).eps
            return partial(_rms_norm, weight=norm.weight, eps=eps)
        return norm

    def _plan(self, layer) -> _Layer:
        def linear(parent, name):  # LoRA adapters are the parent's `lora_<name>` children
            return _Linear(getattr(parent, name).weight, getattr(parent, f"lora_{name}", None))

        att, mlp = layer.self_attention, layer.mlp
        falcon = type(layer).__name__ == "FalconLayer"
        shared = falcon and type(layer.pre_mlp_layernorm).__name__ == "IdentityOp"
        return _Layer(self._norm_fn(layer.input_layernorm), None if shared else self._norm_fn(layer.pre_mlp_layernorm),
                      linear(att, "linear_qkv"), linear(att, "linear_proj"), linear(mlp, "linear_fc1"),
                      linear(mlp, "linear_fc2"), falcon)

    # ----------------------------------------------------------------- pieces

    def _tp_sum(self, x):
        if self.tp > 1:
            dist.all_reduce(x, group=self.runtime.tp_group)
        return x

    @staticmethod
    def _lora(linear: _Linear, x, y):
        """y plus the linear's LoRA delta for input x, as models/lora.py's hook adds it."""
        adapter = linear.adapter
        return y if adapter is None or not adapter.enabled else y + adapter.delta(x).to(y.dtype)

    def _column(self, linear: _Linear, x):
        """A column-parallel linear: this rank's output shard (+ its adapter's)."""
        return self._lora(linear, x, F.linear(x, linear.weight))

    def _row(self, linear: _Linear, x, reduce: bool = True):
        """A row-parallel linear, summed over TP (+ its adapter's delta after the sum, as megatron's
        forward hook sees it); reduce=False: this rank's partial sum (Falcon's one reduce per layer)."""
        y = F.linear(x, linear.weight)
        return self._lora(linear, x, self._tp_sum(y)) if reduce else y

    def _rope(self, t, cos, sin):  # t (..., hn); cos, sin broadcast to (..., rot)
        if self.rot_dim == t.shape[-1]:
            return t * cos + t.roll(self.rot_dim // 2, dims=-1) * sin
        r, rest = t[..., :self.rot_dim], t[..., self.rot_dim:]
        return torch.cat([r * cos + r.roll(self.rot_dim // 2, dims=-1) * sin, rest], dim=-1)

    def _rope_tables(self, slots, decode: bool):
        """cos, sin at the given slots, shaped for (B, s, ng, heads per group + 1, hn): built once per
        forward, shared by every layer. Decode: slots (B,) -> (B, 1, 1, 1, rot); prefill: (P,) -> (1, P, 1, 1, rot)."""
        cos, sin = self.cos[slots], self.sin_signed[slots]
        if decode:
            return cos[:, None, None, None], sin[:, None, None, None]
        return cos[None, :, None, None], sin[None, :, None, None]

    def _attention(self, index, layer: _Layer, x, slots, mask, rows, rope, reduce=True):
        """x (B, s, h) normed -> attention output projected (B, s, h), summed over TP (reduce=False: not yet).

        Prefill (mask bool (R, 1, P, P), True = attend; None: causal, no padding): slots (P,) = 0 .. P-1; the
        prompt attends to its own fresh keys; they are written to cache rows `rows` (None: all).
        Decode (mask = additive bias (B, 1, 1, w)): slots (B,) each row's own cache slot.
        rope: `_rope_tables(slots, ...)`. A group's queries and key are rotated in one pass.
        """
        batch, seq, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self._column(layer.qkv, x).view(batch, seq, self.groups, per_group + 2, self.head_dim)
        qk = self._rope(qkv[:, :, :, :per_group + 1], *rope)  # (B, s, ng, np/ng + 1, hn) rotated
        q = qk[:, :, :, :per_group].reshape(batch, seq, self.heads, self.head_dim)  # (B, s, np, hn)
        k, v = qk[:, :, :, per_group], qkv[:, :, :, per_group + 1]  # (B, s, ng, hn)
        if mask is None or mask.dtype == torch.bool:  # prefill, or a whole sequence without a cache (scoring)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (R, ng, P, hn)
            if self.keys is not None:
                keys, values = self.keys[index], self.values[index]  # (B, ng, S, hn)
                if rows is None:
                    keys[:, :, :seq], values[:, :, :seq] = k, v
                else:
                    keys[rows, :, :seq], values[rows, :, :seq] = k, v
            out = sdpa(q.transpose(1, 2), k, v, mask, is_causal=mask is None, scale=self.scale)  # (R, np, P, hn)
            out = out.transpose(1, 2)  # (R, P, np, hn)
        else:  # one token per row at its own slot; a query head's group is head // (np/ng)
            keys, values = self.keys[index], self.values[index]  # (B, ng, S, hn)
            keys[self.row_index, :, slots] = k[:, 0]  # (B, ng, hn) at (row b, slot_b)
            values[self.row_index, :, slots] = v[:, 0]
            width = mask.shape[-1]  # the slots filled so far, or S (a captured or compiled step)
            q = q.view(batch, self.groups, per_group, self.head_dim)  # (B, ng, np/ng, hn)
            scores = torch.matmul(q, keys[:, :, :width].transpose(-1, -2)).mul_(self.scale).add_(mask)
            probs = scores.float().softmax(dim=-1).to(values.dtype)  # (B, ng, np/ng, w)
            out = torch.matmul(probs, values[:, :, :width])  # (B, ng, np/ng, hn) == (B, 1, np, hn) in head order
        out = out.reshape(batch, seq, self.heads * self.head_dim)
        return self._row(layer.proj, out, reduce)  # (B, s, h)

    def _mlp(self, layer: _Layer, x, reduce=True):
        y = self._column(layer.fc1, x)
        if self.gated:
            gate, up = torch.chunk(y, 2, dim=-1)
            y = self.activation(gate) * up
        else:
            y = self.activation(y)
        return self._row(layer.fc2, y, reduce)

    def _embed(self, ids):
        emb = self.model.embedding
        if self.tp == 1:
            return F.embedding(ids, emb.word_embeddings.weight)  # (B, s, h)
        return emb(input_ids=ids, position_ids=None).transpose(0, 1)  # megatron gives (s, B, h)

    def _logits(self, x, gather: bool = True):
        x = self.final_norm(x)
        head = self.model.output_layer
        if type(head).__name__ == "ScalarHead":  # a reward / value model: one score per position (B, s, 1)
            return F.linear(x, head.weight, head.bias)
        shard = F.linear(x, head.weight)  # (B, s, V/tp)
        if self.tp == 1 or not gather:
            return shard
        parts = [torch.empty_like(shard) for _ in range(self.tp)]
        dist.all_gather(parts, shard.contiguous(), group=self.runtime.tp_group)
        return torch.cat(parts, dim=-1)  # (B, s, V)

    # ----------------------------------------------------------------- one forward

    def forward(self, x, slots, mask, rows=None):
        """x: ids (B, s) on the first stage, hidden (B, s, h) after. Prefill: slots (P,) = 0 .. P-1,
        mask (R, 1, P, P) bool (True = attend), rows (R,) the cache rows written (None: all B).
        Decode (s = 1): slots (B,) each row's cache slot, mask an additive bias (B, 1, 1, w) over
        cache slots [0, w): 0 where visible, -inf elsewhere."""
        x = self._layers(x, slots, mask, rows)
        if self.model.post_process:
            return self._logits(x[:, -1:])  # only the newest position is ever sampled from: (B, 1, V)
        return x

    def score(self, ids, mask):
        """A whole-sequence forward of one stage that is first and last, without a cache (scoring):
        ids (B, L), mask (B, 1, L, L) bool True = attend (None: causal, no padding) -> this TP rank's
        vocabulary shard of the logits (B, L, V/tp), or a scalar head's (B, L, 1)."""
        slots = torch.arange(ids.shape[1], device=ids.device)
        return self._logits(self._layers(ids, slots, mask, None), gather=False)

    def _layers(self, x, slots, mask, rows):
        if self.model.pre_process:
            x = self._embed(x)
        rope = self._rope_tables(slots, decode=mask is not None and mask.dtype != torch.bool)
        for i, layer in enumerate(self.layers):
            normed = layer.input_norm(x)
            att = self._attention(i, layer, normed, slots, mask, rows, rope, reduce=not layer.falcon)
            if layer.falcon:  # out = x + Attention(LN_attn(x)) + MLP(LN_mlp(x)), one reduce
                mlp_in = normed if layer.pre_mlp_norm is None else layer.pre_mlp_norm(x)
                x = x + self._tp_sum(att + self._mlp(layer, mlp_in, reduce=False))
            else:
                x = x + att
                x = x + self._mlp(layer, layer.pre_mlp_norm(x))
        return x
