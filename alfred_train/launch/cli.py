"""`alfred-train launch` and `alfred-train jobs`: submit a run YAML to a backend and follow it.

    alfred-train launch CONFIG.yaml [--backend slurm|sagemaker|local] [--template T.yaml]
                        [--dry-run] [--wait] [key.path=value ...]
    alfred-train jobs status|logs|cancel JOB --backend slurm|sagemaker [--region R] [--endpoint-url U]

Handlers return the exit code: 0 ok, 2 bad configuration (ConfigError, nothing submitted),
1 a backend call failed; `launch --wait` returns the job's own exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from alfred_train.cli import parse_with_overrides
from alfred_train.errors import AlfredError, ConfigError
from alfred_train.launch import job as job_files
from alfred_train.launch import local, sagemaker, sagemaker_plan, slurm
from alfred_train.launch.config import BACKENDS, validate_common, validate_sagemaker, validate_slurm


IMAGE_NEEDS = (
    "Image (launch.sagemaker.image_uri): the AWS PyTorch training container for the instance's CUDA with "
    "megatron-core, transformer-engine and flash-attn (alfred-train[gpu]) and alfred-train's pinned "
    "dependencies; sagemaker/Dockerfile builds it (README: Building the SageMaker image). The job installs "
    "its own source from the tarball (pip --no-deps)."
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `launch` and `jobs` on the main CLI's subparsers; each sets `func=handler`."""
    p = subparsers.add_parser("launch", help="submit a run to Slurm, SageMaker or local torchrun")
    p.add_argument("config", help="run YAML with a launch: section")
    p.add_argument("--backend", choices=BACKENDS, help="overrides launch.backend")
    p.add_argument("--template", help="YAML whose launch: section is laid over CONFIG's")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and return its exit code")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(func=cmd_launch)

    jobs = subparsers.add_parser("jobs", help="status, logs or cancel of a submitted job")
    actions = jobs.add_subparsers(dest="action", required=True)
    for action, text in (("status", "one status line"), ("logs", "print the log"), ("cancel", "cancel/stop")):
        q = actions.add_parser(action, help=text)
        q.add_argument("job", help="Slurm job id or SageMaker training job name")
        q.add_argument("--backend", choices=("slurm", "sagemaker"), required=True)
        q.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        q.add_argument("--endpoint-url", default="", help="SageMaker/logs endpoint (tests: moto)")
        if action == "logs":
            q.add_argument("--tail", type=int, default=0, help="last N lines only (Slurm)")
        q.set_defaults(func=cmd_jobs)


# ---------------------------------------------------------------------------------------------
# launch


def cmd_launch(args: argparse.Namespace) -> int:
    run = job_files.resolve_run(args.config, args.overrides, args.template, args.backend)
    validate_common(run.launch)  # launch.backend among them, before it picks the function
    backend = {"slurm": _launch_slurm, "sagemaker": _launch_sagemaker, "local": _launch_local}
    return backend[run.launch.backend](run, args)


def _launch_slurm(run: job_files.ResolvedRun, args: argparse.Namespace) -> int:
    from alfred_train.dryrun import describe

    launch = run.launch
    validate_slurm(launch)
    job_files.check_world_size(run)
    # What `<stage> --dry-run` refuses (GPU memory, the checkpoints and data it can reach from the
    # login node) is refused before the job waits in the queue for hours, not once it starts.
    report = describe(run.config, launch.stage)
    job_dir = job_files.job_dir_for(run).resolve()
    config_path = job_dir / job_files.RESOLVED_CONFIG
    script = slurm.render_sbatch(
        launch,
        command=job_files.train_command(launch, str(config_path)),
        job_dir=job_dir,
        workdir=Path.cwd(),
        source=str(run.source),
    )
    if args.dry_run:  # the script on stdout, the plan for a person on stderr
        print(report, file=sys.stderr)
        sys.stdout.write(script)
        return 0
    job_files.write_job_dir(run, job_dir)
    if launch.slurm.log_dir:  # sbatch does not create it: the job would fail with no log at all
        try:
            Path(launch.slurm.log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"launch.slurm.log_dir: cannot create {launch.slurm.log_dir} ({err.strerror}); "
                              "set it to a folder the job's nodes can write") from None
    script_path = job_dir / "job.sbatch"
    script_path.write_text(script)
    try:
        job_id = slurm.submit(script_path)
    except AlfredError:  # nothing was queued: no job folder without a job
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    (job_dir / "job_id").write_text(job_id + "\n")
    print(f"submitted Slurm job {job_id} ({script_path})", flush=True)
    if not args.wait:
        return 0
    done = slurm.wait(job_id)
    sys.stdout.write(slurm.log_text(job_id, tail_lines=20))
    print(f"job {job_id} {done.state} exit={done.exit_code} restarts={done.restarts}")
    return done.exit_code if done.state == "COMPLETED" or done.exit_code else 1


