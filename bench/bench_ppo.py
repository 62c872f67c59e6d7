"""One PPO iteration's time split (generate / score / train) on the tiny PPO recipe, CPU.

    python bench/bench_ppo.py [--iters 4] [parallel.tp=2 ...]
    python bench/bench_ppo.py [ppo overrides ...] --model model.num_layers=8 model.hidden_size=2048 ...
    python bench/bench_ppo.py ... --then ppo.recompute_logprobs=false   # a second PPO run, same SFT and RM
    python bench/bench_ppo.py ... logging.profile_step=4   # also print rank 0's top ops of each phase at step 4

Runs the real stages: a short SFT and RM to initialize from, then `alfred-train ppo` for a few
iterations, and prints a table from metrics.jsonl (the first iteration is warm-up and left out
of the medians). Rollout tokens/s with the KV cache vs full re-forward is bench_generation.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()


def cli(*args: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] alfred-train {args[0]}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "alfred_train", *args, "logging.tensorboard=false",
                           "logging.plots=false", "checkpoint.interval=0"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"alfred-train {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--model", nargs="*", default=[],
                        help="model.* overrides for the SFT, RM and PPO runs alike (the shape they share)")
    parser.add_argument("--then", nargs="*", default=None,
                        help="a second PPO run from the same SFT and RM, with these overrides added")
    parser.add_argument("overrides", nargs="*", help="overrides of the PPO run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cli("sft", "configs/tiny-sft.yaml", f"run.dir={out / 'sft'}", "train.max_steps=10", "parallel.tp=1",
            *args.model)
        cli("rm", "configs/tiny-rm.yaml", f"run.dir={out / 'rm'}", f"rm.init={out / 'sft'}", "train.max_steps=5",
            "parallel.tp=1", *args.model)
        runs = [args.overrides] + ([args.overrides + args.then] if args.then is not None else [])
        for i, overrides in enumerate(runs):
            run_dir = out / f"ppo{i}"
            cli("ppo", "configs/tiny-ppo.yaml", f"run.dir={run_dir}", f"ppo.policy_init={out / 'sft'}",
                f"ppo.reward_init={out / 'rm'}", f"train.max_steps={args.iters}", "train.eval_interval=0",
                "ppo.eval_prompts=0", *args.model, *overrides)
            report([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()],
                   " ".join(args.model + overrides) or "tiny-ppo.yaml as is")
            for table in sorted((run_dir / "profile").glob("*_rank0.txt")):  # logging.profile_step=N
                print(table.read_text(), flush=True)
    return 0


def report(rows: list[dict], label: str) -> None:
    """The phase table of one PPO run's metrics.jsonl (the first iteration left out)."""
    rows = [r for r in rows if "time_generate" in r][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("time_generate", "time_score", "time_train",
                                                               "tokens_per_s", "response_len")}
    total = med["time_generate"] + med["time_score"] + med["time_train"]
    print(f"PPO iteration on the tiny recipe ({label}), median of {len(rows)} iterations")
    print(f"{'phase':<10}{'seconds':>10}{'share':>8}")
    for phase in ("generate", "score", "train"):
        t = med[f"time_{phase}"]
        print(f"{phase:<10}{t:>10.3f}{t / total:>8.0%}")
    print(f"{'total':<10}{total:>10.3f}   rollout tokens/s {med['tokens_per_s']:.0f}, "
          f"mean response {med['response_len']:.1f} tokens")
    extra = [f"{key} {statistics.median(r[key] for r in rows):.3g}" for key in ("logprob_gap", "policy_ratio_first",
                                                                               "slot_utilisation")
             if all(key in r for r in rows)]
    if extra:  # one set of log-probs: the sampler's vs the scoring pass's, and the first mini-batch's ratio
        print("median " + ", ".join(extra), flush=True)


if __name__ == "__main__":
    sys.exit(main())
