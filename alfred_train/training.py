"""A trainable megatron-core model: DDP wrapper, optimizer, LR schedule, and one optimizer step.

Every stage trains through `Trainable.step(micro_batches, forward_step)`: it runs megatron-core's
pipeline schedule (1F1B with PP > 1, plain gradient accumulation otherwise), reduces gradients over
DP, clips, and steps the optimizer and the schedule.

Loss aggregation is a token mean over the *global* batch: a `forward_step` returns
`(loss_sum, num_tokens, report)` for its micro-batch, megatron-core sums gradients over
micro-batches and DP ranks and divides by the total token count (`calculate_per_token_loss`), so
splitting the same global batch over more ranks or micro-batches does not change the update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from alfred_train.parallel.init import ParallelRuntime

log = logging.getLogger("alfred_train")


@dataclass
class StepResult:
    loss: float  # token-mean loss over the global batch
    tokens: int  # tokens that carried loss, over the global batch
    grad_norm: float
    lr: float
    ok: bool  # False when the update was skipped (non-finite loss or gradients)
    reports: dict  # other per-step sums reported by the forward step, averaged per token


def lr_floor(optim_cfg, lr: float | None = None) -> float:
    """The rate a schedule of peak `lr` (default optim.lr) decays to: optim.min_lr scaled by
    lr / optim.lr (ppo.value_lr's schedule has the policy's shape)."""
    return optim_cfg.min_lr * ((lr or optim_cfg.lr) / optim_cfg.lr)


def build_optimizer(chunks, optim_cfg, *, lr: float | None = None, bf16: bool, zero: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    # megatron's scheduler takes each param group's min_lr over its own: it must be the scaled floor
    # (ppo.value_lr decayed to the unscaled optim.min_lr, and rose to it when below)
    cfg = OptimizerConfig(
        optimizer="adam", lr=lr or optim_cfg.lr, min_lr=lr_floor(optim_cfg, lr),
        weight_decay=optim_cfg.weight_decay, adam_beta1=optim_cfg.beta1, adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.eps, clip_grad=optim_cfg.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=zero)
    return get_megatron_optimizer(cfg, chunks)


def schedule_lengths(optim_cfg, max_steps: int) -> tuple[int, int, str]:
    """(warm-up, decay) lengths the schedule uses over `max_steps` units, and a note when the
    configured warm-up does not fit before the decay ends (it is cut to decay - 1: a short run of a
    recipe, `train.max_steps=4` on 10 warm-up steps, still ends its warm-up at the peak)."""
    decay = optim_cfg.decay_steps or max_steps
    warmup = min(optim_cfg.warmup_steps, max(decay - 1, 0))
    note = "" if warmup == optim_cfg.warmup_steps else (
        f"optim.warmup_steps {optim_cfg.warmup_steps} cut to {warmup}: the decay ends at step {decay}")
    return warmup, decay, note


def build_scheduler(optimizer, optim_cfg, max_steps: int, *, lr: float | None = None):
    """megatron's schedule, read so that update k (k = 1 .. max_steps) takes its rate at step k - 1, as
    megatron's and HF's trainers do: with no warm-up the first update is at the peak, and a decay as
    long as the run ends one step above the floor (Tulu's linear decay to 0 over its 300 iterations
    does not spend the 300th at rate 0). The warm-up starts at peak / (warmup + 1), not at 0, so no
    update is wasted at rate 0 either: with 10 warm-up steps, updates 1-10 ramp and the 11th is at the peak."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    peak, floor = lr or optim_cfg.lr, lr_floor(optim_cfg, lr)
    warmup, decay, _ = schedule_lengths(optim_cfg, max_steps)
    style = optim_cfg.schedule
    return OptimizerParamScheduler(
        optimizer, init_lr=peak / (warmup + 1), max_lr=peak, min_lr=floor if style != "constant" else peak,
        lr_warmup_steps=warmup, lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=style, start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant")


def schedule_line(optim_cfg, max_steps: int, unit: str, *, lr: float | None = None) -> str:
    """The rates a run's updates take, for the dry run: the first, where the peak and the floor are
    reached, the last (megatron's own schedule on a stand-in optimizer, no model needed)."""
    from types import SimpleNamespace

    scheduler = build_scheduler(SimpleNamespace(param_groups=[{}]), optim_cfg, max_steps, lr=lr)

    def rate(k: int) -> float:  # the rate of update k
        scheduler.num_steps = k - 1
        return scheduler.get_lr({})

    warmup, decay, note = schedule_lengths(optim_cfg, max_steps)
    parts = [f"{unit} 1 at {rate(1):.3g}"]
    if warmup:
        parts.append(f"peak {scheduler.max_lr:.3g} at {unit} {warmup + 1}")
    if optim_cfg.schedule != "constant" and decay + 1 <= max_steps:
        parts.append(f"floor {scheduler.min_lr:.3g} from {unit} {decay + 1}")
    parts.append(f"{unit} {max_steps} (the last) at {rate(max_steps):.3g}")
    head = (f"constant {scheduler.max_lr:.3g}" if optim_cfg.schedule == "constant" else
            f"{optim_cfg.schedule} from {scheduler.max_lr:.3g} to {scheduler.min_lr:.3g} at step {decay}")
    head += f" after {warmup} warm-up step(s)" if warmup else ""
    return f"{head}: " + ", ".join(parts) + (f"; {note}" if note else "")


SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def restore_scheduler(scheduler, state: dict) -> list[str]:
    """Resume a schedule at its saved step; the schedule itself is this run's config. A resumed run
    whose config changed it (train.max_steps with optim.decay_steps unset, optim.lr, ...) follows the
    new one from the saved step on; returns the changes ("lr_decay_steps 2 -> 4"), for the caller's
    warning: megatron's default (the checkpoint's values win, said at INFO level) kept a run extended
    from 2 to 4 iterations at its floor rate. megatron's load_state_dict *adds* the saved steps to the
    current count."""
    changed = [f"{k} {state[k]} -> {getattr(scheduler, k)}" for k in SCHEDULE_KEYS
               if k in state and state[k] != getattr(scheduler, k)]
    scheduler.num_steps = 0
    scheduler.override_opt_param_scheduler = True  # this config's values, the checkpoint's step count
    scheduler.load_state_dict(state)
    return changed


def wrap_ddp(chunks, *, zero: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=zero,
        check_for_nan_in_grad=False, bucket_size=None)
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_cfg, module=chunk,
            disable_bucketing=i > 0))
    return wrapped


