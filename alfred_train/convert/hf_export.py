"""`convert mcore-to-hf`: our checkpoint (any TP/PP it was saved at) -> a Hugging Face directory.

The model is built at TP=1/PP=1 in one process and loaded with resharding, gathered into global
tensors and mapped back with the same rules as the import (`convert/hf.py`):

    OUT_DIR/config.json              LlamaFor* / FalconFor* (new decoder architecture)
    OUT_DIR/model.safetensors        or model-0000i-of-0000N.safetensors + index past --max-shard-size
    OUT_DIR/tokenizer.* ...          copied from the checkpoint's state["tokenizer"]
    OUT_DIR/adapter/                 a LoRA checkpoint's adapters in PEFT's format (convert/peft.py),
                                     OUT_DIR then holding its base; --merge-lora: merged weights instead
    OUT_DIR/alfred-export.json       what it was exported from (convert/hf_output.py)

The checkpoint, and the LoRA bases it loads, are checked against their manifests (sizes, sha256)
before anything loads. OUT_DIR is new, empty or an earlier export, written whole or not at all
(`hf_output.staged`): an export into an earlier one replaces the files it wrote; others stay.

A scalar model ("reward", "value") becomes *ForSequenceClassification with `score.weight` (1, h);
our ScalarHead's bias is written as `score.bias` only when it is non-zero (transformers' score head
has none and would ignore it; a warning says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from alfred_train.convert import hf, hf_config, hf_output, peft
from alfred_train.convert.mcore import gather_globals
from alfred_train.convert.safetensors_io import DEFAULT_SHARD_BYTES, write_safetensors
from alfred_train.convert.tokenizer_files import copy_tokenizer_files, write_tokenizer_config
from alfred_train.errors import ConfigError
from alfred_train.models import lora, lora_checkpoint
from alfred_train.models.build import ModelShape

log = logging.getLogger("alfred_train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCALAR_MODELS = ("reward", "value")
ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapters, PEFT format, under OUT_DIR


def pick_model(meta: dict, requested: str | None) -> str:
    names = meta["models"]
    if requested:
        if requested not in names:
            raise ConfigError(f"--model {requested}: the checkpoint holds {names}")
        return requested
    for name in ("policy", "reward", "value"):
        if name in names:
            return name
    raise ConfigError(f"checkpoint holds models {names}; pick one with --model")


def load_global_tensors(ckpt: Path, name: str, shape: ModelShape, kind: str, runtime) -> dict[str, torch.Tensor]:
    """Load model `name` at TP=1/PP=1 (fp32) and return its global tensors (a LoRA model's base
    tensors and its adapters, `decoder.layers.i.<parent>.lora_<target>.lora_{A,B}`)."""
    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model
    from alfred_train.models.from_checkpoint import load_meta

    chunks = build_model(shape, ParallelConfig(), kind=kind, bf16=False,
                         backend=choose_backend("eager"), device=runtime.device)
    path, meta = load_meta(ckpt)
    lora_checkpoint.load_checkpoint_model(path, meta, name, chunks, kind=kind)
    return gather_globals(chunks)


def _token_ids(state: dict, tok) -> dict:
    saved = state.get("hf") or {}
    if tok is None:
        return {k: saved.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    pad = saved.get("pad_token_id", tok.pad_id) if saved else tok.pad_id
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": pad}


def export_tokenizer(state: dict, out_dir: Path):
    """Copy the checkpoint's tokenizer next to the weights; returns it loaded, or None."""
    from alfred_train.data.tokenizer import load_tokenizer

    src = state.get("tokenizer")
    if not src or not Path(src).exists():
        log.warning("checkpoint names no tokenizer (state['tokenizer']); copy the tokenizer files yourself")
        return None
    copy_tokenizer_files(src, out_dir)
    tok = load_tokenizer(out_dir)
    write_tokenizer_config(out_dir, tok)
    return tok


