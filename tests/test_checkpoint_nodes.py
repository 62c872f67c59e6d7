"""Node-local run directories on two simulated nodes, mirrored to S3 (a real moto server).

Two trainer processes, each the local rank 0 of its own "node" (LOCAL_RANK=0, RANK 0 and 1), each
with its own run.dir as two SageMaker instances have their own /opt/ml/checkpoints; data parallel
with ZeRO, so both nodes write shards. Each node's copy holds its own files and the one manifest;
the copies add up to the whole checkpoint in S3. Then both directories are wiped (a reclaim): the
restarted run downloads the newest sound checkpoint from S3, verifies it, and continues exactly as
an uninterrupted run; S3 keeps `checkpoint.keep` checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_fixtures import boto_client

from alfred_train.checkpointing import manifest as mf
from tests.helpers import ROOT, TINY_SFT, free_port, metrics, run_cli

pytestmark = pytest.mark.slow
BUCKET = "ckpt"
S3_ROOT = f"s3://{BUCKET}/run/checkpoints"
ARGS = [str(TINY_SFT), "parallel.tp=1", "parallel.zero=true", "data.synthetic_size=200",
        "train.eval_interval=0", "logging.plots=false", "logging.tensorboard=false", "checkpoint.interval=1",
        "checkpoint.keep=2", "optim.decay_steps=4"]  # the schedule must not depend on max_steps


def on_nodes(dirs: list[Path], steps: int, env: dict, *extra: str, node_local: bool = True,
             expect: int = 0) -> list[str]:
    """Run the SFT stage as one one-process node per directory, data parallel over them (S3 at
    S3_ROOT unless `extra` says otherwise); returns each node's output."""
    port = str(free_port())
    procs = []
    for rank, run_dir in enumerate(dirs):
        node_env = {**os.environ, **env, "RANK": str(rank), "WORLD_SIZE": str(len(dirs)), "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "alfred_train", "sft", *ARGS, f"parallel.dp={len(dirs)}", f"train.max_steps={steps}",
             f"run.dir={run_dir}", f"checkpoint.node_local={str(node_local).lower()}", f"checkpoint.s3_uri={S3_ROOT}",
             *extra], cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == expect, f"node {rank} exited {p.returncode}\n{out[-5000:]}"
    return outputs


def remote_steps(client) -> list[str]:
    pages = client.list_objects_v2(Bucket=BUCKET, Prefix="run/checkpoints/", Delimiter="/")
    return sorted(p["Prefix"].split("/")[-2] for p in pages.get("CommonPrefixes", []))


