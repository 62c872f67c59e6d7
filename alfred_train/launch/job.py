"""What every backend submits: a job folder holding the resolved run config, and the command.

`resolve_run(config_path, overrides, template)` reads the run YAML, lays the `launch:` section of
an optional template over it (e.g. sagemaker/alfred-40b-p4d.yaml; its empty values are placeholders
that leave the run config's), applies `a.b.c=value` overrides, and returns the resolved tree plus its LaunchConfig. The whole tree is checked by
the trainer's own loader (alfred_train.config.load_config) before anything is submitted, so a
typo anywhere in the run config fails at launch with exit code 2. `write_job_dir` copies the tree
to `<job_dir>/config.yaml`: the job runs `python -m alfred_train <stage> <job_dir>/config.yaml`
with no further overrides, so what ran is exactly what is on disk next to the job script.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
import yaml

from alfred_train.config import default_run_dir
from alfred_train.errors import ConfigError
from alfred_train.launch.config import LaunchConfig, check_processes, validate_common

RESOLVED_CONFIG = "config.yaml"


@dataclass(frozen=True)
class ResolvedRun:
    """A run YAML after template and overrides: the full tree and its parsed launch section."""

    tree: dict  # the whole run config, launch section included
    config: Any  # alfred_train.config.Config loaded from `tree`, as the job will load it
    source: Path  # the YAML it came from

    @property
    def launch(self) -> LaunchConfig:
        return self.config.launch

    @property
    def run_dir(self) -> str:
        return self.config.run.dir


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in `tree` in place; `value` is parsed as YAML (2 -> int, [a, b] -> list)."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected key.path=value")
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML") from err


def _merge(base: dict, top: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, everything else in `top` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _without_placeholders(template: dict) -> dict:
    """The template's keys that choose something: an empty value ("", [], {}: the account-specific
    placeholders of sagemaker/alfred-40b-p4d.yaml) leaves the run config's value (an empty role_arn
    or `inputs: {}` wiped what the run config set)."""
    out = {}
    for key, value in template.items():
        if isinstance(value, dict) and value:
            value = _without_placeholders(value)
        if value not in ("", [], {}, None):
            out[key] = value
    return out


def resolve_run(
    config_path: str | os.PathLike,
    overrides: list[str] = (),
    template: str | os.PathLike | None = None,
    backend: str | None = None,
) -> ResolvedRun:
    """Run YAML <- template's `launch:` <- overrides <- `--backend`; returns the resolved run."""
    source = Path(config_path)
    tree = _read_yaml(source)
    if template is not None:
        extra = _read_yaml(Path(template))
        unknown = sorted(set(extra) - {"launch"})
        if unknown:
            raise ConfigError(f"{template}: a launch template holds only a launch: section, not {unknown[0]}")
        tree = _merge(tree, _without_placeholders(extra))
    for override in overrides:
        apply_override(tree, override)
    if "launch" in tree and not isinstance(tree["launch"], dict):  # `launch:` left empty is None
        raise ConfigError(f"launch: expected a mapping, got {tree['launch']!r}; fill the launch section or remove it")
    if backend is not None:
        tree.setdefault("launch", {})["backend"] = backend
    default_run_dir(tree, source)  # as the trainer reads this file (the job's copy is named config.yaml)
    launch = tree.setdefault("launch", {})
    if isinstance(launch, dict) and "stage" not in launch:  # written into the job's config, not guessed again
        launch["stage"] = stage_from_sections(tree, source)
    return ResolvedRun(tree=tree, config=load_run_tree(tree), source=source)


def stage_from_sections(tree: dict, source: Path) -> str:
    """The stage a config without launch.stage names by its sections: ppo with a `ppo:` section, rm
    with an `rm:` one, sft with neither (launching configs/tiny-rm.yaml used to train SFT)."""
    named = [stage for stage in ("rm", "ppo") if tree.get(stage)]
    if len(named) > 1:
        raise ConfigError(f"launch.stage: {source} has both rm: and ppo: sections; set launch.stage to the "
                          "stage this job runs (e.g. launch.stage=ppo)")
    return named[0] if named else "sft"


def load_run_tree(tree: dict, *, here: bool = True) -> Any:
    """Load `tree` exactly as the job will: through the trainer's loader, from a YAML file.
    here=False: a SageMaker job's tree, whose paths are the container's (not read here)."""
    from alfred_train.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RESOLVED_CONFIG
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_config(path, here=here)


def check_world_size(run: ResolvedRun) -> None:
    """The job starts launch.nodes * workers_per_node processes: that must be tp * pp * dp."""
    from alfred_train.config import validate
    from alfred_train.config_checks import validate_stage

    validate_common(run.launch)
    check_processes(run.launch, run.config.world_size)  # in launch.* words, before validate's generic ones
    validate(run.config, world_size=run.launch.nodes * run.launch.workers_per_node)
    validate_stage(run.config, run.launch.stage)
    if run.launch.stage == "ppo":  # PPO's config-only checks, before a job is submitted
        from alfred_train.ppo.checks import check_config

        check_config(run.config)


def job_dir_for(run: ResolvedRun, now: _dt.datetime | None = None) -> Path:
    """launch.job_dir, or <run.dir>/launch/<YYYYmmdd-HHMMSS> when it is empty."""
    if run.launch.job_dir:
        return Path(run.launch.job_dir)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(run.run_dir) / "launch" / stamp


def write_job_dir(run: ResolvedRun, job_dir: Path) -> Path:
    """Create `job_dir` and write the resolved run config there; returns the config's path."""
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / RESOLVED_CONFIG
    path.write_text(yaml.safe_dump(run.tree, sort_keys=False))
    return path


def train_command(launch: LaunchConfig, config_path: str, extra: list[str] = ()) -> list[str]:
    """argv each worker runs: `<python> -m alfred_train <stage> <config> [extra overrides]`."""
    return [launch.python, "-m", "alfred_train", launch.stage, config_path, *extra]


def resolved_yaml(run: ResolvedRun) -> str:
    """The resolved config as YAML text (what write_job_dir writes)."""
    return yaml.safe_dump(run.tree, sort_keys=False)

