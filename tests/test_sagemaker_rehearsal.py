"""A two-host SageMaker job rehearsed on this machine (tests/sagemaker_rehearsal.py plays SageMaker).

The launcher submits the tiny PPO recipe (DP=2, one process per host) to the moto server: it
uploads the seeded SFT and RM checkpoints (local inputs) and the source tarball. Each host then gets
the job as a SageMaker instance would: the code, the input channels, resourceconfig.json, its own
node-local checkpoint directory synced to the moto bucket; entry.py starts torchrun across both.
One job runs straight through; the other is reclaimed as soon as S3's `latest` names step 2 (both
hosts killed, their disks wiped, whatever was not uploaded lost), restarted from S3, resumes from
the newest checkpoint complete there, and must end where the straight one did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_fixtures import REPO, aws_env, boto_client, free_port
from sagemaker_rehearsal import Host

from alfred_train.launch.s3 import parse_s3_uri

pytestmark = pytest.mark.slow

BUCKET = "alfred-rehearsal"
STEPS = 4


def submit(moto: str, name: str, inputs: Path, tmp_path: Path, *extra: str) -> dict:
    """`alfred-train launch` of the tiny PPO recipe as a 2 x ml.m5.xlarge job; returns the job."""
    overrides = [
        "parallel.tp=1", "parallel.dp=2", f"train.max_steps={STEPS}", "checkpoint.interval=1", "checkpoint.keep=5",
        "train.eval_interval=0", "ppo.rollouts_per_iter=16", "ppo.rollout_micro_batch=8", "ppo.train_micro_batch=4", "ppo.value_steps_per_epoch=2",
        "ppo.eval_prompts=8", "logging.progress=false", "logging.plots=false", "logging.tensorboard=false",
        "launch.backend=sagemaker", "launch.stage=ppo", f"launch.name={name}", "launch.nodes=2",
        "launch.gpus_per_node=0", "launch.procs_per_node=1", "launch.sagemaker.instance_type=ml.m5.xlarge",
        "launch.sagemaker.role_arn=arn:aws:iam::123456789012:role/AlfredSageMaker",
        "launch.sagemaker.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/alfred-train:0.1",
        f"launch.sagemaker.source_s3_uri=s3://{BUCKET}/jobs", f"launch.sagemaker.output_s3_uri=s3://{BUCKET}/output",
        f"launch.sagemaker.checkpoint_s3_uri=s3://{BUCKET}/{name}/checkpoints", "launch.sagemaker.spot=true",
        f"launch.sagemaker.endpoint_url={moto}",
        f"launch.sagemaker.inputs={{ppo.policy_init: {inputs / 'sft'}, ppo.reward_init: {inputs / 'rm'}}}",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "alfred_train.launch.cli", "launch", "configs/tiny-ppo.yaml", *overrides, *extra],
                          capture_output=True, text=True, env=aws_env(moto), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    job_name = done.stdout.split()[-1]
    return boto_client("sagemaker", moto).describe_training_job(TrainingJobName=job_name)


def start_hosts(root: Path, job: dict, s3, moto: str) -> list[Host]:
    port = free_port()
    env = {**aws_env(moto), "OMP_NUM_THREADS": "1"}
    hosts = [Host(root / f"algo-{i + 1}", i, job, s3, env, port) for i in range(2)]
    for host in hosts:
        host.start()
    return hosts


def finish(hosts: list[Host], timeout: float = 900) -> None:
    codes = [host.wait(timeout) for host in hosts]
    assert codes == [0, 0], "\n".join(host.log.read_text()[-4000:] for host in hosts)


def s3_latest_step(s3, job: dict) -> int:
    """The step `latest` names in the job's checkpoint prefix (run.dir/checkpoints/latest)."""
    loc = parse_s3_uri(job["CheckpointConfig"]["S3Uri"])
    try:
        body = s3.get_object(Bucket=loc.bucket, Key=f"{loc.key}/checkpoints/latest")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return 0
    return int(body.decode().strip().split("_")[-1] or 0)


def last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if r.get("step") == STEPS][-1]
    return {k: v for k, v in row.items() if not k.startswith(("time", "tokens_per_s"))}


def test_two_hosts_reclaimed_after_a_checkpoint_resume_from_s3_equal(moto, tmp_path, ppo_inits):
    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    straight_job = submit(moto, "straight", ppo_inits, tmp_path)
    # checkpoint.resume: none holds for the job's first start: the restart continues its own checkpoints
    reclaimed_job = submit(moto, "reclaimed", ppo_inits, tmp_path, "checkpoint.resume=none")
    assert {c["ChannelName"] for c in straight_job["InputDataConfig"]} == {"ppo_policy_init", "ppo_reward_init"}
    hosts = []
    try:
        hosts = start_hosts(tmp_path / "straight", straight_job, s3, moto)
        finish(hosts)
        straight = last_metrics(tmp_path / "straight" / "algo-1" / "checkpoints")

        hosts = start_hosts(tmp_path / "reclaimed", reclaimed_job, s3, moto)
        deadline = time.monotonic() + 600
        while s3_latest_step(s3, reclaimed_job) < 2:
            assert time.monotonic() < deadline and all(h.proc.poll() is None for h in hosts), \
                "\n".join(h.log.read_text()[-3000:] for h in hosts)
            time.sleep(0.2)
        for host in hosts:
            host.reclaim()
        named = s3_latest_step(s3, reclaimed_job)  # S3 as the reclaim left it: no process writes any more
        assert not (tmp_path / "reclaimed" / "algo-1").exists()
        hosts = start_hosts(tmp_path / "reclaimed", reclaimed_job, s3, moto)  # SageMaker restarts the job
        finish(hosts)
    finally:
        for host in hosts:
            host.kill_quietly()
    log = "\n".join(h.log.read_text() for h in hosts)
    resumed = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    # The newest checkpoint complete in S3 when the hosts died. The poll saw `latest` name step 2, and
    # an iteration can end between that poll and the kill (a CI run resumed from step 3), so take what
    # `latest` named after the kill: that step if every node's files of it were uploaded, else the one
    # before; or the one after, if its files were all up but `latest` not yet rewritten. Never step 0.
    assert named >= 2 and named - 1 <= resumed <= min(named + 1, STEPS - 1), (named, log[-3000:])
    # Each host restored every node's files from S3 (node-local layout: each wrote only its own shards).
    for host in hosts:
        assert (host.checkpoints / "checkpoints" / f"iter_{STEPS:07d}" / "manifest.json").is_file()
    assert last_metrics(tmp_path / "reclaimed" / "algo-1" / "checkpoints") == pytest.approx(straight, abs=1e-6)