def test_node_local_checkpoints_meet_in_s3_and_a_reclaimed_run_resumes_from_s3(moto, tmp_path):
    client = boto_client("s3", moto)
    client.create_bucket(Bucket=BUCKET)
    env = {"AWS_ENDPOINT_URL_S3": moto}
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    # node-local directories run as if shared (issue 9: nodes 1-15 failed at the first save): refused
    # before any step, naming the key
    out = on_nodes(nodes, 2, env, node_local=False, expect=2)
    assert "set checkpoint.node_local=true" in out[0] and "Traceback" not in out[0] + out[1]
    for n in nodes:
        shutil.rmtree(n, ignore_errors=True)
    on_nodes(nodes, 2, env)

    # each node's copy: its own files plus the same manifest; together, every file it lists
    copies = [n / "checkpoints" / "iter_0000002" for n in nodes]
    manifest = mf.read_manifest(copies[0])
    assert (copies[1] / "manifest.json").read_bytes() == (copies[0] / "manifest.json").read_bytes()
    assert manifest["nodes"] == 2 and {e["node"] for e in manifest["files"]} == {0, 1}
    for node, copy in enumerate(copies):
        held = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} - {"manifest.json"}
        assert held == {e["path"] for e in manifest["files"] if e["node"] == node}
        assert (nodes[node] / "checkpoints" / "latest").read_text() == "iter_0000002"
    merged = tmp_path / "merged"
    for copy in copies:
        shutil.copytree(copy, merged, dirs_exist_ok=True)
    assert mf.problems(merged) == []

    # S3 holds both checkpoints, the manifest identical to the local one
    assert remote_steps(client) == ["iter_0000001", "iter_0000002"]
    body = client.get_object(Bucket=BUCKET, Key="run/checkpoints/iter_0000002/manifest.json")["Body"].read()
    assert json.loads(body) == manifest

    # reclaimed: both local directories gone; the restart resumes from S3 and continues exactly
    for n in nodes:
        shutil.rmtree(n)
    out = on_nodes(nodes, 4, env)
    assert f"downloaded iter_0000002 from {S3_ROOT}/iter_0000002" in out[0]
    assert "at step 2" in out[0]
    assert remote_steps(client) == ["iter_0000003", "iter_0000004"]  # checkpoint.keep=2 in S3 too

    reference = tmp_path / "reference"  # one shared directory, uninterrupted
    run_cli("sft", *ARGS, "parallel.dp=2", "train.max_steps=8", f"run.dir={reference}")
    assert metrics(nodes[0], "step") == [3, 4]
    assert metrics(nodes[0], "loss") == metrics(reference, "loss")[2:4]
    assert metrics(nodes[0], "grad_norm") == metrics(reference, "grad_norm")[2:4]

    # shrunk to the one node left, its directory empty: step 4 from S3 at DP=1 (ZeRO states reshard across DP)
    one = tmp_path / "one"
    out = on_nodes([one], 6, env)[0]
    assert f"downloaded iter_0000004 from {S3_ROOT}/iter_0000004" in out and "at step 4" in out
    assert "resumed at another layout (dp 2 -> 1)" in out
    assert metrics(one, "loss") == pytest.approx(metrics(reference, "loss")[4:6], rel=1e-5)
    # grown again: that node keeps its copy, a new node starts empty and downloads step 6 from S3
    out = on_nodes([one, tmp_path / "new"], 8, env)
    assert "resumed at another layout (dp 1 -> 2)" in out[0] and "downloaded iter_0000006" in out[0] + out[1]
    assert metrics(one, "step") == [5, 6, 7, 8]
    assert metrics(one, "loss")[2:] == pytest.approx(metrics(reference, "loss")[6:], rel=1e-5)


def test_an_s3_uri_that_cannot_be_listed_is_one_line(moto, tmp_path):
    """A missing bucket: each rank's line ran into the others' (one garbled line, twice the words),
    and it said "not resuming" of a fresh run."""
    nodes = [tmp_path / "n0", tmp_path / "n1"]
    out = on_nodes(nodes, 1, {"AWS_ENDPOINT_URL_S3": moto}, "checkpoint.s3_uri=s3://nobucket/ck", expect=1)
    said = [line for o in out for line in o.splitlines() if "error:" in line]
    assert len(said) == 1 and said[0].startswith("alfred-train: error: checkpoint.s3_uri: cannot list s3://nobucket/ck"), said
    assert "fix the URI or the access, or remove checkpoint.s3_uri" in said[0] and "Traceback" not in "".join(out)


def test_a_resume_refused_on_one_node_only_is_refused_on_every_node(tmp_path):
    """Node-local copies differ: node 1 holds a ZeRO checkpoint saved at TP=1 that cannot reshard to
    TP=2, node 0 (rank 0) is new and empty. Every node exits 2 and rank 0 prints the one line; it used to
    be node 1 alone, silent, and rank 0 dying in the next collective with a gloo traceback."""
    saved = tmp_path / "saved"
    run_cli("sft", *ARGS, "parallel.dp=1", "train.max_steps=2", f"run.dir={saved}")
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(saved / "checkpoints", nodes[1] / "checkpoints")
    out = on_nodes(nodes, 4, {}, "parallel.tp=2", "parallel.dp=1", "checkpoint.s3_uri=null", expect=2)
    assert ("rank 1: checkpoint.resume: " in out[0] and "reshard across parallel.dp only" in out[0]), out[0][-3000:]
    assert "Traceback" not in out[0] + out[1]
