"""`convert hf-to-mcore`: a Hugging Face Llama / Falcon directory -> our checkpoint at any TP/PP.

    OUT_DIR/
        iter_0000000/     megatron dist checkpoint, model "policy" (or "reward" for a scalar head)
        latest
        tokenizer/        tokenizer.model / tokenizer.json / tokenizer_config.json ... as found
        model.yaml        the `model:` section for a run YAML using OUT_DIR as checkpoint.init

OUT_DIR is new, empty, or an earlier conversion (its model.yaml says so): that one is replaced,
tokenizer files included. Anything else is refused (a run directory's newer iter_* would shadow step 0).
Everything is written into a hidden sibling, `.OUT_DIR.hf-to-mcore-tmp`, and moved into OUT_DIR
only once the checkpoint is saved; a conversion that fails removes it and leaves OUT_DIR as it was.

Order of work: config.json is validated and the tensor names / shapes in the safetensors headers
checked before any weight is read; then every rank builds its part of the model and reads only
the Hugging Face tensors its shards come from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from alfred_train.convert import hf, hf_config
from alfred_train.convert.mcore import fill_from_globals
from alfred_train.convert.safetensors_io import SafetensorsDir
from alfred_train.convert.tokenizer_files import check_tokenizer, copy_tokenizer_files, remove_tokenizer_files
from alfred_train.errors import ConfigError
from alfred_train.models.build import ModelShape

log = logging.getLogger("alfred_train")
MODEL_NAMES = {"lm": "policy", "scalar": "reward"}
MODEL_YAML_HEAD = "# Written by `alfred-train convert hf-to-mcore`."  # marks OUT_DIR as a conversion


@dataclass(frozen=True)
class ImportPlan:
    config: dict  # the Hugging Face config.json
    shape: ModelShape
    kind: str  # "lm" | "scalar"
    tied: bool  # HF ties lm_head to the embedding: our output layer gets a copy
    bf16: bool  # store bf16 weights (else fp32)


def plan_import(hf_dir: str | Path, kind: str | None = None, dtype: str = "auto") -> ImportPlan:
    """Validate config.json (no weights read) and decide what to build."""
    config = hf_config.read_hf_config(hf_dir)
    kind = kind or hf_config.hf_kind(config)
    shape = hf_config.shape_from_hf(config, kind, where=str(Path(hf_dir) / "config.json"))
    source = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    bf16 = {"auto": source == "bfloat16", "bf16": True, "fp32": False}[dtype]
    return ImportPlan(config, shape, kind, tied=kind == "lm" and hf_config.is_tied(config), bf16=bf16)


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def check_layout(plan: ImportPlan, tp: int, pp: int) -> None:
    """--tp / --pp (each >= 1) fit the model: the trainer's rules (config_checks.py, dryrun.py
    `_check_shards`, models/build.py), but named by the flags and config.json's fields; checked
    before any worker starts or OUT_DIR is touched."""
    import math

    shape, fields = plan.shape, hf_config.shape_fields(plan.config)
    if shape.num_layers % pp:
        raise ConfigError(f"--pp {pp}: does not divide the {shape.num_layers} layers (config.json "
                          f"{fields['layers']}); pick a --pp of {_divisors(shape.num_layers)}")
    split = {f"{fields['heads']} ({shape.num_attention_heads})": shape.num_attention_heads,
             f"{fields['groups']} ({shape.num_query_groups})": shape.num_query_groups,
             f"{fields['ffn']} ({shape.ffn_hidden_size})": shape.ffn_hidden_size,
             f"the padded vocabulary ({shape.padded_vocab_size})": shape.padded_vocab_size}
    bad = [what for what, n in split.items() if n % tp]
    if bad:
        fits = math.gcd(*split.values())
        raise ConfigError(f"--tp {tp}: does not divide {', '.join(bad)}; pick a --tp of {_divisors(fits)}")


def open_weights(hf_dir: str | Path):
    """The HF directory's tensors: a DeepSpeed ZeRO checkpoint's fp32 masters when it holds
    `global_step*/` shards (the HF Trainer under DeepSpeed), else its safetensors."""
    from alfred_train.convert import deepspeed_zero

    if deepspeed_zero.is_zero_checkpoint(hf_dir):
        return deepspeed_zero.ZeroCheckpoint(hf_dir)
    return SafetensorsDir(hf_dir)


def check_tied_head(plan: ImportPlan, weights: SafetensorsDir) -> None:
    """config.json's tying agrees with the files: untied needs an `lm_head.weight`; tied allows one
    only as a copy of the embedding (the one check that reads weights: those two tensors)."""
    if plan.kind != "lm":
        return
    said = hf_config.tie_source(plan.config)
    has_head = hf.LM_HEAD in weights
    if not plan.tied and not has_head:
        raise ConfigError(f"{weights.path}: {said}, but there is no {hf.LM_HEAD}; "
                          "set tie_word_embeddings true in config.json if the model ties its embeddings")
    if plan.tied and has_head:
        embed = hf.embedding_name(plan.shape)
        if embed in weights and not torch.equal(weights.get(hf.LM_HEAD), weights.get(embed)):
            raise ConfigError(f"{weights.path}: {said}, but {hf.LM_HEAD} differs from {embed}; "
                              "set tie_word_embeddings false in config.json to keep the trained output layer")


def check_hf_shapes(plan: ImportPlan, weights: SafetensorsDir, rules: list[hf.Rule]) -> None:
    """Every tensor present has the shape config.json implies (read from the headers)."""
    fields = hf_config.shape_fields(plan.config)
    for rule in rules:
        for name, dims in zip(rule.hf, rule.hf_shapes):
            if name not in weights:
                continue
            actual, expected = weights.shape(name), tuple(size for size, _ in dims)
            if actual == expected:
                continue
            wrong = [src for (size, src), n in zip(dims, actual) if size != n] or [src for _, src in dims]
            fix = " or ".join(dict.fromkeys(fields[src] for src in wrong))
            raise ConfigError(f"{weights.path}: tensor {name!r} has shape {actual}, config.json implies {expected}; "
                              f"fix {fix} in config.json to match the weights")


def check_hf_tensors(plan: ImportPlan, weights: SafetensorsDir) -> list[hf.Rule]:
    """Every tensor the rules need is there with the shape config.json implies, and nothing we would
    silently drop (header reads only, but for `check_tied_head`)."""
    rules = hf.rules_for(plan.shape, plan.kind, tied=plan.tied)
    names = weights.keys()
    check_tied_head(plan, weights)
    for rule in rules:
        for name in rule.hf:
            if name not in weights and not rule.optional:
                raise ConfigError(f"{weights.path}: tensor {name!r} is missing (needed for {rule.ours})")
    check_hf_shapes(plan, weights, rules)
    extra = hf.unexpected_hf_tensors(rules, names, tied=plan.tied)
    if extra:
        raise ConfigError(f"{weights.path}: tensors {extra[:3]} have no place in a {plan.shape.arch} "
                          f"model as config.json describes it; check the config's bias/architecture fields")
    return rules


def global_reader(rules: list[hf.Rule], weights: SafetensorsDir):
    """name -> our global tensor, built from the HF tensors on demand (fp32)."""
    by_name = {r.ours: r for r in rules}

    def read(name: str) -> torch.Tensor:
        rule = by_name.get(name)
        if rule is None:
            raise ConfigError(f"no Hugging Face tensor maps to our {name!r}")
        if rule.optional and any(n not in weights for n in rule.hf):
            return rule.missing()
        try:
            return rule.to_ours([weights.get(n).float() for n in rule.hf])
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"{weights.path}: tensors {list(rule.hf)} do not fit {name}: {err}") from err

    return read


def _with_adapters(read, adapter_tensors: dict):
    def read_any(name: str) -> torch.Tensor:
        return adapter_tensors[name] if name in adapter_tensors else read(name)
    return read_any


def output_problem(out_dir: Path) -> str | None:
    """Why OUT_DIR cannot take this conversion (None: it is new, empty, or an earlier conversion,
    known by its model.yaml). Anything else, e.g. a run directory, might hold newer iter_* that
    would shadow the converted step 0."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    written = out_dir / "model.yaml"
    if written.is_file() and written.read_text().startswith(MODEL_YAML_HEAD):
        return None
    return (f"output {out_dir} is not empty and holds no earlier hf-to-mcore conversion (no model.yaml "
            "written by it); name a new or empty directory")


