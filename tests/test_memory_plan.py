"""The dry run's whole per-GPU plan (activations, buffers, recompute) and train.recompute itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_workers

from alfred_train import cli

REPO = Path(__file__).resolve().parents[1]
ALFRED = REPO / "configs" / "alfred-40b-ppo.yaml"


def test_recompute_is_megatrons_and_changes_nothing_but_memory(tmp_path):
    run_workers(REPO / "tests" / "workers" / "recompute.py", [str(tmp_path)], world_size=1)
    runs = json.loads((tmp_path / "recompute.json").read_text())
    assert [runs[m]["granularity"] for m in ("none", "selective", "full")] == [None, "selective", "full"]
    assert runs["none"]["all_calls"] == runs["none"]["forward_calls"] == 4  # 4 layers, run once
    assert runs["full"]["all_calls"] == 2 * runs["full"]["forward_calls"] == 8  # re-run in backward
    for mode in ("selective", "full"):
        assert runs[mode]["loss"] == runs["none"]["loss"]
        assert runs[mode]["grad_sum"] == pytest.approx(runs["none"]["grad_sum"], rel=1e-6)


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_alfred_plan_activations_by_recompute_and_the_refusal(capsys):
    # Falcon-40B at TP=8, PP=4, 1 x 2048 tokens per micro-batch: s*b*h = 2048 * 8192.
    sbh = 2048 * 8192
    none_layer = sbh * (10 + (8 + 16) / 8)  # Korthikanti, flash attention: no s^2 term
    code, out, err = dry_run(capsys, "ppo", str(ALFRED))
    assert code == 0, err
    stage0 = next(line for line in out.splitlines() if line.strip().startswith("stage 0"))
    full = 15 * 2 * sbh * 4 + none_layer  # 4 micro-batches x 15 layers' inputs + one layer recomputed
    assert float(stage0.split()[4]) == pytest.approx(full / 2**30, abs=0.006)
    assert "peak: 34.99 GiB on pipeline stage 0 (generation phase)" in out
    code, out, err = dry_run(capsys, "ppo", str(ALFRED), "train.recompute=none")
    assert code == 2 and out == ""
    assert err.startswith("alfred-train: error: train.recompute: the plan needs 41.7 GiB per GPU (pipeline stage 0, "
                          "training phase) but one GPU of ml.p4d.24xlarge has 39.4 GiB; set train.recompute: full")
    # The generation phase: 4x the rollouts at once does not fit whatever the recompute.
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "ppo.rollout_micro_batch=256")
    assert code == 2 and "error: ppo.rollout_micro_batch: " in err and "generation phase" in err
    # On Slurm the GPU is whatever launch.gpu_memory_gib says (unchecked when 0).
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "launch.backend=slurm", "train.recompute=none")
    assert code == 0, err
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "launch.backend=slurm", "launch.gpu_memory_gib=79.1",
                           "train.recompute=none")
    assert code == 0, err
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "launch.backend=slurm", "launch.gpu_memory_gib=24")
    assert code == 2 and "error: parallel.pp: the plan needs" in err and "has 24 GiB" in err
    # the recipe has ZeRO on already: not advised again (it was); the reserve is said to be in the sum
    assert "the model states and the 2 GiB reserve alone need" in err and "parallel.zero" not in err, err
    code, _, err = dry_run(capsys, "ppo", str(ALFRED), "launch.backend=slurm", "launch.gpu_memory_gib=24",
                           "parallel.zero=false")
    assert code == 2 and "turn on parallel.zero" in err, err
