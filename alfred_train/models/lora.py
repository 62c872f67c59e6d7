"""LoRA: low-rank adapters on megatron's tensor-parallel linears, the base weights frozen.

Vocabulary (one letter each, as in ppo/math.py):
    x      the input of the wrapped linear, (s, b, n_in) (row-parallel: (s, b, n_in / tp))
    W      the frozen base weight, (n_out, n_in) globally
    A      the adapter's down-projection, (r, n_in); initialised U(-1/sqrt(n_in), 1/sqrt(n_in)) (PEFT's
           kaiming-uniform with a=sqrt(5)), drawn whole per global tensor from (seed, name) like
           models/build.py, so every TP/PP layout starts from the same adapters
    B      the adapter's up-projection, (n_out, r); initialised to zero, so step 0 is the base model
    scale  alpha / r

    y = W x + scale * B A dropout(x)                                     # (s, b, n_out)

Tensor parallelism follows the wrapped layer (tp ranks, rank k):
- column-parallel (linear_qkv, linear_fc1; W sharded on n_out): A replicated (r, n_in), B sharded
  on its output dim, B_k (n_out / tp, r). h = A x is the same on every rank; its gradient is
  partial per rank, so h passes `copy_to_tensor_model_parallel_region` (identity forward,
  all-reduce backward): dA and dx come out whole and equal on every rank.
- row-parallel (linear_proj, linear_fc2; W sharded on n_in): A sharded on its input dim,
  A_k (r, n_in / tp), B replicated (n_out, r). h = sum_k A_k x_k is all-reduced
  (`reduce_from_tensor_model_parallel_region`), then B h is added to the reduced base output.
The replicated half is not tagged `tensor_model_parallel`, so megatron counts it once in the
gradient norm. Llama's linear_fc1 stacks [gate; up] (each n_out / 2): B is stacked the same way
and checkpointed with megatron's swiglu factory, so it reshards like the weight.

Where the adapters live: a `LoRAAdapter` is a sibling of the linear it wraps (the parent attention
or MLP module gets a child `lora_<target>`, e.g. `decoder.layers.3.self_attention.lora_linear_qkv.
lora_A`) and a forward hook adds its delta to the linear's output. The base's own parameter names
are unchanged, so base checkpoints load into an adapted model with `skip=("lora_",)`.

A LoRA checkpoint holds only what trains (the adapters, and a scalar model's head) plus, in
meta.json state["lora"], the adapter shape and a reference to the base: models/lora_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from alfred_train.errors import ConfigError

COLUMN = ("linear_qkv", "linear_fc1")
ROW = ("linear_proj", "linear_fc2")
PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
ADAPTER_KEY = "lora_"  # in every adapter parameter's name, and in no base parameter's
HEAD = "output_layer"


@dataclass(frozen=True)
class AdapterSpec:
    """The adapters of one model: per target (rank, scale). Trained adapters share one rank and
    scale (the lora config); imported PEFT adapters may not (q/k/v stacked: see convert/peft.py)."""

    targets: dict  # target -> {"rank": r, "scale": alpha / r}
    dropout: float = 0.0

    @classmethod
    def from_config(cls, lora_cfg) -> "AdapterSpec":
        scale = lora_cfg.alpha / lora_cfg.rank
        return cls({t: {"rank": lora_cfg.rank, "scale": scale} for t in lora_cfg.targets}, lora_cfg.dropout)

    @classmethod
    def from_state(cls, state: dict) -> "AdapterSpec":
        return cls(dict(state["targets"]), float(state.get("dropout", 0.0)))

    def to_state(self) -> dict:
        return {"targets": self.targets, "dropout": self.dropout}


def layer_sizes(shape, target: str) -> tuple[int, int]:
    """(n_in, n_out) of a target linear, globally."""
    h, d = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    qkv = (shape.num_attention_heads + 2 * shape.num_query_groups) * d
    fc1 = shape.ffn_hidden_size * (2 if shape.arch == "llama" else 1)
    return {"linear_qkv": (h, qkv), "linear_proj": (h, h), "linear_fc1": (h, fc1),
            "linear_fc2": (shape.ffn_hidden_size, h)}[target]


def check_shape(spec: AdapterSpec, shape) -> None:
    """Each rank fits its layer: r <= min(n_in, n_out) (else B A is not low-rank)."""
    for target, t in spec.targets.items():
        n_in, n_out = layer_sizes(shape, target)
        if t["rank"] > min(n_in, n_out):
            raise ConfigError(f"lora.rank: {t['rank']} is larger than {target} ({n_in} -> {n_out}); "
                              f"pick a rank <= {min(n_in, n_out)}")


class LoRAAdapter(MegatronModule):
    """delta(x) = scale * B A dropout(x) for one tensor-parallel linear (see the module docstring)."""

    def __init__(self, config, target: str, base, rank: int, scale: float, dropout: float):
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__(config=config)
        self.target, self.scale, self.column = target, scale, target in COLUMN
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.enabled = True
        self.gated = self.column and target == "linear_fc1" and config.gated_linear_unit
        dtype = config.params_dtype
        if self.column:  # base: ColumnParallelLinear, weight (n_out / tp, n_in)
            n_in, n_out = base.input_size, base.output_size_per_partition
        else:  # base: RowParallelLinear, weight (n_out, n_in / tp)
            n_in, n_out = base.input_size_per_partition, base.output_size
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, n_in, dtype=dtype, device=device))  # (r, n_in[/tp])
        self.lora_B = torch.nn.Parameter(torch.zeros(n_out, rank, dtype=dtype, device=device))  # (n_out[/tp], r)
        sharded = self.lora_B if self.column else self.lora_A
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region)

        if torch.is_grad_enabled():  # dropout in training steps only: never when scoring / generating
            x = self.dropout(x)
        h = F.linear(x, self.lora_A)  # (s, b, r): whole (column) or this rank's part (row)
        h = copy_to_tensor_model_parallel_region(h) if self.column else reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_B) * self.scale  # (s, b, n_out[/tp])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items()}
        axis = {"lora_B": 0} if self.column else {"lora_A": 1}
        out = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)
        if self.gated:  # [gate; up] rows, each half TP-sharded on its own, as linear_fc1.weight
            out[f"{prefix}lora_B"] = apply_swiglu_sharded_factory(out[f"{prefix}lora_B"], sharded_offsets)
        return out


def _add_delta(adapter: LoRAAdapter):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        out, bias = output
        return out + adapter.delta(args[0]).to(out.dtype), bias
    return hook


def adapters(model) -> list[LoRAAdapter]:
    return [m for m in model.modules() if isinstance(m, LoRAAdapter)]


def attach(chunks, spec: AdapterSpec, *, kind: str) -> list:
    """Add adapters (A and B zero; see `init_adapters`) to every layer of each (unwrapped) chunk and
    freeze everything else except a scalar model's head. Call before DDP and the optimizer."""
    from alfred_train.models.build import unwrap

    for chunk in chunks:
        model = unwrap(chunk)
        for layer in model.decoder.layers:
            for target, t in spec.targets.items():
                parent = getattr(layer, PARENT[target])
                base = getattr(parent, target)
                if "LayerNorm" in type(base).__name__:  # TE fuses the norm in: the hook would see x before it
                    raise ConfigError(f"lora.targets: {target} is fused with its LayerNorm in the Transformer Engine "
                                      "layer spec; with LoRA set model.attention_backend to flash, sdpa or eager")
                adapter = LoRAAdapter(model.config, target, base, t["rank"], t["scale"], spec.dropout)
                parent.add_module(f"lora_{target}", adapter)
                base.register_forward_hook(_add_delta(adapter))
        for name, p in model.named_parameters():
            p.requires_grad_(ADAPTER_KEY in name or (kind == "scalar" and name.startswith(HEAD)))
        model.lora_spec = spec
    return chunks


