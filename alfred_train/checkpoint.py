"""Sharded checkpoints: save, load (resharding across TP/PP), resume from the newest sound one.

Layout under `run.dir/checkpoints/`:

    iter_0000010/            megatron-core dist_checkpointing (torch_dist) files
        meta.json            step, layout, trainer state (schedules, data position, KL controller...)
        rng/rank_00003.safetensors   python / numpy / torch RNG states of each rank (no pickle)
        manifest.json        every file with its size and sha256, written last (checkpointing/manifest.py)
    latest                   text file naming the newest complete checkpoint: a hint for people

A save (collective) writes `.tmp-iter_0000010/` with an in-process writer (no child process a
preemption signal can kill), each rank fsyncs and hashes the files it wrote, rank 0 gathers the
manifest, the directory is fsynced and renamed, and only when every node's part is complete does
`latest` move. Old checkpoints are pruned by step number (`keep`), never the one just written.

Resume (`find_resumable`, collective) ignores `latest`: it walks `iter_*` newest first by step,
checks each against its manifest (sizes, then sha256), names each damaged one in one line and
returns the newest sound one; with `checkpoint.s3_uri` a newer sound checkpoint in S3 is downloaded
and verified first. Checkpoints that exist but none sound: DamagedCheckpointsError, never step 0.

Node-local run directories (one per node, `checkpoint.node_local`) are described in
`checkpointing/site.py`. Model weights load at any TP/PP layout. A resume may change the layout
too (`checkpointing/optimizer_state.py`): plain optimizer states reshard across TP, PP and DP like
the weights, ZeRO's across DP (a 16-node job resumed on 8 nodes); anything else is refused in one
line. A checkpoint holds any number of named models (`policy`, `value`, ...), each with an optional
optimizer; `meta.json["state"]` carries the JSON-able trainer state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
import torch.distributed as dist

from alfred_train import atomic
from alfred_train.checkpointing import manifest as mf
from alfred_train.resources import human
from alfred_train.checkpointing import optimizer_state, safety, writer
from alfred_train.checkpointing.site import Site
from alfred_train.errors import AlfredError, ConfigError

log = logging.getLogger("alfred_train")
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d+)$")


class DamagedCheckpointsError(AlfredError):
    """Checkpoints exist but none is sound: the run refuses to start over from step 0."""

    exit_code = 2


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def iter_steps(ckpt_root: str | Path) -> dict[int, Path]:
    """step -> `iter_N` directory under `ckpt_root` (complete or not)."""
    root = Path(ckpt_root)
    found = {}
    if root.is_dir():
        for p in root.iterdir():
            if (m := _ITER.match(p.name)) and p.is_dir():
                found[int(m.group(1))] = p
    return found


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest checkpoint under `ckpt_root` by step number that has its manifest and meta.json
    (a cheap check for reading a finished run, e.g. `ppo.policy_init`; resume verifies fully).
    Checkpoints written before manifests existed (none under `ckpt_root` has one) count by meta.json."""
    return latest_checkpoint_of(iter_steps(ckpt_root))


def latest_checkpoint_of(steps: dict[int, Path]) -> Path | None:
    found = sorted(((s, p) for s, p in steps.items() if (p / "meta.json").exists()), reverse=True)
    with_manifest = [p for _, p in found if (p / mf.MANIFEST).exists()]
    if with_manifest:
        return with_manifest[0]
    return found[0][1] if found else None


def newest_resumable(ckpt_root: str | Path, damaged: list[str] | None = None) -> Path | None:
    """The checkpoint `checkpoint.resume: auto` is expected to resume, read cheaply (the run hashes
    every file, `find_resumable`): the newest of `latest_checkpoint`'s kind whose meta.json is readable
    and matches its manifest's sha256, and whose files have their manifest's sizes. Each one skipped
    is appended to `damaged` ("PATH: problem"), as the run names them (a damaged meta.json stopped the
    run, or was believed; a truncated shard was said to be resumed)."""
    steps = iter_steps(ckpt_root)
    while (found := latest_checkpoint_of(steps)) is not None and (problem := _cheap_problem(found)):
        if damaged is not None:
            damaged.append(f"{found}: {problem}")
        steps = {s: p for s, p in steps.items() if p != found}
    return found


