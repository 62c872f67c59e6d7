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
