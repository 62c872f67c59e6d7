"""Plays SageMaker for a training job created on the moto server, with every host on this machine.

What SageMaker does for each instance of a job, and this harness does for each `Host`:
- downloads `sagemaker_submit_directory` (sourcedir.tar.gz) into the host's code dir (/opt/ml/code);
- delivers every InputDataConfig S3 channel into <host>/input/data/<channel> (File mode: the keys
  under the S3Prefix, relative to its last "/"), and sets SM_CHANNEL_<NAME> to that directory;
- writes resourceconfig.json (`hosts`, `current_host`) and runs the entry point with the job's
  hyperparameters (JSON-decoded) as `--key value` arguments;
- CheckpointConfig: before the start, downloads the whole S3Uri prefix into the host's LocalPath;
  while the job runs, uploads what is new or changed there (every `SYNC_S`), never deleting in S3.
  A reclaimed instance loses whatever had not been uploaded yet.

Differences from SageMaker, all of them paths: /opt/ml/checkpoints is <host>/checkpoints (passed as
entry.py's --run_dir), the channels are under <host>/input/data, and torchrun's port is a free one.
The two "hosts" are named `localhost` and `127.0.0.1`: two names of this machine, so the master
address (hosts[0]) resolves.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil

from alfred_train.launch.s3 import parse_s3_uri

SYNC_S = 0.3
HOSTS = ("localhost", "127.0.0.1")


class CheckpointSync:
    """SageMaker's checkpoint sync between one host's LocalPath and CheckpointConfig.S3Uri."""

    def __init__(self, s3, local: Path, uri: str):
        self.s3, self.local, self.loc = s3, local, parse_s3_uri(uri)
        self.uploaded: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def restore(self) -> int:
        """Download every object under the prefix (what each instance gets on a (re)start)."""
        count = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=self.loc.key + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(self.loc.key) + 1:]
                path = self.local / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.loc.bucket, obj["Key"], str(path))
                stat = path.stat()
                self.uploaded[rel] = (stat.st_size, stat.st_mtime_ns)
                count += 1
        return count

    def sync_once(self) -> None:
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            try:
                stat = path.stat()
                if self.uploaded.get(rel) == (stat.st_size, stat.st_mtime_ns):
                    continue
                self.s3.upload_file(str(path), self.loc.bucket, f"{self.loc.key}/{rel}")
            except (FileNotFoundError, OSError):  # renamed or removed while we looked
                continue
            self.uploaded[rel] = (stat.st_size, stat.st_mtime_ns)

    def start(self) -> None:
        def loop():
            while not self._stop.wait(SYNC_S):
                self.sync_once()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self, final: bool) -> None:
        """Stop syncing; `final`: one last pass (a job that ended), else none (a reclaimed instance)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final:
            self.sync_once()


def _download_prefix(s3, uri: str, target: Path) -> None:
    """An S3Prefix channel in File mode: keys under `uri`, relative to its last "/"."""
    loc = parse_s3_uri(uri)
    prefix = loc.key + ("/" if uri.endswith("/") else "")
    base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = target / obj["Key"][len(base):]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(loc.bucket, obj["Key"], str(path))


class Host:
    """One instance of the job: code, channels, resourceconfig.json, checkpoint dir, entry process."""

    def __init__(self, root: Path, index: int, job: dict, s3, env: dict[str, str], master_port: int):
        self.root, self.index, self.job, self.s3 = root, index, job, s3
        self.env, self.master_port = env, master_port
        self.code, self.checkpoints = root / "code", root / "checkpoints"
        self.proc: subprocess.Popen | None = None
        self.sync: CheckpointSync | None = None
        self.log = root.parent / f"{root.name}.log"  # outlives a reclaim, for the test's messages

    def _hyperparameters(self) -> dict:
        return {k: json.loads(v) for k, v in self.job["HyperParameters"].items()}

    def start(self) -> None:
        hyper = self._hyperparameters()
        if not self.code.exists():
            loc = parse_s3_uri(hyper["sagemaker_submit_directory"])
            body = self.s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(self.code, filter="data")
        env = dict(self.env)
        for channel in self.job.get("InputDataConfig", []):
            target = self.root / "input" / "data" / channel["ChannelName"]
            if not target.exists():
                _download_prefix(self.s3, channel["DataSource"]["S3DataSource"]["S3Uri"], target)
            env[f"SM_CHANNEL_{channel['ChannelName'].upper()}"] = str(target)
        config = self.root / "resourceconfig.json"
        config.write_text(json.dumps({"current_host": HOSTS[self.index], "hosts": list(HOSTS)}))
        env["ALFRED_SM_RESOURCECONFIG"] = str(config)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.sync = CheckpointSync(self.s3, self.checkpoints, self.job["CheckpointConfig"]["S3Uri"])
        self.sync.restore()
        self.sync.start()
        args = []
        for key, value in hyper.items():
            if not key.startswith("sagemaker_"):
                args += [f"--{key}", str(self.checkpoints) if key == "run_dir" else str(value)]
        argv = [sys.executable, str(self.code / hyper["sagemaker_program"]), *args, "--master_port", str(self.master_port)]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(argv, cwd=self.code, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.sync.stop(final=True)
        return code

    def reclaim(self) -> None:
        """A spot reclaim: every process of the instance dies at once, its disk is gone."""
        self.kill_quietly()
        shutil.rmtree(self.root)  # code, channels and checkpoints: a new instance

    def kill_quietly(self) -> None:
        """SIGKILL the entry script and every process under it, and wait until none runs. Not
        `killpg`: torchrun starts each worker in a session of its own, and a worker that survived
        its host would go on writing into the wiped directory."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                entry = psutil.Process(self.proc.pid)
                family = [entry, *entry.children(recursive=True)]
            except psutil.NoSuchProcess:
                family = []
            for p in family:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc.wait(timeout=30)
            deadline = time.monotonic() + 60
            while any(_running(p) for p in family):
                assert time.monotonic() < deadline, f"a process of host {self.index} outlived SIGKILL"
                time.sleep(0.05)
        if self.sync is not None:
            self.sync.stop(final=False)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
