"""The reward-model stage: Bradley-Terry math by hand, and real runs initialized from a short SFT run.

Launches (each a few seconds): SFT TP=1 (3 steps) -> RM TP=1 and RM TP=2 on JSONL pairs (per-step
losses equal within 1e-5 relative), and a TP=2 worker (`python -m tests.test_rm init ...`) that
checks the RM trunk equals the SFT policy's after init, across layouts (SFT saved at TP=1).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, TINY_SFT, free_port, metrics, run_cli

TINY_RM = ROOT / "configs" / "tiny-rm.yaml"
RM_STEPS = 8
QUIET = ["logging.tensorboard=false", "logging.plots=false", "logging.progress=false"]


# ---------------------------------------------------------------------------------------------
# Pure math against hand-computed numbers.

def test_bradley_terry_sums_by_hand():
    from alfred_train.stages.rm import bradley_terry_sums

    # chosen [2, 0, 1], rejected [1, 0.5, 1] -> margins [1, -0.5, 0]
    scores = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.5, 1.0])  # (2B,)
    loss_sum, correct, margin_sum = bradley_terry_sums(scores)
    expected = math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5)) + math.log(2.0)  # 1.9804859
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert loss_sum.item() == pytest.approx(1.9804859, rel=1e-6)
    assert correct.item() == 1.0  # the tie (margin 0) counts as wrong
    assert margin_sum.item() == pytest.approx(0.5)


def test_bradley_terry_is_stable_for_large_margins():
    from alfred_train.stages.rm import bradley_terry_sums

    loss_sum, correct, _ = bradley_terry_sums(torch.tensor([200.0, -200.0, 0.0, 0.0]))
    # pair 0: margin +200 -> loss ~0; pair 1: margin -200 -> loss 200 (no inf from log(sigmoid))
    assert loss_sum.item() == pytest.approx(200.0, rel=1e-6)
    assert correct.item() == 1.0


def test_pair_loss_reads_scores_at_eod_and_counts_pairs():
    from alfred_train.stages.rm import _pair_loss

    # 2 pairs, S=4: rows 0,1 chosen, rows 2,3 rejected; padding after EOD holds junk scores
    scores = torch.tensor([[0.0, 9.0, 3.0, 7.0],
                           [0.0, 1.0, 7.0, 7.0],
                           [5.0, 1.0, 9.0, 9.0],
                           [0.0, 0.0, 0.0, 4.0]])[..., None]  # (2B, S, 1)
    eod_index = torch.tensor([2, 1, 0, 3])  # r_c = [3, 1], r_r = [5, 4] -> margins [-2, -3]
    loss_sum, pairs, report = _pair_loss(eod_index, scores)
    expected = math.log1p(math.exp(2.0)) + math.log1p(math.exp(3.0))
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert pairs.item() == 2 and pairs.dtype == torch.int
    assert report["tokens"].item() == 2.0 and report["correct"].item() == 0.0
    assert report["margin"].item() == pytest.approx(-5.0)


def test_split_into_micro_batches_keeps_the_global_mean():
    """Sums over two micro-batches of 2 pairs / total pairs == the mean over one batch of 4."""
    from alfred_train.stages.rm import bradley_terry_sums

    chosen, rejected = torch.randn(4, generator=torch.Generator().manual_seed(0)), torch.zeros(4)
    whole = bradley_terry_sums(torch.cat([chosen, rejected]))
    halves = [bradley_terry_sums(torch.cat([chosen[i:i + 2], rejected[i:i + 2]])) for i in (0, 2)]
    for k in range(3):
        assert (halves[0][k] + halves[1][k]).item() / 4 == pytest.approx(whole[k].item() / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Real runs.

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from alfred_train.data.synthetic import make_preference_pairs, write_jsonl

    root = tmp_path_factory.mktemp("rm")
    run_cli("sft", str(TINY_SFT), f"run.dir={root / 'sft'}", "parallel.tp=1", "train.max_steps=3",
            "data.synthetic_size=200", "train.eval_interval=0", *QUIET)
    pairs = make_preference_pairs(360, seed=7)
    write_jsonl(root / "train.jsonl", pairs[:320])
    write_jsonl(root / "valid.jsonl", pairs[320:])
    common = [str(TINY_RM), f"rm.init={root / 'sft'}", "data.synthetic=false",
              f"data.train={root / 'train.jsonl'}", f"data.valid={root / 'valid.jsonl'}",
              f"train.max_steps={RM_STEPS}", "train.eval_interval=4", "train.eval_batches=5",
              "train.global_batch_size=32", "train.micro_batch_size=8", "optim.warmup_steps=2",
              "optim.lr=2e-3", "checkpoint.interval=0", *QUIET]
    for tp in (1, 2):
        run_cli("rm", *common, f"run.dir={root / f'rm-tp{tp}'}", f"parallel.tp={tp}")
    return root


@pytest.mark.slow
def test_metrics_and_held_out_accuracy(runs):
    import json

    rows = [json.loads(line) for line in (runs / "rm-tp1" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, RM_STEPS + 1))
    assert {"loss", "accuracy", "margin", "lr", "grad_norm"} <= set(train_rows[0])
    evals = [r for r in rows if "valid_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert {"valid_loss", "valid_margin"} <= set(evals[0])
    # 40 held-out pairs, 5 micro-batches of 8 scored: well above chance, and the loss below log 2
    assert evals[-1]["valid_accuracy"] > 0.8, evals
    assert evals[-1]["valid_loss"] < math.log(2.0) and evals[-1]["valid_margin"] > 0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    meta = json.loads((runs / "rm-tp1" / "checkpoints" / f"iter_{RM_STEPS:07d}" / "meta.json").read_text())
    assert meta["models"] == ["reward"] and meta["state"]["stage"] == "rm"
    assert meta["state"]["consumed_samples"] == RM_STEPS * 32
    assert meta["state"]["model"]["num_layers"] == 4 and meta["state"]["tokenizer"]


@pytest.mark.slow
def test_tp2_matches_tp1(runs):
    reference, losses = metrics(runs / "rm-tp1"), metrics(runs / "rm-tp2")
    assert len(losses) == RM_STEPS
    assert losses == pytest.approx(reference, rel=1e-5)
    assert metrics(runs / "rm-tp2", "valid_loss") == pytest.approx(metrics(runs / "rm-tp1", "valid_loss"), rel=1e-5)
    for key in ("accuracy", "valid_accuracy"):  # counts: equal unless a margin sits within fp32 noise of 0
        assert metrics(runs / "rm-tp2", key) == metrics(runs / "rm-tp1", key)
    # margins are differences of O(1) scores: compare them absolutely, at fp32 noise of those scores
    assert metrics(runs / "rm-tp2", "margin") == pytest.approx(metrics(runs / "rm-tp1", "margin"), abs=1e-4)


@pytest.mark.slow
def test_init_loads_sft_trunk_across_layouts(runs):
    """SFT saved at TP=1, RM built at TP=2: every trunk shard equals the SFT policy's shard."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_rm", "init", str(runs / "sft")],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-6000:]}"
        assert "trunk tensors equal: 26" in out and "head: (1, 64) bias 0" in out, out[-3000:]


