"""`alfred-train eval`: one of our checkpoints on lm-evaluation-harness tasks, as the Alfred card did.

    alfred-train eval CKPT --tasks NAME_OR_YAML [NAME_OR_YAML ...] [--limit N] [--output FILE]
                      [--num-fewshot K] [--batch-size B] [--device D]
                      [--hf-dir DIR] [--samples]

How: the checkpoint (saved at any TP/PP) is exported to a Hugging Face directory by `convert
mcore-to-hf` (a temporary one beside the output, or --hf-dir to keep it), and lm-eval's own
Hugging Face model class (HFLM) runs the tasks on it. The harness's tokenization, batching and
metrics are used unchanged, so the numbers compare with published lm-eval numbers.

A task is a name from lm-eval's registry or a task YAML file (its `task:` name is registered from
the file's folder). When every task is a YAML file the run is offline (HF_DATASETS_OFFLINE,
HF_HUB_OFFLINE, ...): the file must point at local data, e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: {test: /path/data.jsonl}}`, and nothing is downloaded.

Output: lm-eval's results table on stdout, and JSON (results, versions, n-shot, task configs, the
checkpoint it came from; per-example samples with --samples) at --output, by default
RUN_DIR/eval/<iter_N>.json. `ppo.eval_tasks` runs this on the final PPO checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from alfred_train.atomic import check_writable, write_text
from alfred_train.errors import AlfredError, ConfigError
from alfred_train.eval_tasks import check_task_names, check_tasks, is_task_file, split_tasks

log = logging.getLogger("alfred_train")
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1"}


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint with lm-evaluation-harness tasks")
    p.add_argument("ckpt", help="a checkpoint dir, a checkpoints/ root or a run dir (uses latest)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="NAME_OR_YAML",
                   help="lm-eval task names and/or task YAML files (comma-separated lists work too)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--output", default=None, help="results JSON (default: RUN_DIR/eval/<iter>.json)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--hf-dir", default=None, help="keep the Hugging Face export here (reused if it exists)")
    p.add_argument("--samples", action="store_true", help="also write every example's inputs and scores")
    p.set_defaults(func=run_eval)


# ---------------------------------------------------------------------------------------------
# The command.

def default_output(ckpt: Path) -> Path:
    """RUN_DIR/eval/<iter_N>.json: RUN_DIR/checkpoints/iter_N -> RUN_DIR, OUT/iter_N (convert) -> OUT
    (of the resolved path: `eval .` inside iter_N wrote iter_N/eval/.json)."""
    ckpt = ckpt.resolve()
    root = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return root / "eval" / f"{ckpt.name}.json"


def check_output(output: Path, key: str = "--output") -> None:
    """The results file can be written: found after the export and the whole evaluation, it was a
    traceback (a directory, a parent that is a file) with a temporary file left behind."""
    check_writable(output, key, ".json file")


def check_device(device: str | None) -> None:
    import torch

    if device and not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device {device}: lm-eval runs on cuda (cuda:N) or cpu; name one or leave it out")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible here; use --device cpu or leave it out")


def check_language_model(ckpt: Path) -> None:
    from alfred_train.models.from_checkpoint import load_meta

    models = load_meta(ckpt)[1].get("models", [])
    if "policy" not in models:
        raise ConfigError(f"{ckpt}: holds {models}; lm-eval scores a language model (the 'policy' of an SFT "
                          "or PPO run, or of a converted LM checkpoint)")


def run_eval(args: argparse.Namespace) -> int:
    """Every check (tasks and their data, checkpoint, outputs, device) before the export."""
    from alfred_train import checkpoint
    from alfred_train.convert.hf_export import checkpoint_source
    from alfred_train.convert.hf_output import output_problem
    from alfred_train.parallel.init import detect_launch_env

    if detect_launch_env().world_size != 1:
        raise ConfigError("eval runs as one process; start it without torchrun/srun")
    if args.hf_dir and (problem := output_problem(Path(args.hf_dir))):
        raise ConfigError(f"--hf-dir: {problem}")
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: must be >= {least}")
    check_device(args.device)
    offline = all(is_task_file(t) for t in split_tasks(args.tasks))
    if offline:
        os.environ.update(OFFLINE_ENV)  # before lm-eval/datasets read them
    check_tasks(args.tasks)
    ckpt = checkpoint.resolve_checkpoint(args.ckpt)
    check_language_model(ckpt)
    output = Path(args.output) if args.output else default_output(ckpt)
    check_output(output)
    names, manager = check_task_names(args.tasks, "--tasks")  # before the export

    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
        if exported_from(hf_dir) != checkpoint_source(ckpt):  # another checkpoint's export is replaced, not scored
            export_hf(ckpt, hf_dir)
        results = run_harness(hf_dir, names, manager, args)
    else:
        with tempfile.TemporaryDirectory(prefix=".hf-export-", dir=output.parent) as tmp:
            export_hf(ckpt, Path(tmp))
            results = run_harness(Path(tmp), names, manager, args)
    results["alfred_train"] = {"checkpoint": str(ckpt.resolve()), "model": "policy",
                               "tasks": split_tasks(args.tasks), "limit": args.limit, "offline": offline}
    write_json(results, output)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"eval: {ckpt} on {', '.join(names)} -> {output}", flush=True)
    return 0


def exported_from(hf_dir: Path) -> dict | None:
    """The checkpoint (`hf_export.checkpoint_source`) an export in `hf_dir` holds the policy of, as
    lm-eval loads it (merged when it is a LoRA policy); None for anything else."""
    from alfred_train.convert.hf_output import is_whole, read_record

    record = read_record(hf_dir) or {}
    if record.get("by") != "mcore-to-hf" or record.get("model") != "policy" or record.get("lora") == "adapter":
        return None
    if not is_whole(hf_dir):  # a file deleted or cut short since: exported again
        return None
    return {k: record.get(k) for k in ("checkpoint", "manifest_sha256")}


def export_hf(ckpt: Path, hf_dir: Path) -> None:
    """`convert mcore-to-hf` in this process (TP=1/PP=1, resharded on load), then free the runtime.
    A LoRA policy is exported merged: lm-eval loads the directory's weights, and its adapters beside
    them (adapter/) were never read, so the base model was scored in the trained policy's name."""
    from alfred_train.convert.hf_export import mcore_to_hf
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown

    runtime = init_runtime(ParallelDims(1, 1, 1))
    try:
        mcore_to_hf(ckpt, hf_dir, runtime, model="policy", merge_lora=True)
    finally:
        shutdown()


