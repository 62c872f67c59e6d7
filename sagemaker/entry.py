"""Entry script run by the SageMaker training toolkit on every instance of a training job.

Standard library only: it runs before alfred_train is installed in the container.

    python entry.py --stage ppo --config job/config.yaml --procs_per_node 8
                    [--run_dir /opt/ml/checkpoints] [--inputs JSON] [--master_port 7777] [--print-only]

1. Host facts: /opt/ml/input/config/resourceconfig.json (`current_host`, `hosts`), or the
   SM_HOSTS / SM_CURRENT_HOST variables. ALFRED_SM_RESOURCECONFIG overrides the path (tests).
2. node_rank = index of current_host in `hosts` *as SageMaker lists them* (the toolkit's own
   rule, not a sorted order); master_addr = hosts[0]; master_port 7777.
   Example: hosts [algo-1, algo-2], current algo-2 -> node_rank 1, master algo-1.
3. Installs the submitted source (`pip install --no-deps`) in the container (/opt/ml/code), or
   wherever alfred_train is not importable: the image (sagemaker/Dockerfile) carries the
   dependencies, the tarball the code of this job.
4. execs `torchrun --nnodes N --nproc_per_node P --node_rank R --master_addr M --master_port 7777
   -m alfred_train <stage> <config> run.dir=<run_dir> [KEY=PATH ...]`. run_dir is /opt/ml/checkpoints
   (synced to CheckpointConfig.S3Uri, so a restarted (spot) job finds its checkpoints and resumes)
   or a folder on an FSx channel. `--inputs` (set by the launcher) maps run-config keys to
   [channel, path inside it] ("" channel: inside /opt/ml/code); each becomes KEY=$SM_CHANNEL_<NAME>/path
   (a mixture: KEY=<its sources as JSON, each path so placed>),
   the directory where the toolkit delivered that channel (the job's config.yaml already holds the
   /opt/ml/input/data/... form of the same paths).
If torchrun already started this script (RANK is set: the toolkit's torch_distributed mode), it
execs the trainer directly instead of nesting another torchrun.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

RESOURCE_CONFIG = "/opt/ml/input/config/resourceconfig.json"
CHECKPOINT_DIR = "/opt/ml/checkpoints"
INPUT_DATA_DIR = "/opt/ml/input/data"
MASTER_PORT = 7777
CODE_DIR = Path(__file__).resolve().parent  # /opt/ml/code in the container


def read_hosts(environ: dict[str, str]) -> tuple[list[str], str]:
    """(hosts in SageMaker's order, current host) from resourceconfig.json or SM_HOSTS."""
    path = Path(environ.get("ALFRED_SM_RESOURCECONFIG", RESOURCE_CONFIG))
    if path.is_file():
        info = json.loads(path.read_text())
        return list(info["hosts"]), info["current_host"]
    if "SM_HOSTS" in environ and "SM_CURRENT_HOST" in environ:
        return list(json.loads(environ["SM_HOSTS"])), environ["SM_CURRENT_HOST"]
    raise SystemExit(f"entry.py: neither {path} nor SM_HOSTS/SM_CURRENT_HOST: not in a SageMaker job")


def input_overrides(inputs_json: str, environ: dict[str, str]) -> list[str]:
    """`KEY=PATH` overrides for the run's inputs, from the channels' directories (SM_CHANNEL_<NAME>)."""
    def path(channel: str, rel: str) -> str:
        root = environ.get(f"SM_CHANNEL_{channel.upper()}", f"{INPUT_DATA_DIR}/{channel}") if channel else str(CODE_DIR)
        return f"{root}/{rel}" if rel else root

    def item(x):  # a mixture's source {path: [channel, rel], ...}, a file [channel, rel], or a task name
        return {**x, "path": path(*x["path"])} if isinstance(x, dict) else path(*x) if isinstance(x, list) else x

    out = []
    for key, where in sorted(json.loads(inputs_json or "{}").items()):
        if isinstance(where, dict):  # a list: a mixture or ppo.eval_tasks, as JSON (YAML's flow form)
            out.append(f"{key}={json.dumps([item(x) for x in where['items']])}")
        else:
            out.append(f"{key}={path(*where)}")
    return out


def torchrun_command(
    *, hosts: list[str], current_host: str, procs_per_node: int, stage: str, config: str,
    run_dir: str = CHECKPOINT_DIR, overrides: list[str] = (), master_port: int = MASTER_PORT,
) -> list[str]:
    """The torchrun argv for this host (node rank = position of current_host in hosts)."""
    if current_host not in hosts:
        raise SystemExit(f"entry.py: current host {current_host!r} is not in hosts {hosts}")
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(len(hosts)),
        "--nproc_per_node", str(procs_per_node),
        "--node_rank", str(hosts.index(current_host)),
        "--master_addr", hosts[0],
        "--master_port", str(master_port),
        "-m", "alfred_train", stage, config, f"run.dir={run_dir}", *overrides,
    ]  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=("sft", "rm", "ppo"))
    parser.add_argument("--config", required=True, help="run config, relative to the code dir")
    parser.add_argument("--procs_per_node", type=int, default=0, help="0 = SM_NUM_GPUS")
    parser.add_argument("--run_dir", default=CHECKPOINT_DIR, help="the run directory (checkpoints)")
    parser.add_argument("--inputs", default="{}", help="JSON {run-config key: [channel, path]}")
    parser.add_argument("--master_port", type=int, default=MASTER_PORT)
    parser.add_argument("--job_id", default="", help="the training job's name: ALFRED_JOB_ID for the trainer")
    parser.add_argument("--print-only", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.job_id:  # inherited by torchrun and the trainer: a restarted job continues its own checkpoints
        os.environ["ALFRED_JOB_ID"] = args.job_id
    environ = dict(os.environ)
    config = str((CODE_DIR / args.config) if not Path(args.config).is_absolute() else args.config)
    commands = []
    if CODE_DIR == Path("/opt/ml/code") or importlib.util.find_spec("alfred_train") is None:
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--force-reinstall"]
        commands.append([*pip, str(CODE_DIR)])
    overrides = input_overrides(args.inputs, environ)
    if "RANK" in environ:  # already a torchrun worker
        trainer = [sys.executable, "-m", "alfred_train", args.stage, config, f"run.dir={args.run_dir}", *overrides]
        commands.append(trainer)
    else:
        hosts, current = read_hosts(environ)
        procs = args.procs_per_node or int(environ.get("SM_NUM_GPUS", "0"))
        if procs < 1:
            raise SystemExit("entry.py: --procs_per_node is 0 and SM_NUM_GPUS is not set")
        commands.append(
            torchrun_command(
                hosts=hosts, current_host=current, procs_per_node=procs, stage=args.stage, config=config,
                run_dir=args.run_dir, overrides=overrides, master_port=args.master_port,
            )
        )
    if args.print_only:
        for command in commands:
            print(shlex.join(command))
        return 0
    import subprocess

    for command in commands[:-1]:
        subprocess.run(command, check=True)
    os.execv(commands[-1][0], commands[-1])
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())
