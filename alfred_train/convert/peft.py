"""LoRA adapters between our global tensors (models/lora.py) and PEFT's adapter directory.

    ADAPTER_DIR/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, rank/alpha_pattern
    ADAPTER_DIR/adapter_model.safetensors  base_model.model.<HF module>.lora_{A,B}.weight

Our fused linears each hold one adapter, PEFT wraps Hugging Face's separate modules:

    ours (decoder.layers.i.)          llama (model.layers.i.)             falcon (transformer.h.i.)
    self_attention.lora_linear_qkv    self_attn.{q,k,v}_proj              self_attention.query_key_value
    self_attention.lora_linear_proj   self_attn.o_proj                    self_attention.dense
    mlp.lora_linear_fc1               mlp.{gate,up}_proj                  mlp.dense_h_to_4h
    mlp.lora_linear_fc2               mlp.down_proj                       mlp.dense_4h_to_h

Export of a fused adapter (A (r, h), B (n_out, r)) to its HF parts: every part gets the same A
and its rows of B (q/k/v rows ungrouped as `hf.grouped_to_qkv`, fc1 rows split [gate; up]); each
part's delta is exactly its rows of B A x, so PEFT reproduces our outputs.

Import of HF parts with their own A_m (r_m, h), B_m (n_m, r_m), scale_m: when every part is there
and they share one A and one scale (what our export writes) the fused adapter is that A with B the
parts' rows: the round trip is exact. Otherwise (StackLLaMA adapts q_proj and v_proj only, each its
own A) the parts are stacked: A = [A_q; A_v] (r_q + r_v, h) and B holds scale_m B_m in the rows of
part m and the columns of its A, zeros elsewhere (k rows: no adapter), with scale 1:
    B A x = sum_m (rows of m) scale_m B_m A_m x                         (exact, rank r_q + r_v)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from alfred_train.convert import hf
from alfred_train.errors import ConfigError
from alfred_train.models import lora
from alfred_train.models.build import ModelShape

Tensor = torch.Tensor
PARTS = {
    "llama": {"linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "linear_proj": ("self_attn.o_proj",), "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
              "linear_fc2": ("mlp.down_proj",)},
    "falcon": {"linear_qkv": ("self_attention.query_key_value",), "linear_proj": ("self_attention.dense",),
               "linear_fc1": ("mlp.dense_h_to_4h",), "linear_fc2": ("mlp.dense_4h_to_h",)},
}
OURS_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp",
               "linear_fc2": "mlp"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _hf_layer(shape: ModelShape, i: int) -> str:
    return f"base_model.model.{'model.layers' if shape.arch == 'llama' else 'transformer.h'}.{i}."


def _ours(i: int, target: str) -> str:
    return f"decoder.layers.{i}.{OURS_PARENT[target]}.lora_{target}"


def split_rows(shape: ModelShape, target: str, b: Tensor) -> list[Tensor]:
    """Our B (n_out, r) -> each HF part's rows, in PARTS order."""
    if shape.arch == "llama" and target == "linear_qkv":
        return hf.grouped_to_qkv(b, heads=shape.num_attention_heads, groups=shape.num_query_groups)
    if shape.arch == "llama" and target == "linear_fc1":
        return [c.contiguous() for c in b.chunk(2, dim=0)]
    return [b]


def join_rows(shape: ModelShape, target: str, parts: list[Tensor]) -> Tensor:
    """Inverse of `split_rows`."""
    if shape.arch == "llama" and target == "linear_qkv":
        return hf.qkv_to_grouped(*parts, heads=shape.num_attention_heads, groups=shape.num_query_groups)
    return torch.cat(parts, dim=0)


