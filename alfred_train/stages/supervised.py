"""What SFT and RM share: one trainable model, started from its init or resumed, and the step loop.

`start` does everything before the first step, in the order that keeps a refused run from writing
anything: the checkpoints the run loads are checked on every rank, the inits pinned and recorded
(`stages.inits`), run.dir prepared, the model built, then LoRA's frozen base loaded, the run resumed
or its init loaded. `train` is the loop: one optimizer step per global batch, its metrics row,
held-out evaluation every train.eval_interval steps and at the last (in the step's row), checkpoints and preemption
(`common.checkpoint_or_stop`), the final plot. A stage supplies only what differs: its data, its
forward step, its metrics and its evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from alfred_train import checkpoint
from alfred_train.config import Config
from alfred_train.metrics import MetricsLogger, plot_metrics
from alfred_train.models.build import ModelShape, unwrap
from alfred_train.parallel.init import ParallelRuntime
from alfred_train.profiling import Phases
from alfred_train.stages import checkpoint_checks, common, inits
from alfred_train.training import Trainable


@dataclass
class Started:
    run_dir: Path
    trainable: Trainable
    step: int  # optimizer steps done (0, or the resumed checkpoint's)
    consumed: int  # training samples consumed, where the data position resumes
    bad_steps: int  # skipped (non-finite) steps in a row before `step`
    save: Callable[[int, int, int], None]  # (step, consumed samples, bad steps) -> a checkpoint of run.dir


@dataclass(frozen=True)
class Init:
    """How a stage's model starts when it does not resume: `given` says whether an init is set;
    `load` puts its full weights into the model chunks; `lora_base` is the frozen base's
    `lora_checkpoint.BaseRef` under LoRA adapters."""

    given: bool
    load: Callable[[list], None]
    lora_base: Callable[[], object]


def start(cfg: Config, runtime: ParallelRuntime, stage: str, shape: ModelShape, *, model_name: str, kind: str,
          init: Init) -> Started:
    # the init and the resumed checkpoint, before run.dir is written (refused everywhere if on any rank)
    common.on_every_rank(runtime, lambda: checkpoint_checks.check_checkpoints(cfg, stage, shape, required=True))
    started_from = inits.record(cfg, stage)  # recorded in its checkpoints: a resume keeps them
    run_dir = common.prepare_run_dir(cfg, runtime)
    backend = common.attention_backend(cfg, runtime)
    trainable = common.build_trainable(cfg, runtime, shape, backend, kind=kind, total_steps=cfg.train.max_steps)
    trainables = {model_name: trainable}

    step, consumed, bad_steps = 0, 0, 0
    if cfg.lora.rank and init.given:  # the frozen base, under the adapters
        common.load_lora_base(trainable, model_name, init.lora_base())
    resumed = common.resume(cfg, runtime, trainables)
    if resumed is not None:
        step, state = resumed
        consumed, bad_steps = state["consumed_samples"], state.get("bad_steps", 0)  # older: none saved
    elif init.given and not cfg.lora.rank:
        init.load([unwrap(c) for c in trainable.chunks])
        trainable.optimizer.reload_model_params()  # bf16 / ZeRO keep fp32 main copies of the weights: refresh them

    def save(at_step: int, consumed_samples: int, bad: int) -> None:
        common.save(cfg, runtime, at_step, trainables, shape, stage, consumed_samples=consumed_samples,
                    bad_steps=bad, inits=started_from)

    return Started(run_dir, trainable, step, consumed, bad_steps, save)


def train(cfg: Config, runtime: ParallelRuntime, started: Started, stage: str, *, batches: Iterator,
          one_step: Callable, row: Callable, evaluate: Callable[[], dict] | None, plotted: list[str]) -> int:
    """Steps until train.max_steps (or a preemption: PREEMPTED_EXIT_CODE, else 0).

    batches yields (data position, this rank's share of a global batch); one_step(share) -> a
    `training.StepResult`; row(result, seconds) -> the stage's metrics of the step; evaluate() ->
    the held-out metrics (valid_loss, ...), None without a held-out set."""
    t = cfg.train
    run_dir, step, consumed = started.run_dir, started.step, started.consumed
    metrics = MetricsLogger(run_dir, enabled=runtime.is_main, total_steps=t.max_steps, start_step=step,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress, desc=stage,
                            log_interval=t.log_interval)
    preemption = common.Preemption()
    bad_steps = common.BadSteps(cfg, runtime, f"{stage.upper()} step", "lower optim.lr or check the data",
                                started.bad_steps)
    phases = Phases(run_dir, cfg.logging.profile_step, runtime.rank, runtime.device)
    code = 0
    while step < t.max_steps:
        position, share = next(batches)
        with phases("step", step + 1):
            result = one_step(share)
        step, consumed = step + 1, position.consumed_samples
        dt = phases.seconds["step"]
        values = {**row(result, dt), "step_time": dt, "skipped": int(not result.ok)}
        due = step == t.max_steps or (t.eval_interval and step % t.eval_interval == 0)
        if evaluate is not None and due:  # in the step's own row: one row per step
            values.update(evaluate())
        metrics.log(step, values)
        bad_steps.after(step, values["skipped"])
        if common.checkpoint_or_stop(cfg, step, lambda at: started.save(at, consumed, bad_steps.count), preemption,
                                     runtime, metrics):
            code = common.PREEMPTED_EXIT_CODE
            break
    metrics.close()
    if runtime.is_main:
        if cfg.logging.plots:
            plot_metrics(run_dir, plotted)
        common.say_done(f"{stage}: {step} steps done", run_dir,
                        ["metrics.jsonl", "tb/", "metrics.png", f"checkpoints/{checkpoint.iter_name(step)}/"])
    return code
