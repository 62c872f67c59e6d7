"""LoRA checkpoints: what they hold, the base they refer to, and loading either (models/lora.py).

A LoRA checkpoint stores a model's trainable part (`TrainableView`: the adapters, and a scalar
model's head) and, in meta.json state["lora"][name], the adapter spec and a `BaseRef`:

    {"targets": {"linear_qkv": {"rank": 16, "scale": 2.0}, ...}, "dropout": 0.05,
     "base": {"path": "/abs/.../iter_0000040", "model": "policy", "skip": [], "seed": null}}

Loading a LoRA model = build it, attach adapters, `load_base` (the referenced checkpoint's weights,
itself merged when it is a LoRA checkpoint), then the adapters. `convert hf-to-mcore --adapter`
writes a self-contained checkpoint (base and adapters in one; base path and seed null).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alfred_train.errors import ConfigError
from alfred_train.models.lora import (ADAPTER_KEY, HEAD, PARENT, AdapterSpec, LoRAAdapter, attach,
                                      has_adapters)


class TrainableView:
    """What a LoRA checkpoint holds of a model: its trainable parameters (adapters, a scalar head).

    Passed to checkpoint.save_checkpoint / load_models in place of the chunk: `sharded_state_dict`
    keeps the trainable entries only, `load_state_dict` loads them and leaves the frozen base as is.
    """

    def __init__(self, model):
        self.model = model

    def _trainable(self, prefix: str) -> set[str]:
        return {prefix + n for n, p in self.model.named_parameters() if p.requires_grad}

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs) -> dict:
        keep = self._trainable(prefix)
        return {k: v for k, v in self.model.sharded_state_dict(prefix=prefix).items() if k in keep}

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        wanted = self._trainable("")
        lost = [k for k in missing if k in wanted]
        if unexpected or lost:
            raise RuntimeError(f"LoRA checkpoint: unexpected keys {unexpected}, missing trainable keys {lost}")
        return [], []


def checkpoint_chunks(chunks) -> list:
    """The chunks as a checkpoint stores them: trainable views for adapted models, else as they are."""
    from alfred_train.models.build import unwrap

    return [TrainableView(unwrap(c)) if has_adapters(c) else unwrap(c) for c in chunks]


# ---------------------------------------------------------------------------------------------
# The base a LoRA checkpoint refers to.

@dataclass(frozen=True)
class BaseRef:
    """Where a model's frozen base weights come from: checkpoint `path`'s model `model` (parameters
    whose name contains one of `skip` keep their own init, e.g. an RM's head over an SFT trunk), or
    the seeded init (`seed`) when the run started from no checkpoint."""

    path: str | None = None
    model: str | None = None
    skip: tuple[str, ...] = ()
    seed: int | None = None

    def to_state(self) -> dict:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_state(cls, state: dict) -> "BaseRef":
        return cls(state.get("path"), state.get("model"), tuple(state.get("skip") or ()), state.get("seed"))


def base_ref(path, model: str, skip: tuple[str, ...] = ()) -> BaseRef:
    from alfred_train import checkpoint

    resolved = checkpoint.resolve_checkpoint(path).resolve()
    return BaseRef(str(resolved), model, tuple(skip))


def load_base(chunks, ref: BaseRef, name: str, *, merge_own: bool = True) -> None:
    """Load model `name`'s base weights per `ref` into its (unwrapped) adapted chunks; records the
    reference on the model (saved in the LoRA checkpoint's state). A base that is itself a LoRA
    checkpoint (StackLLaMA: SFT adapters, then RM adapters, then PPO adapters) is loaded merged:
    its own base, then W += scale * B A of its adapters, shard by shard (`merge_into_base`).
    merge_own=False: a checkpoint holding base and adapters together gives its base alone."""
    from alfred_train import checkpoint
    from alfred_train.models.build import unwrap

    models = [unwrap(c) for c in chunks]
    if ref.path is not None:
        meta = checkpoint.read_meta(ref.path)
        entry = ((meta.get("state") or {}).get("lora") or {}).get(ref.model)
        if entry and not _self_contained(entry):
            inner = BaseRef.from_state(entry["base"])
            if inner.path is None and inner.seed is not None:  # that run's base: the seeded init
                from alfred_train.models.build import init_weights

                with _adapters_aside(models):
                    for m in models:
                        init_weights(m, inner.seed, _shape_of(meta))
            load_base(models, inner, name)
            merge_into_base(models, ref, AdapterSpec.from_state(entry))
        else:
            checkpoint.load_models(ref.path, {f"{name}={ref.model}": (models, None)}, skip=(ADAPTER_KEY, *ref.skip))
            if entry and merge_own:  # base and adapters in one checkpoint (hf-to-mcore --adapter): merged
                merge_into_base(models, ref, AdapterSpec.from_state(entry))
    for m in models:
        m.lora_base = ref


class _SavedPart:
    """The part of a model a LoRA checkpoint stored: its adapters and, for a scalar model, its head."""

    def __init__(self, model, head: bool):
        self.model, self.head = model, head

    def _keys(self, prefix: str) -> set[str]:
        return {prefix + n for n, _ in self.model.named_parameters()
                if ADAPTER_KEY in n or (self.head and n.startswith(HEAD))}

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs) -> dict:
        keep = self._keys(prefix)
        return {k: v for k, v in self.model.sharded_state_dict(prefix=prefix).items() if k in keep}

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        lost = [k for k in missing if k in self._keys("")]
        if unexpected or lost:
            raise RuntimeError(f"LoRA base: unexpected keys {unexpected}, missing keys {lost}")
        return [], []


@torch.no_grad()
def merge_into_base(models, ref: BaseRef, spec: AdapterSpec) -> None:
    """Load the adapters of LoRA checkpoint `ref` (spec `spec`) into temporary adapters at this
    layout and add scale * B A to the base weights they wrap, on each rank's own shards:
        column: W_k (n_out/tp, n_in) += scale * B_k (n_out/tp, r) @ A (r, n_in)
        row:    W_k (n_out, n_in/tp) += scale * B (n_out, r) @ A_k (r, n_in/tp)
    (Llama's fc1: B_k's rows are [gate_k; up_k] like W_k's). This model's own adapters are set
    aside meanwhile. A scalar checkpoint's trained head is loaded too unless `ref.skip` names it."""
    from alfred_train import checkpoint

    head = HEAD not in ref.skip and ref.model in ("reward", "value")
    with _adapters_aside(models):
        temps = []
        for model in models:
            for layer in model.decoder.layers:
                for target, t in spec.targets.items():
                    parent = getattr(layer, PARENT[target])
                    temp = LoRAAdapter(model.config, target, getattr(parent, target), t["rank"], t["scale"], 0.0)
                    parent.add_module(f"lora_{target}", temp)
                    temps.append((parent, target, temp))
        checkpoint.load_models(ref.path, {f"base={ref.model}": ([_SavedPart(m, head) for m in models], None)})
        for parent, target, temp in temps:
            w = getattr(parent, target).weight
            w.copy_((w.double() + temp.scale * (temp.lora_B.double() @ temp.lora_A.double())).to(w.dtype))
            del parent._modules[f"lora_{target}"]


@contextlib.contextmanager
def _adapters_aside(models):
    """Detach this model's adapters from their parents inside the block (their parameters, hooks
    and optimizer are untouched), so that the base's own state dict is all that is left."""
    aside = []
    for model in models:
        for layer in model.decoder.layers:
            for target in PARENT:
                parent = getattr(layer, PARENT[target])
                mine = parent._modules.pop(f"lora_{target}", None)
                if mine is not None:
                    aside.append((parent, target, mine))
    try:
        yield
    finally:
        for parent, target, mine in aside:
            parent._modules.pop(f"lora_{target}", None)
            parent.add_module(f"lora_{target}", mine)


def base_paths(meta: dict, name: str) -> list[tuple[Path, str]]:
    """(checkpoint, model) of each checkpoint model `name` of a checkpoint with this meta.json reads
    its frozen base from, nearest first: a LoRA checkpoint's base, that base's own base when it is a
    LoRA checkpoint too, ... ([] for a full model, a self-contained or seeded-init LoRA checkpoint).
    The walk stops at a base that is gone (no meta.json): `check_bases` names it."""
    from alfred_train.checkpoint import read_meta

    found = []
    entry = ((meta.get("state") or {}).get("lora") or {}).get(name)
    while entry and not _self_contained(entry) and (ref := BaseRef.from_state(entry["base"])).path is not None:
        path = Path(ref.path)
        found.append((path, ref.model))
        if not (path / "meta.json").is_file():
            break
        entry = ((read_meta(path).get("state") or {}).get("lora") or {}).get(ref.model)
    return found


def check_bases(path, meta: dict, names, *, named: str, verify: bool) -> None:
    """ConfigError when a base that models `names` of checkpoint `path` load (`base_paths`) is gone
    (moved, or pruned by checkpoint.keep) or, with `verify`, damaged against its manifest: a LoRA
    checkpoint's own files were checked and its base loaded unchecked, or failed with a traceback."""
    from alfred_train.checkpointing import manifest

    for name in names:
        for base, model in base_paths(meta, name):
            if not (base / "meta.json").is_file():
                raise ConfigError(f"{named}{path} is a LoRA checkpoint over the base {base} (model {model!r}), which "
                                  "holds no checkpoint now (moved, or removed by checkpoint.keep); put it back there")
            if verify:
                manifest.refuse_damaged(base, named=f"{named}{path}: its LoRA base ", before="loading",
                                        fix="put a sound copy of the base it was trained on back there", other="")


def check_sound(path, meta: dict, names, *, named: str, fix: str, before: str) -> None:
    """Checkpoint `path` against its manifest (`manifest.refuse_damaged`), then the bases its models
    `names` load (`check_bases`): every file a load of them reads."""
    from alfred_train.checkpointing import manifest

    manifest.refuse_damaged(path, named=named, fix=fix, before=before)
    check_bases(path, meta, names, named=named, verify=True)


def _self_contained(entry: dict) -> bool:
    """A checkpoint that holds its base weights next to its adapters (`convert hf-to-mcore --adapter`)."""
    base = entry.get("base") or {}
    return base.get("path") is None and base.get("seed") is None


def load_checkpoint_model(path, meta: dict, name: str, chunks, *, kind: str) -> None:
    """Load model `name` of checkpoint `path` into freshly built (unwrapped) chunks: a full model as
    it is; a LoRA one as base (per its reference) + adapters. Adapters stay on (generate, convert)."""
    from alfred_train import checkpoint

    entry = ((meta.get("state") or {}).get("lora") or {}).get(name)
    if not entry:
        checkpoint.load_models(path, {name: (chunks, None)})
        return
    attach(chunks, AdapterSpec.from_state(entry), kind=kind)
    ref = BaseRef.from_state(entry["base"])
    if _self_contained(entry):
        ref = BaseRef(str(path), name)
    elif ref.seed is not None:
        from alfred_train.models.build import init_weights, unwrap

        for c in chunks:
            init_weights(unwrap(c), ref.seed, _shape_of(meta))
    load_base(chunks, ref, name, merge_own=False)
    checkpoint.load_models(path, {name: (checkpoint_chunks(chunks), None)})


def _shape_of(meta: dict):
    from alfred_train.models.build import ModelShape

    return ModelShape(**meta["state"]["model"])


def checkpoint_state(trainables: dict) -> dict:
    """state["lora"] of a checkpoint of `trainables` (name -> Trainable), or {} without adapters."""
    from alfred_train.models.build import unwrap

    out = {}
    for name, t in trainables.items():
        model = unwrap(t.chunks[0])
        if getattr(model, "lora_spec", None) is not None:
            out[name] = {**model.lora_spec.to_state(), "base": model.lora_base.to_state()}
    return {"lora": out} if out else {}


def check_resume(state: dict, trainables: dict, path) -> None:
    """The checkpoint being resumed was trained on the same bases with the same adapters (the run's
    checks said which and named the key: `stages.checkpoint_checks`; a base's path may differ, a
    copy of it being the same base)."""
    def aside_paths(lora_state: dict) -> dict:
        return {name: {**entry, "base": {**entry.get("base", {}), "path": None}} for name, entry in lora_state.items()}

    mine = checkpoint_state(trainables).get("lora", {})
    saved = state.get("lora") or {}
    if aside_paths(mine) != aside_paths(saved):
        raise ConfigError(f"{path}: its LoRA adapters/base {saved or 'none'} differ from this run's "
                          f"{mine or 'none'}; resume with the same lora section and base checkpoints")


# ---------------------------------------------------------------------------------------------
# Global (TP=1/PP=1) adapter tensors: merge.

def adapter_names(global_tensors: dict) -> list[str]:
    """The per-layer adapter prefixes in a dict of global tensors, e.g. decoder.layers.3.self_attention.lora_linear_qkv."""
    return sorted({k[: -len(".lora_A")] for k in global_tensors if k.endswith(".lora_A")})


def base_weight_name(adapter: str) -> str:
    head, _, last = adapter.rpartition(".")
    return f"{head}.{last[len('lora_'):]}.weight"


def merge_globals(tensors: dict, spec: AdapterSpec) -> dict:
    """W + scale * B A for every adapter; returns the base tensors only (no adapter entries)."""
    out = {k: v for k, v in tensors.items() if ADAPTER_KEY not in k}
    for adapter in adapter_names(tensors):
        target = adapter.rpartition(".lora_")[2]
        w = base_weight_name(adapter)
        a, b = tensors[f"{adapter}.lora_A"].double(), tensors[f"{adapter}.lora_B"].double()
        out[w] = (out[w].double() + spec.targets[target]["scale"] * (b @ a)).to(out[w].dtype)  # (n_out, n_in)
    return out
