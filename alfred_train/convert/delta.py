"""`convert apply-delta`: target = base + delta, tensor by tensor (StableVicuna / Vicuna-v0 style).

Released "delta" weights are the difference between a fine-tuned model and its base; both are
Hugging Face safetensors directories with the same tensor names. For every tensor name n:

    out[n] = base[n] + delta[n]          computed in fp32, stored in the base tensor's dtype

Added tokens: when the delta's vocabulary is larger (embedding / lm_head rows V_delta > V_base),
the base rows are zero-padded to V_delta first, so new tokens get exactly the delta's rows.
Any other shape mismatch, or a tensor present on one side only, is an error naming the tensor.
config.json, generation config and tokenizer files are taken from the delta directory (it
describes the target model), falling back to the base's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from alfred_train.convert import hf_output
from alfred_train.convert.hf_config import read_hf_config
from alfred_train.convert.safetensors_io import DEFAULT_SHARD_BYTES, SafetensorsDir, ShardWriter
from alfred_train.convert.tokenizer_files import TOKENIZER_FILES
from alfred_train.errors import ConfigError

VOCAB_TENSORS = ("embed_tokens.weight", "word_embeddings.weight", "lm_head.weight")
MUST_MATCH = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")


def check_shape(name: str, base: tuple[int, ...], delta: tuple[int, ...]) -> None:
    """Equal shapes, or a vocabulary tensor whose delta has more rows (added tokens)."""
    grows = name.endswith(VOCAB_TENSORS) and base[1:] == delta[1:] and delta[0] > base[0]
    if base != delta and not grows:
        raise ConfigError(f"apply-delta: {name}: base shape {base} != delta shape {delta}; "
                          "is this delta made for this base model?")


def add_delta(name: str, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base (V_b, ...) + delta (V_d, ...) with base rows zero-padded when a vocabulary tensor grew."""
    check_shape(name, tuple(base.shape), tuple(delta.shape))
    if base.shape != delta.shape:
        padded = base.new_zeros(delta.shape)  # (V_d, h)
        padded[: base.shape[0]] = base
        base = padded
    return (base.float() + delta.float()).to(base.dtype)


def check_configs(base: dict, delta: dict) -> None:
    for field in MUST_MATCH:
        if base.get(field) != delta.get(field):
            raise ConfigError(f"apply-delta: config.json {field} differs: base {base.get(field)!r}, "
                              f"delta {delta.get(field)!r}; use the base model the delta was made from")


def check_output(out: Path, inputs: tuple[Path, ...]) -> None:
    """The output is a directory of its own: not an input, nor inside one."""
    for d in inputs:
        if out.resolve() == d.resolve() or d.resolve() in out.resolve().parents:
            raise ConfigError(f"apply-delta: output {out} is {'inside ' if out.resolve() != d.resolve() else ''}"
                              f"the input {d}; name a new directory for the output")


def apply_delta(base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """OUT_DIR: new, empty or an earlier export, written whole or not at all (convert/hf_output.py)."""
    base_dir, delta_dir, out = Path(base_dir), Path(delta_dir), Path(out_dir)
    check_output(out, (base_dir, delta_dir))
    if problem := hf_output.output_problem(out):
        raise ConfigError(problem)
    check_configs(read_hf_config(base_dir), read_hf_config(delta_dir))
    base, delta = SafetensorsDir(base_dir), SafetensorsDir(delta_dir)
    only_base = sorted(set(base.keys()) - set(delta.keys()))
    only_delta = sorted(set(delta.keys()) - set(base.keys()))
    if only_base or only_delta:
        raise ConfigError(f"apply-delta: tensor names differ (only in base: {only_base[:3]}, "
                          f"only in delta: {only_delta[:3]})")
    for name in delta.keys():  # every shape from the headers, before anything is written
        check_shape(name, base.shape(name), delta.shape(name))
    record = {"by": "apply-delta", "base": str(base_dir.resolve()), "delta": str(delta_dir.resolve())}
    with hf_output.staged(out, record) as stage:
        with ShardWriter(stage, max_shard_bytes) as writer:
            for name in delta.keys():
                writer.add(name, add_delta(name, base.get(name), delta.get(name)))
        for fname in ("config.json", *TOKENIZER_FILES):
            src = delta_dir / fname if (delta_dir / fname).is_file() else base_dir / fname
            if src.is_file():
                shutil.copyfile(src, stage / fname)
    vocab = json.loads((out / "config.json").read_text()).get("vocab_size")
    print(f"apply-delta: {base_dir} + {delta_dir} -> {out} ({len(delta.keys())} tensors, vocab {vocab})",
          flush=True)
    return out
