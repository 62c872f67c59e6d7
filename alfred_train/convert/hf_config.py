"""Hugging Face `config.json` <-> our `ModelShape`, checked field by field before any weight is read.

Supported:
    llama   LlamaForCausalLM / LlamaForSequenceClassification: RMSNorm, SwiGLU (hidden_act silu),
            GQA, plain RoPE (no rope_scaling), no attention / MLP biases.
    falcon  FalconForCausalLM / FalconForSequenceClassification with RoPE, no biases, GELU, and
            parallel attention + MLP: the new decoder architecture (Falcon-40B/180B: two
            LayerNorms, `num_kv_heads` groups) or Falcon-7B style (one LayerNorm, multi-query).
Anything else (alibi, biases, sequential attention/MLP, scaled RoPE, quantized weights, ...) is a
`ConfigError` naming the field. Tied input/output embeddings are supported by copying the
embedding into our (untied) output layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alfred_train.errors import ConfigError
from alfred_train.models.build import ModelShape

ARCHITECTURES = {
    ("llama", "lm"): "LlamaForCausalLM", ("llama", "scalar"): "LlamaForSequenceClassification",
    ("falcon", "lm"): "FalconForCausalLM", ("falcon", "scalar"): "FalconForSequenceClassification",
}


def read_json(path: Path) -> dict:
    """A JSON object file; a damaged one is a one-line ConfigError naming it."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ConfigError(f"{path}: not valid JSON ({err}); re-save or re-download it") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}; re-save or re-download it")
    return data


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json; point at a Hugging Face model directory")
    return read_json(path)


def hf_kind(config: dict) -> str:
    """"scalar" for a *ForSequenceClassification checkpoint (reward model), else "lm"."""
    archs = config.get("architectures") or []
    return "scalar" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"


TIED_BY_DEFAULT = {"llama": False, "falcon": True}  # transformers' LlamaConfig / FalconConfig defaults


