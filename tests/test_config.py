"""Config errors: every one exits with code 2 and a one-line message naming the key and the fix.

Most tests call `alfred_train.cli.main([...])` in-process: every error here is raised while the
config is loaded, before any process starts. The WORLD_SIZE check runs under a torchrun-style
environment and must fire before a process group exists. One subprocess test feeds a malformed
JSONL file to a real `python -m alfred_train sft` run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alfred_train.cli import main
from alfred_train.config import Config, dump_yaml, load_config
from alfred_train.errors import ConfigError
from tests.helpers import TINY_SFT, free_port, run_cli

ERROR_PREFIX = "alfred-train: error: "


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit code 2 and ONE stderr line; return the message."""
    capsys.readouterr()  # drop anything printed before
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    return lines[0][len(ERROR_PREFIX):]


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def tiny_plus(tmp_path: Path, extra: str) -> str:
    """The tiny SFT recipe with `extra` (new top-level YAML keys) appended."""
    return write_yaml(tmp_path, TINY_SFT.read_text() + extra)


# ---------------------------------------------------------------------------------------------
# Keys and types, in the YAML file and in overrides.

def test_unknown_top_level_key_in_yaml(tmp_path, capsys):
    msg = cli_error(capsys, "sft", tiny_plus(tmp_path, "traning:\n  max_steps: 3\n"))
    assert msg.startswith("traning: unknown key")
    assert "valid keys here:" in msg and "train" in msg  # what to write instead


def test_unknown_nested_key_in_yaml(tmp_path, capsys):
    msg = cli_error(capsys, "sft", write_yaml(tmp_path, "model:\n  hiden_size: 64\n"))
    assert msg.startswith("model.hiden_size: unknown key")
    assert "hidden_size" in msg.split("valid keys here:")[1]


def test_wrong_scalar_type(tmp_path, capsys):
    msg = cli_error(capsys, "sft", write_yaml(tmp_path, 'train:\n  max_steps: "ten"\n'))
    assert msg == "train.max_steps: expected an integer, got 'ten'"
    # a bool is not an int, a float is not an int
    assert cli_error(capsys, "sft", str(TINY_SFT), "train.max_steps=true").startswith("train.max_steps: expected an integer")
    assert cli_error(capsys, "sft", str(TINY_SFT), "train.max_steps=4.5").startswith("train.max_steps: expected an integer")


def test_list_where_a_mapping_is_expected(tmp_path, capsys):
    msg = cli_error(capsys, "sft", write_yaml(tmp_path, "model:\n  - arch: llama\n"))
    assert msg.startswith("model: expected a mapping")
    assert cli_error(capsys, "sft", str(TINY_SFT), "optim=[1,2]").startswith("optim: expected a mapping")


def test_bad_literal_lists_the_choices(capsys):
    msg = cli_error(capsys, "sft", str(TINY_SFT), "model.arch=gpt")
    assert msg == "model.arch: 'gpt' is not one of llama, falcon"


def test_override_of_an_unknown_key(capsys):
    msg = cli_error(capsys, "sft", str(TINY_SFT), "optim.lrr=1")
    assert msg.startswith("optim.lrr: unknown key")
    assert "optim.lrr=1" in msg
    msg = cli_error(capsys, "sft", str(TINY_SFT), "model.hiden_size=3")
    assert msg.startswith("model.hiden_size: unknown key")


def test_override_unknown_key_names_the_valid_ones(capsys):
    """What to change: the valid keys of that section, as the YAML loader already says."""
    msg = cli_error(capsys, "sft", str(TINY_SFT), "optim.lrr=1")
    assert "valid keys here:" in msg and " lr," in msg


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr: expected a finite number, got inf"),  # a megatron assert traceback, per rank
    ("optim.lr=1e400", "optim.lr: expected a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
    ("model.init_std=.inf", "model.init_std: expected a finite number, got inf"),  # a run of NaN losses
    ("ppo.kl_coef=-.inf", "ppo.kl_coef: expected a finite number, got -inf"),
    ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),  # it blamed optim.min_lr
])
def test_numbers_must_be_finite_and_the_first_wrong_key_is_named(capsys, override, message):
    assert cli_error(capsys, "sft", str(TINY_SFT), override) == message


