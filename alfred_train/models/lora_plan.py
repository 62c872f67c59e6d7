"""The dry run's LoRA lines: parameters and memory per GPU with adapters vs full fine-tuning.

Adapter parameters per layer and target (r = rank, tp = tensor-parallel size; models/lora.py):
    column-parallel (linear_qkv, linear_fc1): A r * n_in (replicated) + B n_out / tp * r
    row-parallel    (linear_proj, linear_fc2): A r * n_in / tp + B n_out * r (replicated)
Memory per GPU with LoRA: every trained model's base is frozen (weights only: 2 B bf16 / 4 B fp32
per parameter), its adapters (and a value model's head) are trainable (weights + fp32 grads + Adam,
as sizing.bytes_per_param). PPO holds two networks: the reference and reward models are the policy
and value model with adapters off, so they cost nothing more.
"""

from __future__ import annotations

from alfred_train.models import lora


def adapter_params_per_layer(shape, spec: lora.AdapterSpec, tp: int) -> int:
    """Adapter parameters of one layer held by one TP rank."""
    n = 0
    for target, t in spec.targets.items():
        n_in, n_out = lora.layer_sizes(shape, target)
        r = t["rank"]
        n += r * n_in + n_out // tp * r if target in lora.COLUMN else r * n_in // tp + n_out * r
    return n


def _head_params(shape, kind: str) -> int:
    """A scalar model's trained head (weight + bias); an LM's output layer is part of its frozen base."""
    return shape.hidden_size + 1 if kind == "scalar" else 0


def checkpoint_params(cfg, shape, stage_models) -> list[int]:
    """Parameters a LoRA checkpoint holds for each trained model: its adapters (all layers, as at
    tp=1: the replicated halves once) and a scalar head; the frozen base is referenced, not copied."""
    spec = lora.AdapterSpec.from_config(cfg.lora)
    adapters = adapter_params_per_layer(shape, spec, tp=1) * shape.num_layers
    return [adapters + _head_params(shape, kind) for _, kind, trainable in stage_models if trainable]


def state_bytes(cfg, shape, stage_models, per_stage: dict, kv: float) -> list[float]:
    """Model-state bytes per GPU of each pipeline stage with LoRA (+ `kv`, the KV cache): each trained
    model's base frozen, its adapters (and a scalar head) trainable; the frozen models of the stage
    are the trained ones with adapters off, so they add nothing."""
    from alfred_train.sizing import bytes_per_param

    p = cfg.parallel
    bf16 = cfg.train.precision != "fp32"
    frozen = bytes_per_param(trainable=False, bf16=bf16, zero=p.zero, dp=p.dp).total
    trained = bytes_per_param(trainable=True, bf16=bf16, zero=p.zero, dp=p.dp).total
    adapters = adapter_params_per_layer(shape, lora.AdapterSpec.from_config(cfg.lora), p.tp) * (shape.num_layers // p.pp)
    totals = []
    for r in range(p.pp):
        total = kv
        for name, kind, trainable in stage_models:
            if trainable:
                head = _head_params(shape, kind) if r == p.pp - 1 else 0
                total += (per_stage[name][r] - head) * frozen + (adapters + head) * trained
        totals.append(total)
    return totals


def memory_lines(cfg, shape, stage: str, stage_models, per_stage: dict, full_bytes: list[float], size,
                 kv: float) -> list[str]:
    """Lines for `describe`: stage_models ((name, kind, trainable), ...), per_stage: name -> base params per
    GPU per pipeline stage, full_bytes: per-stage bytes without LoRA (KV cache included), size: formatter."""
    spec = lora.AdapterSpec.from_config(cfg.lora)
    lora.check_shape(spec, shape)
    adapters = adapter_params_per_layer(shape, spec, cfg.parallel.tp) * (shape.num_layers // cfg.parallel.pp)
    with_lora = state_bytes(cfg, shape, stage_models, per_stage, kv)
    trained_models = [name for name, _, t in stage_models if t]
    targets = ", ".join(f"{t} r={s['rank']}" for t, s in spec.targets.items())
    return ["", f"LoRA (lora.rank={cfg.lora.rank}, alpha {cfg.lora.alpha:g}: {targets})",
            f"  trainable per GPU: {adapters:,} adapter parameters per model ({', '.join(trained_models)})"
            + (" + the value head" if stage == "ppo" else " + the scalar head" if stage == "rm" else ""),
            f"  memory per GPU (fullest stage): {size(max(with_lora))} with LoRA vs {size(max(full_bytes))} "
            f"full fine-tuning" + (" (2 networks instead of 4: reference/reward = adapters off)" if stage == "ppo" else ""),
            "  the peak plan above counts the LoRA model states"]
