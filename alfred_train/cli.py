"""`alfred-train`: parse, dispatch to a stage, map errors to exit codes.

    alfred-train sft|rm|ppo [CONFIG.yaml] [key.path=value ...] [--dry-run]
    alfred-train launch CONFIG.yaml --backend slurm|sagemaker|local [--dry-run] [overrides]
    alfred-train jobs status|logs|cancel JOB --backend slurm|sagemaker
    alfred-train convert hf-to-mcore|mcore-to-hf|apply-delta ...
    alfred-train generate CKPT_DIR --prompts FILE.jsonl --output OUT.jsonl
    alfred-train data inspect FILE [--format F] [--template T]
    alfred-train eval CKPT --tasks NAMES_OR_YAML_FILES [--limit N] [--output FILE]

Exit codes: 0 done, 2 bad configuration or input, 3 preempted after a checkpoint, 1 anything else.
Without CONFIG a stage runs its embedded tiny recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from alfred_train.errors import AlfredError, ConfigError

STAGES = ("sft", "rm", "ppo")


def _quiet_third_party() -> None:
    for pattern in ("Apex is not installed", ".*Transformer Engine.*", ".*torch.distributed.*",
                    ".*is deprecated.*", ".*TypedStorage.*", ".*FutureWarning.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


class _RankZeroSpeaks(logging.Filter):
    """On ranks other than 0: our warnings are about the data, the schedule, the checkpoints, which
    every rank reads alike, so rank 0's copy is the one shown (the Alfred job would print each 128
    times). A warning that is this rank's own passes with extra={"rank_local": True}; errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "rank_local", False)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if rank != 0:
        logging.getLogger("alfred_train").addFilter(_RankZeroSpeaks())
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alfred-train", description="RLHF trainer for Llama/Falcon models on megatron-core: SFT -> RM -> PPO.",
        epilog="exit codes: 0 done, 2 bad configuration or input, 3 preempted after a checkpoint, 1 anything else")
    parser.add_argument("--version", action="version", version=f"alfred-train {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage.upper()} stage")
        p.add_argument("config", nargs="?", help="run YAML (default: the embedded tiny recipe)")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-5")
        p.add_argument("--dry-run", action="store_true",
                       help="validate, print the layout, parameter counts and memory estimate, stop")
        p.set_defaults(func=run_stage)
    for module in ("alfred_train.launch.cli", "alfred_train.convert.cli", "alfred_train.generate",
                   "alfred_train.data.inspect", "alfred_train.evaluation"):
        try:
            mod = __import__(module, fromlist=["add_commands"])
        except ImportError:
            continue
        mod.add_commands(sub)
    return parser


