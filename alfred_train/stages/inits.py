"""The checkpoints a run starts from (checkpoint.init, rm.init, ppo.policy_init / reward_init),
resolved once and kept for the whole run, resumes included.

An init may name a run directory or a `checkpoints/` root, which means its newest checkpoint. A
resumed PPO run resolved it again: when the SFT run had gone on meanwhile, the resumed run's
reference (or reward) model silently became another checkpoint than the one it started from, and
its KL penalty measured against a new model. So:

  * `pin` (the CLI, before the dry run and in every worker) replaces each init the run loads by the
    checkpoint it resolves to, or, on a resume, by the one the resumed checkpoint records it started
    from (`record`, in each checkpoint's state["inits"]). A newer checkpoint under the same run
    directory is a warning (the resumed run keeps its own); a config naming another checkpoint
    outright, a recorded one gone or rewritten (its manifest's sha256 changed), is refused; a copy
    of it (the same manifest: a renamed SFT run) named instead is taken (`same_checkpoint`; a LoRA
    resume's base is checked the same way, `checkpoint_checks._check_resume_bases`);
  * `check_resumed` refuses a resume whose recorded inits are not what the run loaded (a checkpoint
    only S3 held, fetched after `pin` looked at run.dir).

A resumed SFT or RM run with full weights loads no init (the checkpoint holds the model): its
config only says the recorded one again. Checkpoints saved before inits were recorded resolve the
config as before.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from alfred_train import checkpoint
from alfred_train.checkpointing import manifest
from alfred_train.config import Config
from alfred_train.errors import ConfigError

log = logging.getLogger("alfred_train")
KEYS = {"checkpoint.init": ("checkpoint", "init"), "rm.init": ("rm", "init"),
        "ppo.policy_init": ("ppo", "policy_init"), "ppo.reward_init": ("ppo", "reward_init")}


def pin(cfg: Config, stage: str, *, say: bool = True) -> Config:
    """`cfg` with each init the run loads replaced by the checkpoint it is to load (module docstring);
    an init that resolves to nothing here is left as given (the checks name it, or the dry run notes
    it). say=False: no warning (the launcher process, whose workers say it)."""
    from alfred_train.stages.checkpoint_checks import init_uses

    resumed = _resumed_meta(cfg)
    recorded = _recorded(resumed) or {}
    if not _loads_inits(cfg, stage, resumed):  # nothing loaded: config.yaml still says where the run started
        return _with(cfg, {use.key: recorded[use.key]["path"] for use in init_uses(cfg, stage) if use.key in recorded})
    pins = {}
    for use in init_uses(cfg, stage):
        if use.key in recorded:
            pins[use.key] = _started(use.key, use.where, recorded[use.key], say)
        elif (found := _resolved(use.where)) is not None:
            pins[use.key] = str(found.resolve())
    return _with(cfg, pins)


def record(cfg: Config, stage: str) -> dict:
    """state["inits"] of this run's checkpoints: each init it loads (pinned: `cfg` is `pin`'s), with
    the sha256 of its manifest when the run started (None for one written before manifests); a
    resumed run that loads none passes on what its checkpoint recorded."""
    from alfred_train.stages.checkpoint_checks import init_uses

    resumed = _resumed_meta(cfg)
    recorded = _recorded(resumed)
    if not _loads_inits(cfg, stage, resumed):
        return recorded or {}
    recorded = recorded or {}
    return {use.key: {"path": use.where, "manifest_sha256": recorded[use.key].get("manifest_sha256")
                      if use.key in recorded else _manifest_sha(Path(use.where))}
            for use in init_uses(cfg, stage) if Path(use.where, "meta.json").is_file()}


def check_resumed(cfg: Config, stage: str, state: dict) -> None:
    """The checkpoint being resumed (its meta.json state) started from the inits this run loaded
    (`pin`), or copies of them."""
    from alfred_train.stages.checkpoint_checks import init_uses

    if not _loads_inits(cfg, stage, state):
        return
    recorded = state.get("inits") or {}
    for use in init_uses(cfg, stage):
        entry = recorded.get(use.key)
        if entry is None or same_checkpoint(use.where, entry["path"], entry.get("manifest_sha256")):
            continue
        raise ConfigError(f"{use.key}: the checkpoint resumed started from {entry['path']}, but this run loaded "
                          f"{use.where}; set {use.key}={entry['path']} (a resumed run keeps its inits)")


def _started(key: str, where: str, entry: dict, say: bool) -> str:
    """The checkpoint a resumed run started from (or a copy of it `where` names), refused when it
    cannot be the same one."""
    started, sha = Path(entry["path"]), entry.get("manifest_sha256")
    now = _resolved(where)
    if now is not None and sha is not None and _manifest_sha(now) == sha:
        return str(now.resolve())  # that checkpoint, where it was or copied elsewhere
    keep = f"a resumed run keeps the checkpoint it started from ({started})"
    if not (started / "meta.json").is_file():
        raise ConfigError(f"{key}: {keep}, which holds no checkpoint now (moved, or removed by checkpoint.keep); put "
                          f"it back there (or set {key} to a copy of it), or start a new run.dir")
    if sha is not None and _manifest_sha(started) != sha:
        raise ConfigError(f"{key}: {keep}, which was rewritten since (its manifest changed): another model now; put "
                          "back the one this run started from, or start a new run.dir")
    if now is None or now.resolve() == started:
        return str(started)
    if (Path(where) / "meta.json").is_file():  # the config names another checkpoint outright
        raise ConfigError(f"{key}: {where} is not the checkpoint this run started from ({started}), and {keep}; "
                          f"set {key}={started}, or start a new run.dir to start from {where}")
    if say:
        log.warning("%s: %s now resolves to %s; %s", key, where, now, keep)
    return str(started)


def _loads_inits(cfg: Config, stage: str, resumed: dict | None) -> bool:
    """A fresh start loads its inits; a resume only in PPO (reference, reward) or with LoRA (bases)."""
    return resumed is None or stage == "ppo" or bool(cfg.lora.rank)


def _recorded(meta: dict | None) -> dict | None:
    return ((meta or {}).get("state") or {}).get("inits")


def _resumed_meta(cfg: Config) -> dict | None:
    """meta.json of the checkpoint a resume would take here (run.dir's newest for `auto`), or None."""
    c = cfg.checkpoint
    if c.resume == "none":
        return None
    path = checkpoint.newest_resumable(Path(cfg.run.dir) / "checkpoints") if c.resume == "auto" \
        else _resolved(c.resume)
    if path is None:
        return None
    try:
        return checkpoint.read_meta(path)
    except ConfigError:  # a damaged meta.json: the resume names it (auto skips it for the one before)
        return None


def _resolved(where: str) -> Path | None:
    try:
        return checkpoint.resolve_checkpoint(where)
    except ConfigError:
        return None


def same_checkpoint(path: str | Path, other: str | Path, other_sha: str | None = None) -> bool:
    """`path` is checkpoint `other` (whose manifest had sha256 `other_sha` when recorded), there or
    copied elsewhere: the same place, or the same manifest (every file's size and sha256)."""
    if Path(path).resolve() == Path(other).resolve():
        return True
    mine = _manifest_sha(Path(path))
    return mine is not None and mine == (other_sha or _manifest_sha(Path(other)))


def _manifest_sha(path: Path) -> str | None:
    try:
        return manifest.sha256_of(path / manifest.MANIFEST)
    except OSError:
        return None


def _with(cfg: Config, pins: dict) -> Config:
    for key, value in pins.items():
        section, field = KEYS[key]
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    return cfg
