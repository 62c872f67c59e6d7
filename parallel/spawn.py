"""Start `world_size` local worker processes running the same command (torchrun's job, made small).

Used when `alfred-train STAGE CONFIG` asks for more than one process and no launcher started us.
Each worker gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; if one fails the
others are stopped, and the first non-zero exit code is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def spawn_local(argv: list[str], world_size: int, script: str | None = None) -> int:
    """`python -m alfred_train ARGV` in `world_size` processes (`script`: `python SCRIPT ARGV`)."""
    from alfred_train.parallel.init import _free_port

    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        command = [script] if script else ["-m", "alfred_train"]
        procs.append(subprocess.Popen([sys.executable, *command, *argv], env=env))

    def forward(signum, _frame):  # preemption signals go to every worker
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = 0
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    for q in procs:  # one worker died: the collective would hang, stop the rest
                        q.terminate()
            time.sleep(0.05)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
