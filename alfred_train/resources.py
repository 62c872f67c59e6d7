"""What a job needs beyond its parameters: activations and buffers per GPU, checkpoint bytes, disk.

Pure arithmetic for the dry run (alfred_train.dryrun) and the launchers. Sizes in bytes; s = tokens
per sequence, b = sequences per micro-batch, h = hidden, f = ffn hidden, t = tp, V = padded vocab.

Activations kept for the backward pass, per layer and micro-batch (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", 16-bit activations; attention is
flash/TE/SDPA, so the s^2 score matrices are not stored; the `eager` backend adds 5 * heads * s^2 * b / t):

    train.recompute none / selective:  s*b*h * (10 + (8 + m) / t)      m = 4 f/h (GELU), 6 f/h (SwiGLU)
                     with sequence_parallel:  s*b*h * (18 + m) / t
    train.recompute full:              2 s*b*h per layer (its input; /t with sequence_parallel)
                                       + one layer's activations while it is recomputed
    selective recomputes the attention core only: it saves the s^2 term, which the fused kernels
    already avoid, so its plan equals `none` except with the eager backend.

In flight: the 1F1B schedule keeps the activations of up to pp micro-batches on pipeline stage 0
(pp - r on stage r; with vpp chunks stage 0 holds pp * (1 + (pp - 1) / (pp * vpp)) micro-batches'
worth of its layers). Temporary buffers: the logits of one micro-batch on the last stage
(b * s * V / t elements: bf16 output + fp32 log-softmax + fp32 gradient = 10 B each) and the
pipeline send/receive buffers (2 * s*b*h * 2 B). PPO's generation phase instead holds the KV cache
(sizing.kv_cache_bytes), the prefill's transient hidden states for rollout_micro_batch prompts
(B * P * (4 h + 2 f / t) * 2 B, P = max_seq_len - max_new_tokens) and the sampler's fp32 (B, V)
copies (3 of them). Both phases add to the model states (weights, grads, optimizer), which stay
resident. A fixed RESERVE_GIB covers the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alfred_train.models.build import ModelShape

GIB = 1024 ** 3
GB = 1000 ** 3
RESERVE_GIB = 2.0  # CUDA context (~0.5), NCCL buffers (~0.5), allocator fragmentation

# Usable memory of one GPU (what torch.cuda reports as total, GiB) per SageMaker instance type.
INSTANCE_GPU_MEMORY_GIB = {
    "ml.p4d.24xlarge": 39.4,  # A100-SXM4-40GB
    "ml.p4de.24xlarge": 79.1,  # A100-SXM4-80GB
    "ml.p5.48xlarge": 79.1, "ml.p5e.48xlarge": 139.8, "ml.p5en.48xlarge": 139.8,  # H100 / H200
    "ml.p3.2xlarge": 15.8, "ml.p3.8xlarge": 15.8, "ml.p3.16xlarge": 15.8, "ml.p3dn.24xlarge": 31.7,  # V100
    "ml.g5.xlarge": 22.0, "ml.g5.12xlarge": 22.0, "ml.g5.48xlarge": 22.0,  # A10G
    "ml.g4dn.xlarge": 14.6, "ml.g4dn.12xlarge": 14.6,  # T4
}  # fmt: skip

# Instance types whose training volume is local NVMe (VolumeSizeInGB cannot exceed it), in GB.
INSTANCE_LOCAL_STORAGE_GB = {
    "ml.p4d.24xlarge": 8000, "ml.p4de.24xlarge": 8000, "ml.p5.48xlarge": 30400,
    "ml.p5e.48xlarge": 30400, "ml.p5en.48xlarge": 30400, "ml.g5.48xlarge": 7600, "ml.p3dn.24xlarge": 1800,
}  # fmt: skip


def _mlp_factor(shape: ModelShape) -> float:
    return (6.0 if shape.arch == "llama" else 4.0) * shape.ffn_hidden_size / shape.hidden_size


def layer_activation_bytes(shape: ModelShape, *, seq: int, micro_batch: int, tp: int, sp: bool,
                           recompute: str, eager: bool = False) -> float:
    """Activations one layer keeps for the backward pass of one micro-batch (see module doc)."""
    sbh = seq * micro_batch * shape.hidden_size
    m = _mlp_factor(shape)
    full_layer = sbh * ((18 + m) / tp if sp else 10 + (8 + m) / tp)
    if eager and recompute != "selective":
        full_layer += 5 * shape.num_attention_heads * seq * seq * micro_batch / tp
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    return full_layer


def in_flight_micro_batches(pp: int, vpp: int | None, num_micro_batches: int) -> float:
    """Micro-batches whose activations pipeline stage 0 holds at once under 1F1B."""
    held = pp * (1 + (pp - 1) / (pp * vpp)) if vpp else pp
    return min(held, num_micro_batches)


def training_activation_bytes(shape: ModelShape, *, seq: int, micro_batch: int, num_micro_batches: int,
                              tp: int, pp: int, vpp: int | None, sp: bool, recompute: str,
                              eager: bool = False) -> float:
    """Stage 0's activations in flight, plus one layer recomputed (full) and the p2p buffers."""
    layers = shape.num_layers // pp
    per_layer = layer_activation_bytes(shape, seq=seq, micro_batch=micro_batch, tp=tp, sp=sp,
                                       recompute=recompute, eager=eager)
    held = layers * per_layer * in_flight_micro_batches(pp, vpp, num_micro_batches)
    if recompute == "full":
        held += layer_activation_bytes(shape, seq=seq, micro_batch=micro_batch, tp=tp, sp=sp,
                                       recompute="none", eager=eager)
    p2p = 2 * seq * micro_batch * shape.hidden_size * 2 if pp > 1 else 0
    return held + p2p