def is_tied(config: dict) -> bool:
    """`tie_word_embeddings`, or when absent transformers' default for the family (Llama untied, Falcon tied)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    return TIED_BY_DEFAULT.get(config.get("model_type"), False)


def tie_source(config: dict) -> str:
    """Where `is_tied` got its answer, for error messages."""
    if "tie_word_embeddings" in config:
        return f"config.json tie_word_embeddings is {json.dumps(bool(config['tie_word_embeddings']))}"
    return (f"config.json has no tie_word_embeddings (transformers' {config.get('model_type')} default: "
            f"{json.dumps(is_tied(config))})")


def _refuse(field: str, value, why: str) -> ConfigError:
    return ConfigError(f"config.json: unsupported {field}: {json.dumps(value)} ({why})")


def _rope_theta(config: dict) -> int:
    """RoPE base from `rope_theta` (transformers 4) or `rope_parameters` (transformers 5)."""
    scaling = config.get("rope_scaling")
    if scaling:
        raise _refuse("rope_scaling", scaling, "only plain RoPE is supported")
    params = config.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _refuse("rope_parameters.rope_type", rope_type, "only plain RoPE ('default') is supported")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise _refuse("rope_theta", theta, "model.rotary_base is an integer")
    return int(theta)


def _required(config: dict, where: str, field: str, *aliases: str) -> int:
    """A shape field (positive int) that has no safe default: `field`, else the first alias present."""
    for name in (field, *aliases):
        if config.get(name) is not None:
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {name} is {json.dumps(value)}; it must be a positive integer")
            return value
    also = f" (or {' / '.join(aliases)})" if aliases else ""
    raise ConfigError(f"{where}: required field {field}{also} is missing; add it, or re-save the config "
                      f"with transformers' save_pretrained")


def _check_false(config: dict, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        if config.get(field):
            raise _refuse(field, config[field], why)


def _check_scalar_head(config: dict, kind: str) -> None:
    if kind != "scalar":
        return
    labels = config.get("num_labels", len(config.get("id2label") or {0: 0}))
    if labels != 1:
        raise _refuse("num_labels", labels, "a reward / value model has one output")


def llama_shape(config: dict, kind: str, where: str = "config.json") -> ModelShape:
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", config["hidden_act"], "Llama's MLP is SwiGLU: silu")
    _check_false(config, ("attention_bias", "mlp_bias"), "our Llama layers have no linear biases")
    hidden, heads = _required(config, where, "hidden_size"), _required(config, where, "num_attention_heads")
    layers, ffn = _required(config, where, "num_hidden_layers"), _required(config, where, "intermediate_size")
    vocab = _required(config, where, "vocab_size")
    if hidden % heads:
        raise _refuse("num_attention_heads", heads, f"must divide hidden_size {hidden}")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim != hidden // heads:
        raise _refuse("head_dim", head_dim, f"must be hidden_size / num_attention_heads = {hidden // heads}")
    rotary_base = _rope_theta(config)
    _check_scalar_head(config, kind)
    return ModelShape(
        arch="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads, vocab_size=vocab,
        padded_vocab_size=128 * math.ceil(vocab / 128),
        max_seq_len=config.get("max_position_embeddings", 2048), rotary_base=rotary_base,
        norm_eps=config.get("rms_norm_eps", 1e-6), parallel_layernorms=2,
        init_std=config.get("initializer_range", 0.02))


def falcon_shape(config: dict, kind: str, where: str = "config.json") -> ModelShape:
    _check_false(config, ("alibi",), "we use RoPE")
    _check_false(config, ("bias",), "our Falcon layers have no linear biases")
    hidden = _required(config, where, "hidden_size", "n_embed")
    heads = _required(config, where, "num_attention_heads", "n_head")
    layers = _required(config, where, "num_hidden_layers", "n_layer")
    vocab = _required(config, where, "vocab_size")
    if config.get("new_decoder_architecture"):
        groups = config.get("num_kv_heads") or heads
        norms = config.get("num_ln_in_parallel_attn") or 2
    else:  # Falcon-7B style: one LayerNorm; fused QKV is [q heads, k, v] (MQA) or per head [q, k, v]
        if not config.get("parallel_attn", True):
            raise _refuse("parallel_attn", False, "our Falcon layer runs attention and MLP in parallel")
        groups = 1 if config.get("multi_query", True) else heads
        norms = 1
    if norms not in (1, 2):
        raise _refuse("num_ln_in_parallel_attn", norms, "1 or 2 LayerNorms per layer")
    if config.get("activation", "gelu") != "gelu":
        raise _refuse("activation", config["activation"], "Falcon's MLP uses exact gelu")
    if hidden % heads:
        raise _refuse("num_attention_heads", heads, f"must divide hidden_size {hidden}")
    rotary_base = _rope_theta(config)
    _check_scalar_head(config, kind)
    return ModelShape(
        arch="falcon", num_layers=layers, hidden_size=hidden,
        ffn_hidden_size=config.get("ffn_hidden_size") or 4 * hidden, num_attention_heads=heads,
        num_query_groups=groups, vocab_size=vocab, padded_vocab_size=128 * math.ceil(vocab / 128),
        max_seq_len=config.get("max_position_embeddings", 2048), rotary_base=rotary_base,
        norm_eps=config.get("layer_norm_epsilon", 1e-5), parallel_layernorms=norms,
        init_std=config.get("initializer_range", 0.02))


def shape_from_hf(config: dict, kind: str, where: str = "config.json") -> ModelShape:
    """Validate a Hugging Face config (no weights touched) and return our ModelShape; `where` names
    the file in errors about a missing field."""
    if config.get("quantization_config"):
        raise _refuse("quantization_config", config["quantization_config"].get("quant_method", "?"),
                      "dequantize to bf16/fp32 safetensors first")
    model_type = config.get("model_type")
    if model_type == "llama":
        return llama_shape(config, kind, where)
    if model_type == "falcon":
        return falcon_shape(config, kind, where)
    raise _refuse("model_type", model_type, "supported: llama, falcon (re-save RefinedWeb checkpoints "
                  "with transformers to get model_type falcon)")


def shape_fields(config: dict) -> dict[str, str]:
    """The config.json field behind each quantity of the shape (`hf.Dim`'s names, and the layer,
    head and group counts), for errors that say what to fix."""
    falcon = config.get("model_type") == "falcon"
    groups = ("num_kv_heads" if config.get("new_decoder_architecture") else "multi_query") if falcon \
        else "num_key_value_heads"
    return {"hidden": "hidden_size", "ffn": "ffn_hidden_size" if falcon else "intermediate_size",
            "kv": f"{groups} (or num_attention_heads)", "vocab": "vocab_size", "labels": "num_labels",
            "layers": "num_hidden_layers", "heads": "num_attention_heads", "groups": groups}


def hf_config_from_shape(shape: ModelShape, kind: str, *, tied: bool, dtype: str,
                         bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    """A config.json that transformers loads into the model our weights describe."""
    common = {
        "architectures": [ARCHITECTURES[(shape.arch, kind)]], "model_type": shape.arch,
        "hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads, "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_seq_len, "initializer_range": shape.init_std,
        "rope_theta": float(shape.rotary_base), "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(shape.rotary_base)},
        "tie_word_embeddings": tied, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "pad_token_id": pad_id, "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }
    if kind == "scalar":
        common.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if shape.arch == "llama":
        return {**common, "intermediate_size": shape.ffn_hidden_size,
                "num_key_value_heads": shape.num_query_groups,
                "head_dim": shape.hidden_size // shape.num_attention_heads, "hidden_act": "silu",
                "rms_norm_eps": shape.norm_eps, "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "pretraining_tp": 1}
    return {**common, "ffn_hidden_size": shape.ffn_hidden_size, "num_kv_heads": shape.num_query_groups,
            "new_decoder_architecture": True, "num_ln_in_parallel_attn": shape.parallel_layernorms,
            "multi_query": shape.num_query_groups == 1, "parallel_attn": True, "bias": False,
            "alibi": False, "activation": "gelu", "layer_norm_epsilon": shape.norm_eps,
            "attention_dropout": 0.0, "hidden_dropout": 0.0}
