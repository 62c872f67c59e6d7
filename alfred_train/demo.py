"""The whole RLHF pipeline on the synthetic task, on CPU: SFT -> reward model -> PPO.

    python -m alfred_train.demo [--out runs/demo] [--quick] [overrides applied to every stage]

Each stage is the real `alfred-train` command with its tiny recipe (configs/tiny-*.yaml, TP=2
across 2 processes); the stages hand over through their run directories. At the end it prints
what a user checks: the reward model's held-out accuracy, and the held-out mean RM score, KL to
the SFT model and the ground-truth property (share of cheerful words) before and after PPO.
`--quick` shortens every stage (for the test suite).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from alfred_train.config import default_config_path

QUICK = {
    "sft": ["train.max_steps=40", "checkpoint.interval=0", "train.eval_interval=0"],
    "rm": ["train.max_steps=30", "checkpoint.interval=0", "train.eval_interval=0"],
    "ppo": ["train.max_steps=12", "checkpoint.interval=0", "ppo.eval_prompts=32", "train.eval_interval=0"],
}


def _last(run_dir: Path, key: str):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _first(run_dir: Path, key: str):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    return values[0] if values else None


def run_pipeline(out: Path, quick: bool, extra: list[str]) -> dict:
    configs = default_config_path().parent
    dirs = {stage: out / stage for stage in ("sft", "rm", "ppo")}
    stage_overrides = {
        "sft": [f"run.dir={dirs['sft']}"],
        "rm": [f"run.dir={dirs['rm']}", f"rm.init={dirs['sft']}"],
        "ppo": [f"run.dir={dirs['ppo']}", f"ppo.policy_init={dirs['sft']}", f"ppo.reward_init={dirs['rm']}"],
    }
    for stage in ("sft", "rm", "ppo"):
        if (dirs[stage] / "config.yaml").exists():  # an earlier demo's run: each stage starts over
            print(f"== {stage}: removing the earlier run in {dirs[stage]}", flush=True)
            shutil.rmtree(dirs[stage])
        args = [sys.executable, "-m", "alfred_train", stage, str(configs / f"tiny-{stage}.yaml"),
                *stage_overrides[stage], "checkpoint.resume=none", *(QUICK[stage] if quick else []), *extra]
        print(f"== {stage}: {' '.join(args[3:])}", flush=True)
        code = subprocess.call(args)
        if code != 0:
            raise SystemExit(code)
    return {
        "rm_valid_accuracy": _last(dirs["rm"], "valid_accuracy"),
        "eval_score_before": _first(dirs["ppo"], "eval_score"),
        "eval_score_after": _last(dirs["ppo"], "eval_score"),
        "eval_kl_after": _last(dirs["ppo"], "eval_kl"),
        "eval_property_before": _first(dirs["ppo"], "eval_property"),
        "eval_property_after": _last(dirs["ppo"], "eval_property"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="directory for the three run directories")
    parser.add_argument("--quick", action="store_true", help="shortened stages (tests)")
    parser.add_argument("overrides", nargs="*", help="key.path=value applied to every stage")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = run_pipeline(out, args.quick, args.overrides)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print("\n".join([
        "",
        f"reward model, held-out pairwise accuracy : {result['rm_valid_accuracy']:.3f}",
        f"PPO, held-out mean RM score              : {result['eval_score_before']:+.3f} -> {result['eval_score_after']:+.3f}",
        f"PPO, held-out KL(policy || SFT) per reply: {result['eval_kl_after']:.3f} nats",
        f"ground truth, share of cheerful words    : {result['eval_property_before']:.3f} -> {result['eval_property_after']:.3f}",
        f"runs: {out}/sft, {out}/rm, {out}/ppo (metrics.jsonl, tb/, ppo/ppo.png, ppo/samples.jsonl)",
    ]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
