"""Slurm backend: render an sbatch script, submit it, and follow the job with scontrol.

The rendered script starts one worker per GPU (or `launch.procs_per_node` on CPU) with `srun`;
each worker joins the job from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID plus MASTER_ADDR (first
host of the allocation) and MASTER_PORT (from the job id, so two jobs on a node do not collide).

Preemption and time limits: `#SBATCH --signal=B:USR1@<lead>` makes Slurm send USR1 to the batch
shell `signal_lead_s` before the limit. The shell's trap forwards it to srun (which passes it to
every task); the trainer finishes its step, saves a checkpoint and exits with code 3
(CHECKPOINT_EXIT_CODE). The requeue decision does not read exit codes: once the preemption checkpoint
is complete on every rank, the trainer's rank 0 writes the *requeue record* (`$ALFRED_REQUEUE_RECORD`,
<job dir>/requeue-record: "checkpoint iter_0000012 saved at step 12"); after a USR1 the shell requeues
when it exists, whichever task ended first and however srun reported it. After a TERM it does not:
`scancel` (`jobs cancel`) must end the job, and a preemption or `scontrol requeue` is requeued by Slurm. The requeued job (same script,
`--requeue`, log opened in append mode) resumes from `checkpoints/latest` on its own.

Multi-node: `srun --nodes N --ntasks-per-node P` starts P workers on every node; Slurm numbers them
SLURM_PROCID 0..N*P-1 node by node, and MASTER_ADDR is the allocation's first host, where rank 0 runs.
With `launch.slurm.container_image` srun runs them in a pyxis/enroot container
(`--container-image`, `--container-workdir`, `--container-mounts`).
A TERM from Slurm (scancel, preemption, external requeue) reaches the tasks directly; the trap only
keeps the shell alive until they have saved (within the cluster's KillWait).

Credentials: sbatch is run with the AWS credential variables removed from its environment, so they
are neither copied into the job's environment nor into slurmctld's saved job state.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from alfred_train.errors import AlfredError, ConfigError
from alfred_train.launch.config import LaunchConfig

CHECKPOINT_EXIT_CODE = 3  # the trainer's "saved a checkpoint after a signal, not finished" code
REQUEUE_RECORD_ENV = "ALFRED_REQUEUE_RECORD"  # file the trainer writes after a preemption checkpoint
REQUEUE_RECORD = "requeue-record"  # in the job folder
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED"}
)  # fmt: skip
CREDENTIAL_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


class SlurmError(AlfredError):
    """A Slurm command failed (sbatch, scontrol, scancel)."""


_BODY = """\
set -uo pipefail
cd {workdir}
{setup}{exports}
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT={master_port}
# The trainer writes this record once its preemption checkpoint is complete on every rank.
export {record_env}={record}
rm -f "${record_env}"
echo "alfred: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}" \
  "nodes $SLURM_JOB_NODELIST master $MASTER_ADDR:$MASTER_PORT"

# USR1 (--signal=B:USR1): ask every worker to checkpoint and exit {ckpt_code}; this shell requeues.
# TERM (scancel, a preemption, an operator's requeue) already reached the workers from Slurm: only keep
# this shell alive while they save; Slurm itself requeues the job or leaves it cancelled.
usr1=0 term=0
on_usr1() {{ usr1=1; echo "alfred: USR1, forwarding to the workers"; kill -USR1 "$srun_pid" 2>/dev/null; }}
trap on_usr1 USR1
trap 'term=1; echo "alfred: TERM, waiting for the workers to save"' TERM

# {workers} workers: {nodes} node(s) x {per_node} tasks, one per GPU (SLURM_PROCID = global rank).
srun --nodes={nodes} --ntasks-per-node={per_node} --kill-on-bad-exit=1 {container}{command} &
srun_pid=$!
while true; do  # `wait` returns early when a trapped signal arrives: wait until srun has ended
  wait "$srun_pid"
  status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
echo "alfred: workers exited with $status"
{requeue}exit "$status"
"""

# The decision reads the record, not srun's exit code: with several tasks srun reports whichever
# ended worst (task 0 exits {ckpt_code}, srun then kills task 1 -> 143), so a code is a race. Only
# our own USR1 requeues: after a TERM (a cancel, or Slurm's own preemption requeue) it would
# bring a cancelled job back, or requeue one Slurm already requeued.
_REQUEUE = """\
if [ -s "${record_env}" ]; then
  echo "alfred: $(cat "${record_env}")"
  rm -f "${record_env}"
  if [ "$usr1" = 1 ] && [ "$term" = 0 ]; then
    echo "alfred: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "alfred: not requeueing: the stop came from Slurm (it requeues a preempted job itself; a cancelled one stays cancelled)"
