"""The phases of a training step, timed, and profiled at one step (`logging.profile_step`).

    phases = Phases(run_dir, cfg.logging.profile_step, runtime.rank, runtime.device)
    with phases("generate", step):       # step: the 1-based step being run
        ...
    phases.seconds                       # {"generate": s, ...}: each body's own time

A phase's time ends after the GPU has finished what the phase queued. At the chosen step (a PPO
iteration, an SFT/RM optimizer step) each phase also runs under `torch.profiler` (CPU ops, and CUDA
kernels on a GPU), one phase at a time so each report is that phase's own, and every rank writes
under run_dir/profile/:

    step{N}_{phase}_rank{r}.json   a Chrome trace (https://ui.perfetto.dev or chrome://tracing)
    step{N}_{phase}_rank{r}.txt    the phase's seconds and its top ops by self time (device time on
                                   a GPU, CPU time otherwise): where the phase's time goes

The reports are written after the phase's clock stops, but the profiler slows the ops it records:
the profiled step's times are its own, higher than the others'. A run resumed past the chosen
step profiles nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("alfred_train")

TOP_OPS = 25  # rows of each report's table


class Phases:
    def __init__(self, run_dir: Path, profile_step: int | None, rank: int, device: torch.device):
        self.dir, self.profile_step, self.rank = Path(run_dir) / "profile", profile_step, rank
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}

    def _clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, step: int):
        """Time the body as phase `name` of `step`; profile it when `step` is the chosen one."""
        profiled = step == self.profile_step
        profiler = contextlib.nullcontext()
        if profiled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            profiler = torch.profiler.profile(
                activities=activities + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else []))
        with profiler as prof:
            start = self._clock()
            yield
            self.seconds[name] = self._clock() - start
        if profiled:
            self._report(prof, name, step)

    def _report(self, prof, name: str, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"step{step}_{name}_rank{self.rank}"
        prof.export_chrome_trace(str(stem.with_suffix(".json")))
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPS)
        stem.with_suffix(".txt").write_text(f"step {step}, phase {name}, rank {self.rank}: "
                                            f"{self.seconds[name]:.3f} s under the profiler; top {TOP_OPS} ops "
                                            f"by {sort_by}\n{table}\n")
        if self.rank == 0:
            log.info("profiled step %d, phase %s: %s.json (trace), .txt (top ops)", step, name, stem)
