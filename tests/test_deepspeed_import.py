"""`convert hf-to-mcore` on an HF-Trainer-style DeepSpeed ZeRO-3 checkpoint (global_step*/ shards).

One launch: a tiny HF Llama trains two steps under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) and saves
its ZeRO checkpoint (tests/workers/deepspeed_zero3.py); the CLI converts the directory; our model's
logits on fixed tokens (tests/workers/logits.py) equal the DeepSpeed model's. Skipped without the
[deepspeed] extra. No DeepSpeed op is compiled: the worker uses a torch optimizer and skips the
shared-memory all-reduce op (see the worker).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.helpers import ROOT, run_cli, run_workers

pytest.importorskip("deepspeed", reason="needs the [deepspeed] extra")
pytest.importorskip("transformers", reason="needs the [hf] extra")

TINY_SP = ROOT / "alfred_train" / "data" / "assets" / "tiny_sp.model"
WORKERS = ROOT / "tests" / "workers"


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    saved = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root / "torch_extensions")  # where a JIT-built op would go
    try:
        run_workers(WORKERS / "deepspeed_zero3.py", [str(root / "checkpoint-2"), str(TINY_SP)], 2, timeout=600)
    finally:
        os.environ.pop("TORCH_EXTENSIONS_DIR")
        if saved is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved
    assert not (root / "torch_extensions").exists()  # no DeepSpeed op was compiled (minutes on a fresh machine)
    return root


@pytest.mark.slow
def test_zero3_checkpoint_converts_to_the_same_logits(zero3):
    hf_dir, ckpt = zero3 / "checkpoint-2", zero3 / "ours"
    assert sorted(p.name for p in (hf_dir / "global_step2").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert not list(hf_dir.glob("*.safetensors"))  # the weights exist only as ZeRO partitions
    losses = json.loads((hf_dir / "ds_losses.json").read_text())
    assert len(losses) == 2 and all(l == l for l in losses)

    done = run_cli("convert", "hf-to-mcore", str(hf_dir), str(ckpt))
    assert "model 'policy'" in done.stdout
    run_workers(WORKERS / "logits.py", [str(ckpt), "1", "1", str(zero3 / "ours.pt")], 1)

    ours = torch.load(zero3 / "ours.pt")  # (2, 24, V)
    theirs = torch.load(hf_dir / "deepspeed_logits.pt")
    assert ours.shape == theirs["trained"].shape == (2, 24, 520)
    assert theirs["trained"].std() > 0.3  # not a comparison between near-zero numbers
    assert (theirs["trained"] - theirs["initial"]).abs().max() > 0.1  # the two steps moved the weights
    assert (ours - theirs["trained"]).abs().max() < 1e-4


@pytest.mark.slow
def test_zero_checkpoint_errors_name_the_problem(zero3, tmp_path):
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(zero3 / "checkpoint-2", broken)
    (broken / "latest").write_text("global_step7")
    done = run_cli("convert", "hf-to-mcore", str(broken), str(tmp_path / "out"), check=False)
    assert done.returncode == 2
    assert "latest: names 'global_step7'" in done.stderr and "global_step2" in done.stderr
    (broken / "latest").write_text("global_step2")
    shard = sorted((broken / "global_step2").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
    done = run_cli("convert", "hf-to-mcore", str(broken), str(tmp_path / "out"), check=False)
    errors = [ln for ln in done.stderr.splitlines() if "error:" in ln]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "a ZeRO shard is damaged or incomplete" in errors[0], errors
    assert not (tmp_path / "out").exists()
