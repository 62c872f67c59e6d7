"""Parameter counts and bytes per GPU, from a model shape alone: the arithmetic behind the dry run
(`dryrun.py`) and the LoRA memory plan (`models/lora_plan.py`). No torch, no weights.

Parameter counts (global, i.e. unsharded; h = hidden, d = h / heads, g = kv groups, f = ffn,
V = padded vocabulary; no linear biases in either family):

    embedding            V * h                                   sharded over TP (vocab rows)
    attention per layer  h * (heads + 2 g) * d   (fused q, k, v)  sharded over TP
                       + heads * d * h           (output proj)    sharded over TP
    MLP per layer        llama:  3 * h * f  (gate, up, down)      sharded over TP
                         falcon: 2 * h * f  (up, down, GELU)      sharded over TP
    norms per layer      llama:  2 RMSNorms x h                   replicated on TP ranks
                         falcon: parallel_layernorms LayerNorms x 2h (weight + bias)
    final norm           h (RMSNorm) or 2h (LayerNorm)            replicated
    output layer         lm: V * h, sharded over TP;  scalar head: h + 1, replicated

Pipeline stage r of pp (with vpp chunks v) holds layers v*L/vpp + r*L/(pp*vpp) ... (+L/(pp*vpp)),
megatron's interleaved order; the embedding lives on stage 0, the final norm and output layer on
stage pp-1.

Memory per GPU (bytes per parameter held by that GPU):

    trainable, bf16: 2 (bf16 weights) + 4 (fp32 grads, DDP grad_reduce_in_fp32)
                     + 12 (fp32 main params + Adam m, v), the 12 divided by dp with parallel.zero
    trainable, fp32: 4 (weights, also the main params) + 4 (grads) + 8 (Adam), the 8 / dp with zero
    frozen:          2 (bf16) or 4 (fp32) weights only
    KV cache (PPO rollouts): 2 (k, v) * L * g * d * max_seq_len * rollout_micro_batch * bytes / tp / pp
                     (prompt + response <= model.max_seq_len)
"""

from __future__ import annotations

from dataclasses import dataclass

from alfred_train.models.build import ModelShape

# ---------------------------------------------------------------------------------------------
# Parameter counts


@dataclass(frozen=True)
class ModelParams:
    """Global parameter counts of one model, by where they live and whether TP shards them."""

    embedding: int  # V * h, stage 0, sharded over TP
    attention: int  # per layer, sharded over TP
    mlp: int  # per layer, sharded over TP
    norms: int  # per layer, replicated over TP
    num_layers: int
    final_norm: int  # last stage, replicated
    head: int  # last stage: lm output layer or scalar head
    head_sharded: bool  # lm output layer: sharded over TP; scalar head: replicated

    @property
    def per_layer(self) -> int:
        return self.attention + self.mlp + self.norms

    @property
    def total(self) -> int:
        return self.embedding + self.num_layers * self.per_layer + self.final_norm + self.head


def model_params(shape: ModelShape, kind: str) -> ModelParams:
    """Analytic parameter counts of the megatron model `build_model(shape, kind=kind)` builds."""
    h, heads, groups = shape.hidden_size, shape.num_attention_heads, shape.num_query_groups
    head_dim = h // heads
    llama = shape.arch == "llama"
    norm = h if llama else 2 * h  # RMSNorm: weight; LayerNorm: weight + bias
    norms_per_layer = 2 if llama else shape.parallel_layernorms
    vocab_h = shape.padded_vocab_size * h
    return ModelParams(
        embedding=vocab_h,
        attention=h * (heads + 2 * groups) * head_dim + heads * head_dim * h,
        mlp=(3 if llama else 2) * h * shape.ffn_hidden_size,
        norms=norms_per_layer * norm,
        num_layers=shape.num_layers,
        final_norm=norm,
        head=vocab_h if kind == "lm" else h + 1,
        head_sharded=kind == "lm",
    )


def stage_layers(num_layers: int, pp: int, vpp: int | None) -> list[list[range]]:
    """Layer indices held by each pipeline rank: one range per virtual chunk (megatron's order)."""
    chunks = vpp or 1
    per_chunk = num_layers // (pp * chunks)
    return [[range(v * num_layers // chunks + r * per_chunk, v * num_layers // chunks + (r + 1) * per_chunk)
             for v in range(chunks)] for r in range(pp)]


def params_per_gpu(params: ModelParams, tp: int, pp: int) -> list[int]:
    """Parameters held by one GPU of each pipeline stage (every TP rank of a stage holds as many)."""
    layer = (params.attention + params.mlp) // tp + params.norms
    counts = []
    for rank in range(pp):
        n = params.num_layers // pp * layer
        if rank == 0:
            n += params.embedding // tp
        if rank == pp - 1:
            n += params.final_norm + (params.head // tp if params.head_sharded else params.head)
        counts.append(n)
    return counts


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class BytesPerParam:
    weights: float
    grads: float
    optimizer: float  # fp32 main params (bf16 only) + Adam moments, after ZeRO sharding

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def bytes_per_param(*, trainable: bool, bf16: bool, zero: bool, dp: int) -> BytesPerParam:
    """Bytes one GPU spends per parameter it holds (see the module docstring)."""
    if not trainable:
        return BytesPerParam(2.0 if bf16 else 4.0, 0.0, 0.0)
    optimizer = 12.0 if bf16 else 8.0  # (fp32 main params +) Adam m and v
    return BytesPerParam(2.0 if bf16 else 4.0, 4.0, optimizer / dp if zero else optimizer)


def kv_cache_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, tp: int, pp: int, bf16: bool) -> int:
    """KV cache of one GPU for `micro_batch` sequences of `seq_len` tokens."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    dtype_bytes = 2 if bf16 else 4
    return 2 * shape.num_layers * shape.num_query_groups * head_dim * seq_len * micro_batch * dtype_bytes // (tp * pp)
