"""Every checkpoint a run loads is checked against the config before any model is built
(stages/checkpoint_checks.py `check_checkpoints`): in `--dry-run` and at the start of the real run, one line
naming the key, exit 2. In process and fast: the checkpoints are meta.json stand-ins.

SFT: checkpoint.init (a "policy"); RM: rm.init (a "policy" or a "reward"); every stage: the
checkpoint it resumes (its own models, the same shape and layout). A path that does not exist is a
dry-run note (not mounted here); one that exists but is no checkpoint is an error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from launch_fixtures import boto_client

from alfred_train import cli
from alfred_train.checkpointing import manifest as mf
from alfred_train.config import load_config
from alfred_train.errors import ConfigError
from alfred_train.stages import checkpoint_checks, common
from tests.helpers import ROOT, free_port

TINY_SFT = str(ROOT / "configs" / "tiny-sft.yaml")
TINY_RM = str(ROOT / "configs" / "tiny-rm.yaml")
TP1 = {"tp": 1, "pp": 1, "dp": 1, "vpp": None, "zero": False}


def _shape(config: str, *overrides: str) -> dict:
    cfg = load_config(config, ["parallel.tp=1", *overrides])
    return dataclasses.asdict(common.shape_for(cfg, common.tokenizer_for(cfg)))


def _checkpoint(path: Path, models: list[str], stage: str, shape: dict, layout: dict = TP1) -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": 1, "layout": layout, "models": models,
                                                "state": {"stage": stage, "model": shape}}))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    shape = _shape(TINY_SFT)
    (root / "empty").mkdir()
    (root / "plain").write_text("not a checkpoint")
    return {"sft": _checkpoint(root / "sft" / "checkpoints" / "iter_0000003", ["policy"], "sft", shape).parents[1],
            "rm": _checkpoint(root / "rm", ["reward"], "rm", shape), "empty": root / "empty",
            "plain": root / "plain", "root": root}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _error(capsys, key: str, says: str, *argv: str) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2 and err.startswith(f"alfred-train: error: {key}: ") and says in err, (argv, err)
    assert err.count("\n") == 1, err


def test_sft_dry_run_checks_checkpoint_init(capsys, tmp_path, ckpts):
    sft = [TINY_SFT, "parallel.tp=1", f"run.dir={tmp_path / 'run'}", "--dry-run"]
    code, out, err = _run(capsys, "sft", *sft, f"checkpoint.init={ckpts['sft']}")
    assert code == 0 and "not checked here" not in out, err
    _error(capsys, "checkpoint.init", "num_layers=4, this config builds num_layers=2; set model.*",
           "sft", *sft, f"checkpoint.init={ckpts['sft']}", "model.num_layers=2")
    _error(capsys, "checkpoint.init", "holds the models ['reward'] of a rm run", "sft", *sft, f"checkpoint.init={ckpts['rm']}")
    _error(capsys, "checkpoint.init", "holds no checkpoint", "sft", *sft, f"checkpoint.init={ckpts['empty']}")
    _error(capsys, "checkpoint.init", "is a file", "sft", *sft, f"checkpoint.init={ckpts['plain']}")
    code, out, _ = _run(capsys, "sft", *sft, "checkpoint.init=/fsx/nowhere/sft")
    assert code == 0 and "not checked here: checkpoint.init: /fsx/nowhere/sft is not reachable here" in out, out
    # init_std (a fresh init's) and max_seq_len (rotary positions) are not in the weights: no refusal
    code, _, err = _run(capsys, "sft", *sft, f"checkpoint.init={ckpts['sft']}", "model.init_std=0.01",
                        "model.max_seq_len=256")
    assert code == 0, err


def test_a_resumed_run_is_checked_against_its_checkpoint(capsys, tmp_path, ckpts):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "iter_0000002", ["policy"], "sft", _shape(TINY_SFT))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={run}", "--dry-run"]
    assert _run(capsys, *sft)[0] == 0
    _error(capsys, "checkpoint.resume", "num_layers=4, this config builds num_layers=2", *sft, "model.num_layers=2")
    code, out, err = _run(capsys, *sft, "parallel.tp=2")  # plain optimizer states reshard like the weights
    assert code == 0 and "(step 1) at another layout (tp 1 -> 2): weights and optimizer states reshard" in out, err
    _error(capsys, "checkpoint.resume", "parallel.zero=false when saved", *sft, "parallel.zero=true")
    _error(capsys, "checkpoint.resume", "holds the models ['policy'] of a sft run; checkpoint.resume takes this rm "
           "stage's own checkpoints ('reward') (auto: run.dir's newest): set a new run.dir", "rm", TINY_RM,
           "parallel.tp=1", f"run.dir={run}", "--dry-run")
    _error(capsys, "checkpoint.resume", "holds the models ['reward'] of a rm run; checkpoint.resume takes this sft "
           "stage's own checkpoints ('policy'): name one of this stage's checkpoints", *sft,
           f"checkpoint.resume={ckpts['rm']}")  # it said to set a new run.dir
    # resumed, an SFT run loads no init: a bad checkpoint.init is not in the way
    assert _run(capsys, *sft, f"checkpoint.init={ckpts['rm']}")[0] == 0
    # starting over beside an earlier run's checkpoints would leave them as the newest: refused
    _error(capsys, "checkpoint.resume", "holds checkpoints of an earlier run after it (iter_0000002)", *sft,
           "model.num_layers=2", "checkpoint.resume=none")
    _error(capsys, "checkpoint.resume", "holds no checkpoint", *sft, f"checkpoint.resume={ckpts['empty']}")


def test_a_resume_in_another_precision_is_refused(capsys, tmp_path):
    """A bf16 run's optimizer holds fp32 main copies, an fp32 run's none: resumed as the other, the run
    died in a KeyError traceback after a dry run called it valid. auto is bf16 on a GPU: the dry run
    (perhaps on a login node) leaves it to the run, which knows its device."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints" / "iter_0000002", ["policy"], "sft", _shape(TINY_SFT))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["state"]["precision"] = "fp32"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={run}", "--dry-run"]
    _error(capsys, "train.precision", f"this run trains in bf16, but checkpoint.resume ({ckpt}) was trained in fp32",
           *sft, "train.precision=bf16")
    assert _run(capsys, *sft, "train.precision=fp32")[0] == 0
    assert _run(capsys, *sft)[0] == 0  # auto: not known here
    cfg = load_config(TINY_SFT, ["parallel.tp=1", f"run.dir={run}"])  # the run on this (CPU) machine: fp32
    shape = common.shape_for(cfg, common.tokenizer_for(cfg))
    assert checkpoint_checks.check_checkpoints(cfg, "sft", shape, required=True)[0]
    meta["state"]["precision"] = "bf16"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="^train.precision: this run trains in fp32, but .* trained in bf16"):
        checkpoint_checks.check_checkpoints(cfg, "sft", shape, required=True)


