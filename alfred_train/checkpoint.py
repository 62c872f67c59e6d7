"""Sharded checkpoints: save, load (resharding across TP/PP), resume, keep-last-N, `latest`.

Layout under `run.dir/checkpoints/`:

    iter_0000010/            megatron-core dist_checkpointing (torch_dist) files
        meta.json            step, layout, trainer state (schedules, data position, KL controller...)
        rng/rank_00003.pt    python / numpy / torch RNG states of each rank
    latest                   text file naming the newest complete checkpoint ("iter_0000010")

A checkpoint is written under `.tmp-iter_0000010/` and renamed when every rank has finished, then
`latest` is replaced atomically (write + os.replace): a crash mid-save leaves the previous
`latest` loadable. Model weights load at any TP/PP layout; optimizer states at the layout they
were saved with (checked, with a clear error otherwise).

A checkpoint holds any number of named models (`policy`, `value`, ...), each with an optional
optimizer; `meta.json["state"]` carries the JSON-able trainer state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError

LATEST = "latest"


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint under `ckpt_root`, or None."""
    root = Path(ckpt_root)
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "meta.json").exists() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a `checkpoints/` root (uses latest) or a run dir."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if (cand / "meta.json").exists():
            return cand
        found = latest_checkpoint(cand)
        if found:
            return found
    raise ConfigError(f"{path}: no checkpoint found (expected meta.json, or a 'latest' file)")


def _model_sd(chunks, name: str) -> dict:
    """Each chunk's sharded state dict with tensor keys under `name.` (several models per checkpoint)."""
    return {f"{name}.chunk{i}": c.sharded_state_dict(prefix=f"{name}.") for i, c in enumerate(chunks)}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


@torch.no_grad()
def _prime_optimizer_state(optimizer) -> None:
    """Materialize torch Adam's lazy state (with its per-parameter `step`) by one step at lr=0 on
    zero gradients; parameters do not change. megatron-core 0.16.1's distributed optimizer needs
    that state to build its load template when Adam is torch's (no TE/apex FusedAdam)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if len(inner.state):
            continue
        saved = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, saved):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = None


def _adam_step(optimizer) -> float | None:
    """torch Adam's per-parameter step count (the same for every parameter)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
    return None


def _set_adam_step(optimizer, step: float) -> None:
    """Restore the step count: megatron-core 0.16.1's distributed optimizer loads it only into a
    state it allocates itself, not into the primed one (see `_prime_optimizer_state`)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def _optimizer_sd(optimizer, model_sd: dict, is_loading: bool) -> dict:
    merged = {f"{chunk}/{k}": v for chunk, sd in model_sd.items() for k, v in sd.items()}  # vpp chunks share local names
    # The distributed optimizer (ZeRO) is saved per DP shard ("dp_reshardable"): megatron-core
    # 0.16.1's default fully-sharded format rejects fp32 params (flattened_range unsupported).
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    with torch.no_grad():
        return optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=metadata)


def save_checkpoint(ckpt_root: str | Path, step: int, models: dict, state: dict, runtime,
                    keep: int, layout: dict) -> Path:
    """Collective: every rank calls it. models: name -> (chunks, optimizer or None)."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_root)
    final = root / iter_name(step)
    tmp = root / f".tmp-{iter_name(step)}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = {}
    for name, (chunks, optimizer) in models.items():
        msd = _model_sd(chunks, name)
        sharded.update(msd)
        if optimizer is not None:
            sharded[f"{name}.optimizer"] = _optimizer_sd(optimizer, msd, is_loading=False)
    with _preemption_signals_blocked():
        dist_checkpointing.save(sharded, str(tmp))
    adam_steps = {name: _adam_step(opt) for name, (_, opt) in models.items() if opt is not None}
    rng_dir = tmp / "rng"
    if runtime.is_main:
        rng_dir.mkdir(exist_ok=True)
    dist.barrier()
    torch.save(rng_state(), rng_dir / f"rank_{runtime.rank:05d}.pt")
    dist.barrier()
    if runtime.is_main:
        meta = {"step": step, "layout": layout, "models": sorted(models), "state": state,
                "adam_steps": adam_steps}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, keep)
    dist.barrier()
    return final


