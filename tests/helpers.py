"""Shared helpers for the tests: run the CLI as a user would, read a run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = ROOT / "configs" / "tiny-sft.yaml"


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, check: bool = True,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m alfred_train ARGS` in a fresh process (in `cwd`); raises with its output when it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not env or key not in env:
            full_env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "alfred_train", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"alfred-train {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def metrics(run_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: Path, args: list[str], world_size: int, timeout: int = 300) -> None:
    """Run `script ARGS` as `world_size` torchrun-style processes; fail with their output."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"{script.name} rank {rank} exited {p.returncode}\n{out[-6000:]}")