def test_a_moved_key_says_where_it_is_now(tmp_path, capsys):
    assert cli_error(capsys, "sft", str(TINY_SFT), "ppo.max_bad_steps=2") == \
        "ppo.max_bad_steps: moved to train.max_bad_steps; rename it"
    assert cli_error(capsys, "sft", tiny_plus(tmp_path, "ppo:\n  max_bad_steps: 2\n")) == \
        "ppo.max_bad_steps: moved to train.max_bad_steps; rename it"


def test_malformed_override(capsys):
    msg = cli_error(capsys, "sft", str(TINY_SFT), "optim.lr")
    assert msg == "override 'optim.lr': expected KEY.PATH=VALUE, e.g. optim.lr=1e-5"



def test_override_value_that_is_not_yaml(capsys):
    msg = cli_error(capsys, "sft", str(TINY_SFT), "--dry-run", "optim.lr=[1")
    assert msg.startswith("override 'optim.lr=[1': the value is not valid YAML (expected ',' or ']'")
    assert msg.endswith("fix it, or quote it to pass a string")


# ---------------------------------------------------------------------------------------------
# Checks across fields.

@pytest.mark.parametrize("overrides, key, numbers", [
    (["parallel.tp=3"], "parallel.tp", ["num_attention_heads (4)", "tp (3)"]),
    (["model.num_query_groups=1"], "parallel.tp", ["num_query_groups (1)", "tp (2)"]),
    (["parallel.tp=1", "parallel.pp=3"], "parallel.pp", ["num_layers (4)", "pp (3)"]),
    (["train.global_batch_size=12"], "train.global_batch_size", ["12", "micro_batch_size (8)", "dp (1)"]),
    (["parallel.dp=3", "train.global_batch_size=16"], "train.global_batch_size", ["16", "dp (3)"]),
    (["logging.profile_step=0"], "logging.profile_step", ["0", "train.max_steps"]),
    (["train.max_steps=4", "logging.profile_step=5"], "logging.profile_step", ["5", "max_steps = 4"]),
])
def test_impossible_layouts(capsys, overrides, key, numbers):
    msg = cli_error(capsys, "sft", str(TINY_SFT), *overrides)
    assert msg.startswith(f"{key}: "), msg
    for text in numbers:
        assert text in msg, (text, msg)


@pytest.mark.parametrize("override, message", [
    ("ppo.top_k=-1", "ppo.top_k: must be >= 0, got -1"),
    ("ppo.max_new_tokens=0", "ppo.max_new_tokens: must be > 0, got 0"),
    ("ppo.kl_coef=-1", "ppo.kl_coef: must be >= 0, got -1.0"),
    ("ppo.policy_epochs=0", "ppo.policy_epochs: must be > 0, got 0"),
    ("train.max_bad_steps=0", "train.max_bad_steps: must be > 0, got 0"),  # it stopped a healthy run
    ("ppo.value_lr=-1", "ppo.value_lr: must be > 0, got -1.0"),
    ("ppo.eval_prompts=-4", "ppo.eval_prompts: must be >= 0, got -4"),
    ("ppo.eval_limit=0", "ppo.eval_limit: must be > 0, got 0"),  # it failed after training, exit 0
    ("ppo.lam=1.5", "ppo.lam: must be in [0, 1], got 1.5"),
    ("checkpoint.interval=-1", "checkpoint.interval: must be >= 0 (0: at the end only), got -1"),  # saved every step
    ("train.eval_batches=0", "train.eval_batches: must be > 0, got 0"),  # warned to raise data.valid_fraction
    ("optim.beta1=2", "optim.beta1: must be in [0, 1), got 2.0"),
    ("optim.eps=-1", "optim.eps: must be > 0, got -1.0"),
    ("optim.weight_decay=-1", "optim.weight_decay: must be >= 0, got -1.0"),
    ("model.init_std=-1", "model.init_std: must be > 0, got -1.0"),
    ("model.rotary_base=0", "model.rotary_base: must be > 0, got 0"),  # a NaN loss, exit 0, before
    ("model.norm_eps=-1", "model.norm_eps: must be > 0, got -1.0"),
    ("data.valid_fraction=2", "data.valid_fraction: must be in [0, 1), got 2.0"),
    ("data.synthetic_size=0", "data.synthetic_size: must be > 0, got 0"),
    ("data.seq_len=256", "data.seq_len: 256 is above model.max_seq_len (128), the positions the model is built "
                         "(and exported) for; lower data.seq_len or raise model.max_seq_len"),  # it trained 256
    ("data.train=my.jsonl", "data.synthetic: true generates the demo task and would ignore data.train (my.jsonl); "
                            "set data.synthetic=false to train on it"),  # it trained on the demo task
    ("rm.init=/a", "rm.init: /a and checkpoint.init: /b both name the checkpoint the reward model starts from; "
                   "keep one"),
])
def test_values_out_of_range_are_refused_before_any_model(capsys, override, message):
    """Each of these failed after the models were built (a torch traceback, a NaN loss with exit 0,
    or a misleading message) and passed --dry-run."""
    extra = ["checkpoint.init=/b"] if override.startswith("rm.init") else []
    assert cli_error(capsys, "sft", str(TINY_SFT), "--dry-run", override, *extra) == message