def load_models(ckpt_dir: str | Path, models: dict, *, strict_layout: dict | None = None,
                skip: tuple[str, ...] = ()) -> dict:
    """Load the named models (and optimizers, when given) in place; returns meta.json.

    models: name -> (chunks, optimizer or None). `name` may be given as "dst=src" to load the
    checkpoint's model `src` into `dst` (e.g. value model from the reward model).
    Optimizer states need the layout they were saved at (`strict_layout`).
    skip: partial load of weights only. Parameters whose name contains one of these strings are
    left as they are (e.g. `skip=("output_layer",)` loads an SFT trunk into a scalar-head model);
    every other parameter must be in the checkpoint, as in a full load.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(ckpt_dir)
    meta = json.loads((path / "meta.json").read_text())
    sharded, wanted = {}, {}
    for spec, (chunks, optimizer) in models.items():
        dst, _, src = spec.partition("=")
        src = src or dst
        if src not in meta["models"]:
            raise ConfigError(f"{path}: holds models {meta['models']}, not {src!r}")
        if len(chunks) != int(meta["layout"].get("vpp") or 1):
            raise ConfigError(f"{path}: saved with another virtual-pipeline split; set parallel.vpp as when saved")
        msd = _model_sd(chunks, src)
        if skip:
            if optimizer is not None:
                raise ValueError("load_models: skip= loads weights only; pass no optimizer with it")
            msd = {k: {key: v for key, v in sd.items() if not _skipped(key, skip)} for k, sd in msd.items()}
        sharded.update(msd)
        wanted[spec] = (chunks, optimizer, src, msd)
        if optimizer is not None:
            if strict_layout is not None and meta["layout"] != strict_layout:
                raise ConfigError(f"{path}: optimizer state was saved at layout {meta['layout']}, "
                                  f"this run is {strict_layout}; resume at the same parallel.tp/pp/dp/zero")
            _prime_optimizer_state(optimizer)
            sharded[f"{src}.optimizer"] = _optimizer_sd(optimizer, msd, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    with torch.no_grad():
        for spec, (chunks, optimizer, src, _) in wanted.items():
            for i, chunk in enumerate(chunks):
                _load_chunk(chunk, _strip(loaded[f"{src}.chunk{i}"], f"{src}."), skip)
            if optimizer is not None:
                optimizer.load_state_dict(loaded[f"{src}.optimizer"])
                if meta.get("adam_steps", {}).get(src) is not None:
                    _set_adam_step(optimizer, meta["adam_steps"][src])
    return meta


def _skipped(key: str, skip: tuple[str, ...]) -> bool:
    return any(s in key for s in skip)


def _load_chunk(chunk, state_dict: dict, skip: tuple[str, ...]) -> None:
    """load_state_dict, strict except for the parameters named by `skip` (kept as they are)."""
    if not skip:
        chunk.load_state_dict(state_dict, strict=True)
        return
    missing, unexpected = chunk.load_state_dict(state_dict, strict=False)
    wrong = [k for k in missing if not _skipped(k, skip)] + list(unexpected)
    if wrong:
        raise RuntimeError(f"partial load (skip={skip}): unexpected or missing keys {wrong}")


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    f = Path(ckpt_dir) / "rng" / f"rank_{rank:05d}.pt"
    if not f.exists():
        return False
    set_rng_state(torch.load(f, weights_only=False))
    return True


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


@contextlib.contextmanager
def _preemption_signals_blocked():
    """Hold SIGTERM/SIGUSR1 while dist_checkpointing writes: its writer and Manager processes inherit
    the blocked mask, so a scheduler's TERM to the whole job step (Slurm requeue, scancel) cannot
    kill them mid-save; the parent gets the signal when the save is done and checkpoints/exits."""
    sigs = {signal.SIGTERM, signal.SIGUSR1}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if (p / "meta.json").exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