@dataclass
class Trainable:
    """Model chunks (DDP-wrapped), their optimizer and LR schedule, and the step count.

    schedule_per_step: the LR schedule advances after each successful optimizer step (SFT, RM);
    False: the caller advances it (`advance_schedule`), PPO once per iteration for both models.
    """

    chunks: list
    optimizer: object
    scheduler: object
    runtime: ParallelRuntime
    steps: int = 0
    schedule_per_step: bool = True

    @property
    def config(self):
        return self.chunks[0].config

    def train(self) -> None:
        for c in self.chunks:
            c.train()

    def eval(self) -> None:
        for c in self.chunks:
            c.eval()

    def step(self, micro_batches: list, forward_step: Callable, *, seq_len: int,
             micro_batch_size: int) -> StepResult:
        """One optimizer step over `micro_batches` (this DP rank's share of the global batch)."""
        from megatron.core.distributed import finalize_model_grads

        cfg = self.config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        cfg.grad_scale_func = self.optimizer.scale_loss
        self.train()
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = run_schedule(self.chunks, micro_batches, forward_step, seq_len=seq_len,
                               micro_batch_size=micro_batch_size, forward_only=False)
        sums = reduce_reports(reports, self.runtime)
        tokens = max(sums.pop("tokens"), 1.0)
        loss = sums.pop("loss") / tokens
        ok = bool(torch.isfinite(torch.tensor(loss)))
        grad_norm = float("nan")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        if ok:
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            ok = bool(ok) and bool(torch.isfinite(torch.tensor(grad_norm)))
        if ok:
            if self.schedule_per_step:
                self.scheduler.step(increment=1)
            self.steps += 1
        return StepResult(loss=loss, tokens=int(tokens), grad_norm=grad_norm,
                          lr=lr, ok=ok,
                          reports={k: v / tokens for k, v in sums.items()})


    def advance_schedule(self) -> None:
        """One unit of the LR schedule (a PPO iteration) done: the next uses lr(unit + 1)."""
        self.scheduler.step(increment=1)


def run_schedule(chunks, micro_batches: list, forward_step: Callable, *, seq_len: int,
                 micro_batch_size: int, forward_only: bool) -> list:
    """megatron-core's schedule over `micro_batches`; returns the per-micro-batch reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    iterators = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    return fb(forward_step_func=forward_step, data_iterator=iterators,
              model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro_batches),
              seq_length=seq_len, micro_batch_size=micro_batch_size, forward_only=forward_only)


def reduce_reports(reports: Iterable[dict], runtime: ParallelRuntime) -> dict:
    """Sum the per-micro-batch reports over micro-batches and DP ranks; known on every rank.

    Each report maps a name to a scalar tensor sum; the last pipeline stage holds them, so the sums
    are all-reduced over the PP group (other stages add zeros) and then over the DP group.
    """
    reports = list(reports)
    keys = sorted(reports[0]) if reports else []
    # every rank must agree on the keys: the last stage's are broadcast implicitly by fixing them
    names = keys if runtime.is_last_stage else None
    holder = [names]
    if runtime.dims.pp > 1:
        src = dist.get_global_rank(runtime.pp_group, runtime.dims.pp - 1)
        dist.broadcast_object_list(holder, src=src, group=runtime.pp_group)
    names = holder[0] or []
    vec = torch.zeros(len(names), dtype=torch.float64, device=runtime.device)
    if runtime.is_last_stage:
        for r in reports:
            for i, k in enumerate(names):
                vec[i] += float(r[k])
    if runtime.dims.pp > 1:
        dist.all_reduce(vec, group=runtime.pp_group)
    if runtime.dims.dp > 1:
        dist.all_reduce(vec, group=runtime.dp_group)
    return {k: float(v) for k, v in zip(names, vec.tolist())}
