"""What every stage does around its loop: run directory, tokenizer, models, resume, preemption."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from alfred_train import checkpoint
from alfred_train.checkpointing.site import Site, check_run_dir
from alfred_train.config import Config, dump_yaml
from alfred_train.data.corpus import TINY_SP_MODEL_PATH as TINY_TOKENIZER
from alfred_train.data.tokenizer import load_tokenizer
from alfred_train.errors import ConfigError
from alfred_train.models.build import ModelShape, build_model, resolve_shape, unwrap
from alfred_train.parallel.init import ParallelRuntime

log = logging.getLogger("alfred_train")
PREEMPTED_EXIT_CODE = 3  # a checkpoint was written on SIGUSR1/SIGTERM: requeue and resume


def prepare_run_dir(cfg: Config, runtime: ParallelRuntime) -> Path:
    """Create run.dir (and checkpoints/) and write the resolved config atomically on rank 0 (with
    `checkpoint.node_local`, on every node's local rank 0: each node has its own run.dir); a run.dir
    that is not shared, or shared, against what `checkpoint.node_local` says is refused here."""
    run_dir = Path(cfg.run.dir)
    site = Site.detect(runtime.rank, cfg.checkpoint.node_local)
    if site.owner:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    check_run_dir(run_dir, site)
    if site.owner:
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(dump_yaml(cfg))
        os.replace(tmp, run_dir / "config.yaml")
    dist.barrier()
    return run_dir


def tokenizer_path(cfg: Config) -> str:
    return str(Path(cfg.model.tokenizer).resolve()) if cfg.model.tokenizer else str(TINY_TOKENIZER)


def tokenizer_for(cfg: Config):
    return load_tokenizer(tokenizer_path(cfg))


def use_bf16(cfg: Config, runtime: ParallelRuntime) -> bool:
    if cfg.train.precision == "auto":
        return not runtime.cpu
    return cfg.train.precision == "bf16"


def layout(cfg: Config) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "dp": p.dp, "vpp": p.vpp, "zero": p.zero}


def attention_backend(cfg: Config, runtime: ParallelRuntime):
    from alfred_train.kernels.backends import choose_backend

    return choose_backend(cfg.model.attention_backend)


def make_model(cfg: Config, runtime: ParallelRuntime, shape: ModelShape, *, kind: str, backend,
               seed: int | None):
    return build_model(shape, cfg.parallel, kind=kind, bf16=use_bf16(cfg, runtime), backend=backend,
                       device=runtime.device, seed=seed, recompute=cfg.train.recompute)


def shape_for(cfg: Config, tokenizer) -> ModelShape:
    return resolve_shape(cfg.model, tokenizer.vocab_size)


def build_trainable(cfg: Config, runtime: ParallelRuntime, shape: ModelShape, backend, *, kind: str,
                    total_steps: int, lr: float | None = None):
    """A seeded model (`kind` "lm" or "scalar") wrapped in megatron DDP, with its own optimizer and
    LR schedule over `total_steps` optimizer steps (peak `lr`, default optim.lr)."""
    from alfred_train.training import Trainable, build_optimizer, build_scheduler, wrap_ddp

    chunks = wrap_ddp(make_model(cfg, runtime, shape, kind=kind, backend=backend, seed=cfg.train.seed),
                      zero=cfg.parallel.zero)
    optimizer = build_optimizer(chunks, cfg.optim, lr=lr, bf16=use_bf16(cfg, runtime), zero=cfg.parallel.zero)
    return Trainable(chunks, optimizer, build_scheduler(optimizer, cfg.optim, total_steps, lr=lr), runtime)


def _saved(trainables: dict) -> dict:
    return {name: ([unwrap(c) for c in t.chunks], t.optimizer) for name, t in trainables.items()}


def save(cfg: Config, runtime: ParallelRuntime, step: int, trainables: dict, shape: ModelShape, stage: str,
         **state) -> None:
    """Checkpoint the named trainables (weights, optimizers, `<name>_scheduler`, `<name>_steps`) with
    the stage's own `state`, the model shape and the tokenizer (enough to rebuild from it alone)."""
    for name, t in trainables.items():
        state[f"{name}_scheduler"], state[f"{name}_steps"] = t.scheduler.state_dict(), t.steps
    state.update(stage=stage, model=dataclasses.asdict(shape), tokenizer=tokenizer_path(cfg))
    c = cfg.checkpoint
    checkpoint.save_checkpoint(Path(cfg.run.dir) / "checkpoints", step, _saved(trainables), state, runtime,
                               c.keep, layout(cfg), node_local=c.node_local, s3_uri=c.s3_uri)


def resume(cfg: Config, runtime: ParallelRuntime, trainables: dict) -> tuple[int, dict] | None:
    """Per `checkpoint.resume`: restore the named trainables exactly as `save` wrote them, and this
    rank's RNG states; returns (step, the stage's saved state), or None when starting fresh."""
    from alfred_train.training import restore_scheduler

    path = resume_dir(cfg, runtime)
    if path is None:
        return None
    meta = checkpoint.load_models(path, _saved(trainables), strict_layout=layout(cfg))
    state = meta["state"]
    for name, t in trainables.items():
        restore_scheduler(t.scheduler, state[f"{name}_scheduler"])
        t.steps = state[f"{name}_steps"]
    checkpoint.load_rng(path, runtime.rank)
    log.info("resumed from %s at step %d", path, meta["step"])
    return meta["step"], state


def resume_dir(cfg: Config, runtime: ParallelRuntime) -> Path | None:
    """The checkpoint to resume from per `checkpoint.resume` (auto | none | a path). Collective:
    `auto` verifies the candidates against their manifests (`checkpoint.find_resumable`)."""
    c = cfg.checkpoint
    if c.resume == "none":
        return None
    if c.resume == "auto":
        return checkpoint.find_resumable(Path(cfg.run.dir) / "checkpoints", runtime, node_local=c.node_local,
                                         s3_uri=c.s3_uri)
    path = checkpoint.resolve_checkpoint(c.resume)
    checkpoint.verify_checkpoint(path, runtime)
    return path


def load_records(cfg: Config, synthetic_records, parse, read_jsonl):
    """(train, valid) records: JSONL files or the synthetic task; without data.valid a seeded
    `data.valid_fraction` of the training records is held out."""
    d = cfg.data
    if d.synthetic:
        records = [parse(r, f"synthetic:{i}") for i, r in enumerate(synthetic_records(d.synthetic_size, cfg.train.seed))]
    else:
        records = read_jsonl(d.train)
    if d.valid:
        return records, read_jsonl(d.valid)
    n_valid = int(len(records) * d.valid_fraction)
    order = list(range(len(records)))
    random.Random(cfg.train.seed).shuffle(order)
    return [records[i] for i in order[n_valid:]], [records[i] for i in order[:n_valid]]


def eval_indices(num_samples: int, cfg: Config, dp_rank: int) -> list[int]:
    """This DP rank's held-out samples: up to `train.eval_batches` *full* micro-batches of its
    contiguous share (pipeline stages exchange fixed shapes; the interleaved vpp schedule also
    needs a multiple of pp micro-batches)."""
    t, p = cfg.train, cfg.parallel
    per_rank = num_samples // p.dp
    batches = min(per_rank // t.micro_batch_size, t.eval_batches)
    if p.vpp:
        batches -= batches % p.pp
    if batches <= 0:
        raise ConfigError(f"the held-out split has {num_samples} samples, too few for one evaluation of "
                          f"train.micro_batch_size ({t.micro_batch_size}) x parallel.dp ({p.dp})"
                          + (f" x pp ({p.pp}) micro-batches" if p.vpp else "") + "; raise data.valid_fraction")
    return list(range(dp_rank * per_rank, dp_rank * per_rank + batches * t.micro_batch_size))


def checkpoint_or_stop(cfg: Config, step: int, save, preemption: "Preemption", runtime, metrics) -> bool:
    """After an optimizer step (or PPO iteration): save when due; on a preemption signal save and
    return True so the loop exits with PREEMPTED_EXIT_CODE."""
    last = step == cfg.train.max_steps
    periodic = bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0
    if periodic or (last and cfg.checkpoint.save_final):
        save(step)
    if last or not preemption.requested(runtime.device):
        return False
    if not periodic:
        save(step)
    write_requeue_record(step, runtime)
    metrics.write(f"preempted at step {step}: checkpoint saved, exiting with code {PREEMPTED_EXIT_CODE} "
                  "so the job can be requeued")
    return True


def write_requeue_record(step: int, runtime) -> None:
    """Rank 0, after the preemption checkpoint is complete on every rank (the save ends with a
    barrier): tell the Slurm batch script to requeue (launch/slurm.py reads $ALFRED_REQUEUE_RECORD),
    so its decision does not depend on which task exits first or with what code."""
    path = os.environ.get("ALFRED_REQUEUE_RECORD")
    if not path or not runtime.is_main:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(f"checkpoint {checkpoint.iter_name(step)} saved at step {step}\n")
    os.replace(tmp, path)


class Preemption:
    """SIGUSR1 / SIGTERM ask the run to checkpoint at the next step boundary and exit with code 3.

    `requested()` is collective (a MAX all-reduce), so every rank stops at the same step.
    """

    def __init__(self):
        self._flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self._flag = True

    def requested(self, device) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