def checkpoint_source(ckpt: Path) -> dict:
    """What identifies `ckpt`'s weights in an export's record: its path and its manifest's digest (a
    checkpoint saved again under the same name is another one)."""
    from alfred_train.checkpointing import manifest

    found = Path(ckpt) / manifest.MANIFEST
    return {"checkpoint": str(Path(ckpt).resolve()),
            "manifest_sha256": manifest.sha256_of(found) if found.is_file() else None}


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, runtime, *, model: str | None = None,
                dtype: str = "auto", max_shard_bytes: int = DEFAULT_SHARD_BYTES, merge_lora: bool = False) -> Path:
    """A LoRA checkpoint writes its base to OUT_DIR and its adapters in PEFT's format to
    OUT_DIR/adapter/ (or, with merge_lora, the merged weights W + scale * B A to OUT_DIR). The
    output is checked first, then the checkpoint and the LoRA bases it loads against their manifests."""
    from alfred_train.checkpoint import resolve_checkpoint
    from alfred_train.checkpointing import manifest
    from alfred_train.models.from_checkpoint import checkpoint_shape, load_meta

    out = Path(out_dir)
    if problem := hf_output.output_problem(out):  # before a 40B checkpoint's files are hashed
        raise ConfigError(problem)
    ckpt = resolve_checkpoint(ckpt_dir)
    manifest.refuse_damaged(ckpt, named="", fix="export a sound checkpoint", before="export")
    ckpt, meta = load_meta(ckpt)
    state = meta.get("state") or {}
    shape = checkpoint_shape(ckpt, meta)
    name = pick_model(meta, model)
    kind = "scalar" if name in SCALAR_MODELS else "lm"
    dtype = {"auto": state.get("dtype", "float32"), "fp32": "float32", "bf16": "bfloat16",
             "fp16": "float16"}.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
    entry = (state.get("lora") or {}).get(name)
    if entry and kind == "scalar" and not merge_lora:
        raise ConfigError(f"--model {name}: a LoRA reward/value model exports merged only; add --merge-lora")
    if merge_lora and not entry:
        log.warning("--merge-lora: model %r of %s has no LoRA adapters; its full weights are written", name, ckpt)
    lora_checkpoint.check_bases(ckpt, meta, [name], named="", verify=True)
    lora_mode = None if not entry else "merged" if merge_lora else "adapter"
    record = {"by": "mcore-to-hf", **checkpoint_source(ckpt), "model": name, "lora": lora_mode, "dtype": dtype}
    with hf_output.staged(out, record) as stage:
        ours = load_global_tensors(ckpt, name, shape, kind, runtime)
        adapters = {}
        if lora_mode == "merged":
            ours = lora_checkpoint.merge_globals(ours, lora.AdapterSpec.from_state(entry))
        elif lora_mode == "adapter":
            adapters = {k: v for k, v in ours.items() if lora.ADAPTER_KEY in k}
            ours = {k: v for k, v in ours.items() if lora.ADAPTER_KEY not in k}
        config = _write_model(stage, ours, shape, kind, state, dtype, max_shard_bytes)
        if adapters:
            peft.export_adapter(adapters, lora.AdapterSpec.from_state(entry), shape, stage / ADAPTER_DIR,
                                base_path=str(out.resolve()), dtype=DTYPES[dtype])
    if adapters:
        print(f"convert: LoRA adapters of {name!r} -> {out / ADAPTER_DIR} (PEFT: "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{out}'), '{out / ADAPTER_DIR}'))")
    print(f"convert: {ckpt} (model {name!r}) -> {out} ({config['architectures'][0]}, {dtype}"
          f"{', LoRA merged' if lora_mode == 'merged' else ''})", flush=True)
    return out


def _write_model(out: Path, ours: dict, shape: ModelShape, kind: str, state: dict, dtype: str,
                 max_shard_bytes: int) -> dict:
    """Weights, tokenizer files, config.json and generation_config.json into `out`; returns the config."""
    tied = kind == "lm" and torch.equal(ours["embedding.word_embeddings.weight"], ours["output_layer.weight"])
    tensors = hf.hf_from_ours(hf.rules_for(shape, kind), ours, tied=tied)
    if "score.bias" in tensors:
        log.warning("score.bias is non-zero: transformers' %s has no bias and will ignore it",
                    hf_config.ARCHITECTURES[(shape.arch, kind)])
    write_safetensors({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, out, max_shard_bytes)
    tok = export_tokenizer(state, out)
    ids = _token_ids(state, tok)
    config = hf_config.hf_config_from_shape(shape, kind, tied=tied, dtype=dtype, bos_id=ids["bos"],
                                            eos_id=ids["eos"], pad_id=ids["pad"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return config
