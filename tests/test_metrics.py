"""The run directory's plot: one panel per metric, a tuple of metrics shares a panel, absent ones left out."""

from __future__ import annotations

import json
import struct

from alfred_train.metrics import plot_metrics


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])  # IHDR width, height


def test_plot_panels_share_tuples_and_skip_metrics_never_logged(tmp_path):
    rows = [{"step": s, "score": 0.1 * s, "time_generate": 1.0, "time_score": 0.5, "time_train": 0.7 + s}
            for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    two = plot_metrics(tmp_path, ["score", ("time_generate", "time_score", "time_train"), "never_logged",
                                  ("also_never",)], "two.png")
    four = plot_metrics(tmp_path, ["score", "time_generate", "time_score", "time_train"], "four.png")
    # panels in rows of 3, 4 inches wide and 2.8 high each, at 90 dpi
    assert _png_size(two) == (2 * 4 * 90, round(2.8 * 90))
    assert _png_size(four) == (3 * 4 * 90, 2 * round(2.8 * 90))
    assert plot_metrics(tmp_path, ["never_logged"], "none.png") is None
    assert not (tmp_path / "none.png").exists()


def _strict(text: str) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A diverged step wrote NaN / Infinity, which JSON.parse, jq and pandas' strict readers refuse."""
    from alfred_train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, total_steps=2, tensorboard=False, progress=False)
    logger.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    logger.log(2, {"loss": 2.5})
    logger.close()
    rows = _strict((tmp_path / "metrics.jsonl").read_text())
    assert [(r["step"], r["loss"], r.get("grad_norm"), r.get("lr")) for r in rows] == [(1, None, None, 1e-3),
                                                                                     (2, 2.5, None, None)]


def _on_a_terminal(monkeypatch, columns: int):
    """stderr is a pseudo-terminal `columns` wide; returns a function that reads what was drawn on it."""
    import fcntl
    import os
    import pty
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    stream = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", stream)

    def drawn() -> str:
        stream.flush()
        out = b""
        os.set_blocking(master, False)
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")
    return drawn


def test_the_bar_shows_this_steps_numbers_and_logs_go_above_it(tmp_path, monkeypatch):
    """The bar showed the step before's loss (and none at the end), and a checkpoint's log line was
    glued onto the bar's line in the scrollback."""
    import logging

    from alfred_train.metrics import MetricsLogger

    drawn = _on_a_terminal(monkeypatch, 120)
    handler = logging.StreamHandler(__import__("sys").stderr)
    logging.getLogger().addHandler(handler)
    try:
        logger = MetricsLogger(tmp_path, enabled=True, total_steps=3, tensorboard=False, desc="sft")
        logger.log(1, {"loss": 1.25})
        logger.log(2, {"loss": 2.5})
        logging.getLogger("alfred_train").warning("saved iter_0000002")
        logger.log(3, {"loss": 3.75})
        logger.close()
    finally:
        logging.getLogger().removeHandler(handler)
    screen = drawn()
    frames = [f for f in screen.replace("\n", "\r").split("\r") if "sft:" in f]
    assert "2/3" in next(f for f in frames if "2/3" in f) and "loss=2.5" in next(f for f in frames if "2/3" in f), frames
    assert "loss=3.75" in frames[-1] and "3/3" in frames[-1], frames
    assert any(line.strip() == "saved iter_0000002" for line in screen.replace("\r", "\n").splitlines()), screen


def test_a_terminal_of_no_width_gets_progress_lines(tmp_path, monkeypatch):
    """A pty that reports 0 columns (some container shells): the bar drew nothing, for the whole run."""
    from alfred_train.metrics import MetricsLogger

    drawn = _on_a_terminal(monkeypatch, 0)
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=2, tensorboard=False, desc="rm", log_interval=1)
    logger.log(1, {"loss": 0.5})
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert "rm 2/2 loss=0.25 eta 0s" in drawn()


def test_one_row_per_step_when_the_last_step_evaluates_off_the_interval(tmp_path):
    """The end-of-run evaluation was a second row for the last step (13, then 13 with valid_loss)."""
    from tests.helpers import TINY_SFT, run_cli

    run = tmp_path / "sft"
    done = run_cli("sft", str(TINY_SFT), "parallel.tp=1", "train.max_steps=3", "train.eval_interval=2",
                   f"run.dir={run}", "logging.plots=false", "logging.tensorboard=false", "checkpoint.interval=0")
    # the closing line names what the run directory holds (it named tb/ with logging.tensorboard off)
    assert f"sft: 3 steps done; run directory: {run} (metrics.jsonl, checkpoints/iter_0000003/)" in done.stdout
    rows = _strict((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert ["valid_loss" in r for r in rows] == [False, True, True] and all("loss" in r for r in rows)


def test_skipped_steps_are_said_and_stop_the_run(tmp_path):
    """An SFT run whose every update went non-finite exited 0, silently (PPO alone had a limit):
    each skipped step is a console warning, train.max_bad_steps in a row stop the run (exit 1,
    one line), and the count resumes with the run."""
    from tests.helpers import TINY_SFT, run_cli

    run = tmp_path / "sft"
    args = ["sft", str(TINY_SFT), "parallel.tp=1", "train.max_steps=8", "train.eval_interval=0", f"run.dir={run}",
            "logging.plots=false", "logging.tensorboard=false", "checkpoint.interval=1", "optim.lr=1e30",
            "optim.warmup_steps=0", "train.max_bad_steps=3"]
    first = run_cli(*args, "train.max_steps=2")  # step 1 makes the weights huge: step 2 is not finite
    assert "SFT step 2: update skipped (non-finite loss or gradient), 1 in a row of train.max_bad_steps=3" \
        in first.stderr
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 SFT steps in a row had a non-finite loss or gradient (train.max_bad_steps=3)" in proc.stderr
    assert "Traceback" not in proc.stderr and "SFT step 3: update skipped" in proc.stderr
    assert [r["skipped"] for r in _strict((run / "metrics.jsonl").read_text())] == [0, 1, 1, 1]