def test_a_resume_with_other_adapters_is_refused_naming_the_lora_keys(capsys, tmp_path):
    """A LoRA run resumed with full weights (or another rank), or a full one resumed with adapters:
    the dry run passed, and the run stopped with both adapter specs as dicts, naming no key."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints" / "iter_0000002", ["policy"], "sft", _shape(TINY_SFT))
    meta = json.loads((ckpt / "meta.json").read_text())
    spec = {"targets": {"linear_qkv": {"rank": 4, "scale": 2.0}, "linear_proj": {"rank": 4, "scale": 2.0}},
            "dropout": 0.0, "base": {"path": None, "model": None, "skip": [], "seed": 1234}}
    meta["state"]["lora"] = {"policy": spec}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={run}", "--dry-run"]
    lora = ["lora.rank=4", "lora.alpha=8", "lora.targets=[linear_qkv,linear_proj]", "lora.dropout=0"]
    assert _run(capsys, *sft, *lora)[0] == 0
    _error(capsys, "lora", "trained adapters of rank 4, alpha 8 on linear_proj, linear_qkv, dropout 0, this config "
           "the full weights (no adapters); set lora.rank=4 lora.alpha=8 lora.targets=[linear_proj,linear_qkv] "
           "lora.dropout=0 as when saved", *sft)
    _error(capsys, "lora", "this config adapters of rank 8, alpha 8", *sft, *lora, "lora.rank=8")
    del meta["state"]["lora"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    _error(capsys, "lora", "trained the full weights (no adapters), this config adapters of rank 4, alpha 8",
           *sft, *lora)


def test_a_resume_with_another_global_batch_is_refused_before_the_run_writes(capsys, tmp_path):
    """The dry run passed it; the run was refused by the sampler after replacing config.yaml."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints" / "iter_0000002", ["policy"], "sft", _shape(TINY_SFT))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["state"]["consumed_samples"] = 64
    (ckpt / "meta.json").write_text(json.dumps(meta))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={run}"]
    assert _run(capsys, *sft, "train.global_batch_size=32", "--dry-run")[0] == 0
    for dry in (["--dry-run"], []):
        _error(capsys, "train.global_batch_size", f"48, but checkpoint.resume ({ckpt}) stopped after 64 samples, not a "
               "whole number of batches of 48", *sft, "train.global_batch_size=48", "train.micro_batch_size=8", *dry)
    assert not (run / "config.yaml").exists()