def part_sizes(shape: ModelShape, target: str) -> list[int]:
    """Output rows of each HF part of `target`."""
    n_out = lora.layer_sizes(shape, target)[1]
    if shape.arch == "llama" and target == "linear_qkv":
        d = shape.hidden_size // shape.num_attention_heads
        return [shape.num_attention_heads * d, shape.num_query_groups * d, shape.num_query_groups * d]
    if shape.arch == "llama" and target == "linear_fc1":
        return [n_out // 2, n_out // 2]
    return [n_out]


# ---------------------------------------------------------------------------------------------
# Export.

def export_adapter(tensors: dict[str, Tensor], spec: lora.AdapterSpec, shape: ModelShape, out_dir: Path, *,
                   base_path: str, dtype: torch.dtype) -> Path:
    """Write ADAPTER_DIR from our global adapter tensors of a language model (a reward/value model's
    LoRA exports merged: PEFT would also need its trained score head as modules_to_save)."""
    from safetensors.torch import save_file

    out: dict[str, Tensor] = {}
    for i in range(shape.num_layers):
        for target in spec.targets:
            a, b = tensors[f"{_ours(i, target)}.lora_A"], tensors[f"{_ours(i, target)}.lora_B"]
            for part, rows in zip(PARTS[shape.arch][target], split_rows(shape, target, b)):
                out[f"{_hf_layer(shape, i)}{part}.lora_A.weight"] = a.clone()  # safetensors: no shared storage
                out[f"{_hf_layer(shape, i)}{part}.lora_B.weight"] = rows.contiguous()
    out = {k: v.to(dtype) for k, v in out.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, shape, base_path), indent=2))
    return out_dir


def adapter_config(spec: lora.AdapterSpec, shape: ModelShape, base_path: str) -> dict:
    modules = {target: [p.rpartition(".")[2] for p in PARTS[shape.arch][target]] for target in spec.targets}
    ranks = {t: s["rank"] for t, s in spec.targets.items()}
    alphas = {t: s["scale"] * s["rank"] for t, s in spec.targets.items()}
    first = next(iter(spec.targets))
    rank_pattern = {m: ranks[t] for t, ms in modules.items() for m in ms if ranks[t] != ranks[first]}
    alpha_pattern = {m: alphas[t] for t, ms in modules.items() for m in ms if alphas[t] != alphas[first]}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path, "r": ranks[first], "lora_alpha": alphas[first],
        "lora_dropout": spec.dropout, "target_modules": sorted(m for ms in modules.values() for m in ms),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
    }


# ---------------------------------------------------------------------------------------------
# Import.

def _pattern_value(patterns: dict, module_path: str, default, where: str):
    """PEFT's rank/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key with
    re.match(rf"(.*\\.)?({key})$", module path), e.g. "q_proj" or "model.layers.0.self_attn.q_proj"."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return value
        except re.error as err:
            raise ConfigError(f"{where}: pattern key {key!r} is not a regular expression ({err})") from err
    return default


def _scale(config: dict, module_path: str, rank: int, where: str) -> float:
    """alpha / r of the module at `module_path`, r the rank of its tensors, which must be the one
    `r` / rank_pattern gives it (8: LoraConfig's default for both r and lora_alpha)."""
    said = _pattern_value(config.get("rank_pattern") or {}, module_path, config.get("r", 8), f"{where} rank_pattern")
    if said != rank:
        raise ConfigError(f"{where}: r / rank_pattern give {module_path} rank {said}, its tensors have rank "
                          f"{rank}; the adapter config does not belong to these weights")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path, config.get("lora_alpha", 8),
                           f"{where} alpha_pattern")
    return float(alpha) / rank