def _cheap_problem(ckpt_dir: Path) -> str | None:
    try:
        json.loads((ckpt_dir / "meta.json").read_text())
    except (OSError, ValueError):  # UnicodeDecodeError, JSONDecodeError
        return "meta.json cannot be read"
    if not (ckpt_dir / mf.MANIFEST).exists():
        return None  # written before manifests: its meta.json is all there is
    if found := mf.problems(ckpt_dir, hashes=False):
        return "; ".join(found[:3])
    entries = mf.read_manifest(ckpt_dir)["files"]
    recorded = next((e["sha256"] for e in entries if e["path"] == "meta.json"), None)
    if recorded is not None and mf.sha256_of(ckpt_dir / "meta.json") != recorded:
        return "meta.json does not match its sha256 (corrupted)"
    return None


def none_sound(root: Path, damaged: list[str], s3_uri: str | None = None,
               node_local: bool = False) -> DamagedCheckpointsError:
    """The refusal of a resume whose checkpoints all are damaged (`damaged`: "PATH: problem" each)."""
    return DamagedCheckpointsError(
        f"checkpoint.resume=auto: no sound checkpoint under {root}"
        f"{' or ' + s3_uri if s3_uri else ''} ({' | '.join(damaged)}); repair them, or move them out of run.dir to "
        "start again from step 0 (or set a new run.dir)"
        + ("; with checkpoint.node_local each node's copy needs every node's files (from checkpoint.s3_uri "
           "or the launcher's checkpoint sync)" if node_local else ""))


def read_meta(ckpt_dir: str | Path) -> dict:
    """A checkpoint's meta.json; a ConfigError naming it when it cannot be read (a damaged copy)."""
    path = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}); the checkpoint is damaged: use a sound "
                          "one (an earlier iter_*, or a fresh copy of this one)") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} holds no JSON object; the checkpoint is damaged: use a sound one")
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a `checkpoints/` root (its newest checkpoint) or a run dir."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if (cand / "meta.json").exists():
            return cand
        found = latest_checkpoint(cand)
        if found:
            return found
    raise ConfigError(f"{path}: no checkpoint found (expected meta.json, or iter_* checkpoints with a manifest)")


def locate(where: str | Path, key: str, *, required: bool) -> Path | None:
    """`resolve_checkpoint` for the config key `key` naming `where`: None when `where` does not exist
    and not `required` (a dry run on a machine that does not mount it); a ConfigError naming `key`
    when it is required and missing, or exists (a file, an empty or unrelated directory) but holds
    no checkpoint."""
    p = Path(where)
    try:
        return resolve_checkpoint(p)
    except ConfigError:
        if not p.exists() and not required:
            return None
    problem = "does not exist" if not p.exists() else "is a file, not a checkpoint directory" if not p.is_dir() \
        else "holds no checkpoint (no meta.json, no iter_* checkpoint with a manifest, here or under checkpoints/)"
    raise ConfigError(f"{key}: {where} {problem}; point {key} at a run directory or one of its checkpoints")


# Model shape fields the weights do not hold: an init or resume may differ in them.
SHAPE_FREE = ("init_std", "max_seq_len")  # used only by a fresh init; rotary positions (no weights)