def test_a_lora_resume_needs_the_base_its_adapters_were_trained_over(capsys, tmp_path):
    """The dry run passed each of these and the run stopped with a dict of both bases (no key); a
    copy of the base (a renamed SFT run) was refused, though the refusal of a moved one advised it."""
    shape = _shape(TINY_RM)
    sft = _checkpoint(tmp_path / "sft" / "iter_0000004", ["policy"], "sft", shape)
    (sft / "manifest.json").write_text('{"step": 4, "files": {}}')
    spec = {"targets": {"linear_qkv": {"rank": 4, "scale": 2.0}}, "dropout": 0.0}

    def resumed(run: str, base: dict) -> list[str]:
        ckpt = _checkpoint(tmp_path / run / "checkpoints" / "iter_0000002", ["reward"], "rm", shape)
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["state"]["lora"] = {"reward": {**spec, "base": {"model": "policy", "skip": ["output_layer"], **base}}}
        (ckpt / "meta.json").write_text(json.dumps(meta))
        return ["rm", TINY_RM, "parallel.tp=1", f"run.dir={tmp_path / run}", "lora.rank=4", "lora.alpha=8",
                "lora.targets=[linear_qkv]", "lora.dropout=0", "--dry-run"]

    seeded = resumed("seeded", {"path": None, "seed": 1234})
    assert _run(capsys, *seeded, "rm.init=null")[0] == 0
    _error(capsys, "rm.init", "trained its adapters over the seeded init (train.seed 1234), not over a checkpoint; "
           "remove rm.init", *seeded, f"rm.init={sft}")
    _error(capsys, "train.seed", "over the seeded init of train.seed=1234; set train.seed=1234", *seeded,
           "rm.init=null", "train.seed=5")
    over = resumed("over-sft", {"path": str(sft), "seed": None})
    assert _run(capsys, *over, f"rm.init={sft}")[0] == 0
    _error(capsys, "rm.init", f"trained its adapters over {sft}; set rm.init to it (or a copy of it)", *over, "rm.init=null")
    copy = tmp_path / "renamed" / "iter_0000004"
    shutil.copytree(sft, copy)
    assert _run(capsys, *over, f"rm.init={copy}")[0] == 0, capsys.readouterr().err  # the same manifest: the same base
    (copy / "manifest.json").write_text('{"step": 4, "files": {"other": 1}}')
    _error(capsys, "rm.init", f"{copy} is not the base checkpoint.resume", *over, f"rm.init={copy}")


