"""Where this rank's checkpoint files go: one shared run directory, or one per node.

Shared layout (`checkpoint.node_local: false`, the default): every rank sees the same `run.dir`
(one machine, a shared FSx/Lustre/NFS mount). Global rank 0 prepares, renames and prunes.

Node-local layout (`checkpoint.node_local: true`): `run.dir` is a different directory on every node
(SageMaker's `/opt/ml/checkpoints` on a multi-instance job, node-local NVMe). Every node's local
rank 0 prepares and renames its own copy of each checkpoint; each copy holds the files that node's
ranks wrote plus the one manifest listing every node's files, so the copies add up to the whole
checkpoint where they meet (S3). A node is found as the ranks that share `rank - local_rank`
(torchrun and srun number a node's ranks contiguously). Example, 2 nodes x 2 ranks:

    rank 0 (local 0) node 0 owner    rank 2 (local 0) node 1 owner
    rank 1 (local 1) node 0          rank 3 (local 1) node 1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from alfred_train.errors import ConfigError


@dataclass(frozen=True)
class Site:
    node: int  # this rank's node index (0 in the shared layout)
    nodes: int  # number of directories the checkpoint is spread over
    owner: bool  # this rank prepares, renames and prunes its directory
    node_local: bool

    @classmethod
    def detect(cls, rank: int, node_local: bool) -> "Site":
        """Collective when `node_local` (an all_gather of each rank's node key)."""
        if not node_local:
            return cls(node=0, nodes=1, owner=rank == 0, node_local=False)
        from alfred_train.parallel.init import detect_launch_env

        local_rank = detect_launch_env().local_rank
        keys = [None] * dist.get_world_size()
        dist.all_gather_object(keys, rank - local_rank)
        order = sorted(set(keys))
        return cls(node=order.index(rank - local_rank), nodes=len(order), owner=local_rank == 0, node_local=True)

    def problems_everywhere(self, problem: str | None) -> list[str]:
        """Collective: every rank's problem with the same candidate (None: fine on that rank),
        each named by its node in the node-local layout."""
        if problem and self.node_local:
            problem = f"node {self.node}: {problem}"
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        return [p for p in found if p]


def check_run_dir(run_dir: Path, site: Site) -> None:
    """Collective: refuse (ConfigError, before any step) a run.dir that is not laid out as
    `checkpoint.node_local` says. Each directory owner drops a marker named by a token of this
    run; in the shared layout every rank must see rank 0's, node-local each node only its own."""
    import uuid

    from alfred_train.errors import ConfigError

    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    marker = run_dir / f".probe-{box[0]}-node{site.node}"
    if site.owner:
        marker.touch()
    dist.barrier()
    seen = list(run_dir.glob(f".probe-{box[0]}-node*"))
    problem = None
    if not site.node_local and not seen:
        problem = (f"checkpoint.node_local: rank {dist.get_rank()} does not see rank 0's {run_dir}: run.dir is "
                   "local to each node; set checkpoint.node_local=true (or use a shared file system)")
    elif site.node_local and len(seen) > 1:
        problem = (f"checkpoint.node_local: {run_dir} is shared by {len(seen)} nodes; set "
                   "checkpoint.node_local=false for a shared file system")
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)  # (not problems_everywhere: the message names no node)
    if site.owner:
        marker.unlink(missing_ok=True)
    if found := next((p for p in problems if p), None):
        raise ConfigError(found)


_held: dict[Path, int] = {}  # run.dir -> the descriptor holding its lock, for the life of the run


def lock_run_dir(run_dir: Path) -> str | None:
    """Take run.dir's lock (flock on run_dir/.lock; the kernel drops it when the process ends, crash
    included): a second run into the same directory would resume from this one's checkpoints and
    overwrite them, metrics.jsonl and the config under it. Returns the problem (that run's pid and
    host; an unwritable run.dir), None once held or where the file system has no locks."""
    import fcntl
    import socket

    try:
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        return f"run.dir: cannot write in {run_dir} ({err.strerror}); set run.dir elsewhere"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return (f"run.dir: {run_dir} is in use by another run ({holder}); wait for it to end or stop it, "
                "or set another run.dir")
    except OSError:  # a mount without locks (some NFS): no guard rather than no run
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[run_dir] = fd
    return None


def release_run_dirs() -> None:
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def file_in_the_way(path: Path) -> Path | None:
    """`path`, or its nearest existing ancestor, when that is not a directory: where
    `path.mkdir(parents=True)` would fail. None when the directory exists or can be made. A path
    the OS cannot look up (a name too long, a loop of links) is a ConfigError naming it."""
    try:
        for candidate in (path, *path.parents):
            if candidate.exists():
                return None if candidate.is_dir() else candidate
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}; name another path") from None
    return None


def run_dir_problem(run_dir: Path, profile: bool) -> str | None:
    """What stops a run from laying out run.dir (checkpoints/, config.yaml, and profile/ when
    `logging.profile_step` is set), as a one-line message naming the key to change; None if nothing.
    Checked by the CLI before a dry run or any worker starts, and by `prepare_run_dir` on every rank."""
    blocked = file_in_the_way(run_dir)
    if blocked is not None:
        return f"run.dir: {blocked} is a file, not a directory; set run.dir to a directory path"
    if (run_dir / "config.yaml").is_dir():
        return f"run.dir: {run_dir / 'config.yaml'} is a directory; move it away or set run.dir elsewhere"
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():
        return f"run.dir: {run_dir / 'checkpoints'} is a file; move it away or set run.dir elsewhere"
    if profile and (run_dir / "profile").exists() and not (run_dir / "profile").is_dir():
        return (f"logging.profile_step: {run_dir / 'profile'} is a file, so the profiler has nowhere to write; "
                "move it away, set run.dir elsewhere or logging.profile_step=null")
    return None
