"""The checkpoints a run loads (its inits, the one it resumes), checked against the config before
any model is built, by the run and by `--dry-run` alike: the right models, this model shape,
this run's template and tokenizer, a layout the optimizer states reshard to, and no later history
of an earlier run beside them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.distributed as dist

from alfred_train import checkpoint
from alfred_train.config import Config
from alfred_train.checkpointing import optimizer_state
from alfred_train.errors import ConfigError
from alfred_train.models import lora_checkpoint
from alfred_train.models.build import ModelShape
from alfred_train.stages.common import JOB_MARKER, layout, tokenizer_digest, tokenizer_path


log = logging.getLogger(__name__)
TRAINED = {"sft": ("policy",), "rm": ("reward",), "ppo": ("policy", "value")}  # what a stage's checkpoints hold


@dataclasses.dataclass(frozen=True)
class CheckpointUse:
    """A checkpoint a run will load: the config key that names it, the path as given, and the
    models it must hold (all of one of the `holds` alternatives)."""

    key: str
    where: str
    holds: tuple[tuple[str, ...], ...]
    what: str  # the kind of checkpoint the key takes, for the message
    resume: bool = False  # optimizer states load too: they must reshard to this layout


def init_uses(cfg: Config, stage: str) -> list[CheckpointUse]:
    """The checkpoints `stage` starts its models from (when it does not resume)."""
    c, o = cfg.checkpoint, cfg.ppo
    if stage == "sft" and c.init:
        return [CheckpointUse("checkpoint.init", c.init, (("policy",),), 'an SFT or converted model ("policy")')]
    if stage == "rm" and (cfg.rm.init or c.init):
        return [CheckpointUse("rm.init" if cfg.rm.init else "checkpoint.init", cfg.rm.init or c.init,
                              (("policy",), ("reward",)), 'an SFT policy or an RM ("policy" or "reward")')]
    if stage == "ppo":
        return [CheckpointUse(key, where, ((name,),), what) for key, where, name, what in [
            ("ppo.policy_init", o.policy_init, "policy", 'an SFT checkpoint ("policy")'),
            ("ppo.reward_init", o.reward_init, "reward", 'an RM checkpoint ("reward")')] if where]
    return []


def checkpoints_to_load(cfg: Config, stage: str) -> list[CheckpointUse]:
    """Every checkpoint `stage` loads with this config, in the order the run meets them. A resumed
    SFT/RM run loads no init (a LoRA one does: the frozen base); PPO always loads both inits (the
    reference and the reward model start there). checkpoint.resume=auto resumes the newest of
    run.dir (a damaged one is skipped at run time for the one before it, from the same run)."""
    c = cfg.checkpoint
    own = f"this {stage} stage's own checkpoints ({', '.join(repr(m) for m in TRAINED[stage])})"
    resume = []
    if c.resume not in ("auto", "none"):
        resume = [CheckpointUse("checkpoint.resume", c.resume, (TRAINED[stage],), own, resume=True)]
    elif c.resume == "auto":
        root, damaged = Path(cfg.run.dir) / "checkpoints", []
        if found := checkpoint.newest_resumable(root, damaged):
            resume = [CheckpointUse("checkpoint.resume", str(found), (TRAINED[stage],),
                                    f"{own} (auto: run.dir's newest)", resume=True)]
        elif (present := checkpoint.iter_steps(root)) and not c.s3_uri:  # the run refuses them (S3 may hold one)
            raise checkpoint.none_sound(root, damaged or [f"{p}: incomplete (no meta.json)" for p in present.values()],
                                        node_local=c.node_local)
    loads_init = stage == "ppo" or cfg.lora.rank or not resume
    return resume + (init_uses(cfg, stage) if loads_init else [])


def check_checkpoints(cfg: Config, stage: str, shape: ModelShape, *,
                      required: bool) -> tuple[list[tuple[CheckpointUse, Path, dict]], list[str]]:
    """Check every checkpoint `stage` loads (`checkpoints_to_load`) against the config, as `checked`
    does. Returns ((use, path, meta.json) of each one found, notes on those not reachable here)."""
    found, notes = [], []
    for use in checkpoints_to_load(cfg, stage):
        got = checked(cfg, use, shape, required=required)
        if got is None:
            notes.append(f"{use.key}: {use.where} is not reachable here: it is checked when the run starts, "
                         "before any model is built")
        else:
            found.append((use, *got))
    mine = tokenizer_path(cfg)
    digest = tokenizer_digest(mine) if Path(mine).exists() else None  # None: the dry run, not mounted here
    for use, path, meta in found:
        _check_text(cfg, use, path, meta, digest)
    start = next((meta["step"] for use, _, meta in found if use.resume), 0)
    if start > cfg.train.max_steps:
        raise ConfigError(f"train.max_steps: {cfg.train.max_steps}, but the checkpoint resumed is at step {start}: "
                          "nothing to train (its result stays as it is); raise train.max_steps to train on")
    notes += check_no_later_history(cfg, start)
    return found, notes


def resume_of_restarted_job(cfg: Config, environ=None) -> Config:
    """A restarted job (Slurm: requeued, SLURM_RESTART_COUNT >= 1; SageMaker: after a spot reclaim,
    run.dir's job-id is this job's ALFRED_JOB_ID) runs its first command again: with
    checkpoint.resume none or a path it refused its own checkpoints at the first restart (or would
    have started over). Its run.dir's checkpoints after where it started are its own (its first run
    refused a run.dir holding later ones), so the restart continues them (`auto`); before it has
    saved one, it starts where configured."""
    import os

    environ = os.environ if environ is None else environ
    c = cfg.checkpoint
    marker = Path(cfg.run.dir) / JOB_MARKER
    job = environ.get("ALFRED_JOB_ID")
    restarted = int(environ.get("SLURM_RESTART_COUNT") or 0) >= 1 or (
        bool(job) and marker.is_file() and marker.read_text().strip() == job)
    if not restarted or c.resume == "auto":
        return cfg
    start = 0
    if c.resume != "none":
        start = checkpoint.read_meta(checkpoint.resolve_checkpoint(c.resume)).get("step", 0)
    own = [step for step in checkpoint.iter_steps(Path(cfg.run.dir) / "checkpoints") if step > start]
    if not own:
        return cfg
    log.warning("job restart: continuing this job's own checkpoints in run.dir (checkpoint.resume: %s applied "
                "to its first run)", c.resume)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(c, resume="auto"))


def check_no_later_history(cfg: Config, start: int) -> list[str]:
    """A run that does not continue run.dir's own newest checkpoint (checkpoint.resume: none, or a
    path: a rollback) would leave the checkpoints an earlier run saved there after `start` beside
    its own, and the newest by step number is what auto-resume, rm.init, ppo.*_init and eval take:
    another run's model, silently. Refused (what to move is named); `auto` always continues.
    With checkpoint.s3_uri the mirror is looked at too (by rank 0 only): a requeued job's auto
    resume downloads the newest there. Returns a note when S3 cannot be listed from here."""
    c = cfg.checkpoint
    if c.resume == "auto":
        return []
    root = Path(cfg.run.dir) / "checkpoints"
    _refuse_later(c.resume, start, str(root), checkpoint.iter_steps(root),
                  "move them out of run.dir (or delete them), or set a new run.dir")
    if not c.s3_uri or (dist.is_initialized() and dist.get_rank() != 0):
        return []
    from alfred_train.checkpointing.mirror import sync_errors
    from alfred_train.launch import s3

    try:
        listed = s3.list_iter_prefixes(s3.parse_s3_uri(c.s3_uri), s3.make_client(max_attempts=2))
    except sync_errors() as err:
        note = (f"checkpoint.s3_uri: cannot list {c.s3_uri} from here ({type(err).__name__}): an earlier run's "
                "later checkpoints there are not checked")
        if dist.is_initialized():  # the run itself; a dry run prints its notes
            log.warning("%s", note)
        return [note]
    _refuse_later(c.resume, start, f"checkpoint.s3_uri {c.s3_uri}", [step for step, _ in listed],
                  "delete them there, or set a new checkpoint.s3_uri")
    return []


def _refuse_later(resume: str, start: int, where: str, steps, fix: str) -> None:
    later = sorted(step for step in steps if step > start)
    if later:
        names = ", ".join(checkpoint.iter_name(s) for s in later[:3]) + (", ..." if len(later) > 3 else "")
        raise ConfigError(f"checkpoint.resume: {resume} starts this run at step {start}, but {where} holds "
                          f"checkpoints of an earlier run after it ({names}), which a resume or the next stage "
                          f"would take for this run's; {fix}")


def checked(cfg: Config, use: CheckpointUse, shape: ModelShape, *, required: bool) -> tuple[Path, dict] | None:
    """(path, meta.json) of `use`, refused (ConfigError naming its key) unless it holds the models
    the run loads from it, of this model shape, at parallel.vpp (resumed: at the run's layout).
    None when its path does not exist and not `required` (a dry run where /fsx is not mounted); a
    path that exists but holds no checkpoint is an error either way."""
    path = checkpoint.locate(use.where, use.key, required=required)
    if path is None:
        return None
    try:
        meta = checkpoint.read_meta(path)
    except ConfigError as err:  # a damaged meta.json: name the key that took it
        raise ConfigError(f"{use.key}: {err}") from None
    _check_checkpoint(cfg, use, path, meta, shape, required)
    if not use.resume:  # a resumed run loads its bases from its own inits, checked as those
        lora_checkpoint.check_bases(path, meta, _loaded(use, meta), named=f"{use.key}: ", verify=False)
    if required and not use.resume:  # a resume is verified as it is chosen (checkpoint.find_resumable)
        _check_sound(use, path, meta)
    return path, meta


def _loaded(use: CheckpointUse, meta: dict) -> tuple[str, ...]:
    """The models the run loads from `use`'s checkpoint (the first of `use.holds` it holds)."""
    return next(names for names in use.holds if set(names) <= set(meta.get("models") or []))


def _check_sound(use: CheckpointUse, path: Path, meta: dict) -> None:
    """The run itself (not the dry run: it would hash a 40B model's files), rank 0 only: an init's
    files against its manifest, sizes then sha256, and those of the LoRA bases it loads, as a resume
    and `convert`/`eval`/`generate` check theirs. A damaged SFT checkpoint started PPO from corrupted
    weights without a word. One written before manifests existed (or by an older converter) is
    loaded unchecked, with a warning."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        lora_checkpoint.check_sound(path, meta, _loaded(use, meta), named=f"{use.key}: ",
                                    fix="point it at a sound checkpoint", before="loading")


def _check_checkpoint(cfg: Config, use: CheckpointUse, path: Path, meta: dict, shape: ModelShape,
                      required: bool) -> None:
    key, state = use.key, meta.get("state") or {}
    held = meta.get("models") or []
    if not any(set(names) <= set(held) for names in use.holds):
        stage = f" of a {state['stage']} run" if state.get("stage") else ""
        named = use.resume and cfg.checkpoint.resume not in ("auto", "none")  # a path given, not run.dir's newest
        fix = "name one of this stage's checkpoints" if named else "set a new run.dir" if use.resume else "point it there"
        raise ConfigError(f"{key}: {path} holds the models {held}{stage}; {key} takes {use.what}: {fix}")
    differ = checkpoint.shape_differences(state.get("model"), dataclasses.asdict(shape))
    if differ:
        saved = ", ".join(f"{k}={v}" for k, v, _ in differ)
        built = ", ".join(f"{k}={v}" for k, _, v in differ)
        raise ConfigError(f"{key}: {path} holds a model of shape {saved}, this config builds {built}; set model.* "
                          "(and model.tokenizer) as in that run" + (", or set a new run.dir" if use.resume else ""))
    saved_layout = meta.get("layout") or {}
    if use.resume:
        check_resume_layout(cfg, use, path, meta)
        _check_resume_precision(cfg, use, path, state, required)
        _check_resume_adapters(cfg, use, path, state)
        _check_resume_bases(cfg, use, path, state)
        _check_resume_batch(cfg, use, path, state)
    if (saved_layout.get("vpp") or 1) != (cfg.parallel.vpp or 1):
        raise ConfigError(f"parallel.vpp: {key} ({path}) was saved with parallel.vpp={saved_layout.get('vpp')}; "
                          "set parallel.vpp as when saved")


def _check_text(cfg: Config, use: CheckpointUse, path: Path, meta: dict, digest: str | None) -> None:
    """The template and tokenizer (`digest`, the sha256 of this run's) `use`'s checkpoint recorded
    are this run's: an RM started from an SFT policy of another tokenizer trained without a word,
    and PPO then refused both settings."""
    state = meta.get("state") or {}
    recorded = state.get("template")
    if recorded is not None and recorded != cfg.data.template:
        raise ConfigError(f"data.template: {cfg.data.template!r}, but {use.key} ({path}) was trained with "
                          f"{recorded!r}; set data.template={recorded}")
    theirs = state.get("tokenizer_sha256")
    if theirs is None and state.get("tokenizer") and Path(state["tokenizer"]).exists():
        theirs = tokenizer_digest(state["tokenizer"])
    if theirs is not None and digest is not None and theirs != digest:
        raise ConfigError(f"model.tokenizer: {tokenizer_path(cfg)} is not the tokenizer {use.key} ({path}) was "
                          f"trained with ({state.get('tokenizer')}); set model.tokenizer to that one")


def _check_resume_precision(cfg: Config, use: CheckpointUse, path: Path, state: dict, required: bool) -> None:
    """A resume keeps the precision it was trained in: a bf16 run's optimizer holds fp32 main copies
    of the weights, an fp32 run's none, and either resumed as the other died in a KeyError traceback.
    train.precision auto is bf16 where there is a GPU: the run knows, the dry run (on a login node,
    say) does not and leaves it to the run."""
    saved = state.get("precision")  # None: saved before it was recorded
    mine = cfg.train.precision
    if mine == "auto":
        if not required:
            return
        import torch

        mine = "bf16" if torch.cuda.is_available() else "fp32"
    if saved is not None and saved != mine:
        raise ConfigError(f"train.precision: this run trains in {mine}, but {use.key} ({path}) was trained in {saved} "
                          f"and its optimizer states are {saved}'s; set train.precision={saved} to resume, or start a "
                          "new run.dir from its weights")


def _check_resume_batch(cfg: Config, use: CheckpointUse, path: Path, state: dict) -> None:
    """The data position a resume continues from is a whole number of this run's batches: another
    train.global_batch_size passed the dry run and was refused by the sampler after config.yaml
    was replaced (naming train.global_batch_size for PPO too, whose batch is ppo.rollouts_per_iter)."""
    for field, key, size in (("consumed_samples", "train.global_batch_size", cfg.train.global_batch_size),
                             ("consumed_prompts", "ppo.rollouts_per_iter", cfg.ppo.rollouts_per_iter)):
        done = state.get(field)
        if isinstance(done, int) and size > 0 and done % size:
            raise ConfigError(f"{key}: {size}, but {use.key} ({path}) stopped after {done} samples, not a whole number "
                              f"of batches of {size}; resume with the {key} it was trained with (run.dir's config.yaml "
                              "says), or set a new run.dir")


def _check_resume_adapters(cfg: Config, use: CheckpointUse, path: Path, state: dict) -> None:
    """A resume trains the adapters it saved (or the full weights it saved): another lora section
    passed the dry run and stopped the run with a dict of both specs naming no key."""
    from alfred_train.models.lora import AdapterSpec

    mine = AdapterSpec.from_config(cfg.lora).to_state() if cfg.lora.rank else None
    for name in use.holds[0]:
        entry = (state.get("lora") or {}).get(name)
        theirs = {"targets": entry["targets"], "dropout": entry.get("dropout", 0.0)} if entry else None
        if theirs != mine:
            raise ConfigError(f"lora: {use.key} ({path}) trained {_adapters(theirs)}, this config {_adapters(mine)}; "
                              f"set {_lora_keys(theirs)} as when saved, or set a new run.dir")


def _check_resume_bases(cfg: Config, use: CheckpointUse, path: Path, state: dict) -> None:
    """A LoRA resume puts its adapters back over the base they were trained on: the init the run
    loads (pinned, `stages.inits`) is that checkpoint or a copy, or, for a base that was the seeded
    init, there is no init and train.seed is the same. Each passed the dry run and stopped the run
    with a dict of both bases; a copy of the base (a renamed SFT run) was refused."""
    from alfred_train.stages import inits

    stage = state.get("stage")
    for name in use.holds[0] if cfg.lora.rank else ():
        base = (((state.get("lora") or {}).get(name) or {}).get("base")) or {}
        key, where = _init_of(cfg, stage, name)
        recorded = (state.get("inits") or {}).get(key) or {}
        if base.get("path") is None and base.get("seed") is not None:  # over the seeded init
            if where:
                raise ConfigError(f"{key}: {use.key} ({path}) trained its adapters over the seeded init (train.seed "
                                  f"{base['seed']}), not over a checkpoint; remove {key} to resume it, or set a new "
                                  "run.dir")
            if base["seed"] != cfg.train.seed:
                raise ConfigError(f"train.seed: {use.key} ({path}) trained its adapters over the seeded init of "
                                  f"train.seed={base['seed']}; set train.seed={base['seed']} to resume it")
        elif base.get("path") is not None:
            if not where:
                raise ConfigError(f"{key}: {use.key} ({path}) trained its adapters over {base['path']}; set {key} to "
                                  "it (or a copy of it) to resume, or set a new run.dir")
            if not inits.same_checkpoint(where, base["path"], recorded.get("manifest_sha256")):
                raise ConfigError(f"{key}: {where} is not the base {use.key} ({path}) trained its adapters over "
                                  f"({base['path']}); set {key} to it (or a copy of it), or set a new run.dir")


def _init_of(cfg: Config, stage: str | None, name: str) -> tuple[str, str | None]:
    """(config key, its value) of the init model `name`'s base comes from in a `stage` run."""
    if stage == "ppo":
        return ("ppo.policy_init", cfg.ppo.policy_init) if name == "policy" else ("ppo.reward_init", cfg.ppo.reward_init)
    if stage == "rm" and (cfg.rm.init or not cfg.checkpoint.init):
        return "rm.init", cfg.rm.init
    return "checkpoint.init", cfg.checkpoint.init


def _adapters(spec: dict | None) -> str:
    if spec is None:
        return "the full weights (no adapters)"
    ranks = {t["rank"] for t in spec["targets"].values()}
    alphas = {round(t["rank"] * t["scale"], 6) for t in spec["targets"].values()}
    return (f"adapters of rank {'/'.join(map(str, sorted(ranks)))}, alpha {'/'.join(f'{a:g}' for a in sorted(alphas))} "
            f"on {', '.join(sorted(spec['targets']))}, dropout {spec['dropout']:g}")


def _lora_keys(spec: dict | None) -> str:
    if spec is None:
        return "lora.rank=0"
    t = next(iter(spec["targets"].values()))
    return (f"lora.rank={t['rank']} lora.alpha={round(t['rank'] * t['scale'], 6):g} "
            f"lora.targets=[{','.join(sorted(spec['targets']))}] lora.dropout={spec['dropout']:g}")


def check_resume_layout(cfg: Config, use: CheckpointUse, path: Path, meta: dict) -> str | None:
    """Refuse (ConfigError naming `use.key`) a resume whose optimizer states cannot reshard to this
    run's layout (`optimizer_state.reshard_problem`); returns the layout change, None at the same layout."""
    saved = meta.get("layout") or {}
    if problem := optimizer_state.reshard_problem(saved, layout(cfg)):
        raise ConfigError(f"{use.key}: {path}: {problem}, or set a new run.dir")
    return checkpoint.layout_note(saved, layout(cfg))
