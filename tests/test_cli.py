"""The `alfred-train` command: console script, help, version, and overrides anywhere on the line."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from alfred_train.cli import build_parser, main, parse_with_overrides
from tests.helpers import ROOT, TINY_SFT

COMMANDS = ("sft", "rm", "ppo", "launch", "jobs", "convert", "generate")
VENV_BIN = Path(sys.executable).parent


def run_script(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("alfred-train", path=str(VENV_BIN))
    assert script is not None, f"no alfred-train console script in {VENV_BIN}; reinstall the package"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_console_script_help_lists_every_command():
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")}
    assert set(COMMANDS) <= listed, done.stdout
    assert "exit codes: 0 done, 2 bad configuration" in done.stdout


def test_console_script_version_matches_package_metadata():
    done = run_script("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"alfred-train {version('alfred-train')}"


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "alfred_train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "generate" in done.stdout, done.stderr


def test_no_arguments_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: alfred-train")
    for command in COMMANDS:
        assert f"    {command} " in err


def test_help_and_version_return_instead_of_exiting(capsys):
    assert main(["sft", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alfred-train {version('alfred-train')}"


# ---------------------------------------------------------------------------------------------
# key=value overrides before and after options, for every subcommand that takes them.

def parse(*argv: str) -> argparse.Namespace:
    return parse_with_overrides(build_parser(), list(argv))


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_stage_overrides_before_and_after_options(stage):
    args = parse(stage, "run.yaml", "optim.lr=1e-5", "--dry-run", "parallel.tp=2", "train.max_steps=3")
    assert args.command == stage and args.config == "run.yaml" and args.dry_run
    assert args.overrides == ["optim.lr=1e-5", "parallel.tp=2", "train.max_steps=3"]
    args = parse(stage, "--dry-run", "run.yaml", "parallel.tp=2")
    assert (args.config, args.overrides, args.dry_run) == ("run.yaml", ["parallel.tp=2"], True)


def test_launch_and_generate_overrides_after_options():
    args = parse("launch", "run.yaml", "--backend", "slurm", "a.b=1", "--dry-run", "c.d=2")
    assert (args.config, args.backend, args.dry_run, args.overrides) == ("run.yaml", "slurm", True, ["a.b=1", "c.d=2"])
    args = parse("generate", "ckpt", "--prompts", "p.jsonl", "parallel.tp=2", "--output", "o.jsonl", "parallel.pp=2")
    assert (args.checkpoint, args.prompts, args.output) == ("ckpt", "p.jsonl", "o.jsonl")
    assert args.overrides == ["parallel.tp=2", "parallel.pp=2"]


def test_stray_words_are_usage_errors(capsys):
    assert main(["sft", "run.yaml", "--dry-run", "oops"]) == 2
    assert "unrecognized arguments: oops" in capsys.readouterr().err
    assert main(["sft", "run.yaml", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    # convert takes no overrides: a key=value word there is an error, not silently dropped
    assert main(["convert", "apply-delta", "b", "d", "o", "a.b=1"]) == 2
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err


def test_override_after_an_option_reaches_the_config(capsys):
    """The override after --dry-run is applied: its bad value is refused while loading (exit 2)."""
    assert main(["sft", str(TINY_SFT), "--dry-run", "model.arch=gpt"]) == 2
    assert capsys.readouterr().err.strip() == "alfred-train: error: model.arch: 'gpt' is not one of llama, falcon"
    assert main(["sft", "--dry-run", "train.max_steps=ten"]) == 2  # no CONFIG: the embedded recipe
    assert "train.max_steps: expected an integer, got 'ten'" in capsys.readouterr().err