def test_a_damaged_meta_json_is_named_with_the_key_that_took_it(capsys, tmp_path):
    sft = _checkpoint(tmp_path / "sft" / "checkpoints" / "iter_0000004", ["policy"], "sft", _shape(TINY_RM))
    (sft / "meta.json").write_text("{not json")
    (sft / "manifest.json").write_text("{}")
    _error(capsys, "rm.init", f"{sft / 'meta.json'} is unreadable (JSONDecodeError)", "rm", TINY_RM, "parallel.tp=1",
           f"run.dir={tmp_path / 'rm'}", f"rm.init={tmp_path / 'sft'}", "--dry-run")


def test_rm_init_is_checked_in_dry_run_and_before_the_real_run_builds_anything(capsys, tmp_path, ckpts):
    for init in (ckpts["sft"], ckpts["rm"]):  # an SFT policy or an RM
        code, _, err = _run(capsys, "rm", TINY_RM, "parallel.tp=1", f"rm.init={init}", f"run.dir={tmp_path / 'r'}",
                            "--dry-run")
        assert code == 0, err
    values_only = _checkpoint(ckpts["root"] / "value", ["value"], "ppo", _shape(TINY_SFT))
    cases = [(["model.num_layers=2"], "rm.init", "num_layers=4, this config builds num_layers=2"),
             ([f"rm.init={values_only}"], "rm.init", "holds the models ['value'] of a ppo run"),
             ([f"rm.init={ckpts['plain']}"], "rm.init", "is a file"),
             ([f"rm.init={ckpts['empty']}"], "rm.init", "holds no checkpoint")]
    for overrides, key, says in cases:
        for extra in (["--dry-run"], []):  # the real run: one process (tp=1), stopped before any model
            _error(capsys, key, says, "rm", TINY_RM, "parallel.tp=1", f"rm.init={ckpts['sft']}",
                   f"run.dir={tmp_path / 'run'}", "train.max_steps=1", *overrides, *extra)
    assert not (tmp_path / "run").exists()  # stopped before the run directory was written


def test_check_checkpoints_for_the_sft_run():
    """What `stages/sft.py` calls before building its model: the same checks as its dry run."""
    cfg = load_config(TINY_SFT, ["parallel.tp=1", "run.dir=/nonexistent/run",
                                 f"checkpoint.init={ROOT / 'nonexistent'}", "model.num_layers=2"])
    shape = common.shape_for(cfg, common.tokenizer_for(cfg))
    assert checkpoint_checks.check_checkpoints(cfg, "sft", shape, required=False)[1][0].startswith("checkpoint.init: ")
    with pytest.raises(ConfigError, match=r"^checkpoint.init: .* does not exist; point checkpoint.init at"):
        checkpoint_checks.check_checkpoints(cfg, "sft", shape, required=True)


def test_a_run_names_the_keys_an_earlier_run_in_its_dir_set_otherwise(tmp_path, caplog):
    """A resume with another template or seed replaced config.yaml without a word."""
    from alfred_train.config import dump_yaml, load_config
    from alfred_train.stages.common import _say_config_changes

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(TINY_SFT)))
    with caplog.at_level("WARNING", logger="alfred_train"):
        _say_config_changes(tmp_path / "config.yaml", load_config(TINY_SFT, ["train.seed=7", "data.template=plain"]))
        _say_config_changes(tmp_path / "config.yaml", load_config(TINY_SFT))  # the same: nothing said
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "in 2 key(s): data.template 'stackllama' -> 'plain', train.seed 1234 -> 7" in said[0]


def test_a_resume_past_train_max_steps_is_refused(capsys, tmp_path):
    """A rerun with train.max_steps below the checkpoint's step printed "30 steps done" and trained nothing."""
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000003"
    _checkpoint(ckpt, ["policy"], "sft", _shape(TINY_SFT))
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "step": 3}))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={tmp_path / 'run'}", "--dry-run"]
    _error(capsys, "train.max_steps", "2, but the checkpoint resumed is at step 3: nothing to train", *sft,
           "train.max_steps=2")
    assert _run(capsys, *sft, "train.max_steps=3")[0] == 0  # a finished run, rerun: nothing to do, no error


