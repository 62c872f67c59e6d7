"""Distributed start-up: find out how this process was launched, join the job, build the groups.

Launchers understood (first match wins):
- torchrun / SageMaker's entry script (which runs torchrun): RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (inside a job step, SLURM_STEP_ID set);
  MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST, MASTER_PORT to 20000 + job id % 10000.
- nothing: a single process; `alfred_train.parallel.spawn` starts local workers when the config
  asks for more than one.

Process groups are megatron-core's `parallel_state` groups, created once here and handed down in
a `ParallelRuntime`; nothing else in alfred-train creates groups.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError
from alfred_train.parallel import cpu
from alfred_train.parallel.dims import ParallelDims


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out[0] if out else "localhost"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def detect_launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        job = int(env.get("SLURM_JOB_ID", 0))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or _first_slurm_host(),
                         int(env.get("MASTER_PORT", 20000 + job % 10000)), "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


@dataclass(frozen=True)
class ParallelRuntime:
    """Where this process sits in the 3D layout, and the groups it talks over."""

    dims: ParallelDims
    rank: int
    device: torch.device
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    cpu: bool  # the CPU adapter is active (gloo, fp32)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(dims: ParallelDims, backend: str = "auto", timeout_minutes: int = 30) -> ParallelRuntime:
    """Join the job described by the environment (or start a 1-process group) and build the groups."""
    from megatron.core import parallel_state, tensor_parallel

    launch = detect_launch_env()
    dims.check(launch.world_size)
    use_cpu = cpu.install()
    if backend == "auto":
        backend = "gloo" if use_cpu else "nccl"
    if backend == "nccl" and (use_cpu or not dist.is_nccl_available()):
        raise ConfigError("parallel.backend: nccl needs CUDA GPUs, and none is visible here; use gloo or auto"
                          if use_cpu else "parallel.backend: this torch is built without NCCL; use gloo or auto")
    if use_cpu:
        device = torch.device("cpu")
        threads = int(os.environ.get("ALFRED_THREADS", 0)) or max(1, (os.cpu_count() or 1) // launch.world_size)
        torch.set_num_threads(threads)
    else:
        if launch.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {launch.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                              "visible on this node): start at most one process per GPU")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        port = launch.master_port or _free_port()
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{port}",
                                rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
            virtual_pipeline_model_parallel_size=dims.vpp,
            distributed_timeout_minutes=timeout_minutes)
    # Dropout is 0 everywhere (checked at model build), so the no-op "inference" tracker is exact
    # on CPU; on GPU megatron's CUDA tracker is seeded per TP rank in `seed_everything`.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=use_cpu, force_reset=True)
    return ParallelRuntime(
        dims=dims, rank=dist.get_rank(), device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        cpu=use_cpu)


def seed_everything(seed: int, runtime: ParallelRuntime) -> None:
    """Same seed on every rank for weights and data; megatron's TP RNG tracker on GPU."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if not runtime.cpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# how gloo and NCCL say that the process at the other end of a collective is gone
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def lost_peer(err: BaseException) -> str | None:
    """The transport's words when `err` (or what it was raised from) is a collective that failed
    because another worker stopped (killed, out of memory, its own error), else None. Its traceback
    says nothing about why: that worker's output, or the launcher's line, does."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RuntimeError):
            said = str(err)
            if reason := next((words for words in _PEER_LOST if words in said), None):
                return reason
        err = err.__cause__ or err.__context__
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