def staging_dir(out_dir: Path) -> Path:
    """Where a conversion into OUT_DIR is written until it is whole (same filesystem: renames)."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.hf-to-mcore-tmp"


def commit_output(staging: Path, out_dir: Path) -> None:
    """Rank 0: move a finished conversion into OUT_DIR. New or empty: one rename. An earlier
    conversion: its tokenizer files, iter_0000000, `latest` and (last) model.yaml are replaced,
    anything else in it is left alone."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(staging, out_dir)  # onto an empty directory too (POSIX rename)
        return
    tok_dir = out_dir / "tokenizer"
    remove_tokenizer_files(tok_dir)
    if (staging / "tokenizer").is_dir():
        tok_dir.mkdir(exist_ok=True)
        for f in (staging / "tokenizer").iterdir():
            os.replace(f, tok_dir / f.name)
    for ckpt in staging.glob("iter_*"):
        old = out_dir / f".old-{ckpt.name}"
        if (out_dir / ckpt.name).exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir / ckpt.name, old)
        os.replace(ckpt, out_dir / ckpt.name)
        shutil.rmtree(old, ignore_errors=True)
    for name in ("latest", "model.yaml"):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging)


def model_yaml(shape: ModelShape, tokenizer: str | None, out_dir: Path) -> str:
    model = {"arch": shape.arch, "num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
             "ffn_hidden_size": shape.ffn_hidden_size, "num_attention_heads": shape.num_attention_heads,
             "num_query_groups": shape.num_query_groups, "vocab_size": shape.vocab_size,
             "max_seq_len": shape.max_seq_len, "rotary_base": shape.rotary_base, "norm_eps": shape.norm_eps,
             "parallel_layernorms": shape.parallel_layernorms, "init_std": shape.init_std,
             "tokenizer": tokenizer}
    head = (f"{MODEL_YAML_HEAD} Paste into a run YAML, with\n"
            f"#   checkpoint:\n#     init: {out_dir.resolve()}\n")
    return head + yaml.safe_dump({"model": model}, sort_keys=False)


