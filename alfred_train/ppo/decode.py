"""The rollout decoder's forward: this pipeline stage's layers run straight on their weights.

Why not `GPTModel.forward` with megatron's `StaticInferenceContext` (kept as `MegatronKVCache` in
generation.py, the reference and the fallback)? A tiny decode step is ~95% overhead there: module
wrappers, RoPE cos/sin recomputed for every layer and step, the cache re-sliced and keys re-rotated,
a new mask per step. Here the same math is a short list of tensor ops per layer:

    x (B, s, h) -> norm -> qkv = x W_qkv^T                 (B, s, ng, (np/ng + 2) hn), megatron's
                                                            per-group "q.. k v" layout
                -> q (B, s, np, hn), k, v (B, s, ng, hn) -> RoPE by cache slot (table built once)
                -> k, v written into this stage's cache (L, B, ng, S, hn) at slots [start, start + s)
                -> SDPA(q, cache, mask) -> proj (+ TP all-reduce) -> residual; MLP likewise
    last stage: final norm -> logits shard (B, s, V/tp) -> TP all-gather -> (B, s, V)

Static shapes for a decode step: every step attends over the whole cache (B, ng, S, hn) and an
additive (B, 1, 1, S) key bias (-inf) hides padding and not-yet-written slots, so the step is the same kernel
sequence every time (what a CUDA graph needs). Slot-based RoPE (not position ids) is megatron's
rule too; q.k depends only on slot differences, which left padding shifts equally.

Supported: megatron's local layer spec (torch norms), llama (RMSNorm, SwiGLU) and Falcon's parallel
layer (LayerNorm, GELU), no linear biases, num_query_groups divisible by TP; LoRA adapters
(models/lora.py: each delta added where its forward hook adds it), except on Falcon's parallel layer.
`unsupported_reason` names what is not; generation then falls back to megatron's own forward.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alfred_train.errors import ConfigError
from alfred_train.models.build import unwrap

log = logging.getLogger("alfred_train")


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
        self.falcon = [type(layer).__name__ == "FalconLayer" for layer in model.decoder.layers]
        self.gated = cfg.gated_linear_unit
        self.activation = cfg.activation_func
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        layers = len(model.decoder.layers)
        # LoRA adapters by (id(parent module), target linear): a lookup, not a failing getattr, per linear
        self.adapters = {(id(parent), name[len("lora_"):]): adapter for layer in model.decoder.layers
                         for parent in (layer.self_attention, layer.mlp)
                         for name, adapter in parent.named_children() if name.startswith("lora_")}
        cache_shape = (layers, batch, self.groups, max_len, self.head_dim)  # (L, B, ng, S, hn)
        self.row_index = torch.arange(batch, device=self.device)  # (B,)
        # cache=False: whole sequences only (scoring), nothing kept
        self.keys = torch.zeros(cache_shape, dtype=self.dtype, device=self.device) if cache else None
        self.values = torch.zeros(cache_shape, dtype=self.dtype, device=self.device) if cache else None
        emb = model.rotary_pos_emb.get_emb(max_len).to(self.device)[:, 0, 0, :]  # (S, rot) float32
        half = emb.shape[-1] // 2
        self.rot_dim = emb.shape[-1]
        self.cos = emb.cos().to(self.dtype)  # (S, rot): megatron's cos(freqs).to(dtype)
        sin = emb.sin().to(self.dtype)
        # rotate_half(t) * sin == roll(t, half) * [-sin_1, sin_2]: the same products, one op fewer
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # (S, rot)

    # ----------------------------------------------------------------- pieces

    def _norm(self, norm, x):
        """The layer's torch norm; fp32 RMSNorm spelled out (torch's fused CPU kernel costs ~30 us per
        small call, the four ops below ~8 us; same formula, rounding may differ in the last bit)."""
        if self.dtype == torch.float32 and isinstance(norm, torch.nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * norm.weight
        return norm(x)

    def _tp_sum(self, x):
        if self.tp > 1:
            dist.all_reduce(x, group=self.runtime.tp_group)
        return x

    def _lora(self, parent, target, x, y):
        """y plus the LoRA adapter's delta of `parent.target` for input x, as models/lora.py's hook adds it."""
        adapter = self.adapters.get((id(parent), target))
        return y if adapter is None or not adapter.enabled else y + adapter.delta(x).to(y.dtype)

    def _column(self, parent, target, x):
        """A column-parallel linear: this rank's output shard (+ its adapter's)."""
        return self._lora(parent, target, x, F.linear(x, getattr(parent, target).weight))

    def _row(self, parent, target, x, reduce: bool = True):
        """A row-parallel linear, summed over TP (+ its adapter's delta after the sum, as megatron's
        forward hook sees it); reduce=False: this rank's partial sum (Falcon's one reduce per layer)."""
        y = F.linear(x, getattr(parent, target).weight)
        return self._lora(parent, target, x, self._tp_sum(y)) if reduce else y

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

    def _attention(self, index, att, x, slots, mask, rows, rope, reduce=True):
        """x (B, s, h) normed -> attention output projected (B, s, h), summed over TP (reduce=False: not yet).

        Prefill (mask bool (R, 1, P, P), True = attend; None: causal, no padding): slots (P,) = 0 .. P-1; the
        prompt attends to its own fresh keys; they are written to cache rows `rows` (None: all).
        Decode (mask = additive bias (B, 1, 1, w)): slots (B,) each row's own cache slot.
        rope: `_rope_tables(slots, ...)`. A group's queries and key are rotated in one pass.
        """
        batch, seq, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self._column(att, "linear_qkv", x).view(batch, seq, self.groups, per_group + 2, self.head_dim)
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
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale, enable_gqa=self.heads != self.groups)  # (R, np, P, hn)
            out = out.transpose(1, 2)  # (R, P, np, hn)
        else:  # one token per row at its own slot; a query head's group is head // (np/ng)
            keys, values = self.keys[index], self.values[index]  # (B, ng, S, hn)
            keys[self.row_index, :, slots] = k[:, 0]  # (B, ng, hn) at (row b, slot_b)
            values[self.row_index, :, slots] = v[:, 0]
            width = mask.shape[-1]  # S, or on CPU the slots filled so far
            q = q.view(batch, self.groups, per_group, self.head_dim)  # (B, ng, np/ng, hn)
            scores = torch.matmul(q, keys[:, :, :width].transpose(-1, -2)).mul_(self.scale).add_(mask)
            probs = scores.float().softmax(dim=-1).to(values.dtype)  # (B, ng, np/ng, w)
            out = torch.matmul(probs, values[:, :, :width])  # (B, ng, np/ng, hn) == (B, 1, np, hn) in head order
        out = out.reshape(batch, seq, self.heads * self.head_dim)
        return self._row(att, "linear_proj", out, reduce)  # (B, s, h)

    def _mlp(self, mlp, x, reduce=True):
        y = self._column(mlp, "linear_fc1", x)
        if self.gated:
            gate, up = torch.chunk(y, 2, dim=-1)
            y = self.activation(gate) * up
        else:
            y = self.activation(y)
        return self._row(mlp, "linear_fc2", y, reduce)

    def _embed(self, ids):
        emb = self.model.embedding
        if self.tp == 1:
            return F.embedding(ids, emb.word_embeddings.weight)  # (B, s, h)
        return emb(input_ids=ids, position_ids=None).transpose(0, 1)  # megatron gives (s, B, h)

    def _logits(self, x, gather: bool = True):
        x = self._norm(self.model.decoder.final_layernorm, x)
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
        for i, layer in enumerate(self.model.decoder.layers):
            normed = self._norm(layer.input_layernorm, x)
            att = self._attention(i, layer.self_attention, normed, slots, mask, rows, rope, reduce=not self.falcon[i])
            if self.falcon[i]:  # out = x + Attention(LN_attn(x)) + MLP(LN_mlp(x)), one reduce
                mlp_in = normed if type(layer.pre_mlp_layernorm).__name__ == "IdentityOp" \
                    else self._norm(layer.pre_mlp_layernorm, x)
                x = x + self._tp_sum(att + self._mlp(layer.mlp, mlp_in, reduce=False))
            else:
                x = x + att
                x = x + self._mlp(layer.mlp, self._norm(layer.pre_mlp_layernorm, x))
        return x


# --------------------------------------------------------------------------- masks and positions

def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token; padding gets 0. mask (B, S) -> (B, S)."""
    return (mask.long().cumsum(dim=1) - 1).clamp_min(0)


