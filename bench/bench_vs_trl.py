"""One PPO iteration, ours vs TRL 1.12's PPOTrainer, on TRL's tiny reference shapes, CPU.

    python bench/bench_vs_trl.py --trl-python /path/to/peer-trl-venv/bin/python [--rounds 2] [--threads 2]

TRL runs ../shared/peers/trl_ppo_tiny.py in its own virtualenv (see ../shared/peers/README.md). Ours
runs in a fresh process of this script (`--ours`), the same shape (Llama, 4 layers, hidden 128, 4
heads / 4 KV heads, ffn 344, vocab 512, fp32, one process), 16 rollouts of exactly P prompt and R
response tokens (min = max new tokens), random prompts, rollout/train micro-batch 16, one policy
and one value step per iteration: the PPO stage's own phase functions (generate_rollouts ->
score_rollouts -> compute_advantages -> policy step -> value step), models seeded, not loaded.
Each variant runs in its own process (in one process, the "before" variant's allocations slowed
"ours" by ~15%):

    before   megatron's forward + its StaticInferenceContext, the CPU adapter's mode on every call,
             the scoring pass recomputes the policy's log-probs, and scores through megatron's
             forward-only schedule (the loop before issue 10)
    ours     the fast decoder (`stage_decoder.StageDecoder`), the sampler's log-probs
             (ppo.recompute_logprobs=false), scoring by `StageDecoder.score`
    compiled ours with the decode step compiled by torch.compile (ppo.compile_decode=true; compiled
             in the warm-up iteration, which is not timed)

TRL, ours and compiled alternate (--rounds times per shape), then "before" runs once; medians over iterations
after the first, pooled over the rounds. A last line gives compiled/TRL per round (each round's own medians):
the spread behind the pooled ratio.
On a shared machine, --clock cpu --threads 1 times each side by its process CPU time (TRL: its own
script, unmodified, with time.perf_counter made time.process_time), which time-slicing does not inflate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRL_SCRIPT = ROOT.parent / "shared" / "peers" / "trl_ppo_tiny.py"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def ours(prompt_len: int, response_len: int, iters: int, threads: int, clock: str = "wall",
         variant: str = "ours") -> dict:
    """Our iterations of `variant` in this process: {phase: [seconds per iteration]}."""
    warnings.filterwarnings("ignore")
    import bench_vs_hf

    from alfred_train.config import load_config
    from alfred_train.parallel import cpu as cpu_adapter
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown
    from alfred_train.ppo import generation
    from alfred_train.ppo import math as ppo_math
    from alfred_train.ppo.experience import compute_advantages, generate_rollouts, score_rollouts
    from alfred_train.ppo.update import policy_forward_step, value_forward_step
    from alfred_train.stages import common
    from alfred_train.stages.ppo import _update, build_models

    n = response_len
    cfg = load_config(ROOT / "configs" / "tiny-ppo.yaml", [
        "parallel.tp=1", "ppo.rollouts_per_iter=16", "ppo.rollout_micro_batch=16", "ppo.train_micro_batch=16",
        "ppo.policy_steps_per_epoch=1", "ppo.value_steps_per_epoch=1", f"ppo.max_new_tokens={n}",
        f"ppo.min_new_tokens={n}", f"train.max_steps={iters + 1}"])
    runtime = init_runtime(ParallelDims(1, 1, 1))
    seed_everything(0, runtime)
    torch.set_num_threads(threads)
    shape = bench_vs_hf.trl_shape(prompt_len + response_len)
    policy, value, models = build_models(cfg, runtime, shape, common.attention_backend(cfg, runtime))
    o = cfg.ppo
    params = generation.SamplingParams.from_ppo(o)
    gen = torch.Generator().manual_seed(0)
    kl_fn = ppo_math.kl_estimator(o.kl_estimator)
    times: dict = {}
    real_choose, real_suspended, real_fast = generation.choose_decoder, cpu_adapter.suspended, generation._fast_scoring
    now = CLOCKS[clock]
    for it in range(iters + 1):
        if variant == "before":
            generation.choose_decoder = lambda model, rt, compiled: generation.MegatronKVCache
            cpu_adapter.suspended = contextlib.nullcontext
            generation._fast_scoring = lambda chunks, rt: False  # megatron's forward-only schedule scores
        prompts = torch.randint(3, shape.vocab_size, (16, prompt_len), generator=gen).tolist()
        t0 = now()
        rollout, _ = generate_rollouts(models.policy, runtime, prompts, params, micro_batch=16, eod_id=2, pad_id=0,
                                       vocab_size=shape.vocab_size, seed=it, compiled=variant == "compiled")
        t1 = now()
        generation.choose_decoder, cpu_adapter.suspended = real_choose, real_suspended
        rollout, _ = score_rollouts(models, runtime, rollout, micro_batch=16, vocab_size=shape.vocab_size,
                                    eod_id=2, pad_id=0, recompute_logprobs=variant == "before")
        rollout, _ = compute_advantages(rollout, kl_estimator=kl_fn, beta=0.01, gamma=1.0, lam=0.95,
                                        whiten_rewards=False, whiten_advantages=True, dp_group=runtime.dp_group)
        t2 = now()
        _update(policy, rollout, 1, 1, 16, policy_forward_step(runtime, clip=0.2, vocab_size=shape.vocab_size), seed=it, first_row=0)
        _update(value, rollout, 1, 1, 16, value_forward_step(runtime, clip=0.2), seed=it, first_row=0)
        generation._fast_scoring = real_fast
        t3 = now()
        if it >= 1:  # the first iteration is warm-up
            for phase, t in (("generate", t1 - t0), ("score", t2 - t1), ("train", t3 - t2), ("total", t3 - t0)):
                times.setdefault(phase, []).append(t)
    shutdown()
    return times


def run_trl(trl_python: str, prompt_len: int, response_len: int, iters: int, threads: int, clock: str) -> dict:
    # --clock cpu: TRL's own script, unmodified, with its clock (time.perf_counter) made the process's CPU time
    wrapper = ("import runpy, sys, time; clock = sys.argv.pop(1); sys.argv = sys.argv[1:]; "
               "time.perf_counter = time.process_time if clock == 'cpu' else time.perf_counter; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([trl_python, "-c", wrapper, clock, str(TRL_SCRIPT), "--layers", "4", "--hidden", "128", "--heads", "4",
                          "--kv-heads", "4", "--ffn", "344", "--vocab", "512", "--prompt-len", str(prompt_len),
                          "--response-len", str(response_len), "--rollouts-per-iter", "16", "--iters", str(iters),
                          "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    iters_s = [float(x) for x in re.search(r"per-iter seconds: (.*)", out).group(1).split(", ")]
    gen = float(re.search(r"generation phase: ([\d.]+)", out).group(1))
    gc = float(re.search(r"gc.collect\(\): ([\d.]+)", out).group(1))
    return {"total": iters_s, "generate": [gen], "gc": [gc]}


def run_ours(prompt_len, response_len, iters, threads, clock, variant) -> dict:
    out = subprocess.run([sys.executable, __file__, "--ours", str(prompt_len), str(response_len), str(iters),
                          str(threads), clock, variant], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", required=True, help="python of a virtualenv with trl==1.12.0")
    parser.add_argument("--shapes", default="64+64,128+128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: each side's process CPU time (robust on a shared machine, with --threads 1)")
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} cores visible, threads={args.threads}, clock={args.clock}, "
          f"torch {torch.__version__}; "
          f"TRL, ours and compiled alternate {args.rounds}x per shape; medians over iterations after the first")
    head = (f"{'P+R':<9}{'TRL s':>7}{'TRL gen':>9}{'TRL gc':>8}{'before s':>10}{'ours s':>8}{'ours/TRL':>10}"
            f"{'compiled s':>12}{'compiled/TRL':>14}  generate / score / train: ours; compiled; before")
    rows = []
    for shape in args.shapes.split(","):
        p, r = (int(x) for x in shape.split("+"))
        trl, mine = {}, {"before": {}, "ours": {}, "compiled": {}}
        rounds = []  # compiled / TRL of each round's own medians: the spread behind the pooled figure
        for _ in range(args.rounds):
            trl_round = run_trl(args.trl_python, p, r, args.iters, args.threads, args.clock)
            for k, v in trl_round.items():
                trl.setdefault(k, []).extend(v)
            for variant in ("ours", "compiled"):
                mine_round = run_ours(p, r, args.iters, args.threads, args.clock, variant)
                for k, v in mine_round.items():
                    mine[variant].setdefault(k, []).extend(v)
            rounds.append(statistics.median(mine_round["total"]) / statistics.median(trl_round["total"]))
        mine["before"] = run_ours(p, r, args.iters, args.threads, args.clock, "before")
        rows.append((shape, trl, mine, rounds))
    print(head)
    print("-" * len(head))
    med = statistics.median
    for shape, trl, mine, rounds in rows:
        o, c, b = mine["ours"], mine["compiled"], mine["before"]
        split = "; ".join(" / ".join(f"{med(x[k]):.3f}" for k in ("generate", "score", "train")) for x in (o, c, b))
        print(f"{shape:<9}{med(trl['total']):>7.3f}{med(trl['generate']):>9.3f}{med(trl['gc']):>8.3f}"
              f"{med(b['total']):>10.3f}{med(o['total']):>8.3f}{med(o['total']) / med(trl['total']):>9.2f}x"
              f"{med(c['total']):>12.3f}{med(c['total']) / med(trl['total']):>13.2f}x  {split}")
    print("compiled/TRL per round (each round's own medians): "
          + "; ".join(f"{shape}: " + ", ".join(f"{x:.2f}x" for x in rounds) for shape, _, _, rounds in rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ours"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        result = ours(*(int(x) for x in sys.argv[2:6]), clock=sys.argv[6], variant=sys.argv[7])
        print(json.dumps(result))
    else:
        main()