def shape_differences(saved: dict | None, built: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, built value) of each model shape field (`ModelShape`) where a checkpoint's
    `meta.json` state.model differs from the model this run builds; [] for a checkpoint that
    records no shape, or for the fields it does not record (written before they existed)."""
    saved = saved or {}
    return [(k, saved[k], v) for k, v in built.items() if k not in SHAPE_FREE and k in saved and saved[k] != v]


def _model_sd(chunks, name: str) -> dict:
    """Each chunk's sharded state dict with tensor keys under `name.` (several models per checkpoint)."""
    return {f"{name}.chunk{i}": c.sharded_state_dict(prefix=f"{name}.") for i, c in enumerate(chunks)}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def save_checkpoint(ckpt_root: str | Path, step: int, models: dict, state: dict, runtime,
                    keep: int, layout: dict, *, node_local: bool = False, s3_uri: str | None = None,
                    timings: dict | None = None) -> Path:
    """Collective: every rank calls it. models: name -> (chunks, optimizer or None).

    `timings`, when given, receives the seconds of each phase: write (dist_checkpointing and RNG
    files), manifest (hash + fsync + gather + rename + `latest`), s3 (upload and verify).
    """
    t0 = time.perf_counter()
    site = Site.detect(runtime.rank, node_local)
    root = Path(ckpt_root)
    final = root / iter_name(step)
    tmp = root / f".tmp-{iter_name(step)}"
    problem = None
    if site.owner:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:  # a full disk, a folder turned read-only: one line, as for the files
            problem = str(_write_failed(err, step, root, tmp, owner=False))
    if problems := site.problems_everywhere(problem):  # the barrier before writing, which also tells every rank
        raise CheckpointWriteError(problems[0])
    sharded = {}
    for name, (chunks, optimizer) in models.items():
        msd = _model_sd(chunks, name)
        sharded.update(msd)
        if optimizer is not None:
            sharded[f"{name}.optimizer"] = optimizer_state.sharded(optimizer, msd, is_loading=False, prefix=f"{name}.")
    with _preemption_signals_blocked():
        try:
            writer.save(sharded, tmp)
            if site.owner:
                (tmp / "rng").mkdir()
            dist.barrier()
            safety.save_rng(safety.rng_file(tmp, runtime.rank))
            if runtime.is_main:
                adam_steps = {name: optimizer_state.adam_step(opt) for name, (_, opt) in models.items()
                              if opt is not None}
                meta = {"step": step, "layout": layout, "models": sorted(models), "state": state,
                        "adam_steps": adam_steps, "optimizer_keys": optimizer_state.KEYS}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except (OSError, RuntimeError, CheckpointException) as err:  # the last: torch DCP's, a BaseException
            raise _write_failed(err, step, root, tmp, site.owner) from None
        dist.barrier()
        t1 = time.perf_counter()
        mine = mf.seal(tmp, mf.own_files(tmp, runtime.rank))
        manifest = mf.gather(mine, step=step, node=site.node, nodes=site.nodes)
        problem = mf.publish(tmp, final, manifest, site.node) if site.owner else None
        _all_or_raise(problem, f"checkpoint {iter_name(step)}")
        if site.owner:  # every node's part is complete and renamed: `latest` may move
            atomic.write_text(root / LATEST, final.name, durable=True)
            _prune(root, keep, written=step)
        t2 = time.perf_counter()
        if s3_uri:
            from alfred_train.checkpointing import mirror

            mirror.upload(final, s3_uri, manifest, mine, runtime, keep=keep)
        dist.barrier()
    t3 = time.perf_counter()
    seconds = {"write": t1 - t0, "manifest": t2 - t1, "s3": t3 - t2, "total": t3 - t0}
    if timings is not None:
        timings.update(seconds)
    log.info("saved %s in %.2fs (write %.2fs, manifest+fsync %.2fs%s)", final, seconds["total"], seconds["write"],
             seconds["manifest"], f", s3 {seconds['s3']:.2f}s" if s3_uri else "")
    return final


class CheckpointWriteError(AlfredError):
    """A save that could not write its files (a full disk, most often). Every rank raises it; rank 0 says it."""

    exit_code = 1
    raised_on_every_rank = True


def _write_failed(err: Exception, step: int, root: Path, tmp: Path, owner: bool) -> CheckpointWriteError:
    """One line for a failed write, with the free space that usually explains it (torch's writer
    reports a full disk as "unexpected pos 704 vs 598"); the part written is removed."""
    free = shutil.disk_usage(root).free
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
    cause = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    full = free < 64 * 2 ** 20
    return CheckpointWriteError(
        f"checkpoint {iter_name(step)}: writing it under {root} failed ({cause}); "
        + (f"the disk is full ({human(free)} free): free space or lower checkpoint.keep, then rerun "
           "(it resumes from the last checkpoint)" if full else f"{human(free)} free there"))