def _wandb_mode_fixed(tree: dict, job_env: dict[str, str]) -> dict:
    """A SageMaker job gets none of this shell's environment: an unset logging.wandb.mode becomes what
    it means here (WANDB_MODE of launch.sagemaker.environment, else of this shell, else online)."""
    from alfred_train import tracking

    wandb = (tree.get("logging") or {}).get("wandb")
    if not isinstance(wandb, dict) or wandb.get("mode"):
        return tree
    fixed = {**wandb, "mode": tracking.mode(None, {**os.environ, **job_env})}
    return {**tree, "logging": {**tree["logging"], "wandb": fixed}}


def _launch_sagemaker(run: job_files.ResolvedRun, args: argparse.Namespace) -> int:
    from alfred_train.dryrun import describe

    launch = run.launch
    validate_sagemaker(launch)
    job_files.check_world_size(run)
    name = sagemaker.job_name(launch)
    tree = _wandb_mode_fixed(run.tree, launch.sagemaker.environment)
    plan = sagemaker_plan.plan_inputs(tree, launch, upload_root=sagemaker.inputs_uri(launch, name),
                                      source_root=sagemaker.source_root())
    job_tree = sagemaker_plan.rewritten_tree(tree, plan)
    job_files.load_run_tree(job_tree, here=False)  # the job's own config loads (its paths: the container's)
    # Refuses what does not fit the GPUs or the volume. Inputs are checked where they are now (what
    # is uploaded from here, or the config's path where it is reachable: FSx), the run directory where
    # the job has it: not this machine's runs/<name>, whose checkpoints the job never sees (the dry
    # run said it would resume them).
    cfg = job_files.load_run_tree(sagemaker_plan.uploaded_tree(tree, plan))
    view = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=launch.sagemaker.run_dir or plan.run_dir),
                               checkpoint=dataclasses.replace(cfg.checkpoint, node_local=plan.node_local))
    report = describe(view, launch.stage)
    if args.dry_run:  # the request on stdout (JSON); the plan for a person on stderr
        request = sagemaker.build_request(launch, name=name, submit_uri=sagemaker.source_uri(launch, name), plan=plan)
        print(report, *plan.lines(), IMAGE_NEEDS, sep="\n", file=sys.stderr)
        print(json.dumps(request, indent=1))
        return 0
    sm_client, s3_client = sagemaker.clients(launch)
    yaml_text = yaml.safe_dump(job_tree, sort_keys=False)
    sagemaker.submit(launch, name=name, job_config_yaml=yaml_text, sm_client=sm_client, s3_client=s3_client,
                     plan=plan)
    print(f"created SageMaker training job {name}", flush=True)
    if not args.wait:
        return 0
    while (info := sagemaker.describe(sm_client, name))["TrainingJobStatus"] not in sagemaker.FINISHED:
        time.sleep(30)
    print(sagemaker.status_line(info))
    return 0 if info["TrainingJobStatus"] == "Completed" else 1


def _launch_local(run: job_files.ResolvedRun, args: argparse.Namespace) -> int:
    local.validate_local(run.launch)
    job_files.check_world_size(run)
    job_dir = job_files.job_dir_for(run).resolve()
    command = local.torchrun_command(run.launch, str(job_dir / job_files.RESOLVED_CONFIG))
    if args.dry_run:
        print(" ".join(command))
        return 0
    job_files.write_job_dir(run, job_dir)
    return local.run(command)


# ---------------------------------------------------------------------------------------------
# jobs


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.backend == "slurm":
        if args.action == "status":
            job = slurm.status(args.job)
            print(f"{job.job_id} {job.state} exit={job.exit_code} restarts={job.restarts} log={job.log_path}")
        elif args.action == "logs":
            sys.stdout.write(slurm.log_text(args.job, tail_lines=args.tail))
        else:
            slurm.cancel(args.job)
            print(f"cancelled Slurm job {args.job}")
        return 0
    sm_client = sagemaker.make_client("sagemaker", args.region, args.endpoint_url)
    if args.action == "status":
        print(sagemaker.status_line(sagemaker.describe(sm_client, args.job)))
    elif args.action == "logs":
        text = sagemaker.log_text(sagemaker.make_client("logs", args.region, args.endpoint_url), args.job)
        if not text:  # a job that does not exist has none either: say which (exit 1 for an unknown one)
            text = f"no log events yet for {sagemaker.status_line(sagemaker.describe(sm_client, args.job))}\n"
        sys.stdout.write(text)
    else:
        sagemaker.stop(sm_client, args.job)
        print(f"stop requested for SageMaker training job {args.job}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m alfred_train.launch.cli ...`) until the main CLI includes us."""
    parser = argparse.ArgumentParser(prog="alfred-train")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parse_with_overrides(parser, argv)
    try:
        return args.func(args)
    except AlfredError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