def test_sft_and_rm_at_dp_3_are_not_refused_for_ppo_batches(capsys):
    """An SFT run at dp 3 was refused for ppo.value_steps_per_epoch (the unused PPO section's 32
    rollouts do not split over 3 ranks); PPO's batch checks now apply to PPO only."""
    over = ["parallel.tp=1", "parallel.dp=3", "train.global_batch_size=24", "--dry-run"]
    assert main(["sft", str(TINY_SFT), *over]) == 0, capsys.readouterr().err
    assert main(["rm", str(TINY_SFT.parent / "tiny-rm.yaml"), *over]) == 0, capsys.readouterr().err


def test_vocab_below_the_tokenizer_and_nccl_without_gpus_are_one_line(capsys, tmp_path):
    for dry in ([], ["--dry-run"]):
        msg = cli_error(capsys, "sft", str(TINY_SFT), "parallel.tp=1", f"run.dir={tmp_path / 'v'}",
                        "model.vocab_size=10", *dry)
        assert msg.startswith("model.vocab_size: 10 is below the tokenizer's vocabulary (512)"), msg
    msg = cli_error(capsys, "sft", str(TINY_SFT), "parallel.tp=1", f"run.dir={tmp_path / 'n'}", "parallel.backend=nccl")
    assert msg == "parallel.backend: nccl needs CUDA GPUs, and none is visible here; use gloo or auto"


def test_layout_errors_name_what_to_change(capsys):
    assert "pick a tp that divides" in cli_error(capsys, "sft", str(TINY_SFT), "parallel.tp=3")
    assert "pick a pp that divides" in cli_error(capsys, "sft", str(TINY_SFT), "parallel.tp=1", "parallel.pp=3")


