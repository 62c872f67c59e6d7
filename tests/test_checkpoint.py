"""Checkpoints a run can be bet on (issue 8 §1), with real trainer processes on CPU.

One short uninterrupted SFT run (5 steps, a checkpoint after each) is the reference. Copies of it
are damaged in every way the issue lists, and each resumed run must name what is damaged, skip
it, and end bit-equal to the reference; all damaged -> refused (exit 2, one line, nothing
written). The same reference checks kill -9 of the process group at seeded moments (one of them
inside a save) and SIGTERM during a save. Crafted pickles are refused before anything unpickles them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alfred_train.checkpointing import manifest as mf
from tests.helpers import ROOT, TINY_SFT, metrics, run_cli

pytestmark = pytest.mark.slow
STEPS = 5
SFT = [str(TINY_SFT), "parallel.tp=1", f"train.max_steps={STEPS}", "data.synthetic_size=200",
       "train.eval_interval=0", "logging.plots=false", "logging.tensorboard=false", "checkpoint.interval=1",
       "checkpoint.keep=10"]
COMPARED = ["loss", "grad_norm", "lr"]


def sft(run_dir: Path, *extra, check=True):
    return run_cli("sft", *SFT, f"run.dir={run_dir}", *extra, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "reference"
    sft(run)
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == [f"iter_{s:07d}" for s in range(1, 6)]
    return run


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"iter_{step:07d}"


def assert_same_as(run: Path, reference: Path) -> None:
    """Each step logged once, every compared metric equal bit for bit."""
    assert [r for r in metrics(run, "step")] == list(range(1, STEPS + 1))
    for key in COMPARED:
        assert metrics(run, key) == metrics(reference, key), key


def damage_truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_pruning_goes_by_step_and_keeps_the_one_just_written(tmp_path):
    from alfred_train import checkpoint

    for step in (1, 2, 3, 4, 10, 12):  # 10 and 12: newer, left by a run that resumed from an older step
        ckpt(tmp_path, step).mkdir(parents=True)
    checkpoint._prune(tmp_path / "checkpoints", keep=2, written=4)
    assert sorted(checkpoint.iter_steps(tmp_path / "checkpoints")) == [3, 4, 10, 12]
    checkpoint._prune(tmp_path / "checkpoints", keep=1, written=1)  # never the one just written
    assert sorted(checkpoint.iter_steps(tmp_path / "checkpoints")) == [3, 4, 10, 12]


def test_pruning_removes_the_parts_of_saves_killed_mid_way(tmp_path):
    """A save KILLed after Slurm's TERM leaves .tmp-iter_N (every shard: a whole checkpoint's size);
    a step it never reaches again would keep it forever. The next save removes it."""
    from alfred_train import checkpoint

    root = tmp_path / "checkpoints"
    ckpt(tmp_path, 10).mkdir(parents=True)
    for stale in (".tmp-iter_0000015", ".old-iter_0000012"):
        (root / stale).mkdir()
        (root / stale / "__0_0.distcp").write_bytes(b"x" * 100)
    checkpoint._prune(root, keep=2, written=10)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000010"]


def test_rows_after_the_resumed_step_are_dropped(tmp_path):
    from alfred_train.metrics import drop_rows_after

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (0, 1, 2, 3, 4)) + '{"step": 5, "lo')
    assert drop_rows_after(log, 2) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 1, 2]
    assert drop_rows_after(log, 0) == 3 and log.read_text() == ""  # a fresh start keeps nothing
    # bytes that are not UTF-8 (a damaged block) were a UnicodeDecodeError at every resume: a bad line
    log.write_bytes(b'{"step": 1}\n\xed\xa0\x80\xff\x00\n{"step": 2}\n{"step": 3}\n')
    assert drop_rows_after(log, 2) == 2 and log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_an_earlier_config_yaml_that_is_not_text_is_ignored(tmp_path, caplog):
    from alfred_train.config import load_config
    from alfred_train.stages.common import _say_config_changes

    (tmp_path / "config.yaml").write_bytes(b"\xed\xa0\x80 garbage \xff")  # was a UnicodeDecodeError traceback
    with caplog.at_level(logging.WARNING, "alfred_train"):
        _say_config_changes(tmp_path / "config.yaml", load_config(TINY_SFT))
    assert caplog.text == ""


# ---------------------------------------------------------------------------------------------
# The damaged-checkpoint sweep


def test_damaged_checkpoints_are_named_skipped_and_the_run_ends_bit_equal(reference, tmp_path):
    run = copy_run(reference, tmp_path / "damaged")
    damage_truncate(ckpt(run, 5) / "__0_0.distcp")
    (ckpt(run, 4) / "__0_1.distcp").unlink()
    damage_flip(ckpt(run, 3) / "__0_0.distcp")
    (ckpt(run, 2) / "meta.json").unlink()
    (run / "checkpoints" / "latest").write_text("iter_0000009")  # names a missing directory
    proc = sft(run)
    err = proc.stderr
    assert "iter_0000005: __0_0.distcp has" in err and "the manifest says" in err, err[-3000:]
    assert "iter_0000004: __0_1.distcp is missing" in err
    assert "iter_0000003: __0_0.distcp does not match its sha256" in err
    assert "iter_0000002: meta.json is missing" in err
    assert "latest names iter_0000009, which does not exist" in err
    assert f"resumed from {ckpt(run, 1)} at step 1" in err
    assert_same_as(run, reference)
    for step in range(1, STEPS + 1):  # the damaged ones were written again, sound
        assert mf.problems(ckpt(run, step)) == [], step
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000005"


def test_latest_naming_a_partial_copy_is_only_a_hint(reference, tmp_path):
    run = copy_run(reference, tmp_path / "partial")
    (ckpt(run, 5) / "manifest.json").unlink()  # a half-finished copy: no manifest, no meta.json
    (ckpt(run, 5) / "meta.json").unlink()
    proc = sft(run)
    assert "iter_0000005: no manifest.json" in proc.stderr
    assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stderr
    assert_same_as(run, reference)

    run = copy_run(reference, tmp_path / "empty-latest")
    (run / "checkpoints" / "latest").write_text("")
    shutil.rmtree(ckpt(run, 5))
    proc = sft(run)
    assert "latest is empty" in proc.stderr
    assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stderr
    assert_same_as(run, reference)

    run = copy_run(reference, tmp_path / "garbage-latest")  # was a UnicodeDecodeError traceback
    (run / "checkpoints" / "latest").write_bytes(b"\xed\xa0\x80\xff garbage")
    shutil.rmtree(ckpt(run, 5))
    proc = sft(run)
    assert "latest is unreadable (not text; ignored" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stderr
    assert_same_as(run, reference)


def test_a_damaged_meta_json_is_skipped_before_the_run_as_in_it(reference, tmp_path):
    """The checks before the run read the newest meta.json unverified: an empty one stopped the run
    ("unreadable ... use a sound one", the one before it never tried), a flipped bit in its shape told
    the user to change model.*. Both are skipped for the one before, as the resume itself does."""
    for name, damage, said in [
            ("empty", lambda meta: meta.write_text(""), "meta.json has 0 bytes, the manifest says"),
            ("bit-rot", lambda meta: meta.write_text(meta.read_text().replace('"hidden_size": 64', '"hidden_size": 65')),
             "meta.json does not match its sha256 (corrupted)")]:
        run = copy_run(reference, tmp_path / name)
        damage(ckpt(run, 5) / "meta.json")
        dry = run_cli("sft", *SFT, f"run.dir={run}", "--dry-run")
        assert f"resumes {ckpt(run, 4)} (step 4)" in dry.stdout + dry.stderr, name
        proc = sft(run)
        assert f"iter_0000005: {said}" in proc.stderr, proc.stderr[-3000:]
        assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stderr
        assert_same_as(run, reference)


def _snapshot(run: Path) -> dict:
    return {p.relative_to(run).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file() and p.name not in ("config.yaml", ".lock")}


def test_all_damaged_is_refused_and_nothing_is_written(reference, tmp_path):
    run = copy_run(reference, tmp_path / "all-damaged")
    for step in range(1, STEPS + 1):
        damage_truncate(ckpt(run, step) / "__0_1.distcp")
    before = _snapshot(run)
    proc = sft(run, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alfred-train: error:")]
    assert len(errors) == 1 and "no sound checkpoint" in errors[0] and "start again from step 0" in errors[0]
    assert all(f"iter_{s:07d}" in errors[0] for s in range(1, STEPS + 1))
    assert "Traceback" not in proc.stderr
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# Pickles


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickles_are_refused(reference, tmp_path):
    from alfred_train import checkpoint
    from alfred_train.checkpointing import safety

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker), protocol=2)
    bad = copy_run(ckpt(reference, 5), tmp_path / "iter_0000005")

    (bad / "rng" / "rank_00000.safetensors").write_bytes(payload)  # RNG file: safetensors, never unpickled
    with pytest.raises(Exception):
        checkpoint.load_rng(bad, 0)

    # a pickled item inside a shard (megatron's `_extra_state`: torch reads it with weights_only=False)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = safety._MetadataUnpickler(open(bad / ".metadata", "rb")).load()
    index, info = next((i, s) for i, s in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    assert len(payload) <= info.length
    with open(bad / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(payload + b"\0" * (info.length - len(payload)))
    with pytest.raises(safety.UnsafeCheckpointError, match="refused"):
        safety.check_pickles(bad)

    # DCP's `.metadata` (torch reads it with plain pickle), with a manifest forged to match: the
    # whole run refuses it with one line, exit 2
    run = copy_run(reference, tmp_path / "tampered")
    for step in range(1, STEPS):
        shutil.rmtree(ckpt(run, step))
    target = ckpt(run, STEPS)
    (target / ".metadata").write_bytes(payload)
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == ".metadata":
            entry.update(size=len(payload), sha256=mf.sha256_of(target / ".metadata"))
    (target / "manifest.json").write_text(json.dumps(manifest))
    proc = sft(run, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ".metadata: refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# kill -9 and SIGTERM at seeded moments


def _start(run_dir: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.Popen([sys.executable, "-m", "alfred_train", *args, f"run.dir={run_dir}"], cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, as a job step


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 600):
    end = time.time() + timeout
    while (found := ready()) is None:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.002)
    return found


def _logged_step(run_dir: Path, step: int):
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            if json.loads(line).get("step") == step:
                return True
        except ValueError:  # a line being written
            pass
    return None


def _temporaries(run_dir: Path) -> set[tuple]:
    try:  # a directory made again under the same name may reuse the inode, never the change time
        return {(p.name, p.stat().st_ino, p.stat().st_ctime_ns) for p in (run_dir / "checkpoints").glob(".tmp-iter_*")}
    except OSError:  # renamed while we looked
        return set()


def _saving(run_dir: Path, stale: set = frozenset()):
    """A save in progress: a temporary checkpoint directory that was not there before."""
    return next(iter(_temporaries(run_dir) - stale), None)


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> int:
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=300)


def _tensorboard_steps(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


def test_sft_survives_kill_9_and_sigterm_during_a_save(reference, tmp_path):
    import psutil

    rng = random.Random(8)
    run, args = tmp_path / "killed", ["sft", *SFT, "logging.tensorboard=true"]
    # 1) kill -9 a seeded moment after step 1 or 2 is logged
    proc = _start(run, args, tmp_path / "attempt1.log")
    step = rng.choice([1, 2])
    _wait_for(proc, lambda: _logged_step(run, step), f"step {step} logged")
    time.sleep(rng.uniform(0.0, 0.2))
    assert _kill_group(proc) == -signal.SIGKILL
    # 2) kill -9 inside a save (its temporary directory exists)
    stale = _temporaries(run)  # attempt 1's, when its kill came inside a save
    proc = _start(run, args, tmp_path / "attempt2.log")
    _wait_for(proc, lambda: _saving(run, stale), "a save")
    time.sleep(rng.uniform(0.0, 0.03))
    assert _kill_group(proc) == -signal.SIGKILL
    # 3) SIGTERM to the whole group inside a save: the save completes, no writer process exists to
    #    be killed, the run exits 3, and the next run resumes from the preemption save
    stale = _temporaries(run)  # attempt 2's, when the kill came before its rename
    proc = _start(run, args, tmp_path / "attempt3.log")
    _wait_for(proc, lambda: _saving(run, stale), "a save")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert _kill_group(proc, signal.SIGTERM) == 3, (tmp_path / "attempt3.log").read_text()[-3000:]
    assert children == [], children
    log = (tmp_path / "attempt3.log").read_text()
    preempted = int(log.split("preempted at step ")[1].split(":")[0])
    assert "Traceback" not in log and "BrokenPipe" not in log
    assert (run / "checkpoints" / "latest").read_text() == f"iter_{preempted:07d}"
    # 4) to the end
    proc = _start(run, args, tmp_path / "final.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert f"at step {preempted}" in (tmp_path / "final.log").read_text()
    assert_same_as(run, reference)
    assert [s for s, _ in _tensorboard_steps(run, "loss")] == list(range(1, STEPS + 1))
    assert [v for _, v in _tensorboard_steps(run, "loss")] == pytest.approx(metrics(reference, "loss"), rel=1e-6)


def test_a_preemption_signal_during_start_up_checkpoints_at_the_first_step(tmp_path):
    """Slurm's USR1 can come while the job still builds its models (minutes at 40B): the run saves
    after its first step and exits 3 (requeued), where the signal's default action used to kill it
    with nothing saved."""
    run, log = tmp_path / "early", tmp_path / "early.log"
    proc = _start(run, ["sft", *SFT], log)
    _wait_for(proc, lambda: True if "attention backend" in log.read_text() else None, "the model build")
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000001"
    assert "preempted at step 1" in log.read_text() and "Traceback" not in log.read_text()


def test_a_term_right_after_the_workers_start_is_a_preemption_too(tmp_path):
    """The workers installed their handlers only after torch, the config and the inits had loaded
    (~13 s on a busy machine): a TERM in those seconds killed them, exit 143, nothing saved."""
    import psutil

    run, log = tmp_path / "first-seconds", tmp_path / "first-seconds.log"
    proc = _start(run, ["sft", *SFT, "parallel.tp=2"], log)
    _wait_for(proc, lambda: True if len(psutil.Process(proc.pid).children()) == 2 else None, "two workers")
    time.sleep(0.5)  # python has started in each, torch has not loaded
    assert "attention backend" not in log.read_text()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000001"
    assert "preempted at step 1" in log.read_text() and "Traceback" not in log.read_text()


def test_workers_stop_with_their_launcher_and_a_dead_rank_is_named(tmp_path):
    """`alfred-train` spawns the TP=2 workers itself. Its death (SIGKILL) used to leave them training,
    unwatched, into the run directory: now they checkpoint at their next step and exit. A worker
    killed alone is named in one line, and the launcher exits 128 + 9 as a shell would say."""
    import psutil

    args = ["sft", *SFT, "parallel.tp=2", "train.max_steps=2000", "checkpoint.interval=0"]
    run, log = tmp_path / "orphans", tmp_path / "orphans.log"
    proc = _start(run, args, log)
    _wait_for(proc, lambda: _logged_step(run, 2), "step 2 logged")
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=120)
    for orphan in alive:  # never left behind by a failing test
        orphan.kill()
    assert not alive, log.read_text()[-3000:]
    assert (run / "checkpoints" / "latest").exists()  # the preemption save of the step after the kill
    assert "preempted at step" in log.read_text()

    run, log = tmp_path / "rank1", tmp_path / "rank1.log"
    proc = _start(run, args, log)
    _wait_for(proc, lambda: _logged_step(run, 2), "step 2 logged")
    rank1 = next(w for w in psutil.Process(proc.pid).children() if w.environ().get("RANK") == "1")
    rank1.kill()
    assert proc.wait(timeout=120) == 128 + signal.SIGKILL
    said = log.read_text()
    assert "alfred-train: worker rank 1 was killed by SIGKILL; the other workers were stopped" in said
    # rank 0's collective failed for it: one line (it was gloo's 50-line traceback), before or after the launcher's
    assert "Traceback" not in said and "alfred-train: error: rank 0: a collective failed because another worker " \
        "stopped" in said, said[-3000:]


def test_a_second_run_into_a_live_run_dir_is_refused(tmp_path):
    """Two runs in one directory resumed from each other's checkpoints and overwrote them, metrics
    and all. The second now stops in one line naming the first; once that one is gone (even killed),
    the directory is free."""
    run, log = tmp_path / "shared", tmp_path / "first.log"
    first = _start(run, ["sft", *SFT, "train.max_steps=2000", "checkpoint.interval=0"], log)
    try:
        _wait_for(first, lambda: _logged_step(run, 2), "step 2 logged")
        second = run_cli("sft", *SFT, f"run.dir={run}", check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run.dir: {run} is in use by another run (pid {first.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    finally:
        _kill_group(first)
    assert run_cli("sft", *SFT, f"run.dir={run}", "checkpoint.resume=none", "checkpoint.interval=0",
                   "train.max_steps=1").returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (a checkpoint of the tiny SFT is 4.4 MB); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(small_disk):
    """A full disk was four tracebacks ("unexpected pos 704 vs 598": no word of space) and a
    partial .tmp-iter_ left on the full disk."""
    run = small_disk / "run"
    proc = run_cli("sft", *SFT, f"run.dir={run}", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alfred-train: error:")]
    assert len(errors) == 1 and "checkpoint iter_0000001: writing it under" in errors[0], proc.stderr[-3000:]
    assert "the disk is full" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.fixture
def unwritable(tmp_path):
    """A folder no process may write in, root included (`chattr +i`); skipped where that is not allowed."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not allowed here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_a_checkpoints_folder_that_cannot_be_written_stops_the_run_before_step_1(unwritable):
    """run.dir was checked, not its checkpoints/: the run trained to its first checkpoint and ended
    in a 37-line PermissionError traceback (exit 1), and every requeue again."""
    run = unwritable.parent
    proc = run_cli("sft", *SFT, f"run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"alfred-train: error: run.dir: cannot write in {unwritable} (Operation not permitted), where checkpoints "
        "are saved; make it writable or set run.dir elsewhere"), proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()