def package_version() -> str:
    """The installed distribution's version (setup.cfg `version`), or "unknown" when run from a bare tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alfred-train")
    except PackageNotFoundError:
        return "unknown"


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but `key=value` words after an option (`CONFIG --dry-run a.b=1`) join overrides.

    argparse stops filling a positional list once an option interrupts it; this collects the rest
    for every subcommand that has an `overrides` list (sft, rm, ppo, launch, generate).
    """
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _split_config_arg(args) -> tuple[str | None, list[str]]:
    """`alfred-train sft optim.lr=1` has no config file: the first positional is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return config, overrides


def run_stage(args) -> int:
    from alfred_train.checkpointing.site import run_dir_problem
    from alfred_train.config import default_config_path, load_config
    from alfred_train.config_checks import validate_stage
    from alfred_train.data.formats import STAGE_KINDS
    from alfred_train.data.mixture import check_formats
    from alfred_train.parallel.init import detect_launch_env
    from alfred_train.stages import inits

    config, overrides = _split_config_arg(args)
    if config is None:
        config = str(default_config_path().with_name(f"tiny-{args.command}.yaml"))
    cfg = load_config(config, overrides)
    validate_stage(cfg, args.command)
    check_formats(cfg.data, STAGE_KINDS[args.command])  # dolly cannot feed the RM: say so before any work
    if problem := run_dir_problem(Path(cfg.run.dir), profile=cfg.logging.profile_step is not None):
        raise ConfigError(problem)  # a file where run.dir/ or its profile/ goes: before the dry run or any worker
    if args.dry_run:
        from alfred_train.dryrun import describe

        print(describe(inits.pin(cfg, args.command), args.command))
        return 0
    from alfred_train.stages.checkpoint_checks import resume_of_restarted_job

    cfg = resume_of_restarted_job(cfg)
    launch = detect_launch_env()
    spawning = launch.launcher == "single" and cfg.world_size > 1
    cfg = inits.pin(cfg, args.command, say=not spawning)  # the workers say it
    if spawning:
        from alfred_train.parallel.spawn import spawn_local

        if args.command == "ppo":  # its config errors before any worker starts (each worker checks again)
            from alfred_train.ppo.checks import preflight

            ours = logging.getLogger("alfred_train")
            level = ours.level
            ours.setLevel(logging.ERROR)  # its warnings: rank 0 says them once it runs
            try:
                preflight(cfg, dry_run=False)
            finally:
                ours.setLevel(level)

        argv = [args.command, config, *overrides]
        return spawn_local(argv, cfg.world_size)
    return _run_worker(cfg, args.command)


def _run_worker(cfg, stage: str) -> int:
    import importlib

    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, seed_everything, shutdown

    from alfred_train.checkpointing.site import release_run_dirs
    from alfred_train.parallel.spawn import follow_launcher
    from alfred_train.stages.common import Preemption

    Preemption.listen()  # a scheduler's USR1/TERM during start-up is honoured at the first step boundary
    follow_launcher()  # spawned by `alfred-train` itself: TERM (save, exit) if that process dies
    p = cfg.parallel
    runtime = init_runtime(ParallelDims(p.tp, p.pp, p.dp, p.vpp), backend=p.backend)
    try:
        seed_everything(cfg.train.seed, runtime)
        module = importlib.import_module(f"alfred_train.stages.{stage}")
        return module.run(cfg, runtime)
    finally:
        release_run_dirs()
        shutdown()


def _training_worker(argv: list[str]) -> bool:
    """A stage's worker started by a launcher (ours, torchrun, srun), not the command a person typed.
    The environment is read here, not by parallel.init.detect_launch_env, which imports torch."""
    from alfred_train.parallel.spawn import LAUNCHER_PID  # the standard library only

    env = os.environ
    started = LAUNCHER_PID in env or int(env.get("WORLD_SIZE", 1)) > 1 or (
        "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1)
    return started and argv[:1] in (["sft"], ["rm"], ["ppo"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _training_worker(argv):  # before torch, the config and the inits load (seconds): a scheduler's
        from alfred_train import preemption  # USR1/TERM then is honoured at the first step, not fatal

        preemption.listen()
    _quiet_third_party()
    _setup_logging()
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parse_with_overrides(parser, argv)
    except SystemExit as done:  # --help / --version (0) or a usage error (2): argparse has printed it
        return int(done.code or 0)
    try:
        code = args.func(args)
    except AlfredError as err:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or (err.exit_code != 2 and not getattr(err, "raised_on_every_rank", False)):
            print(f"alfred-train: error: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print("alfred-train: interrupted; steps since the last checkpoint are lost, and the same command "
                  "resumes from it (checkpoint.resume: auto)", file=sys.stderr, flush=True)
        code = 130
    except Exception as err:  # noqa: BLE001 (a collective whose other end died: one line, not 50)
        from alfred_train.parallel.init import lost_peer

        if (reason := lost_peer(err)) is None:
            raise
        print(f"alfred-train: error: rank {os.environ.get('RANK', 0)}: a collective failed because another worker "
              f"stopped ({reason}); that worker's output, or the launcher's line, says why", file=sys.stderr, flush=True)
        code = 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