def test_world_size_mismatch_fails_before_any_process_group(capsys, monkeypatch):
    """Under torchrun with 3 processes, tp=2 (product 2) is refused before init_process_group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    msg = cli_error(capsys, "sft", str(TINY_SFT))  # tiny-sft: tp=2 pp=1 dp=1
    assert msg.startswith("parallel: dp(1) * tp(2) * pp(1) = 2 != WORLD_SIZE(3)"), msg
    assert "change parallel.dp/tp/pp" in msg
    assert not dist.is_initialized()  # nobody waited for 2 peers that will never come
    assert not parallel_state.model_parallel_is_initialized()


# ---------------------------------------------------------------------------------------------
# Files and presets.

def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    msg = cli_error(capsys, "sft", str(missing))
    assert str(missing) in msg and "cannot read" in msg


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
    path = write_yaml(tmp_path, "model:\n  arch: llama\n  hidden_size: 64: 3\ntrain:\n  max_steps: 2\n")
    msg = cli_error(capsys, "sft", path)
    assert msg.startswith(f"{path}:3: not valid YAML"), msg


def test_unknown_preset_lists_the_known_ones(capsys):
    msg = cli_error(capsys, "sft", str(TINY_SFT), "model.preset=llama2-700b")
    assert msg.startswith("model.preset: no preset 'llama2-700b' (known:"), msg


# ---------------------------------------------------------------------------------------------
# Overrides parse as YAML; the resolved config round-trips.

def test_override_values_are_parsed_as_yaml():
    cfg = load_config(TINY_SFT, ["optim.lr=1e-5", "data.valid=null", "train.max_steps=4",
                                 "logging.tensorboard=false", "data.template=tulu", "optim.min_lr=0",
                                 "data.train=data/x.jsonl", "data.synthetic=false"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)  # int widened to float
    assert cfg.data.valid is None
    assert cfg.train.max_steps == 4 and cfg.logging.tensorboard is False
    assert cfg.data.template == "tulu" and cfg.data.train == "data/x.jsonl"
    assert cfg.parallel.tp == 2 and cfg.train.global_batch_size == 16  # the file's values stay
    # a later override of the same key wins, and overrides reach keys the file does not set
    cfg = load_config(TINY_SFT, ["optim.lr=1e-5", "optim.lr=4e-3", "ppo.top_k=5"])
    assert cfg.optim.lr == 4e-3 and cfg.ppo.top_k == 5


def test_load_config_raises_config_error_with_key_path():
    with pytest.raises(ConfigError, match=r"^data\.seq_len: must be >= 1, got 0$"):
        load_config(TINY_SFT, ["data.seq_len=0"])


def test_a_file_where_run_dir_or_profile_goes_is_refused_before_any_step(tmp_path, capsys):
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown
    from alfred_train.stages.common import prepare_run_dir

    plain = tmp_path / "plain"
    plain.write_text("")
    for run_dir in (plain, plain / "sub"):  # run.dir, or a folder above it, is a file
        msg = cli_error(capsys, "sft", str(TINY_SFT), "--dry-run", f"run.dir={run_dir}")
        assert msg == f"run.dir: {plain} is a file, not a directory; set run.dir to a directory path"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "profile").write_text("")
    assert main(["sft", str(TINY_SFT), "--dry-run", f"run.dir={run_dir}"]) == 0  # not profiling: no matter
    msg = cli_error(capsys, "sft", str(TINY_SFT), "--dry-run", f"run.dir={run_dir}", "logging.profile_step=1")
    assert msg.startswith(f"logging.profile_step: {run_dir / 'profile'} is a file")
    cfg = load_config(TINY_SFT, ["parallel.tp=1", f"run.dir={run_dir}", "logging.profile_step=1"])
    runtime = init_runtime(ParallelDims(1, 1, 1))
    try:  # the workers check again, every rank together, before any step
        with pytest.raises(ConfigError, match=r"^logging.profile_step: .*profile is a file"):
            prepare_run_dir(cfg, runtime)
    finally:
        shutdown()
    assert not (run_dir / "config.yaml").exists()


def test_resolved_config_in_run_dir_round_trips(tmp_path):
    """What `prepare_run_dir` writes to run.dir/config.yaml loads back to an equal Config."""
    from alfred_train.parallel.dims import ParallelDims
    from alfred_train.parallel.init import init_runtime, shutdown
    from alfred_train.checkpointing.site import release_run_dirs
    from alfred_train.stages.common import prepare_run_dir

    run_dir = tmp_path / "run"
    cfg = load_config(TINY_SFT, ["optim.lr=1e-5", "optim.min_lr=1e-6", "data.valid=null", "parallel.tp=1",
                                 f"run.dir={run_dir}",
                                 "model.num_query_groups=4", "data.template=vicuna", "ppo.kl_estimator=k3"])
    runtime = init_runtime(ParallelDims(1, 1, 1))
    try:
        assert prepare_run_dir(cfg, runtime) == run_dir
    finally:
        release_run_dirs()  # the run.dir lock, as the CLI drops it after a run
        shutdown()
    written = run_dir / "config.yaml"
    assert written.read_text() == dump_yaml(cfg)
    again = load_config(written)
    assert isinstance(again, Config) and again == cfg
    assert again.optim.lr == 1e-5 and again.model.num_query_groups == 4 and again.ppo.kl_estimator == "k3"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml"]  # no temp file left


# ---------------------------------------------------------------------------------------------
# Malformed data in a real run.

@pytest.mark.slow
def test_malformed_jsonl_exits_2_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n'
                   '{"prompt": "e", "response": \n{"prompt": "f", "response": "g"}\n')
    run_dir = tmp_path / "run"
    done = run_cli("sft", str(TINY_SFT), f"data.train={bad}", "data.synthetic=false", "parallel.tp=1",
                   f"run.dir={run_dir}", "train.max_steps=2", check=False, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    mentions = [line for line in done.stderr.splitlines() if "bad.jsonl" in line]
    assert len(mentions) == 1, done.stderr
    assert re.fullmatch(rf"{ERROR_PREFIX}{re.escape(str(bad))}:4: invalid JSON \(.+\)", mentions[0]), mentions[0]
    # nothing half-written: no checkpoint, no `latest`, no metrics, no temporary files
    if run_dir.exists():
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
        assert set(left) <= {"config.yaml", "checkpoints"}, left
        assert load_config(run_dir / "config.yaml").data.train == str(bad)