def test_a_checkpoints_link_to_nowhere_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(tmp_path / "gone")  # a scratch volume not mounted: it said "File exists"
    proc = run_cli("sft", *SFT, f"run.dir={run}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"alfred-train: error: run.dir: {run / 'checkpoints'} links to {tmp_path / 'gone'}, which does not exist; "
        "create it or remove the link"), proc.stderr[-2000:]


PPO_STEPS = 3
PPO = [str(ROOT / "configs" / "tiny-ppo.yaml"), "parallel.tp=1", f"train.max_steps={PPO_STEPS}",
       "ppo.rollouts_per_iter=16", "ppo.rollout_micro_batch=8", "ppo.train_micro_batch=4",
       "ppo.value_steps_per_epoch=4", "ppo.max_new_tokens=8", "ppo.eval_prompts=8", "optim.decay_steps=10",
       "checkpoint.interval=1", "logging.tensorboard=false", "logging.plots=false"]
PPO_COMPARED = ["score", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "lr", "value_lr"]


def test_ppo_survives_kill_9_inside_a_save(tmp_path, ppo_inits):
    init = ppo_inits
    args = ["ppo", *PPO, f"ppo.policy_init={init / 'sft'}", f"ppo.reward_init={init / 'rm'}"]
    reference = tmp_path / "reference"
    run_cli(*args, f"run.dir={reference}")

    run = tmp_path / "killed"
    proc = _start(run, args, tmp_path / "attempt1.log")
    step = random.Random(9).choice([1, 2])
    _wait_for(proc, lambda: (run / "checkpoints" / f".tmp-iter_{step:07d}").exists() or None, f"save {step}")
    assert _kill_group(proc) == -signal.SIGKILL
    proc = _start(run, args, tmp_path / "final.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "final.log").read_text()
    assert [s for s in metrics(run, "step") if s] == list(range(1, PPO_STEPS + 1))  # and step 0's eval, once
    assert metrics(run, "step").count(0) == 1
    for key in PPO_COMPARED:
        assert metrics(run, key) == metrics(reference, key), key
    samples = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    expected = [json.loads(x)["step"] for x in (reference / "samples.jsonl").read_text().splitlines()]
    assert samples == expected