def prepare_output(plan: ImportPlan, hf_dir: Path, out_dir: Path, write_dir: Path | None = None) -> str | None:
    """Rank 0: copy and check the tokenizer (an earlier conversion's files removed first), write
    model.yaml; returns the tokenizer path. Files go to `write_dir` (default OUT_DIR), the paths
    they name are OUT_DIR's."""
    write_dir = write_dir or out_dir
    tok_dir = write_dir / "tokenizer"
    remove_tokenizer_files(tok_dir)
    copied = copy_tokenizer_files(hf_dir, tok_dir)
    tokenizer = None
    if any(n in copied for n in ("tokenizer.model", "tokenizer.json")):
        check_tokenizer(tok_dir, plan.shape.vocab_size)
        tokenizer = str((out_dir / "tokenizer").resolve())
    else:
        log.warning("%s has no tokenizer.model or tokenizer.json: set model.tokenizer yourself", hf_dir)
    (write_dir / "model.yaml").write_text(model_yaml(plan.shape, tokenizer, out_dir))
    return tokenizer


def prepare_on_main(plan: ImportPlan, hf_dir: Path, out_dir: Path) -> tuple[str | None, str | None]:
    """Rank 0: (tokenizer path, None) once the staging directory is prepared, or (None, what is
    wrong), for the caller to broadcast: an error raised on rank 0 alone would leave the other
    ranks waiting."""
    staging = staging_dir(out_dir)
    try:
        if problem := output_problem(out_dir):
            raise ConfigError(problem)
        shutil.rmtree(staging, ignore_errors=True)  # a conversion killed before it could clean up
        staging.mkdir(parents=True)
        return prepare_output(plan, hf_dir, out_dir, staging), None
    except ConfigError as err:
        shutil.rmtree(staging, ignore_errors=True)
        return None, str(err)
    except OSError as err:  # no permission, a read-only filesystem: before any weight is read
        from alfred_train.convert.hf_output import cannot_write

        shutil.rmtree(staging, ignore_errors=True)
        return None, cannot_write(out_dir, err)


