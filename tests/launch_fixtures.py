"""Fixtures shared by tests/test_launch_*.py: a moto server process and a real Slurm cluster.

The fixtures reach every module through conftest.py (one server, one cluster per session); the
helpers are imported with `from launch_fixtures import ...` (pytest puts tests/ on sys.path). Both
fixtures are session-scoped and stop what they started by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET_MARKER = "SECRETMARKER-7f3a9c-do-not-leak"  # a fake AWS secret key that must appear nowhere
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str | None = None) -> dict[str, str]:
    """Environment for a process talking to moto: dummy keys, the secret one being the marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="AKIATESTTESTTESTTEST",
        AWS_SECRET_ACCESS_KEY=SECRET_MARKER,
        AWS_DEFAULT_REGION=REGION,
    )
    return env


@pytest.fixture(scope="session")
def moto_server():
    """URL of a `moto_server` process on a free port (the venv's own binary)."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip(f"{binary} missing: pip install 'moto[server]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited with {proc.returncode}")
                time.sleep(0.1)
        else:
            pytest.fail("moto_server did not answer within 15 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def moto(moto_server, monkeypatch):
    """A freshly reset moto server; this process's boto3 clients get dummy credentials."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"))
    for key, value in aws_env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return moto_server


def boto_client(service: str, endpoint: str):
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=endpoint)


# ---------------------------------------------------------------------------------------------
# Slurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm cluster (tests/slurm_cluster.sh); yields the SLURM_CONF path.

    Installs Slurm with apt only when CI or ALFRED_INSTALL_SLURM=1 is set; otherwise skips when
    the binaries are missing. Needs root.
    """
    can_install = bool(os.environ.get("CI")) or os.environ.get("ALFRED_INSTALL_SLURM") == "1"
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")) and not can_install:
        pytest.skip("Slurm is not installed (set ALFRED_INSTALL_SLURM=1 to apt-get it)")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root (slurmd runs jobs as their user)")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    script = REPO / "tests" / "slurm_cluster.sh"
    ports = {"ALFRED_SLURMCTLD_PORT": str(free_port()), "ALFRED_SLURMD_PORT": str(free_port())}
    env = {**os.environ, **ports}
    done = subprocess.run(
        ["bash", str(script), "start", str(cluster_dir)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        subprocess.run(["bash", str(script), "stop", str(cluster_dir)])
        pytest.fail(f"slurm_cluster.sh start failed:\n{done.stdout}\n{done.stderr}")
    conf = cluster_dir / "slurm.conf"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield conf
    finally:
        subprocess.run(["bash", str(script), "stop", str(cluster_dir)])
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


def files_containing(root: Path, needle: str) -> list[Path]:
    """Every regular file under `root` whose bytes contain `needle`."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle.encode() in path.read_bytes():
                    hits.append(path)
            except OSError:
                continue
    return hits