fi
"""


def container_options(s, workdir: Path) -> list[str]:
    """pyxis/enroot options of `srun` ([] without launch.slurm.container_image)."""
    if not s.container_image:
        return []
    options = [f"--container-image={s.container_image}", f"--container-workdir={workdir}"]
    if s.container_mounts:
        options.append(f"--container-mounts={','.join(s.container_mounts)}")
    return options


def render_sbatch(
    launch: LaunchConfig,
    *,
    command: list[str],
    job_dir: Path,
    workdir: Path,
    source: str = "",
) -> str:
    """The sbatch script running `command` on every task. Paths are made absolute."""
    s = launch.slurm
    log_dir = Path(s.log_dir or job_dir).resolve()
    options = [
        f"--job-name={launch.name}",
        f"--nodes={launch.nodes}",
        f"--ntasks-per-node={launch.workers_per_node}",
        *([f"--gpus-per-node={launch.gpus_per_node}"] if launch.gpus_per_node else []),
        *([f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []),
        f"--time={s.time}",
        *([f"--partition={s.partition}"] if s.partition else []),
        *([f"--account={s.account}"] if s.account else []),
        f"--output={log_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--signal=B:USR1@{s.signal_lead_s}",
        "--requeue" if s.requeue else "--no-requeue",
        *s.extra_sbatch,
    ]
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(s.env.items()))
    port = str(s.master_port) if s.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    body = _BODY.format(
        workdir=shlex.quote(str(workdir.resolve())),
        setup=f"{s.setup.rstrip()}\n" if s.setup.strip() else "",
        exports=exports,
        master_port=port,
        record_env=REQUEUE_RECORD_ENV,
        record=shlex.quote(str(Path(job_dir).resolve() / REQUEUE_RECORD)),
        ckpt_code=CHECKPOINT_EXIT_CODE,
        nodes=launch.nodes,
        per_node=launch.workers_per_node,
        workers=launch.nodes * launch.workers_per_node,
        container="".join(f"{shlex.quote(o)} " for o in container_options(s, workdir.resolve())),
        command=shlex.join(command),
        requeue=_REQUEUE.format(record_env=REQUEUE_RECORD_ENV) if s.requeue else "",
    )
    header = "".join(f"#SBATCH {opt}\n" for opt in options)
    note = f"# Rendered by `alfred-train launch`{f' from {source}' if source else ''}.\n"
    return f"#!/bin/bash\n{header}{note}{body}"


def _env_without_credentials() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.upper() not in CREDENTIAL_ENV}


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=_env_without_credentials(), timeout=60
        )
    except FileNotFoundError as err:
        raise SlurmError(f"{argv[0]} not found: run this on a Slurm login node") from err
    if done.returncode != 0:  # one line: Slurm's tools may say it over several (retries, hints)
        said = [line.strip() for line in (done.stderr.strip() or done.stdout).splitlines() if line.strip()]
        raise SlurmError(f"{shlex.join(argv)} failed (exit {done.returncode}): {' | '.join(dict.fromkeys(said))}")
    return done.stdout


# what sbatch says of a field of launch.slurm it refuses (Slurm's words, lower case)
_REFUSED = {"invalid partition": "launch.slurm.partition", "invalid account": "launch.slurm.account",
            "invalid qos": "launch.slurm.extra_sbatch"}


def submit(script_path: Path) -> str:
    """sbatch the script; returns the job id. A partition or account sbatch refuses is a config
    error naming the key (exit 2)."""
    try:
        return _run(["sbatch", "--parsable", str(script_path)]).strip().split(";")[0]
    except SlurmError as err:
        key = next((k for words, k in _REFUSED.items() if words in str(err).lower()), None)
        if key is None:
            raise
        raise ConfigError(f"{key}: {err}; `sinfo -s` and `sacctmgr show assoc user=$USER` list what you may use") from None


@dataclass(frozen=True)
class SlurmJob:
    """What `scontrol show job` says about one job."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ...
    exit_code: int  # the batch script's exit code (ExitCode=<code>:<signal>)
    restarts: int  # how many times the job was requeued
    log_path: str  # StdOut

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


def parse_show_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` one-line output -> {key: value}."""
    fields = {}
    for token in shlex.split(text.strip()):
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def status(job_id: str) -> SlurmJob:
    """State of a job Slurm still remembers (finished jobs are kept for MinJobAge, 300 s)."""
    fields = parse_show_job(_run(["scontrol", "show", "job", "-o", job_id]))
    return SlurmJob(
        job_id=fields.get("JobId", job_id),
        state=fields.get("JobState", "UNKNOWN"),
        exit_code=int(fields.get("ExitCode", "0:0").split(":")[0]),
        restarts=int(fields.get("Restarts", "0")),
        log_path=fields.get("StdOut", ""),
    )


def wait(job_id: str, timeout_s: float = 24 * 3600, poll_s: float = 1.0) -> SlurmJob:
    """Poll until the job has finished (a requeued job is not finished); returns its last status.

    A finished state must be seen on two polls in a row: while `scontrol requeue` is being
    processed a job can briefly show its first run's end before going back to PENDING.
    """
    deadline = time.monotonic() + timeout_s
    seen_finished = False
    while True:
        job = status(job_id)
        if job.finished and seen_finished:
            return job
        seen_finished = job.finished
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still {job.state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def cancel(job_id: str) -> None:
    _run(["scancel", job_id])


def log_text(job_id: str, tail_lines: int = 0) -> str:
    """The job's log (StdOut), all of it or its last `tail_lines` lines."""
    path = Path(status(job_id).log_path)
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    return "".join(lines[-tail_lines:] if tail_lines else lines)
