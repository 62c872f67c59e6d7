"""What every stage does around its loop: run directory, tokenizer, models, resume, preemption."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from alfred_train.atomic import write_text
from alfred_train import checkpoint, preemption
from alfred_train.checkpointing.site import Site, check_run_dir, lock_run_dir, run_dir_problem
from alfred_train.config import Config, dump_yaml
from alfred_train.data import mixture
from alfred_train.data.corpus import TINY_SP_MODEL_PATH as TINY_TOKENIZER
from alfred_train.data.tokenizer import load_tokenizer
from alfred_train.errors import AlfredError, ConfigError
from alfred_train.models import lora, lora_checkpoint
from alfred_train.models.build import ModelShape, build_model, resolve_shape, unwrap
from alfred_train.parallel.init import ParallelRuntime
from alfred_train.stages import inits

log = logging.getLogger("alfred_train")
PREEMPTED_EXIT_CODE = 3  # a checkpoint was written on SIGUSR1/SIGTERM: requeue and resume
JOB_MARKER = "job-id"  # in run.dir: the SageMaker job (ALFRED_JOB_ID, from entry.py) that runs there


def prepare_run_dir(cfg: Config, runtime: ParallelRuntime) -> Path:
    """Create run.dir (and checkpoints/) and write the resolved config atomically on rank 0 (with
    `checkpoint.node_local`, on every node's local rank 0: each node has its own run.dir); a run.dir
    that is not shared, or shared, against what `checkpoint.node_local` says is refused here, as is
    one a file stands in the way of (`site.run_dir_problem`), one another run holds (`site.lock_run_dir`),
    before any step."""
    from alfred_train.training import schedule_lengths

    run_dir = Path(cfg.run.dir)
    site = Site.detect(runtime.rank, cfg.checkpoint.node_local)
    problem = run_dir_problem(run_dir, profile=cfg.logging.profile_step is not None)
    if site.owner and problem is None:
        problem = _checkpoints_folder_problem(run_dir / "checkpoints")
        try:
            problem = problem or lock_run_dir(run_dir)  # one run at a time in a directory
        except OSError as err:
            problem = f"run.dir: cannot create {run_dir / 'checkpoints'} ({err.strerror}); set run.dir elsewhere"
    if problems := site.problems_everywhere(problem):  # collective: every rank stops, none waits
        raise ConfigError(problems[0])
    check_run_dir(run_dir, site)
    problem = None
    if site.owner:
        if runtime.is_main:
            _say_config_changes(run_dir / "config.yaml", cfg)
        try:
            write_text(run_dir / "config.yaml", dump_yaml(cfg))
            if job := os.environ.get("ALFRED_JOB_ID"):  # a restart of this job continues its checkpoints
                (run_dir / JOB_MARKER).write_text(f"{job}\n")
        except OSError as err:  # a full disk: before any step, one line on every rank
            problem = f"run.dir: cannot write {run_dir / 'config.yaml'} ({err.strerror}); free space or set run.dir elsewhere"
    if problems := site.problems_everywhere(problem):
        raise ConfigError(problems[0])
    if note := schedule_lengths(cfg.optim, cfg.train.max_steps)[2]:  # once the run is sure to start
        log.warning("%s (raise train.max_steps or optim.decay_steps to warm up longer)", note)
    return run_dir


def _checkpoints_folder_problem(folder: Path) -> str | None:
    """Why run.dir's checkpoints/ cannot be made, or written in (each save writes a folder there: found
    out before the first step, not at the first save), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if folder.is_symlink():
            return f"run.dir: {folder} links to {os.readlink(folder)}, which does not exist; create it or remove the link"
        return f"run.dir: cannot create {folder} ({err.strerror}); set run.dir elsewhere"
    try:
        tempfile.TemporaryDirectory(dir=folder).cleanup()
    except OSError as err:
        return (f"run.dir: cannot write in {folder} ({err.strerror}), where checkpoints are saved; make it writable "
                "or set run.dir elsewhere")
    return None


