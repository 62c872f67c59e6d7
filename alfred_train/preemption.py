"""The preemption flag: SIGUSR1 / SIGTERM set it; the step loop reads it (`stages.common.Preemption`)
and checkpoints at the next step boundary, then exits with code 3.

Nothing here imports more than `signal`: a worker installs the handlers first thing (`cli.main`),
before torch, megatron, the config and the inits load, which took ~13 s on a busy 2-core machine;
a scheduler's signal in those seconds killed the worker with no checkpoint (exit 143).
"""

from __future__ import annotations

import signal

requested = False


def _on_signal(signum, frame) -> None:
    global requested
    requested = True


def listen() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)
