"""The PPO stage end to end on CPU: model initialization, TP=2, PP=2 (pipelined decode or not),
DP=2 and compiled-decode parity, learning rates per PPO iteration, exact resume, the non-finite
guard, and the whole synthetic pipeline learning (shortened)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, metrics, run_cli

pytestmark = pytest.mark.slow
TINY_PPO = str(ROOT / "configs" / "tiny-ppo.yaml")
SHORT = ["ppo.rollouts_per_iter=16", "ppo.rollout_micro_batch=8", "ppo.train_micro_batch=4",
         "ppo.value_steps_per_epoch=4", "ppo.max_new_tokens=8", "ppo.eval_prompts=8",
         "optim.decay_steps=10", "checkpoint.interval=0", "logging.tensorboard=false", "logging.plots=false"]
COMPARED = ["score", "kl", "policy_loss", "value_loss", "entropy", "response_len", "explained_var"]


def _worker(out, *extra):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "ppo_models.py"), str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def inits(ppo_inits):
    return ppo_inits  # value == RM, no shared memory, reference == policy: checked by the worker


def _ppo(inits, run_dir, *extra, check=True):
    return run_cli("ppo", TINY_PPO, f"run.dir={run_dir}", f"ppo.policy_init={inits / 'sft'}",
                   f"ppo.reward_init={inits / 'rm'}", *SHORT, *extra, check=check)


def test_tp2_step_equals_tp1_and_resume_is_exact(inits, tmp_path):
    _ppo(inits, tmp_path / "tp1", "parallel.tp=1", "train.max_steps=3")
    _ppo(inits, tmp_path / "tp2", "parallel.tp=2", "train.max_steps=3")
    # ppo.compile_decode: the decode step compiled by torch.compile, the same run to rounding
    _ppo(inits, tmp_path / "compiled", "parallel.tp=1", "train.max_steps=3", "ppo.compile_decode=true")
    for layout in ("tp2", "compiled"):
        for key in COMPARED:
            assert metrics(tmp_path / layout, key) == pytest.approx(metrics(tmp_path / "tp1", key), rel=1e-4,
                                                                    abs=1e-6), (layout, key)
    assert max(metrics(tmp_path / "compiled", "logprob_gap")) < 1e-4  # the compiled sampler vs the scoring pass
    # stop after 2 iterations, resume for the 3rd: identical to the uninterrupted run, bit for bit
    # (with the frozen models offloaded between phases: a no-op move on CPU, but the code path runs;
    # and with static rollout micro-batches where tp1 used continuous batching: the same tokens)
    # ppo.policy_init names an SFT run directory, whose newest checkpoint is the reference model: when
    # that run saves a newer one before the resume (here: another policy), the resumed run keeps the
    # reference it started from (it took the new one, silently)
    static = ["ppo.offload_frozen=true", "ppo.continuous_batching=false"]
    sft_run = tmp_path / "sft-run"
    shutil.copytree(inits / "sft", sft_run)
    _ppo(inits, tmp_path / "resumed", "parallel.tp=1", "train.max_steps=2", *static, f"ppo.policy_init={sft_run}")
    shutil.copytree(tmp_path / "resumed" / "checkpoints" / "iter_0000002", sft_run / "checkpoints" / "iter_0000002")
    proc = _ppo(inits, tmp_path / "resumed", "parallel.tp=1", "train.max_steps=3", *static, f"ppo.policy_init={sft_run}")
    assert "resumed from" in proc.stderr
    assert f"ppo.policy_init: {sft_run} now resolves to {sft_run / 'checkpoints' / 'iter_0000002'}; a resumed run " \
           f"keeps the checkpoint it started from ({sft_run / 'checkpoints' / 'iter_0000001'})" in proc.stderr
    assert proc.stderr.count("now resolves to") == 1  # rank 0 only
    for key in COMPARED + ["kl_coef", "lr", "value_lr"]:
        assert metrics(tmp_path / "resumed", key) == metrics(tmp_path / "tp1", key), key
    rows = [json.loads(x) for x in (tmp_path / "tp1" / "metrics.jsonl").read_text().splitlines()]
    expected = {"step", "score", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "policy_loss", "value_loss",
                "explained_var", "response_len", "eod_rate", "time_generate", "time_score", "time_train",
                "tokens_per_s", "slot_utilisation", "logprob_gap", "policy_ratio_first"}
    assert expected <= set(rows[1]), expected - set(rows[1])
    # one set of log-probs: the sampler's agree with the scoring pass's; the first ratio pi/pi_old is 1
    assert all(r["logprob_gap"] < 1e-4 for r in rows[1:]), [r["logprob_gap"] for r in rows[1:]]
    assert all(abs(r["policy_ratio_first"] - 1) < 1e-4 for r in rows[1:])
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["slot_utilisation"] <= 1 for r in rows[1:] + resumed[1:])
    # ppo.recompute_logprobs=false skips the policy's scoring forward: the same run up to that rounding
    _ppo(inits, tmp_path / "sampler-lp", "parallel.tp=1", "train.max_steps=3", "ppo.recompute_logprobs=false")
    for key in COMPARED:
        if key != "entropy":  # estimated from the sampled tokens' log-probs then
            assert metrics(tmp_path / "sampler-lp", key) == pytest.approx(metrics(tmp_path / "tp1", key), rel=1e-3,
                                                                          abs=1e-4), key
    assert "logprob_gap" not in json.loads((tmp_path / "sampler-lp" / "metrics.jsonl").read_text().splitlines()[1])
    samples = (tmp_path / "tp1" / "samples.jsonl").read_text().splitlines()
    assert {"step", "prompt", "response", "score"} <= set(json.loads(samples[0]))


def _lr(k: int, peak: float = 5e-4, floor: float = 5e-5, warmup: int = 2, decay: int = 10) -> float:
    """The tiny recipe's cosine schedule at PPO iteration k, written out: megatron's rate at step k - 1,
    the warm-up from peak / (warmup + 1) (iteration 1 is not at rate 0, iteration warmup + 1 is the peak)."""
    if k <= warmup + 1:
        return peak * k / (warmup + 1)
    return floor + (peak - floor) * 0.5 * (math.cos(math.pi * (k - 1 - warmup) / (decay - warmup)) + 1)


def test_pp2_and_dp2_equal_one_process_with_schedules_in_iterations(inits, tmp_path):
    """PP=2 and DP=2 reproduce the one-process iterations (1e-5 relative). Sampling is made
    layout-independent with top_k=1 (the sampler's generator is per DP rank); the policy and value
    mini-batches are the same global rows at any DP size (update.minibatch_rows)."""
    same = ["ppo.top_k=1", "ppo.temperature=0.7", "ppo.train_micro_batch=2", "train.max_steps=3", "parallel.tp=1"]
    _ppo(inits, tmp_path / "one", *same)
    # profiled at iteration 2 (logging.profile_step): the numbers stay those of the run without it
    _ppo(inits, tmp_path / "pp2", *same, "parallel.pp=2", "logging.profile_step=2", "checkpoint.interval=2")
    # row groups in flight across the two stages, refilled from the iteration's queue (16 rollouts, 8 rows)
    _ppo(inits, tmp_path / "pp2pipe", *same, "parallel.pp=2", "ppo.pipelined_decode=true")
    _ppo(inits, tmp_path / "dp2", *same, "parallel.dp=2")
    # ZeRO (the Alfred recipe's parallel.zero): two distributed optimizers in one checkpoint, saved after
    # iteration 2 and resumed for the 3rd (their state keys once collided: no PPO checkpoint could be saved)
    zero = [*same, "parallel.dp=2", "parallel.zero=true"]
    _ppo(inits, tmp_path / "dp2zero", *[o for o in zero if o != "train.max_steps=3"], "train.max_steps=2")
    assert "resumed from" in _ppo(inits, tmp_path / "dp2zero", *zero).stderr
    one = tmp_path / "one"
    for layout in ("pp2", "pp2pipe", "dp2", "dp2zero"):
        for key in COMPARED + ["eval_score", "eval_kl", "approx_kl", "lr", "value_lr"]:
            ours = metrics(tmp_path / layout, key)
            if layout == "dp2zero" and key.startswith("eval_"):  # the 2-iteration run also evaluated at its end
                ours = ours[:1] + ours[-1:]
            assert ours == pytest.approx(metrics(one, key), rel=1e-5, abs=1e-7), (layout, key)
    # a resume may change the layout (a 16-node job resumed on 8): iteration 3 from the dp2zero run's
    # checkpoint at DP=1 (ZeRO states reshard across DP), from the pp2 run's at TP=2 (plain ones across TP/PP)
    for saved, layout, moved in (("dp2zero", ["parallel.zero=true"], "dp 2 -> 1"),
                                 ("pp2", ["parallel.tp=2"], "tp 1 -> 2, pp 2 -> 1")):
        moved_dir = tmp_path / f"{saved}-moved"
        shutil.copytree(tmp_path / saved / "checkpoints" / "iter_0000002", moved_dir / "checkpoints" / "iter_0000002")
        assert f"resumed at another layout ({moved})" in _ppo(inits, moved_dir, *same, *layout).stderr
        for key in COMPARED + ["approx_kl", "kl_coef", "lr", "value_lr"]:
            assert metrics(moved_dir, key) == pytest.approx(metrics(one, key)[2:], rel=1e-5, abs=1e-7), (saved, key)
    # both schedules count PPO iterations (4 value steps per iteration): the value rate equals the policy's
    assert metrics(one, "lr") == pytest.approx([_lr(k) for k in (1, 2, 3)], rel=1e-6)
    assert metrics(one, "value_lr") == metrics(one, "lr")
    # the update's first step scores the log-probs the rollouts were scored with (temperature 0.7 in both)
    assert max(abs(x) for x in metrics(one, "approx_kl")) < 1e-6 and set(metrics(one, "clipfrac")) == {0.0}
    assert all(rate < 1 for rate in metrics(one, "eod_rate"))  # responses cut at max length: EOD appended to score
    assert len(metrics(one, "eval_score")) == 2 and metrics(one, "prompts_cut") == [0.0] * 3
    # each stage rank wrote a trace and a top-ops table of each phase of iteration 2, and nothing else
    profile = tmp_path / "pp2" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == sorted(
        f"step2_{phase}_rank{rank}.{ext}" for phase in ("generate", "score", "train") for rank in (0, 1)
        for ext in ("json", "txt"))
    train = (profile / "step2_train_rank1.txt").read_text()
    assert train.startswith("step 2, phase train, rank 1: ") and "aten::mm" in train  # the output layer's GEMMs
    assert json.loads((profile / "step2_generate_rank0.json").read_text())["traceEvents"]


def test_warnings_print_once_at_tp2(inits, tmp_path):
    """Every rank reads the prompts and the schedule alike: the launcher and rank 1 leave their
    warnings to rank 0 (the Alfred job printed each 128 times)."""
    proc = _ppo(inits, tmp_path / "run", "parallel.tp=2", "train.max_steps=1", "ppo.max_prompt_tokens=12",
                "optim.decay_steps=1", "ppo.eval_prompts=0")
    for warning in ("training prompts are longer than ppo.max_prompt_tokens (12)",
                    "optim.warmup_steps 2 cut to 0: the decay ends at step 1"):
        assert proc.stderr.count(warning) == 1, proc.stderr[-3000:]
    assert metrics(tmp_path / "run", "prompts_cut")[0] > 0


def test_a_resumed_schedule_change_is_one_warning_naming_each_model(inits, tmp_path):
    """It was two lines, the same words, one per model and neither named."""
    extend = ["parallel.tp=1", "optim.decay_steps=null", "optim.warmup_steps=0", "ppo.eval_prompts=0"]
    _ppo(inits, tmp_path / "run", *extend, "train.max_steps=1", "checkpoint.interval=1")
    proc = _ppo(inits, tmp_path / "run", *extend, "train.max_steps=2")
    said = [line for line in proc.stderr.splitlines() if "learning-rate schedule follows" in line]
    assert len(said) == 1 and said[0].endswith(
        "resume: the learning-rate schedule follows this config, not the checkpoint's "
        "(policy: lr_decay_steps 1 -> 2; value: lr_decay_steps 1 -> 2)"), said


def test_non_finite_updates_stop_the_run(tmp_path):
    _worker(tmp_path / "init", "nan-reward")
    proc = _ppo(tmp_path / "init", tmp_path / "run", "parallel.tp=1", "train.max_steps=5", "train.max_bad_steps=2",
                check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 PPO iterations in a row had a non-finite loss or gradient (train.max_bad_steps=2)" in proc.stderr
    assert proc.stderr.count("PPO iteration 1: update skipped") == 1 and "Traceback" not in proc.stderr
    # every optimizer step of the iteration is skipped: 1 policy step + 4 value steps (SHORT)
    assert metrics(tmp_path / "run", "skipped_updates")[:2] == [5, 5]


def test_demo_pipeline_learns(demo_quick):
    summary = json.loads((demo_quick / "summary.json").read_text())
    assert summary["rm_valid_accuracy"] > 0.8, summary
    assert summary["eval_score_after"] > summary["eval_score_before"] + 0.2, summary
    assert summary["eval_kl_after"] < 10.0, summary