def _say_config_changes(path: Path, cfg: Config) -> None:
    """Warn about the keys an earlier run in this run.dir set otherwise (its config.yaml is replaced):
    a resume with another template, seed or data went unnoticed."""
    import yaml

    def flat(tree, prefix=""):
        items = tree.items() if isinstance(tree, dict) else ()
        return {k: v for key, value in items for k, v in
                (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) else [(f"{prefix}{key}", value)])}

    try:
        before = flat(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text
        return
    now = flat(yaml.safe_load(dump_yaml(cfg)))
    changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    if changed:
        log.warning("run.dir's config.yaml (an earlier run's) differs from this run's in %d key(s): %s%s; replaced "
                    "by this run's", len(changed), ", ".join(changed[:8]), ", ..." if len(changed) > 8 else "")


def tokenizer_path(cfg: Config) -> str:
    return str(Path(cfg.model.tokenizer).resolve()) if cfg.model.tokenizer else str(TINY_TOKENIZER)


def tokenizer_digest(path: str | Path) -> str:
    """sha256 of the tokenizer file `load_tokenizer(path)` reads (a directory's tokenizer.model, else
    its tokenizer.json): recorded in checkpoints so PPO can refuse a different tokenizer."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else path / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    shape = resolve_shape(cfg.model, tokenizer.vocab_size)
    if cfg.lora.rank:
        lora.check_shape(lora.AdapterSpec.from_config(cfg.lora), shape)
    return shape


# ---------------------------------------------------------------------------------------------
# Every rank's own checks, refused everywhere.

def on_every_rank(runtime: ParallelRuntime, check):
    """`check()` (each rank reads its own files), refused on every rank if it is refused on any.

    Node-local run directories differ by node: a checkpoint refused on one node only (after a shrink
    the survivors are renumbered) left the other ranks to die in the next collective with a gloo
    traceback, and the one line unprinted where the refusing rank was not rank 0 (only rank 0 prints
    config errors). Each rank raises its own error, or the first other rank's as a ConfigError."""
    try:
        result, problem = check(), None
    except AlfredError as err:
        result, problem = None, err
    if dist.is_initialized() and dist.get_world_size() > 1:
        said = [None] * dist.get_world_size()
        dist.all_gather_object(said, None if problem is None else str(problem))
        problem = problem or next((ConfigError(f"rank {r}: {p}") for r, p in enumerate(said) if p), None)
    if problem is not None:
        raise problem
    return result


def build_trainable(cfg: Config, runtime: ParallelRuntime, shape: ModelShape, backend, *, kind: str,
                    total_steps: int, lr: float | None = None, schedule_per_step: bool = True):
    """A seeded model (`kind` "lm" or "scalar") wrapped in megatron DDP, with its own optimizer and
    LR schedule over `total_steps` units (peak `lr`, default optim.lr): optimizer steps, or with
    schedule_per_step=False units the caller counts (PPO iterations, `Trainable.advance_schedule`).
    With lora.rank > 0 the model gets adapters and only they (and a scalar head) train; its base is
    the seeded init until `load_lora_base` loads a checkpoint into it."""
    from alfred_train.training import Trainable, build_optimizer, build_scheduler, wrap_ddp

    model = make_model(cfg, runtime, shape, kind=kind, backend=backend, seed=cfg.train.seed)
    if cfg.lora.rank:
        lora.attach(model, lora.AdapterSpec.from_config(cfg.lora), kind=kind)
        lora.init_adapters(model, cfg.train.seed)
        for c in model:
            unwrap(c).lora_base = lora_checkpoint.BaseRef(seed=cfg.train.seed)
    chunks = wrap_ddp(model, zero=cfg.parallel.zero)
    optimizer = build_optimizer(chunks, cfg.optim, lr=lr, bf16=use_bf16(cfg, runtime), zero=cfg.parallel.zero)
    return Trainable(chunks, optimizer, build_scheduler(optimizer, cfg.optim, total_steps, lr=lr), runtime,
                     schedule_per_step=schedule_per_step)


def load_full(chunks, path, model: str, name: str, skip: tuple[str, ...] = ()) -> None:
    """Checkpoint `path`'s model `model` as whole weights into the chunks of model `name`: a LoRA
    checkpoint (adapters over a base, or both from `convert hf-to-mcore --adapter`) loads merged,
    W + scale * B A, as README says; its plain load used to drop the adapters (or fail on them)."""
    lora_checkpoint.load_base(chunks, lora_checkpoint.base_ref(path, model, skip), name)


def load_lora_base(trainable, name: str, ref: "lora_checkpoint.BaseRef") -> None:
    """Load an adapted trainable's frozen base weights (fresh start and resume alike: a LoRA
    checkpoint holds the adapters only)."""
    lora_checkpoint.load_base(trainable.chunks, ref, name)
    trainable.optimizer.reload_model_params()  # bf16: refresh the fp32 main copies


def _saved(trainables: dict) -> dict:
    """name -> (chunks as checkpointed, optimizer): adapted models keep their trainable part only."""
    return {name: (lora_checkpoint.checkpoint_chunks(t.chunks), t.optimizer) for name, t in trainables.items()}


def save(cfg: Config, runtime: ParallelRuntime, step: int, trainables: dict, shape: ModelShape, stage: str,
         **state) -> None:
    """Checkpoint the named trainables (weights, optimizers, `<name>_scheduler`, `<name>_steps`) with
    the stage's own `state`, the model shape and the tokenizer (enough to rebuild from it alone)."""
    for name, t in trainables.items():
        state[f"{name}_scheduler"], state[f"{name}_steps"] = t.scheduler.state_dict(), t.steps
    state.update(stage=stage, model=dataclasses.asdict(shape), precision="bf16" if use_bf16(cfg, runtime) else "fp32",
                 tokenizer=tokenizer_path(cfg),
                 tokenizer_sha256=tokenizer_digest(tokenizer_path(cfg)), template=cfg.data.template,
                 **lora_checkpoint.checkpoint_state(trainables))
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
    saved = checkpoint.read_meta(path).get("state") or {}
    lora_checkpoint.check_resume(saved, trainables, path)
    inits.check_resumed(cfg, saved.get("stage", ""), saved)
    meta = checkpoint.load_models(path, _saved(trainables), strict_layout=layout(cfg))
    state = meta["state"]
    changed = {}
    for name, t in trainables.items():
        changed[name] = ", ".join(restore_scheduler(t.scheduler, state[f"{name}_scheduler"]))
        t.steps = state[f"{name}_steps"]
    changed = {name: change for name, change in changed.items() if change}
    if changed and runtime.is_main:  # one line, each model's changes named when there are two (PPO)
        said = "; ".join(f"{name}: {c}" for name, c in changed.items()) if len(trainables) > 1 else changed.popitem()[1]
        log.warning("resume: the learning-rate schedule follows this config, not the checkpoint's (%s)", said)
    moved = checkpoint.layout_note(meta["layout"], layout(cfg))
    if moved is None:
        checkpoint.load_rng(path, runtime.rank)
    elif runtime.is_main:  # rank r's saved RNG states were another role's; data order and sampling are
        # keyed by (seed, step, sample), so only a layer's dropout (e.g. lora.dropout) draws differently
        log.warning("resumed at another layout (%s): weights and optimizer states resharded, RNG states from "
                    "train.seed", moved)
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


def load_records(cfg: Config, synthetic_records, parse, kind):
    """(train, valid) records of `kind` ("sft" | "preference"): data.train / data.valid (files or
    mixtures in any data.format, see data/mixture.py) or the synthetic task; without data.valid a
    seeded `data.valid_fraction` of the training records is held out."""
    d = cfg.data
    if not d.synthetic:
        return mixture.load_train_valid(d, kind, cfg.train.seed)
    records = [parse(r, f"synthetic:{i}") for i, r in enumerate(synthetic_records(d.synthetic_size, cfg.train.seed))]
    if d.valid:
        return records, mixture.load(d.valid, kind, d, cfg.train.seed, "data.valid")
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
    write_text(path, f"checkpoint {checkpoint.iter_name(step)} saved at step {step}\n")




def say_done(what: str, run_dir: Path, names: list[str]) -> None:
    """The closing line: `what` and those of `names` (files; folders end in /) the run directory holds
    (logging.tensorboard / logging.plots off, checkpoint.save_final off: not named)."""
    held = ", ".join(n for n in names if (run_dir / n.rstrip("/")).exists())
    print(f"{what}; run directory: {run_dir}" + (f" ({held})" if held else ""), flush=True)


class TooManyBadSteps(AlfredError):
    exit_code = 1


class BadSteps:
    """Steps (PPO: iterations) in a row whose update was skipped for a non-finite loss or gradient:
    each one is said on the console, and `train.max_bad_steps` of them stop the run (the weights are
    the last good step's: a skipped update changes nothing)."""

    def __init__(self, cfg: Config, runtime: ParallelRuntime, unit: str, hint: str, count: int = 0):
        self.limit, self.unit, self.hint, self.count = cfg.train.max_bad_steps, unit, hint, count
        self.is_main = runtime.is_main

    def after(self, step: int, skipped: int) -> None:
        self.count = self.count + 1 if skipped else 0
        if self.count >= self.limit:
            raise TooManyBadSteps(f"{self.count} {self.unit}s in a row had a non-finite loss or gradient "
                                  f"(train.max_bad_steps={self.limit}); {self.hint}")
        if skipped and self.is_main:
            log.warning("%s %d: update skipped (non-finite loss or gradient), %d in a row of train.max_bad_steps=%d",
                        self.unit, step, self.count, self.limit)


class Preemption:
    """SIGUSR1 / SIGTERM ask the run to checkpoint at the next step boundary and exit with code 3.

    The handlers are installed when the worker starts (`listen`, from cli), not when the step loop
    begins: a signal during the minutes of start-up (data, model build, resume, the first
    evaluation) used to kill the job with no checkpoint and no requeue record. `requested()` is
    collective (a MAX all-reduce), so every rank stops at the same step.
    """

    def __init__(self):
        self.listen()

    listen = staticmethod(preemption.listen)

    def requested(self, device) -> bool:
        flag = torch.tensor([1.0 if preemption.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt
