"""What a user watches: metrics.jsonl, TensorBoard events, a progress bar with ETA, and plots.

Only the main rank (global rank 0) writes; on other ranks `MetricsLogger` does nothing. A run that
resumes at step s logs each step once: rows after s in metrics.jsonl / samples.jsonl (written by the
attempt that was lost) are dropped, and TensorBoard purges its events after s (`purge_step`).
metrics.jsonl is strict JSON: a NaN or infinite value is written as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from alfred_train.atomic import replacing, write_text


STEP_LOGS = ("metrics.jsonl", "samples.jsonl")  # JSONL logs with a "step" per row


def drop_rows_after(path: Path, step: int) -> int:
    """Keep the rows of `path` logged up to `step` (the checkpoint a run resumes from; 0: a fresh
    start keeps none), and no torn last line; rewritten atomically. Returns the rows dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill, or bytes that are not UTF-8 (a damaged disk block)
            dropped += 1
            continue
        if step and isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line.decode())
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, desc: str = "train", log_interval: int = 10):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None  # a tracking.WandbRun when logging.wandb is set
        self._bar = None
        self._lines = None  # (t0, first step, total, interval): plain progress lines when stderr is no TTY
        self._desc = desc
        if not enabled:
            return
        for name in STEP_LOGS:  # a resumed run logs each step once: drop what the lost attempt wrote
            drop_rows_after(self.run_dir / name, start_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the events at steps >= purge_step written before this restart
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else 0)
        from alfred_train import tracking

        self._wandb = tracking.start(self.run_dir)  # logging.wandb in run_dir/config.yaml, else None
        if progress and not _terminal_columns():  # log files (Slurm, CI), a terminal of no width: a line every log_interval steps
            self._lines = (time.time(), start_step, total_steps, max(1, log_interval))
        elif progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                             dynamic_ncols=True, file=sys.stderr, disable=None)
            self._logs_above_bar = logging_redirect_tqdm([logging.getLogger()])  # not glued onto the bar's line
            self._logs_above_bar.__enter__()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
        self._jsonl.write(json.dumps({k: _json_number(v) for k, v in record.items()}, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(step, record)
        shown = {k: f"{v:.4g}" for k, v in record.items()
                 if k in ("loss", "lr", "score", "kl", "accuracy", "tokens_per_s") and isinstance(v, float)}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)  # this step's numbers, drawn by the advance
            self._bar.update(max(0, step - self._bar.n))  # one advance per step, however many rows it logs
        elif self._lines is not None and shown:
            t0, first, total, every = self._lines
            done = step - first
            if done > 0 and (step % every == 0 or step == total):
                eta = (time.time() - t0) / done * (total - step)
                fields = " ".join(f"{k}={v}" for k, v in shown.items())
                print(f"{self._desc} {step}/{total} {fields} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.refresh()  # the last step's numbers stay on the closed bar
            self._bar.close()
            self._logs_above_bar.__exit__(None, None, None)
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _json_number(v):
    """NaN and infinities are not JSON (strict readers refused the whole file): null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _terminal_columns() -> int:
    """stderr's width, 0 when it is no terminal or one that reports no size (a bar would draw nothing)."""
    if not sys.stderr.isatty():
        return 0
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 0


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: str | Path, keys: list, out_name: str = "metrics.png") -> Path | None:
    """One small panel per metric against step; a tuple of keys shares one panel (a line each, with a
    legend). Metrics never logged are left out. Returns the PNG path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(run_dir)

    def points(key):
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]

    # {key: its points} per panel, for the keys that were logged
    panels = [{k: pts for k in (g if isinstance(g, tuple) else (g,)) if (pts := points(k))} for g in keys]
    panels = [p for p in panels if p]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for key, pts in panel.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=key)
        ax.set_title(" / ".join(panel))
        if len(panel) > 1:
            ax.legend(fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / out_name
    try:
        with replacing(out, binary=True) as f:  # a crash mid-write keeps the previous plot whole
            fig.savefig(f, dpi=90, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
