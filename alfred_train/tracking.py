"""Weights & Biases beside metrics.jsonl and TensorBoard (`logging.wandb`), on the main rank only.

    logging:
      wandb: {project: alfred-40b, name: ppo-run-3, mode: online}    # or offline; unset: WANDB_MODE, else online

What the W&B run gets: the resolved config exactly as the run wrote it (run.dir/config.yaml, with
any secret-looking key masked, and the same for the command line W&B records) and every
metrics.jsonl row at its step. The W&B run id is kept in
run.dir/wandb_run_id: a resumed training run (same run.dir) continues the same W&B run
(`resume="allow"`). Offline, the files are under run.dir/wandb/offline-run-*/ and `wandb sync`
uploads them later (the resumed part of an offline run syncs into the same run id).

`MetricsLogger` opens this from the run directory, so no stage passes it around.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import yaml

from alfred_train.atomic import write_text

RUN_ID_FILE = "wandb_run_id"
SECRET_KEY = re.compile(r"secret|token|passw|api[_-]?key|access[_-]?key|credential|private[_-]?key", re.I)
MASK = "***"


def mode(configured: str | None, env=os.environ) -> str:
    """The W&B mode of a run: logging.wandb.mode, else WANDB_MODE, else online. wandb.init lets its
    own argument beat WANDB_MODE, so ours goes to it only as the config's or the environment's."""
    return configured or env.get("WANDB_MODE") or "online"


def needs_login(run_mode: str) -> bool:
    return run_mode not in ("offline", "dryrun", "disabled")  # dryrun: W&B's older name of offline


def has_credentials(env=os.environ) -> bool:
    """Whether an online W&B run can log in without a prompt: WANDB_API_KEY, an identity token file,
    or a netrc entry for the W&B host (what `wandb login` writes)."""
    import netrc
    from urllib.parse import urlparse

    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(env.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def mask_secrets(node):
    """A copy of a config tree with the value of every secret-looking key (at any depth) masked."""
    if isinstance(node, dict):
        return {k: MASK if SECRET_KEY.search(str(k)) and v not in (None, "") else mask_secrets(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [mask_secrets(v) for v in node]
    return node


def mask_argv(argv: list[str]) -> list[str]:
    """The command line W&B records as run metadata, with the value of any secret-looking word masked
    (`launch.slurm.env={HF_TOKEN: x}` -> `launch.slurm.env=***`)."""
    return [w.split("=", 1)[0] + "=" + MASK if "=" in w and SECRET_KEY.search(w) else
            MASK if SECRET_KEY.search(w) else w for w in argv]


class WandbRun:
    """One W&B run for this run directory: `log` a metrics row, `finish` at the end."""

    def __init__(self, run):
        self._run = run

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, record: dict) -> None:
        """Every key of the metrics.jsonl row but `step` (the W&B step); non-finite numbers skipped."""
        row = {k: v for k, v in record.items()
               if k != "step" and not (isinstance(v, float) and not math.isfinite(v))}
        self._run.log(row, step=step)

    def finish(self) -> None:
        self._run.finish()


def start(run_dir: str | Path) -> WandbRun | None:
    """The W&B run for `logging.wandb` in run_dir/config.yaml; None when it is not set."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        return None
    config = yaml.safe_load(config_file.read_text()) or {}
    section = (config.get("logging") or {}).get("wandb")
    if not section:
        return None
    import wandb

    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B makes one
    name = section.get("name") or (config.get("run") or {}).get("name") or run_dir.resolve().name
    argv, sys.argv = sys.argv, [sys.argv[0], *mask_argv(sys.argv[1:])]
    try:
        run = wandb.init(project=section.get("project"), entity=section.get("entity"), name=name,
                         mode=mode(section.get("mode")), dir=str(run_dir), id=run_id, resume="allow",
                         config=mask_secrets(config),
                         settings=wandb.Settings(console="off"))  # stdout/stderr stay ours (tqdm, log files)
    finally:
        sys.argv = argv
    if not id_file.exists():
        write_text(id_file, run.id + "\n")
    return WandbRun(run)