def run_harness(hf_dir: Path, names: list[str], manager, args) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _git_hash  # its own let git's "fatal: not a git repository" through
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=str(hf_dir), device=device, batch_size=args.batch_size, dtype="auto")
    try:
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                                  num_fewshot=args.num_fewshot, log_samples=args.samples, bootstrap_iters=1000)
    except Exception as err:  # what the checks cannot see: a hub dataset out of reach, a task's own code
        log.debug("lm-eval failed", exc_info=True)
        first = " ".join(str(err).split())[:300] or "no message"
        raise AlfredError(f"lm-eval failed on {', '.join(names)}: {type(err).__name__}: {first} (a hub dataset needs "
                          "network access; task YAML files with local data run offline)") from None
    if results is None:  # lm-eval returns None on non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    for key in ("pretty_env_info",):  # bulky machine dump; lm-eval versions stay
        results.pop(key, None)
    return results


def _git_hash() -> str | None:
    """What lm-eval records as results["git_hash"] (`git describe` of the working directory), asked
    quietly: outside a repository git printed "fatal: not a git repository" into every eval."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).decode().strip()
    except (subprocess.CalledProcessError, OSError):
        return None


def write_json(results: dict, output: Path) -> None:
    """Atomically: a reader never sees half a file."""
    from lm_eval.utils import handle_non_serializable

    write_text(output, json.dumps(results, indent=2, default=handle_non_serializable))


# ---------------------------------------------------------------------------------------------
# At the end of a PPO run (ppo.eval_tasks).

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID")


def evaluate_after_training(cfg, run_dir: Path, runtime) -> int:
    """ppo.eval_tasks: rank 0 runs `alfred-train eval` on the run's final checkpoint in a fresh
    process (one process, its own HF export); the other ranks return at once. A failed evaluation
    is reported, never turned into a failed training run: the checkpoint is there to evaluate again.
    Returns the eval command's exit code (0 on other ranks and without tasks)."""
    tasks = cfg.ppo.eval_tasks
    if not tasks or not runtime.is_main:
        return 0
    argv = [sys.executable, "-m", "alfred_train", "eval", str(Path(run_dir) / "checkpoints"), "--tasks", *tasks]
    if cfg.ppo.eval_limit is not None:
        argv += ["--limit", str(cfg.ppo.eval_limit)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    log.info("ppo.eval_tasks: %s", " ".join(argv[2:]))
    code = subprocess.run(argv, env=env).returncode
    if code != 0:
        log.error("ppo.eval_tasks: evaluation exited %d; the final checkpoint is saved, rerun it with: "
                  "alfred-train %s", code, " ".join(argv[3:]))
    return code
