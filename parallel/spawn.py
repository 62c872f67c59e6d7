"""Start `world_size` local worker processes running the same command (torchrun's job, made small).

Used when `alfred-train STAGE CONFIG` asks for more than one process and no launcher started us.
Each worker gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; if one fails the
others are stopped, a line names it (a signal, or an exit code other than a config error's 2 and a
preemption's 3), and its exit code is returned (128 + N for signal N, as a shell reports it). A
worker gets SIGTERM when the launcher dies (Linux, `follow_launcher`): it checkpoints at its next
step and exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

QUIET_CODES = (2, 3)  # a config error (rank 0 printed it) and a preemption (every rank saved and says so)
LAUNCHER_PID = "ALFRED_LAUNCHER_PID"  # set for the workers spawn_local starts
STOP_GRACE_S = 30.0  # after one worker failed: the others' TERM, then KILL


def follow_launcher() -> None:
    """In a worker of spawn_local (after the preemption handlers are in place): SIGTERM when the
    launcher dies (prctl PR_SET_PDEATHSIG, Linux), so the worker checkpoints at its next step and
    exits, instead of training on, unwatched, beside the next run of the same directory."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _describe(rank: int, rc: int) -> str:
    if rc < 0:
        return f"alfred-train: worker rank {rank} was killed by {signal.Signals(-rc).name}; the other workers were stopped"
    return f"alfred-train: worker rank {rank} exited with code {rc}; the other workers were stopped"


def spawn_local(argv: list[str], world_size: int, script: str | None = None) -> int:
    """`python -m alfred_train ARGV` in `world_size` processes (`script`: `python SCRIPT ARGV`)."""
    from alfred_train.parallel.init import _free_port

    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads), **{LAUNCHER_PID: str(os.getpid())})
        command = [script] if script else ["-m", "alfred_train"]
        procs.append(subprocess.Popen([sys.executable, *command, *argv], env=env))

    def forward(signum, _frame):  # preemption signals go to every worker
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code, ranks, stopping = 0, {p: r for r, p in enumerate(procs)}, None
        while procs:
            ended = [(p, p.poll()) for p in procs if p.poll() is not None]
            for p, _ in ended:
                procs.remove(p)
            failed = sorted(((ranks[p], rc) for p, rc in ended if rc != 0), key=lambda f: f[1] >= 0)  # signals first
            if failed and code == 0:
                rank, rc = failed[0]  # the first to fail; the others often die of its broken collective
                code = _exit_code(rc)
                if rc not in QUIET_CODES:
                    print(_describe(rank, rc), file=sys.stderr, flush=True)
                for q in procs:  # one worker died: the collective would hang, stop the rest
                    q.terminate()
                stopping = time.monotonic()
            if stopping is not None and time.monotonic() - stopping > STOP_GRACE_S:
                for q in procs:  # a worker that took TERM as a preemption (save at the next step) while it
                    q.kill()  # waits for the dead one: no save can complete without it
                stopping = None
            time.sleep(0.05)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
