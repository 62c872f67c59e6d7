"""Rebuild a model from a checkpoint alone (shape and tokenizer from meta.json), at any layout."""

from __future__ import annotations

from pathlib import Path

from alfred_train import checkpoint
from alfred_train.models.build import ModelShape, build_model

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "assets" / "tiny_sp.model"


def load_meta(ckpt: str | Path) -> tuple[Path, dict]:
    import json

    path = checkpoint.resolve_checkpoint(ckpt)
    return path, json.loads((path / "meta.json").read_text())


def checkpoint_shape(meta: dict) -> ModelShape:
    return ModelShape(**meta["state"]["model"])


def checkpoint_tokenizer(meta: dict) -> str:
    return meta["state"].get("tokenizer") or str(TINY_TOKENIZER)


def build_from_checkpoint(ckpt: str | Path, parallel_cfg, runtime, *, name: str = "policy",
                          backend_name: str = "auto", bf16: bool = False):
    """(chunks, shape, meta): model `name` of the checkpoint, built at `parallel_cfg`, weights loaded."""
    from alfred_train.kernels.backends import choose_backend

    path, meta = load_meta(ckpt)
    shape = checkpoint_shape(meta)
    kind = "lm" if name == "policy" else "scalar"
    chunks = build_model(shape, parallel_cfg, kind=kind, bf16=bf16, backend=choose_backend(backend_name),
                         device=runtime.device, seed=None)
    checkpoint.load_models(path, {name: (chunks, None)})
    return chunks, shape, meta