@pytest.mark.slow
def test_a_held_out_split_too_small_to_evaluate_trains_without_valid_metrics(runs, tmp_path):
    """5 held-out pairs, micro-batch 8: the dry run passes, so the run must not fail on it (it once
    did, after building the model); it trains and says why there is no valid_accuracy, as SFT does."""
    argv = [str(TINY_RM), f"rm.init={runs / 'sft'}", "parallel.tp=1", "data.synthetic_size=100",
            f"run.dir={tmp_path / 'rm'}", "train.max_steps=2", "train.eval_interval=1", *QUIET]
    assert run_cli("rm", *argv, "--dry-run").returncode == 0
    proc = run_cli("rm", *argv)
    assert "no valid_accuracy: the held-out split has 5 samples, too few for one evaluation" in proc.stderr
    assert metrics(tmp_path / "rm") and not metrics(tmp_path / "rm", "valid_accuracy")


@pytest.mark.slow
def test_init_rejects_a_checkpoint_of_another_shape(runs, tmp_path):
    proc = run_cli("rm", str(TINY_RM), f"rm.init={runs / 'sft'}", "parallel.tp=1", "model.num_layers=2",
                   f"run.dir={tmp_path / 'rm'}", "train.max_steps=1", *QUIET, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rm.init:" in proc.stderr and "set model.*" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Worker: `RANK=.. WORLD_SIZE=2 python -m tests.test_rm init SFT_RUN_DIR` (TP=2).

def _init_worker(sft_dir: str) -> None:
    from alfred_train.config import load_config
    from alfred_train.models.from_checkpoint import build_from_checkpoint
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown
    from alfred_train.stages import common, rm

    cfg = load_config(TINY_RM, ["parallel.tp=2", f"rm.init={sft_dir}"])
    runtime = init_runtime(ParallelDims(2, 1, 1))
    shape = common.shape_for(cfg, common.tokenizer_for(cfg))
    reward = common.make_model(cfg, runtime, shape, kind="scalar", backend=common.attention_backend(cfg, runtime),
                               seed=cfg.train.seed)
    rm.init_from(cfg, reward, shape)
    policy, _, _ = build_from_checkpoint(sft_dir, cfg.parallel, runtime, backend_name="sdpa")
    got = {k: v for k, v in reward[0].state_dict().items() if "_extra_state" not in k}
    want = {k: v for k, v in policy[0].state_dict().items() if "_extra_state" not in k}
    trunk = sorted(k for k in want if not k.startswith("output_layer"))
    assert set(got) - set(trunk) == {"output_layer.weight", "output_layer.bias"}, sorted(got)
    for k in trunk:
        assert torch.equal(got[k], want[k]), f"{k} differs after init"
    fresh = common.make_model(cfg, runtime, shape, kind="scalar", backend=common.attention_backend(cfg, runtime),
                              seed=cfg.train.seed)[0].state_dict()
    key = "embedding.word_embeddings.weight"
    assert not torch.equal(fresh[key], got[key])  # the SFT steps moved it: the load did something
    print(f"trunk tensors equal: {len(trunk)}", flush=True)  # embedding, 4 x 6 per layer, final norm
    head_w, head_b = got["output_layer.weight"], got["output_layer.bias"]
    assert 0 < head_w.std().item() < 0.05 and torch.all(head_b == 0)
    print(f"head: {tuple(head_w.shape)} bias {int(head_b.abs().sum().item())}", flush=True)
    shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        _init_worker(sys.argv[2])
