"""The Slurm backend on a real single-node cluster (tests/slurm_cluster.sh): sbatch, srun, requeue."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_fixtures import REPO, SECRET_MARKER, aws_env, files_containing

from alfred_train.launch import slurm
from alfred_train.launch.config import LaunchConfig

pytestmark = pytest.mark.slurm

# Joins the job the way the trainer does (SLURM_PROCID / SLURM_NTASKS + MASTER_ADDR/PORT from the
# script), all-reduces over gloo; on the first run it waits for USR1 or TERM, then behaves like the trainer
# after its preemption checkpoint: rank 0 writes the requeue record and exits 3 at once, while
# rank 1 is still busy; srun then kills rank 1 (143), the exit-code race that must not matter.
WORKER = """
import json, os, signal, sys, time
import torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))  # the trainer saves on both
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
out = {"world": world, "local": int(os.environ["SLURM_LOCALID"]), "sum": value.item(),
       "master": os.environ["MASTER_ADDR"], "port": os.environ["MASTER_PORT"]}
if restart == 0:
    open(f"ready.{rank}", "w").close()
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    out["signal"] = got[0] if got else None
json.dump(out, open(f"out.{restart}.{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
if restart == 0 and rank == 0:
    open(os.environ["ALFRED_REQUEUE_RECORD"], "w").write("checkpoint iter_0000007 saved at step 7\\n")
    sys.exit(3)
if restart == 0 and got == [signal.SIGUSR1]:
    time.sleep(30)  # still "finishing" when rank 0 exits: srun's --kill-on-bad-exit ends it
sys.exit(0)
"""


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def test_two_tasks_allreduce_then_usr1_checkpoint_and_requeue(slurm_cluster, tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    launch = LaunchConfig.from_dict(
        {"name": "allreduce", "gpus_per_node": 0, "procs_per_node": 2,
         "slurm": {"time": "00:05:00", "signal_lead_s": 60, "env": {"ALFRED_PROBE": "x y"}}}
    )  # fmt: skip
    script = slurm.render_sbatch(
        launch, command=[sys.executable, str(tmp_path / "worker.py")], job_dir=tmp_path, workdir=tmp_path
    )
    (tmp_path / "job.sbatch").write_text(script)
    job_id = slurm.submit(tmp_path / "job.sbatch")
    wait_for(lambda: (tmp_path / "ready.0").exists() and (tmp_path / "ready.1").exists(), 60, "both tasks")
    assert slurm.status(job_id).state == "RUNNING"
    # What --signal=B:USR1@lead does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    done = slurm.wait(job_id, timeout_s=120, poll_s=0.5)

    assert (done.state, done.exit_code, done.restarts) == ("COMPLETED", 0, 1), done
    runs = {(r, k): json.loads((tmp_path / f"out.{r}.{k}.json").read_text()) for r in (0, 1) for k in (0, 1)}
    for (restart, rank), out in runs.items():
        assert out["sum"] == 3.0 and out["world"] == 2 and out["local"] == rank
        assert out["master"] == "localhost" and int(out["port"]) == 20000 + int(job_id) % 20000
    assert runs[0, 0]["signal"] == runs[0, 1]["signal"] == 10  # SIGUSR1 reached both tasks
    log = slurm.log_text(job_id)
    assert log.index("restart 0") < log.index("USR1, forwarding") < log.index("workers exited with")
    assert log.index("checkpoint iter_0000007 saved at step 7\nalfred: requeueing job") < log.index("restart 1")
    assert log.index("restart 1") < log.index("workers exited with 0")
    assert done.log_path == str(tmp_path / f"allreduce-{job_id}.out")


def test_scancel_saves_and_ends_the_job_without_a_requeue(slurm_cluster, tmp_path):
    """`jobs cancel` (scancel) sends TERM, which the trainer takes as a preemption: it saves and writes
    the requeue record. The script requeued on that record, so a cancelled job ran to its end."""
    (tmp_path / "worker.py").write_text(WORKER)
    launch = LaunchConfig.from_dict({"name": "cancelled", "gpus_per_node": 0, "procs_per_node": 2,
                                     "slurm": {"time": "00:05:00", "signal_lead_s": 60}})
    script = slurm.render_sbatch(
        launch, command=[sys.executable, str(tmp_path / "worker.py")], job_dir=tmp_path, workdir=tmp_path
    )
    (tmp_path / "job.sbatch").write_text(script)
    job_id = slurm.submit(tmp_path / "job.sbatch")
    wait_for(lambda: (tmp_path / "ready.0").exists() and (tmp_path / "ready.1").exists(), 60, "both tasks")
    slurm.cancel(job_id)
    wait_for(lambda: "workers exited with" in slurm.log_text(job_id), 60, "the batch shell to end")
    time.sleep(3)  # a requeue would have been asked for by now

    job = slurm.status(job_id)
    assert (job.state, job.restarts) == ("CANCELLED", 0), job
    assert json.loads((tmp_path / "out.0.0.json").read_text())["signal"] == 15  # TERM reached the worker
    log = slurm.log_text(job_id)
    assert "checkpoint iter_0000007 saved at step 7\nalfred: not requeueing" in log, log
    assert "restart 1" not in log and not (tmp_path / "out.1.0.json").exists(), log


def launch_cli(*args: str, wait: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alfred_train.launch.cli", *args, *(["--wait"] if wait else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=aws_env(), cwd=REPO,
    )  # fmt: skip


def final_loss(run_dir: Path, step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("step") == step and "loss" in r]
    assert losses, f"no loss at step {step} in {run_dir}/metrics.jsonl"
    return losses[-1]


def test_tiny_sft_on_slurm_and_requeue_resumes_to_the_same_loss(slurm_cluster, tmp_path):
    steps = 80
    common = ["launch", "configs/tiny-sft.yaml", "--backend", "slurm", f"train.max_steps={steps}", "checkpoint.interval=10", "checkpoint.keep=20",
              "logging.progress=false", "logging.plots=false", "launch.gpus_per_node=0", "launch.procs_per_node=2",
              f"launch.python={sys.executable}", "launch.slurm.time=00:10:00", "launch.slurm.signal_lead_s=60"]  # fmt: skip
    straight = launch_cli(*common, f"run.dir={tmp_path}/straight", "launch.name=sft-straight", wait=True)
    requeued = launch_cli(*common, f"run.dir={tmp_path}/requeued", "launch.name=sft-requeued",
                          f"launch.slurm.log_dir={tmp_path}/logs/sft",  # sbatch does not create it
                          "checkpoint.resume=none")  # for the first run: the restart continues its own
    out, err = requeued.communicate(timeout=60)
    assert requeued.returncode == 0, err
    job_id = out.split()[3]  # "submitted Slurm job <id> (<script>)"

    # Requeue as an operator (or a preemption) would, once a checkpoint exists: TERM reaches the
    # trainer, which saves at the next step and exits 3; the rerun resumes from `latest`.
    ckpts = tmp_path / "requeued" / "checkpoints"
    wait_for(lambda: (ckpts / "latest").exists(), 120, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    job = slurm.wait(job_id, timeout_s=180, poll_s=0.5)
    out_straight, err_straight = straight.communicate(timeout=180)

    assert straight.returncode == 0, err_straight
    assert " COMPLETED exit=0 restarts=0" in out_straight
    assert (job.state, job.exit_code) == ("COMPLETED", 0) and job.restarts >= 1
    log = slurm.log_text(job_id)
    assert job.log_path == f"{tmp_path}/logs/sft/sft-requeued-{job_id}.out"
    assert "restart 1" in log and "resumed from" in log, log[-3000:]
    # The save that TERM triggered completed (rank 0 wrote the requeue record after it) and the
    # rerun resumed from it, not from the periodic checkpoint before it.
    preempted_step = int(log.split("preempted at step ")[1].split(":")[0])
    resumed_step = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert f"checkpoint iter_{preempted_step:07d} saved at step {preempted_step}\nalfred: not requeueing" in log, log[-3000:]
    assert 0 < resumed_step == preempted_step < steps, log[-3000:]
    assert final_loss(tmp_path / "requeued", steps) == pytest.approx(final_loss(tmp_path / "straight", steps), abs=1e-6)

    # `jobs status` / `jobs logs` through the CLI.
    status = launch_cli("jobs", "status", job_id, "--backend", "slurm")
    s_out, _ = status.communicate(timeout=60)
    assert s_out.startswith(f"{job_id} COMPLETED exit=0 restarts=")
    # a job Slurm does not know: scontrol's complaint in one line, not its several
    unknown = launch_cli("jobs", "status", "999999", "--backend", "slurm")
    u_err = unknown.communicate(timeout=60)[1]
    assert unknown.returncode != 0 and u_err.count("\n") == 1, u_err
    assert "scontrol show job -o 999999 failed (exit 1): " in u_err and "Traceback" not in u_err, u_err
    logs = launch_cli("jobs", "logs", job_id, "--backend", "slurm", "--tail", "1")
    assert logs.communicate(timeout=60)[0] == "alfred: workers exited with 0\n"
    # a partition sbatch refuses: the key named, exit 2, no job folder left without a job (it was exit 1)
    bad = launch_cli(*common, f"run.dir={tmp_path}/bad", "launch.name=bad", "launch.slurm.partition=nope")
    b_err = bad.communicate(timeout=60)[1]
    assert bad.returncode == 2, b_err
    last = b_err.strip().splitlines()[-1]  # before it: megatron's import warnings (the dry-run report)
    assert "Traceback" not in b_err and last.startswith("error: launch.slurm.partition: ") and "nvalid partition" in last
    folders = tmp_path / "bad" / "launch"
    assert not folders.exists() or not any(folders.iterdir())

    # The fake AWS secret in the launcher's environment is nowhere: outputs, run dirs, job
    # scripts, logs, nor slurmctld's saved job state.
    for text in (out, err, out_straight, err_straight, log):
        assert SECRET_MARKER not in text
    assert files_containing(tmp_path, SECRET_MARKER) == []
    assert files_containing(slurm_cluster.parent, SECRET_MARKER) == []