def test_the_dry_run_refuses_what_the_run_refuses_among_damaged_checkpoints(capsys, tmp_path):
    """Every checkpoint of run.dir damaged: the dry run said "a seeded random init" and the run refused
    (exit 2). A shard cut short (its manifest's size) was named by the dry run as the one resumed;
    the run skipped it for the one before."""
    root = tmp_path / "run" / "checkpoints"
    for step in (3, 4):
        ckpt = _checkpoint(root / f"iter_{step:07d}", ["policy"], "sft", _shape(TINY_SFT))
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps({**meta, "step": step}))
        (ckpt / "shard.distcp").write_bytes(b"x" * 100)
        files = [{"path": n, "size": (ckpt / n).stat().st_size, "sha256": mf.sha256_of(ckpt / n)}
                 for n in ("meta.json", "shard.distcp")]
        (ckpt / mf.MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={tmp_path / 'run'}", "train.max_steps=9", "--dry-run"]
    (root / "iter_0000004" / "shard.distcp").write_bytes(b"x" * 10)  # cut short: the one before is resumed
    code, out, err = _run(capsys, *sft)
    assert code == 0 and f"resumes {root / 'iter_0000003'} (step 3)" in out, (out, err)
    with open(root / "iter_0000003" / "meta.json", "a") as f:
        f.write("x")  # now none is sound
    code, out, err = _run(capsys, *sft)
    assert code == 2 and err.startswith(f"alfred-train: error: checkpoint.resume=auto: no sound checkpoint under {root}")
    assert "iter_0000004: shard.distcp has 10 bytes, the manifest says 100" in err and err.count("\n") == 1, err
    assert "iter_0000003: meta.json cannot be read" in err


def test_a_fresh_start_is_refused_beside_an_earlier_runs_later_checkpoints_in_s3(capsys, tmp_path, moto,
                                                                                  monkeypatch):
    """With checkpoint.s3_uri a requeued job's auto resume downloads S3's newest: an earlier run's
    later checkpoint there would become this run's. Listed by the dry run and the run (rank 0)."""
    client = boto_client("s3", moto)
    client.create_bucket(Bucket="ckpt")
    client.put_object(Bucket="ckpt", Key="old/checkpoints/iter_0000005/manifest.json", Body=b"{}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto)
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"run.dir={tmp_path / 'run'}", "checkpoint.resume=none", "--dry-run"]
    _error(capsys, "checkpoint.resume", "checkpoint.s3_uri s3://ckpt/old/checkpoints holds checkpoints of an "
           "earlier run after it (iter_0000005)", *sft, "checkpoint.s3_uri=s3://ckpt/old/checkpoints")
    assert _run(capsys, *sft, "checkpoint.s3_uri=s3://ckpt/new/checkpoints")[0] == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, out, err = _run(capsys, *sft, "checkpoint.s3_uri=s3://ckpt/old/checkpoints")
    assert code == 0 and "cannot list s3://ckpt/old/checkpoints from here (EndpointConnectionError)" in out, out + err


def test_an_init_trained_with_another_template_or_tokenizer_is_refused_in_every_stage(capsys, tmp_path):
    """Only PPO compared them: an RM started from an SFT policy of another tokenizer trained, and PPO
    then refused both the SFT's tokenizer and the RM's."""
    from alfred_train.stages.common import tokenizer_digest, tokenizer_path

    cfg = load_config(TINY_RM)
    state = {"stage": "sft", "model": _shape(TINY_RM), "template": cfg.data.template,
             "tokenizer": tokenizer_path(cfg), "tokenizer_sha256": tokenizer_digest(tokenizer_path(cfg))}
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "meta.json").write_text(json.dumps({"step": 3, "layout": TP1, "models": ["policy"], "state": state}))
    rm = ["rm", TINY_RM, "parallel.tp=1", f"rm.init={sft}", f"run.dir={tmp_path / 'run'}", "--dry-run"]
    assert _run(capsys, *rm)[0] == 0
    _error(capsys, "data.template", f"'tulu', but rm.init ({sft}) was trained with 'stackllama'", *rm, "data.template=tulu")
    other = tmp_path / "other.model"
    other.write_bytes(Path(tokenizer_path(cfg)).read_bytes())  # the same pieces: accepted
    assert _run(capsys, *rm, f"model.tokenizer={other}")[0] == 0
    state["tokenizer_sha256"] = "0" * 64  # trained with another tokenizer
    (sft / "meta.json").write_text(json.dumps({"step": 3, "layout": TP1, "models": ["policy"], "state": state}))
    _error(capsys, "model.tokenizer", f"is not the tokenizer rm.init ({sft}) was trained with", *rm)