def read_adapter(adapter_dir: str | Path, shape: ModelShape) -> tuple[lora.AdapterSpec, dict[str, Tensor]]:
    """PEFT adapter dir -> (our AdapterSpec, our global adapter tensors); shapes checked against `shape`."""
    from alfred_train.convert.hf_config import read_json
    from alfred_train.convert.safetensors_io import load_safetensors

    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).exists() or not (d / WEIGHTS_FILE).exists():
        raise ConfigError(f"--adapter {d}: expected {CONFIG_FILE} and {WEIGHTS_FILE} (a PEFT LoRA adapter)")
    config = read_json(d / CONFIG_FILE)
    for key, ok in [("peft_type", config.get("peft_type") == "LORA"), ("use_dora", not config.get("use_dora")),
                    ("use_rslora", not config.get("use_rslora")), ("bias", config.get("bias", "none") == "none"),
                    ("fan_in_fan_out", not config.get("fan_in_fan_out")),
                    ("layers_to_transform", config.get("layers_to_transform") is None)]:
        if not ok:
            raise ConfigError(f"--adapter {d}: {CONFIG_FILE} {key}={config.get(key)!r} is not supported "
                              "(plain LoRA only: peft_type LORA, no DoRA/rsLoRA, bias none)")
    if saved := config.get("modules_to_save"):  # e.g. ["lm_head"]: its weights are in WEIGHTS_FILE, not LoRA
        raise ConfigError(f"--adapter {d}: {CONFIG_FILE} modules_to_save={saved} (modules trained in full and "
                          "saved beside the adapter) is not supported; merge the adapter with peft's "
                          "merge_and_unload(), save_pretrained the merged model and import that without --adapter")
    weights = load_safetensors(d / WEIGHTS_FILE)
    weights = {k.replace(".default.weight", ".weight"): v.float() for k, v in weights.items()}
    known = {f"{_hf_layer(shape, i)}{p}.lora_{ab}.weight" for i in range(shape.num_layers)
             for parts in PARTS[shape.arch].values() for p in parts for ab in "AB"}
    extra = [k for k in weights if k not in known]
    if extra:
        raise ConfigError(f"--adapter {d}: tensors {extra[:3]} do not fit a {shape.num_layers}-layer "
                          f"{shape.arch} model; the adapter was trained on another base")
    targets, tensors = {}, {}
    for target, parts in PARTS[shape.arch].items():
        layers = [_read_layer(weights, config, shape, i, target, d) for i in range(shape.num_layers)]
        if all(x is None for x in layers):
            continue
        if any(x is None for x in layers):
            raise ConfigError(f"--adapter {d}: {target} adapters on some layers only; not supported")
        ranks = {x[0].shape[0] for x in layers}
        scales = {x[2] for x in layers}
        if len(ranks) > 1 or len(scales) > 1:
            raise ConfigError(f"--adapter {d}: {target} adapters of different ranks/alphas per layer; not supported")
        targets[target] = {"rank": ranks.pop(), "scale": scales.pop()}
        for i, (a, b, _) in enumerate(layers):
            tensors[f"{_ours(i, target)}.lora_A"], tensors[f"{_ours(i, target)}.lora_B"] = a, b
    if not targets:
        raise ConfigError(f"--adapter {d}: no LoRA tensor of a {shape.arch} model found")
    return lora.AdapterSpec(targets, float(config.get("lora_dropout") or 0.0)), tensors


def _read_layer(weights, config, shape, i, target, d):
    """(A, B, scale) of our fused adapter on layer i, or None when no part of it is adapted."""
    parts = PARTS[shape.arch][target]
    sizes = part_sizes(shape, target)
    n_in = lora.layer_sizes(shape, target)[0]
    found = []
    for part, n_out in zip(parts, sizes):
        name = f"{_hf_layer(shape, i)}{part}"
        if f"{name}.lora_A.weight" not in weights:
            found.append(None)
            continue
        a, b = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]  # (r, n_in), (n_out, r)
        if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise ConfigError(f"--adapter {d}: {part} on layer {i} is ({b.shape[0]} x {a.shape[1]}) through rank "
                              f"{a.shape[0]}, the base model's {part} is ({n_out} x {n_in}); the adapter was "
                              "trained on another base")
        module_path = name[len("base_model.model."):]  # the name PEFT matched patterns against
        found.append((a, b, _scale(config, module_path, a.shape[0], f"--adapter {d}: {CONFIG_FILE}")))
    present = [f for f in found if f is not None]
    if not present:
        return None
    a0, _, s0 = present[0]
    if len(present) == len(parts) and all(torch.equal(f[0], a0) and f[2] == s0 for f in present):
        return a0, join_rows(shape, target, [f[1] for f in present]), s0  # shared A: exact, rank r
    a = torch.cat([f[0] for f in present])  # (sum r_m, n_in)
    rows, col = [], 0
    for f, n_out in zip(found, sizes):
        block = torch.zeros(n_out, a.shape[0])
        if f is not None:
            block[:, col:col + f[0].shape[0]] = f[2] * f[1]
            col += f[0].shape[0]
        rows.append(block)
    return a, join_rows(shape, target, rows), 1.0
