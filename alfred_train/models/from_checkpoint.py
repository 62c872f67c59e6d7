"""Rebuild a model from a checkpoint alone (shape and tokenizer from meta.json), at any layout."""

from __future__ import annotations

from pathlib import Path

from alfred_train import checkpoint
from alfred_train.errors import ConfigError
from alfred_train.models import lora_checkpoint
from alfred_train.models.build import ModelShape, build_model



def load_meta(ckpt: str | Path) -> tuple[Path, dict]:
    path = checkpoint.resolve_checkpoint(ckpt)
    return path, checkpoint.read_meta(path)


def checkpoint_shape(path: Path, meta: dict) -> ModelShape:
    state = meta.get("state") or {}
    if "model" not in state:
        raise ConfigError(f"{path}: meta.json has no state.model (the model shape); use a checkpoint written "
                          "by an alfred-train stage or convert")
    return ModelShape(**state["model"])


def checkpoint_tokenizer(meta: dict) -> str:
    from alfred_train.data.corpus import TINY_SP_MODEL_PATH

    return (meta.get("state") or {}).get("tokenizer") or str(TINY_SP_MODEL_PATH)


def build_from_checkpoint(ckpt: str | Path, parallel_cfg, runtime, *, name: str = "policy",
                          kind: str | None = None, backend_name: str = "auto", bf16: bool = False):
    """(chunks, shape, meta): model `name` of the checkpoint, built at `parallel_cfg`, weights loaded.
    kind: "lm" or "scalar"; by default "lm" for the policy and "scalar" for any other model."""
    from alfred_train.kernels.backends import choose_backend

    path, meta = load_meta(ckpt)
    shape = checkpoint_shape(path, meta)
    kind = kind or ("lm" if name == "policy" else "scalar")
    chunks = build_model(shape, parallel_cfg, kind=kind, bf16=bf16, backend=choose_backend(backend_name),
                         device=runtime.device, seed=None)
    lora_checkpoint.load_checkpoint_model(path, meta, name, chunks, kind=kind)  # a full model, or LoRA base + adapters
    return chunks, shape, meta