def test_a_damaged_init_is_refused_before_the_run_loads_it(capsys, tmp_path):
    """Inits were loaded without a look at their manifest: PPO trained from an SFT checkpoint with
    flipped bytes, exit 0 (a resume, `convert` and `eval` refused the same checkpoint)."""
    from alfred_train.checkpointing import manifest as mf

    init = _checkpoint(tmp_path / "sft" / "iter_0000003", ["policy"], "sft", _shape(TINY_SFT))
    weights = init / "__0_0.distcp"
    weights.write_bytes(b"weights" * 100)
    (init / mf.MANIFEST).write_text(json.dumps({"format": mf.MANIFEST_FORMAT, "step": 1, "nodes": 1, "files": [
        {**entry, "node": 0} for entry in mf.seal(init, [weights])]}))
    sft = ["sft", TINY_SFT, "parallel.tp=1", f"checkpoint.init={init}", f"run.dir={tmp_path / 'run'}",
           "train.max_steps=1", "logging.plots=false", "logging.tensorboard=false"]
    weights.write_bytes(b"weightZ" * 100)  # same size, other bytes
    assert _run(capsys, *sft, "--dry-run")[0] == 0  # the dry run does not hash a 40B model's files
    _error(capsys, "checkpoint.init", f"{init} is damaged: __0_0.distcp does not match its sha256 (corrupted); point "
           "it at a sound checkpoint", *sft)


def test_a_restarted_slurm_job_continues_its_own_checkpoints(tmp_path):
    """A job launched with checkpoint.resume none (or a path) ran the same config after its requeue and
    refused its own checkpoints; a restart now continues them, and only them."""
    cfg = load_config(TINY_SFT, [f"run.dir={tmp_path / 'run'}", "checkpoint.resume=none"])
    ckpts = tmp_path / "run" / "checkpoints"
    restart = {"SLURM_RESTART_COUNT": "1"}
    assert checkpoint_checks.resume_of_restarted_job(cfg, restart) is cfg  # nothing saved yet: as configured
    (ckpts / "iter_0000010").mkdir(parents=True)
    assert checkpoint_checks.resume_of_restarted_job(cfg, {"SLURM_RESTART_COUNT": "0"}) is cfg  # the first run
    assert checkpoint_checks.resume_of_restarted_job(cfg, restart).checkpoint.resume == "auto"
    rollback = tmp_path / "other" / "iter_0000020"
    rollback.mkdir(parents=True)
    (rollback / "meta.json").write_text(json.dumps({"step": 20}))
    from_path = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(rollback)))
    assert checkpoint_checks.resume_of_restarted_job(from_path, restart) is from_path  # iter 10 is not this job's
    (ckpts / "iter_0000030").mkdir()
    assert checkpoint_checks.resume_of_restarted_job(from_path, restart).checkpoint.resume == "auto"
    # SageMaker: a spot restart of the same job (run.dir's job-id is its ALFRED_JOB_ID), not another job
    assert checkpoint_checks.resume_of_restarted_job(cfg, {"ALFRED_JOB_ID": "ppo-1"}) is cfg  # no marker yet
    (tmp_path / "run" / "job-id").write_text("ppo-1\n")
    assert checkpoint_checks.resume_of_restarted_job(cfg, {"ALFRED_JOB_ID": "ppo-2"}) is cfg  # another job
    assert checkpoint_checks.resume_of_restarted_job(cfg, {"ALFRED_JOB_ID": "ppo-1"}).checkpoint.resume == "auto"

