"""Runs several test modules start from: made once per session (each costs a minute on 2 cores),
and the moto server and Slurm cluster of tests/launch_fixtures.py (one per session: imported by each
module, as before, they started one per module)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.distributed as dist

from launch_fixtures import moto, moto_server, slurm_cluster  # noqa: F401 (fixtures, shared by the session)
from tests.helpers import ROOT


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
    """`python -m alfred_train.demo --quick` (SFT 40 steps -> RM 30 -> PPO 12, TP=2): its output
    folder (sft/, rm/, ppo/, summary.json). The LoRA PPO test starts from its SFT and RM."""
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "alfred_train.demo", "--quick", "--out", str(out),
                           "logging.tensorboard=false", "logging.plots=false"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert json.loads((out / "summary.json").read_text())
    return out


@pytest.fixture(scope="session")
def ppo_inits(tmp_path_factory):
    """tests/workers/ppo_models.py's SFT and RM checkpoints (sft/, rm/) for short PPO runs; the worker
    also checks the four models (value == RM, no shared memory, reference == policy)."""
    out = tmp_path_factory.mktemp("ppo-init")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "ppo_models.py"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "ppo models ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def megatron_world():
    """One-process megatron-core model parallel state (gloo) with the project's CPU adapter."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from alfred_train.parallel import cpu

    cpu.install()  # no-op with CUDA
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    yield parallel_state
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