def read_adapter(plan: ImportPlan, adapter: str | Path | None):
    """(AdapterSpec, global adapter tensors) of a PEFT adapter dir, checked against the base; or (None, {})."""
    if adapter is None:
        return None, {}
    from alfred_train.convert import peft
    from alfred_train.models import lora

    if plan.kind != "lm":
        raise ConfigError(f"--adapter {adapter}: adapters import onto a language model (--kind lm) only")
    spec, tensors = peft.read_adapter(adapter, plan.shape)
    lora.check_shape(spec, plan.shape)
    return spec, tensors


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, runtime, *, tp: int, pp: int,
                kind: str | None = None, dtype: str = "auto", adapter: str | Path | None = None) -> Path:
    """Collective over tp*pp ranks: build our model at (tp, pp), fill it from HF, save step 0.
    adapter: a PEFT LoRA adapter dir; the checkpoint then holds the base and the adapters (a LoRA
    checkpoint whose base is itself, loadable by generate / convert mcore-to-hf)."""
    import torch.distributed as dist

    from alfred_train import checkpoint
    from alfred_train.config import ParallelConfig
    from alfred_train.kernels.backends import choose_backend
    from alfred_train.models.build import build_model
    from alfred_train.models.build import unwrap

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    plan = plan_import(hf_dir, kind, dtype)
    check_layout(plan, tp, pp)
    weights = open_weights(hf_dir)
    rules = check_hf_tensors(plan, weights)
    spec, adapter_tensors = read_adapter(plan, adapter)
    box = list(prepare_on_main(plan, hf_dir, out_dir)) if runtime.is_main else [None, None]
    dist.broadcast_object_list(box, src=0)
    tokenizer, problem = box
    if problem:
        raise ConfigError(problem)
    staging = staging_dir(out_dir)
    try:
        # The local spec's sharded keys equal the TE spec's: the checkpoint loads under either backend.
        chunks = build_model(plan.shape, ParallelConfig(tp=tp, pp=pp), kind=plan.kind, bf16=plan.bf16,
                             backend=choose_backend("eager"), device=runtime.device)
        chunks = [unwrap(c) for c in chunks]
        read = global_reader(rules, weights)
        if spec is not None:
            from alfred_train.models import lora

            lora.attach(chunks, spec, kind=plan.kind)
            read = _with_adapters(read, adapter_tensors)
        filled = fill_from_globals(chunks, read)
        log.info("filled %d tensor shards from %s", filled, hf_dir)
        state = _checkpoint_state(plan, hf_dir, tokenizer, spec, adapter)
        layout = {"tp": tp, "pp": pp, "dp": 1, "vpp": None, "zero": False}
        name = MODEL_NAMES[plan.kind]
        saved = checkpoint.save_checkpoint(staging, 0, {name: (chunks, None)}, state, runtime, keep=1, layout=layout)
        if runtime.is_main:
            commit_output(staging, out_dir)
        dist.barrier()  # no rank returns (and reads OUT_DIR) before rank 0 has moved the conversion there
    except BaseException:
        if runtime.is_main:  # the other ranks' part of it is under `staging` too
            shutil.rmtree(staging, ignore_errors=True)
        raise
    path = out_dir / saved.name
    if runtime.is_main:
        print(f"convert: {hf_dir} -> {path} (model {name!r}, tp={tp}, pp={pp}); "
              f"model section in {out_dir / 'model.yaml'}", flush=True)
    return path


def _checkpoint_state(plan: ImportPlan, hf_dir: Path, tokenizer: str | None, spec, adapter) -> dict:
    """The checkpoint's `state`: our shape, tokenizer, dtype, where the weights came from (and the LoRA spec)."""
    hf_ids = {k: plan.config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    state = {"stage": "convert", "model": dataclasses.asdict(plan.shape), "tokenizer": tokenizer,
             "dtype": "bfloat16" if plan.bf16 else "float32",
             "hf": {"source": str(hf_dir.resolve()), "architectures": plan.config.get("architectures"),
                    "tie_word_embeddings": plan.tied, **hf_ids}}
    if spec is not None:
        state["hf"]["adapter"] = str(Path(adapter).resolve())
        state["lora"] = {MODEL_NAMES[plan.kind]: {**spec.to_state(),
                                                  "base": {"path": None, "model": None, "skip": [], "seed": None}}}
    return state
