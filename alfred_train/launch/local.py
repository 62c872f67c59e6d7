"""Local backend: torchrun on this machine, in the foreground (one node only)."""

from __future__ import annotations

import subprocess
import sys

from alfred_train.errors import ConfigError
from alfred_train.launch.config import LaunchConfig


def validate_local(launch: LaunchConfig) -> None:
    if launch.nodes != 1:
        raise ConfigError(f"launch.nodes: {launch.nodes}, but --backend local runs on this machine only (1)")


def torchrun_command(launch: LaunchConfig, config_path: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node P -m alfred_train <stage> <config>`."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(launch.workers_per_node),
        "-m", "alfred_train", launch.stage, config_path,
    ]  # fmt: skip


def run(command: list[str]) -> int:
    """Run in the foreground; returns the exit code (3 = checkpoint saved after a signal)."""
    return subprocess.run(command).returncode
