"""The checkpoints a run starts from, resolved once and kept on resume (stages/inits.py). In process,
with meta.json + manifest.json stand-ins: what `pin` makes of the config, what it says and refuses."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from alfred_train.config import load_config
from alfred_train.errors import ConfigError
from alfred_train.stages import inits
from tests.helpers import ROOT

TINY_PPO = str(ROOT / "configs" / "tiny-ppo.yaml")
TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")


def _checkpoint(path: Path, models: list[str], stage: str, *, step: int = 1, tag: str = "", **state) -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "models": models, "state": {"stage": stage, **state}}))
    (path / "manifest.json").write_text(json.dumps({"format": 1, "step": step, "files": [], "tag": tag or str(path)}))
    return path


@pytest.fixture
def world(tmp_path):
    """An SFT run (one checkpoint), an RM run, and a PPO run.dir that started from both."""
    sft = _checkpoint(tmp_path / "sft" / "checkpoints" / "iter_0000030", ["policy"], "sft", step=30).parents[1]
    rm = _checkpoint(tmp_path / "rm" / "checkpoints" / "iter_0000020", ["reward"], "rm", step=20).parents[1]
    cfg = load_config(TINY_PPO, [f"ppo.policy_init={sft}", f"ppo.reward_init={rm}", f"run.dir={tmp_path / 'ppo'}"])
    started = inits.pin(cfg, "ppo")
    _checkpoint(tmp_path / "ppo" / "checkpoints" / "iter_0000003", ["policy", "value"], "ppo", step=3,
                inits=inits.record(started, "ppo"))
    return cfg, sft, rm, started


def test_a_fresh_start_pins_each_init_to_the_checkpoint_it_resolves_to(world):
    cfg, sft, rm, started = world
    assert started.ppo.policy_init == str((sft / "checkpoints" / "iter_0000030").resolve())
    assert started.ppo.reward_init == str((rm / "checkpoints" / "iter_0000020").resolve())
    recorded = inits.record(started, "ppo")["ppo.policy_init"]
    assert recorded["path"] == started.ppo.policy_init and len(recorded["manifest_sha256"]) == 64
    # not reachable here (a dry run on a laptop): left as given, for the checks to name or note
    far = load_config(TINY_PPO, ["ppo.policy_init=/fsx/nowhere/sft", f"run.dir={sft.parent / 'other'}"])
    assert inits.pin(far, "ppo").ppo.policy_init == "/fsx/nowhere/sft"


def test_a_resume_keeps_the_reference_it_started_from_when_the_sft_run_went_on(world, caplog):
    cfg, sft, _, started = world
    newer = _checkpoint(sft / "checkpoints" / "iter_0000034", ["policy"], "sft", step=34)
    with caplog.at_level(logging.WARNING, "alfred_train"):
        assert inits.pin(cfg, "ppo").ppo.policy_init == started.ppo.policy_init
    assert f"ppo.policy_init: {sft} now resolves to {newer}; a resumed run keeps the checkpoint it started from" \
        in caplog.text
    with pytest.raises(ConfigError, match=r"^ppo.policy_init: .*iter_0000034 is not the checkpoint this run started "
                                          r"from \(.*iter_0000030\), .*set ppo.policy_init=.*iter_0000030"):
        inits.pin(load_config(TINY_PPO, [f"ppo.policy_init={newer}", f"run.dir={cfg.run.dir}"]), "ppo")
    # a fresh run in another run.dir takes the newest
    assert inits.pin(load_config(TINY_PPO, [f"ppo.policy_init={sft}", f"run.dir={sft.parent / 'new'}"]),
                     "ppo").ppo.policy_init == str(newer.resolve())


def test_a_resume_whose_init_is_gone_or_rewritten_is_refused_and_a_copy_is_taken(world, tmp_path):
    cfg, sft, _, started = world
    copy = tmp_path / "moved" / "iter_0000030"
    shutil.copytree(started.ppo.policy_init, copy)
    shutil.rmtree(started.ppo.policy_init)  # pruned by the SFT run's checkpoint.keep
    _checkpoint(sft / "checkpoints" / "iter_0000034", ["policy"], "sft", step=34)
    with pytest.raises(ConfigError, match=r"^ppo.policy_init: a resumed run keeps the checkpoint it started from "
                                          r"\(.*iter_0000030\), which holds no checkpoint now"):
        inits.pin(cfg, "ppo")
    moved = load_config(TINY_PPO, [f"ppo.policy_init={copy}", f"run.dir={cfg.run.dir}", f"ppo.reward_init={cfg.ppo.reward_init}"])
    pinned = inits.pin(moved, "ppo")
    assert pinned.ppo.policy_init == str(copy.resolve())  # the same manifest: that checkpoint, copied
    inits.check_resumed(pinned, "ppo", json.loads((Path(cfg.run.dir) / "checkpoints" / "iter_0000003" /
                                                   "meta.json").read_text())["state"])
    shutil.copytree(copy, started.ppo.policy_init)  # put back, then rewritten in place: another model
    (Path(started.ppo.policy_init) / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^ppo.policy_init: .*iter_0000030\), which was rewritten since"):
        inits.pin(cfg, "ppo")


def test_a_resume_fetched_later_must_have_started_from_what_the_run_loaded(world, tmp_path):
    """A checkpoint only S3 held is fetched after `pin` looked at run.dir: its recorded inits are
    compared with what the run loaded."""
    cfg, sft, rm, started = world
    state = json.loads((Path(cfg.run.dir) / "checkpoints" / "iter_0000003" / "meta.json").read_text())["state"]
    other = _checkpoint(tmp_path / "sft2" / "iter_0000001", ["policy"], "sft")
    loaded = load_config(TINY_PPO, [f"ppo.policy_init={other}", f"ppo.reward_init={started.ppo.reward_init}"])
    with pytest.raises(ConfigError, match=r"^ppo.policy_init: the checkpoint resumed started from .*iter_0000030, "
                                          r"but this run loaded .*sft2/iter_0000001"):
        inits.check_resumed(loaded, "ppo", state)
    inits.check_resumed(started, "ppo", state)


def test_a_resumed_sft_run_with_full_weights_loads_no_init(tmp_path):
    init = _checkpoint(tmp_path / "base" / "iter_0000001", ["policy"], "sft")
    cfg = load_config(TINY_SFT, [f"checkpoint.init={init.parent}", f"run.dir={tmp_path / 'run'}"])
    started = inits.pin(cfg, "sft")
    _checkpoint(tmp_path / "run" / "checkpoints" / "iter_0000002", ["policy"], "sft", step=2,
                inits=inits.record(started, "sft"))
    shutil.rmtree(init)  # gone: not loaded by the resume; config.yaml still names where the run started
    assert inits.pin(cfg, "sft") == load_config(TINY_SFT, [f"checkpoint.init={init.resolve()}", f"run.dir={tmp_path / 'run'}"])
    assert inits.record(cfg, "sft")["checkpoint.init"]["path"] == str(init.resolve())  # passed on