def _all_or_raise(problem: str | None, what: str) -> None:
    """Collective: raise on every rank when any rank reports a problem."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
    if found:
        raise AlfredError(f"{what} is incomplete: {'; '.join(found)}")


def find_resumable(ckpt_root: str | Path, runtime, *, node_local: bool = False,
                   s3_uri: str | None = None) -> Path | None:
    """Collective: the newest sound checkpoint under `ckpt_root` (downloaded from `s3_uri` when S3
    holds a newer sound one), or None when there is none at all. Damaged ones are named in one log
    line each; raises DamagedCheckpointsError when checkpoints exist but none is sound."""
    site = Site.detect(runtime.rank, node_local)
    root = Path(ckpt_root)
    local = iter_steps(root) if site.owner else {}
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (sorted(local), _latest_hint(root) if site.owner else None))
    steps = sorted({s for found, _ in seen for s in found}, reverse=True)
    damaged, chosen = [], None
    for step in steps:
        path = root / iter_name(step)
        mine = None
        if site.owner:
            found = mf.problems(path, expect_step=step) if path.is_dir() else [f"{path.name} is missing"]
            mine = "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "") if found else None
        bad = site.problems_everywhere(mine)
        if not bad:
            chosen = step
            break
        damaged.append(f"{root / iter_name(step)}: {'; '.join(bad)}")
    if s3_uri:
        from alfred_train.checkpointing import mirror

        fetched = mirror.fetch_newer(s3_uri, root, chosen, runtime, site, damaged)
        chosen = fetched if fetched is not None else chosen
    if runtime.is_main:
        for line in damaged:
            log.warning("damaged checkpoint skipped: %s", line)
        for hint in {h for _, h in seen if h}:
            log.warning("%s", hint)
    if chosen is None and damaged:
        raise none_sound(root, damaged, s3_uri, site.node_local)
    return None if chosen is None else root / iter_name(chosen)


def verify_checkpoint(path: Path, runtime) -> None:
    """Collective: rank 0 checks `path` against its manifest; DamagedCheckpointsError everywhere if
    it is not sound (for a checkpoint named explicitly, e.g. `checkpoint.resume: <path>`)."""
    box = [mf.problems(path) if runtime.is_main else None]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise DamagedCheckpointsError(f"{path} is damaged: {'; '.join(box[0][:3])}; name a sound checkpoint "
                                      "or set checkpoint.resume=auto")


def _latest_hint(root: Path) -> str | None:
    """What is wrong with `latest` (it is only a hint, never followed), or None."""
    marker = root / LATEST
    if not marker.exists() and not marker.is_symlink():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:  # a folder, binary garbage, a dangling link
        why = err.strerror if isinstance(err, OSError) else "not text"
        return f"{marker} is unreadable ({why}; ignored: resume walks iter_* by step)"
    if not name:
        return f"{marker} is empty (ignored: resume walks iter_* by step)"
    if not (root / name).is_dir():
        return f"{marker} names {name}, which does not exist (ignored: resume walks iter_* by step)"
    return None


def layout_note(saved: dict, now: dict) -> str | None:
    """One line for a resume at another layout ("tp 2 -> 1, dp 1 -> 2"), None at the same one."""
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in ("tp", "pp", "dp") if saved.get(k) != now[k]]
    return ", ".join(changed) or None


def load_models(ckpt_dir: str | Path, models: dict, *, strict_layout: dict | None = None,
                skip: tuple[str, ...] = ()) -> dict:
    """Load the named models (and optimizers, when given) in place; returns meta.json.

    models: name -> (chunks, optimizer or None). `name` may be given as "dst=src" to load the
    checkpoint's model `src` into `dst` (e.g. value model from the reward model).
    `strict_layout`: this run's layout, which optimizer states must be able to reshard to
    (`optimizer_state.reshard_problem`).
    skip: partial load of weights only. Parameters whose name contains one of these strings are
    left as they are (e.g. `skip=("output_layer",)` loads an SFT trunk into a scalar-head model);
    every other parameter must be in the checkpoint, as in a full load.
    """
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(ckpt_dir)
    safety.check_pickles(path)
    meta = json.loads((path / "meta.json").read_text())
    sharded, wanted = {}, {}
    for spec, (chunks, optimizer) in models.items():
        dst, _, src = spec.partition("=")
        src = src or dst
        if src not in meta["models"]:
            raise ConfigError(f"{path}: holds models {meta['models']}, not {src!r}")
        if len(chunks) != int(meta["layout"].get("vpp") or 1):
            raise ConfigError(f"{path}: saved with another virtual-pipeline split; set parallel.vpp as when saved")
        msd = _model_sd(chunks, src)
        if skip:
            if optimizer is not None:
                raise ValueError("load_models: skip= loads weights only; pass no optimizer with it")
            msd = {k: {key: v for key, v in sd.items() if not _skipped(key, skip)} for k, sd in msd.items()}
        sharded.update(msd)
        wanted[spec] = (chunks, optimizer, src, msd)
        if optimizer is not None:
            problem = None if strict_layout is None else optimizer_state.reshard_problem(meta["layout"], strict_layout)
            if problem:
                raise ConfigError(f"{path}: {problem}")
            optimizer_state.prime(optimizer)
            prefix = f"{src}." if meta.get("optimizer_keys") == optimizer_state.KEYS else ""
            sharded[f"{src}.optimizer"] = optimizer_state.sharded(optimizer, msd, is_loading=True, prefix=prefix)
    loaded = dist_checkpointing.load(sharded, str(path))
    with torch.no_grad():
        for spec, (chunks, optimizer, src, _) in wanted.items():
            for i, chunk in enumerate(chunks):
                _load_chunk(chunk, _strip(loaded[f"{src}.chunk{i}"], f"{src}."), skip)
            if optimizer is not None:
                optimizer.load_state_dict(loaded[f"{src}.optimizer"])
                if meta.get("adam_steps", {}).get(src) is not None:
                    optimizer_state.set_adam_step(optimizer, meta["adam_steps"][src])
    return meta


def _skipped(key: str, skip: tuple[str, ...]) -> bool:
    return any(s in key for s in skip)


def _load_chunk(chunk, state_dict: dict, skip: tuple[str, ...]) -> None:
    """load_state_dict, strict except for the parameters named by `skip` (kept as they are)."""
    if not skip:
        chunk.load_state_dict(state_dict, strict=True)
        return
    missing, unexpected = chunk.load_state_dict(state_dict, strict=False)
    wrong = [k for k in missing if not _skipped(k, skip)] + list(unexpected)
    if wrong:
        raise RuntimeError(f"partial load (skip={skip}): unexpected or missing keys {wrong}")


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's RNG states (safetensors: no pickle); False when the file is absent."""
    f = safety.rng_file(ckpt_dir, rank)
    if not f.exists():
        return False
    safety.load_rng(f)
    return True


@contextlib.contextmanager
def _preemption_signals_blocked():
    """Hold SIGTERM/SIGUSR1 while dist_checkpointing writes: its writer and Manager processes inherit
    the blocked mask, so a scheduler's TERM to the whole job step (Slurm requeue, scancel) cannot
    kill them mid-save; the parent gets the signal when the save is done and checkpoints/exits."""
    sigs = {signal.SIGTERM, signal.SIGUSR1}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _prune(root: Path, keep: int, written: int) -> None:
    """Keep the newest `keep` checkpoints by step number up to `written` (just written, so never
    removed), and remove the parts of saves that never finished. Newer ones are left alone: a run
    resumed from an older step skipped them as damaged, and it replaces each when it reaches its
    step; they do not push out the sound ones before it."""
    done = sorted((step, path) for step, path in iter_steps(root).items() if step <= written)
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # a save killed mid-way (Slurm's KILL after TERM) left its .tmp- part (a whole checkpoint's size), or
    # the .old- copy of a step it replaced; the save just published is whole, so these are stale
    for stale in [*root.glob(".tmp-iter_*"), *root.glob(".old-iter_*")]:
        shutil.rmtree(stale, ignore_errors=True)