@torch.no_grad()
def init_adapters(chunks, seed: int) -> None:
    """A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) drawn whole per global tensor from (seed, key); B = 0."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from alfred_train.models.build import unwrap

    for chunk in chunks:
        model = unwrap(chunk)
        for a in adapters(model):
            a.lora_B.zero_()
        for sh in nested_values(model.sharded_state_dict()):
            if not isinstance(sh, ShardedTensor) or not sh.key.endswith("lora_A"):
                continue
            shape = tuple(sh.global_shape)  # (L, r, n_in): layers stacked on a prepended axis
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(sh.key.encode())) % (2 ** 63))
            bound = 1.0 / math.sqrt(shape[-1])
            full = torch.rand(shape, generator=gen) * (2 * bound) - bound
            index = [off if axis < sh.prepend_axis_num else slice(off, off + sh.local_shape[axis - sh.prepend_axis_num])
                     for axis, off in enumerate(sh.global_offset)]
            sh.data.copy_(full[tuple(index)].to(sh.data.dtype))


@contextlib.contextmanager
def adapters_off(chunks):
    """Run the base model: every adapter of `chunks` contributes nothing inside the block."""
    from alfred_train.models.build import unwrap

    found = [a for c in chunks for a in adapters(unwrap(c))]
    saved = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a, s in zip(found, saved):
            a.enabled = s


def has_adapters(chunk) -> bool:
    from alfred_train.models.build import unwrap

    return getattr(unwrap(chunk), "lora_spec", None) is not None


# ---------------------------------------------------------------------------------------------
# PPO in two copies: the frozen models are the trained ones with their adapters off.

class AdaptersOff(torch.nn.Module):
    """A trained, adapted chunk seen as its frozen base: the PPO reference (the policy's base) or
    reward model (the value model's base, with `head` = the RM's own scalar head (weight (1, h),
    bias (1,)) in place of the value head while it runs). Shares every parameter with the chunk:
    no second copy of the weights. Forward-only (scoring under torch.no_grad)."""

    def __init__(self, chunk, head: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.adapted = chunk
        self.head = head

    def __getattr__(self, name):  # config, set_input_tensor, pre_process ... of the wrapped model
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "adapted":
                raise
            return getattr(self.adapted, name)

    def set_input_tensor(self, tensor) -> None:
        self.adapted.set_input_tensor(tensor)

    def forward(self, *args, **kwargs):
        with adapters_off([self.adapted]), self._base_head():
            return self.adapted(*args, **kwargs)

    @contextlib.contextmanager
    def _base_head(self):
        layer = getattr(self.adapted, HEAD, None) if self.adapted.post_process else None
        if self.head is None or layer is None:
            yield
            return
        trained = [layer.weight.detach().clone(), layer.bias.detach().clone()]
        with torch.no_grad():
            layer.weight.copy_(self.head[0])
            layer.bias.copy_(self.head[1])
        try:
            yield
        finally:
            with torch.no_grad():
                layer.weight.copy_(trained[0])
                layer.bias.copy_(trained[1])


def frozen_head(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A copy of a scalar model's head as loaded (the RM's), before the value head trains; None off
    the last pipeline stage."""
    if not model.post_process:
        return None
    layer = getattr(model, HEAD)
    return layer.weight.detach().clone(), layer.bias.detach().clone()
