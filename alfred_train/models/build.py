"""Build policy (language-model) and scalar-head (reward / value) models on megatron-core.

One builder for both families:
- llama : RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, untied embeddings.
- falcon: two LayerNorms feeding attention and MLP in parallel (see falcon.py), GELU MLP of
          4 x hidden, GQA/MQA, RoPE, no linear biases, untied embeddings.

`kind="scalar"` swaps the vocabulary projection for a `ScalarHead`: the model then returns one
score per token, (B, S), and the reward is read at the EOD token of each sequence.

Weights are initialized deterministically *per global tensor*: every tensor of the checkpoint
(keyed by its global name, e.g. `decoder.layers.3.mlp.linear_fc1.weight`) is drawn whole from a
generator seeded by (seed, name), and each rank keeps its own shard. A model built at TP=2/PP=2
therefore starts from exactly the weights of the TP=1/PP=1 model, which is what the parallel
parity tests rely on. On a GPU each tensor is drawn there (CUDA's Philox generator): the same on
every GPU of one kind, not the CPU's draw. The CPU draw is single-threaded, about 100 s per
billion weights on a small machine: drawn on the CPU, a 1.2B model spent minutes being built on
the H100 before a single step (and PPO builds four).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alfred_train.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """The resolved architecture (config + tokenizer), shared by every model of a run."""

    arch: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the tokenizer's
    padded_vocab_size: int  # a multiple of 128, so every TP size in use divides it
    max_seq_len: int
    rotary_base: int
    norm_eps: float
    parallel_layernorms: int
    init_std: float


def resolve_shape(model_cfg, vocab_size: int) -> ModelShape:
    m = model_cfg
    if m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is below the tokenizer's vocabulary ({vocab_size}); "
                          f"raise it or remove it (unset: the tokenizer's)")
    vocab = m.vocab_size or vocab_size
    if m.ffn_hidden_size:
        ffn = m.ffn_hidden_size
    elif m.arch == "falcon":
        ffn = 4 * m.hidden_size
    else:  # Llama: 2/3 of 4h, rounded up to a multiple of 256
        ffn = 256 * math.ceil(int(8 * m.hidden_size / 3) / 256)
    return ModelShape(
        arch=m.arch, num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=ffn,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        vocab_size=vocab, padded_vocab_size=128 * math.ceil(vocab / 128), max_seq_len=m.max_seq_len,
        rotary_base=m.rotary_base, norm_eps=m.norm_eps, parallel_layernorms=m.parallel_layernorms,
        init_std=m.init_std)


# train.recompute -> megatron-core's activation recomputation (TransformerConfig fields).
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def transformer_config(shape: ModelShape, parallel_cfg, bf16: bool, fused: bool = False, recompute: str = "none"):
    """megatron-core's TransformerConfig for `shape`. fused (GPU): megatron's torch.jit fusions that
    need neither TE nor apex (SwiGLU, native vocab-parallel cross-entropy); off on CPU.
    recompute: none | selective (attention core) | full (each layer's input kept, the layer re-run
    in the backward pass)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    llama = shape.arch == "llama"
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, kv_channels=shape.hidden_size // shape.num_attention_heads,
        normalization="RMSNorm" if llama else "LayerNorm", layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=llama, activation_func=F.silu if llama else F.gelu,
        add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0,  # RLHF setting; the CPU RNG tracker needs it
        tensor_model_parallel_size=parallel_cfg.tp, pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        init_method_std=shape.init_std, use_cpu_initialization=False,
        perform_initialization=True,  # also tags TP-sharded weights (tensor_model_parallel attrs)
        calculate_per_token_loss=True,  # token-mean over the global batch (see stages/sft.py)
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        bias_activation_fusion=fused and llama, persist_layer_norm=False, gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=False, cross_entropy_loss_fusion=fused, cross_entropy_fusion_impl="native",
        **RECOMPUTE[recompute],
    )