def attention_mask_for(key_is_real: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal + padding mask for the last `num_queries` positions: (B, 1, sq, sk) bool, True = hidden.

    key_is_real (B, sk): 1 on real tokens. Query i sits at slot sk - sq + i and sees key j iff
    j <= its slot and (key j is real or j is the query's own slot): a padding query sees only
    itself, so no softmax row is empty (an empty row gives NaN, which would leak through 0 * NaN).
    """
    sk = key_is_real.shape[1]
    device = key_is_real.device
    q_slot = torch.arange(sk - num_queries, sk, device=device)[:, None]  # (sq, 1)
    k_slot = torch.arange(sk, device=device)[None, :]  # (1, sk)
    visible = (k_slot <= q_slot) & (key_is_real.bool()[:, None, :] | (k_slot == q_slot))  # (B, sq, sk)
    return ~visible[:, None]  # (B, 1, sq, sk)


# --------------------------------------------------------------------------- pipeline stage I/O and decoders

def _single_chunk(chunks) -> torch.nn.Module:
    if len(chunks) != 1:
        raise ConfigError(f"generation runs one model chunk per rank, got {len(chunks)} (virtual pipeline "
                          "stages): set parallel.vpp to null for generation")
    model = unwrap(chunks[0])
    if model.config.sequence_parallel:
        raise ConfigError("generation does not support sequence parallelism: set parallel.sequence_parallel=false")
    return model


def _stage_rank(runtime, pp_rank: int) -> int:
    return dist.get_global_rank(runtime.pp_group, pp_rank)


def share_from_sampler(tensor, runtime, shape, dtype) -> torch.Tensor:
    """A tensor from the sampling rank (last stage, TP rank 0) to every rank of its TP and PP groups;
    `tensor` is None elsewhere (a buffer of `shape`, `dtype` receives it)."""
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=runtime.device)
    if runtime.dims.tp > 1 and runtime.is_last_stage:
        dist.broadcast(tensor, src=dist.get_global_rank(runtime.tp_group, 0), group=runtime.tp_group)
    if runtime.dims.pp > 1:
        dist.broadcast(tensor, src=_stage_rank(runtime, runtime.dims.pp - 1), group=runtime.pp_group)
    return tensor


def stage_forward(model, runtime, input_ids, position_ids, attention_mask, *, inference_context=None):
    """This stage's forward of one micro-batch, hidden states passed stage to stage with send/recv.

    input_ids, position_ids (B, s); attention_mask (B, 1, s, sk). Returns the gathered logits
    (B, s', V) on the last stage (s' = 1 with a KV cache: only the newest position), else None.
    """
    batch, seq = input_ids.shape
    if not runtime.is_first_stage:
        cfg = model.config
        hidden = torch.empty(seq, batch, cfg.hidden_size, dtype=cfg.params_dtype, device=runtime.device)
        dist.recv(hidden, src=_stage_rank(runtime, runtime.pp_rank - 1), group=runtime.pp_group)  # (s, B, h)
        model.set_input_tensor(hidden)
    out = model(input_ids, position_ids, attention_mask, inference_context=inference_context,
                runtime_gather_output=True)
    if runtime.is_last_stage:
        return out  # (B, s', V)
    dist.send(out.contiguous(), dst=_stage_rank(runtime, runtime.pp_rank + 1), group=runtime.pp_group)
    return None


class KVCacheForward:
    """The fast path: prompts prefilled into this stage's own static KV cache (`StageDecoder`), then
    one (B, 1) token per step, each row at its own cache slot. RoPE tables and the key bias are
    built once per generation; the slots live on the device (no host value in a step: the same
    kernels every step). `refill` starts new prompts in some rows while the others go on
    (continuous batching): those rows' slots, key bias and cache are reset and their prompt is
    prefilled; a row's computation does not depend on the other rows."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        batch, prompt_len = prompt_ids.shape
        device = prompt_ids.device
        self.model, self.runtime, self.prompt_ids, self.prompt_mask = model, runtime, prompt_ids, prompt_mask
        self.max_len = prompt_len + max_new_tokens  # S
        self.decoder = StageDecoder(model, runtime, batch, self.max_len)
        self.key_bias = torch.empty(batch, 1, 1, self.max_len, dtype=self.decoder.dtype, device=device)  # (B,1,1,S)
        self.slot = torch.empty(batch, dtype=torch.long, device=device)  # (B,) each row's next cache slot
        # on a GPU every step attends over all S slots (static shapes, one kernel sequence); on CPU a
        # step reads only the slots filled so far (its width, counted on the host, costs nothing there)
        self.width = None if device.type == "cuda" else prompt_len
        self.hidden_size = model.config.hidden_size

    def _run(self, x, slots, mask, rows=None):
        rt = self.runtime
        if not rt.is_first_stage:
            batch, seq = x.shape
            x = torch.empty(batch, seq, self.hidden_size, dtype=self.decoder.dtype, device=rt.device)
            dist.recv(x, src=_stage_rank(rt, rt.pp_rank - 1), group=rt.pp_group)  # (B, s, h)
        out = self.decoder.forward(x, slots, mask, rows)
        if rt.is_last_stage:
            return out[:, -1]  # (B, V)
        dist.send(out.contiguous(), dst=_stage_rank(rt, rt.pp_rank + 1), group=rt.pp_group)
        return None

    def _start(self, prompt_ids, prompt_mask, rows):
        prompt_len = prompt_ids.shape[1]
        real = prompt_mask.bool()  # (R, P)
        bias = torch.full((real.shape[0], self.max_len), float("-inf"), dtype=self.key_bias.dtype,
                          device=real.device)
        bias[:, :prompt_len].masked_fill_(real, 0.0)  # (R, S): prompt tokens visible, the rest not yet
        if rows is None:
            self.key_bias[:, 0, 0] = bias
            self.slot.fill_(prompt_len)
        else:
            self.key_bias[rows, 0, 0] = bias
            self.slot[rows] = prompt_len
        # (R, 1, P, P) True = attend; without padding plain causal attention (SDPA's fast path)
        mask = None if bool(real.all()) else ~attention_mask_for(real, prompt_len)
        return self._run(prompt_ids, torch.arange(prompt_len, device=real.device), mask, rows)

    def prefill(self):
        return self._start(self.prompt_ids, self.prompt_mask, None)

    def refill(self, rows, prompt_ids, prompt_mask):
        """Start prompts (R, P) (left-padded to the generation's P) in cache rows `rows` (R,): (R, V)."""
        return self._start(prompt_ids, prompt_mask, rows)

    def step(self, tokens):
        return self.step_local(tokens, communicate=True)

    def step_local(self, x, communicate: bool = False):
        """One decode step; x: tokens (B,) on the first stage, else the previous stage's hidden states
        (B, 1, h) (with communicate=True: received here). Without communication: this stage's output,
        hidden (B, 1, h) or logits (B, 1, V), for a caller that moves it (the pipelined decoder)."""
        self.key_bias[self.decoder.row_index, 0, 0, self.slot] = 0.0  # each new token sees itself
        bias = self.key_bias
        if self.width is not None:
            self.width = min(self.width + 1, self.max_len)
            bias = bias[..., :self.width]  # (B, 1, 1, w)
        x = x[:, None] if x.dim() == 1 else x
        out = self._run(x, self.slot, bias) if communicate else self.decoder.forward(x, self.slot, bias)
        self.slot.add_(1).clamp_max_(self.max_len - 1)  # a finished row may idle on: keep its slot in range
        return out


class MegatronKVCache:
    """Reference / fallback: megatron's own forward with its `StaticInferenceContext` KV cache."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, prompt_len = prompt_ids.shape
        self.model, self.runtime = model, runtime
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.ctx = StaticInferenceContext(batch, prompt_len + max_new_tokens)
        new = torch.ones(batch, max_new_tokens, dtype=torch.bool, device=prompt_ids.device)
        self.key_is_real = torch.cat([prompt_mask.bool(), new], dim=1)  # (B, P + N)
        self.next_position = prompt_mask.long().sum(dim=1, keepdim=True)  # (B, 1)

    def prefill(self):
        prompt_len = self.prompt_ids.shape[1]
        mask = attention_mask_for(self.key_is_real[:, :prompt_len], prompt_len)  # (B, 1, P, P)
        out = stage_forward(self.model, self.runtime, self.prompt_ids, position_ids_from_mask(self.prompt_mask),
                            mask, inference_context=self.ctx)
        self.ctx.increment_sequence_len_offset(prompt_len)
        self.ctx.enable_decode_mode()
        return None if out is None else out[:, -1]  # (B, V)

    def step(self, tokens):
        filled = self.ctx.sequence_len_offset
        mask = attention_mask_for(self.key_is_real[:, :filled + 1], 1)  # (B, 1, 1, filled + 1)
        out = stage_forward(self.model, self.runtime, tokens[:, None], self.next_position, mask,
                            inference_context=self.ctx)
        self.ctx.increment_sequence_len_offset(1)
        self.next_position = self.next_position + 1
        return None if out is None else out[:, -1]  # (B, V)


class FullReforward:
    """Reference decoder without a cache: every step re-runs the whole sequence so far."""

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        self.model, self.runtime = model, runtime
        self.ids, self.real = prompt_ids, prompt_mask.bool()  # (B, S) growing

    def _run(self):
        seq = self.ids.shape[1]
        out = stage_forward(self.model, self.runtime, self.ids, position_ids_from_mask(self.real),
                            attention_mask_for(self.real, seq))
        return None if out is None else out[:, -1]  # (B, V)

    def prefill(self):
        return self._run()

    def step(self, tokens):
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.real = torch.cat([self.real, torch.ones_like(self.real[:, :1])], dim=1)
        return self._run()


def _check_attention_backend(model) -> None:
    layers = model.decoder.layers
    if len(layers) and type(layers[0].self_attention.core_attention).__name__ == "FlashAttention":
        raise ConfigError("generation needs padding masks, which the flash attention backend does not take: "
                          "set model.attention_backend=sdpa")


class CudaGraphDecode:
    """`KVCacheForward` with its decode step captured once in a CUDA graph and replayed after.

    The step is capturable because nothing in it depends on a host value: the cache slot, the key
    bias and the cache are device tensors updated in place, shapes are static (every step attends
    over all S slots). Two eager warm-up steps run on a side stream (CUDA's lazy init, cuBLAS
    workspaces), the third is captured (capture records, it runs nothing) and replayed. Any failure
    to capture logs one warning and the generation goes on eagerly: the same tokens, slower. The
    graph and its memory pool live only inside one `generate` call (`close`), so the training phase
    that follows never holds them. TP/PP collectives are not captured: one rank, one stage only.
    """

    WARMUP_STEPS = 2

    def __init__(self, model, runtime, prompt_ids, prompt_mask, max_new_tokens: int):
        self.eager = KVCacheForward(model, runtime, prompt_ids, prompt_mask, max_new_tokens)
        self.graph, self.failed, self.steps = None, False, 0
        self.tokens = self.logits = None  # the graph's static input (B,) and output (B, V)

    def prefill(self):
        return self.eager.prefill()

    def refill(self, rows, prompt_ids, prompt_mask):  # eager, in place on the tensors the graph reads
        return self.eager.refill(rows, prompt_ids, prompt_mask)

    def step(self, tokens):
        self.steps += 1
        if self.graph is None and not self.failed:
            if self.steps <= self.WARMUP_STEPS:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.eager.step(tokens)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(tokens)
        if self.graph is None:
            return self.eager.step(tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits

    def _capture(self, tokens):
        graph = torch.cuda.CUDAGraph()
        self.tokens = tokens.clone()
        try:
            with torch.cuda.graph(graph):
                self.logits = self.eager.step(self.tokens)
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.failed, self.tokens, self.logits = True, None, None
            log.warning("generation: CUDA-graph capture of the decode step failed (%s: %s); decoding eagerly",
                        type(err).__name__, err)

    def close(self):
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.tokens = self.logits = None


def choose_decoder(model, runtime):
    """The fastest decoder this model and layout allow: `CudaGraphDecode` on one GPU rank,
    `KVCacheForward` where `StageDecoder` supports the model, else megatron's `MegatronKVCache`."""
    reason = unsupported_reason(model, runtime.dims.tp)
    if reason:
        log.info("generation: megatron's own forward decodes (the fast decoder does not support %s)", reason)
        return MegatronKVCache
    on_gpu = torch.device(runtime.device).type == "cuda"
    if on_gpu and CUDA_GRAPHS and runtime.dims.tp == 1 and runtime.dims.pp == 1:
        return CudaGraphDecode
    return KVCacheForward


CUDA_GRAPHS = True  # the one switch for tests and benchmarks (before/after on a GPU)