def logits_bytes(shape: ModelShape, *, seq: int, micro_batch: int, tp: int) -> float:
    """One micro-batch's vocab-parallel logits with their fp32 log-softmax and gradient."""
    return seq * micro_batch * shape.padded_vocab_size / tp * 10


def generation_buffer_bytes(shape: ModelShape, *, prompt_len: int, batch: int, tp: int, bf16: bool) -> float:
    """PPO generation besides the KV cache: the prefill's hidden states and the sampler's copies."""
    dtype = 2 if bf16 else 4
    prefill = batch * prompt_len * (4 * shape.hidden_size + 2 * shape.ffn_hidden_size / tp) * dtype
    sampler = 3 * batch * shape.padded_vocab_size * 4
    return prefill + sampler


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of one checkpoint: trainable models' weights + fp32 main params and Adam state."""

    weights: float  # model weights (bf16 or fp32), written once (by data-parallel rank 0)
    optimizer: float  # main params + Adam m, v (ZeRO: spread over every rank)

    @property
    def total(self) -> float:
        return self.weights + self.optimizer


def checkpoint_size(trainable_params: list[int], *, bf16: bool) -> CheckpointSize:
    """What `checkpoint.save_checkpoint` writes for models with these parameter counts."""
    n = sum(trainable_params)
    return CheckpointSize(weights=n * (2 if bf16 else 4), optimizer=n * (12 if bf16 else 8))


def largest_node_share(size: CheckpointSize, *, tp: int, pp: int, zero: bool, nodes: int,
                       gpus_per_node: int) -> float:
    """Bytes of one checkpoint that the busiest node writes to its own disk (node-local layout).

    Ranks are numbered tp fastest, then dp, then pp (megatron's order), gpus_per_node to a node.
    Data-parallel rank 0 writes the weights, so the tp*pp ranks holding them fill
    ceil(tp / gpus_per_node) * pp nodes or fewer; optimizer state is spread over all ranks with
    ZeRO, else it goes with the weights.
    """
    if nodes <= 1:
        return size.total
    weight_nodes = min(nodes, pp * math.ceil(tp / gpus_per_node))
    if zero:
        return size.weights / weight_nodes + size.optimizer / nodes
    return size.total / weight_nodes


def human(n: float) -> str:
    """Bytes as TB / GB (decimal, like disk and S3 sizes), MB or KB."""
    for unit, scale in (("TB", 1000 ** 4), ("GB", GB), ("MB", 1000 ** 2)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1000:.1f} KB"