def layer_spec(shape: ModelShape, backend):
    """The layer spec for `shape.arch` with the chosen attention backend in its core_attention slot."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    norm = "RMSNorm" if shape.arch == "llama" else "LayerNorm"
    if backend.uses_te_spec:
        spec = get_gpt_layer_with_transformer_engine_spec(normalization=norm) if shape.arch == "llama" \
            else get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=norm)
        spec.submodules.self_attention.submodules.core_attention = backend.core_attention
    if shape.arch == "falcon":
        from alfred_train.models.falcon import falcon_layer_spec

        spec = falcon_layer_spec(spec, shape.parallel_layernorms)
    return spec


def build_model(shape: ModelShape, parallel_cfg, *, kind: str, bf16: bool, backend, device,
                seed: int | None = None, recompute: str = "none") -> list[torch.nn.Module]:
    """One model chunk per virtual pipeline stage on this rank (one chunk without vpp).

    kind: "lm" (policy / reference) or "scalar" (reward / value model).
    seed: initialize weights deterministically (see module docstring); None leaves them to a load.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    from alfred_train.models.heads import ScalarHead

    if shape.padded_vocab_size % parallel_cfg.tp:
        raise ConfigError(f"parallel.tp: {parallel_cfg.tp} does not divide the padded vocabulary "
                          f"({shape.padded_vocab_size})")
    config = transformer_config(shape, parallel_cfg, bf16, fused=torch.device(device).type == "cuda",
                                recompute=recompute)
    spec = layer_spec(shape, backend)
    chunks = []
    for vp_stage in range(parallel_cfg.vpp or 1):
        vp = vp_stage if parallel_cfg.vpp else None
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=shape.padded_vocab_size,
            max_sequence_length=shape.max_seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True, share_embeddings_and_output_weights=False,
            position_embedding_type="rope", rotary_base=shape.rotary_base, vp_stage=vp)
        if kind == "scalar" and model.post_process:
            model.output_layer = ScalarHead(config)
        model.to(device)
        if seed is not None:
            init_weights(model, seed, shape)
        if bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    return chunks


def unwrap(chunk):
    """The innermost GPTModel of a DDP / Float16Module wrapped chunk."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


# ---------------------------------------------------------------------------------------------
# Deterministic, layout-independent initialization.

def _global_init(key: str, shape: tuple[int, ...], seed: int, ms: ModelShape, device) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    if "layernorm" in key or "layer_norm" in key or key.endswith("final_layernorm.weight"):
        return torch.ones(shape, device=device) if name.endswith("weight") else torch.zeros(shape, device=device)
    if name == "bias" or name.endswith("_bias"):
        return torch.zeros(shape, device=device)
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    std = ms.init_std
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        std = ms.init_std / math.sqrt(2.0 * ms.num_layers)  # GPT-2 / megatron output-layer scaling
    return torch.randn(shape, generator=gen, device=device).mul_(std)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, shape: ModelShape) -> None:
    """Fill every parameter with its shard of a global tensor drawn from (seed, global key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    def fill(sh):
        if isinstance(sh, ShardedTensorFactory):
            built = sh.build()
            for item in (nested_values(built) if isinstance(built, (dict, list)) else [built]):
                fill(item)
            return
        if not isinstance(sh, ShardedTensor) or sh.data is None or not sh.data.is_floating_point():
            return
        full = _global_init(sh.key, tuple(sh.global_shape), seed, shape, sh.data.device)
        index = []
        for axis, (off, glob) in enumerate(zip(sh.global_offset, sh.global_shape)):
            if axis < sh.prepend_axis_num:
                index.append(off)
            else:
                size = sh.local_shape[axis - sh.prepend_axis_num]
                index.append(slice(off, off + size))
        sh.data.copy_(full[tuple(index)].to(sh.data.dtype))

    for sh in nested_values(model.sharded_state_dict()):
        fill(sh)
