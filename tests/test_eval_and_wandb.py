"""`alfred-train eval` (lm-evaluation-harness on our checkpoints), `ppo.eval_tasks` and `logging.wandb`.

One tiny PPO run, in two launches (1 iteration, then resumed for a 2nd), carries both features:
W&B in offline mode (a credential-looking env entry cannot reach it: the config loader refuses
it, tests/test_launch_config.py; `tracking.mask_secrets` masks such keys anyway), and `ppo.eval_tasks` with a local
multiple-choice task (a task YAML + JSONL written here) at the end. Then `alfred-train eval` runs
the same task on the run's checkpoint with per-example samples. Nothing is downloaded: the HF
caches point into the test's directory and the eval runs offline.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli

pytest.importorskip("lm_eval", reason="needs the [eval] extra")
pytest.importorskip("wandb", reason="needs the [wandb] extra")
pytestmark = pytest.mark.slow

TINY_PPO = str(ROOT / "configs" / "tiny-ppo.yaml")
SHORT = ["parallel.tp=1", "ppo.rollouts_per_iter=8", "ppo.rollout_micro_batch=8", "ppo.train_micro_batch=4",
         "ppo.value_steps_per_epoch=2", "ppo.max_new_tokens=6", "ppo.eval_prompts=4", "optim.decay_steps=10",
         "checkpoint.interval=1", "logging.tensorboard=false", "logging.plots=false"]
QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a cat have?", ["two", "four", "six"], 1),
    ("Which one is a fruit?", ["carrot", "potato", "apple"], 2),
    ("Is fire hot or cold?", ["hot", "cold"], 0),
]


def write_task(folder: Path) -> Path:
    """A local multiple-choice task as lm-eval reads it: YAML + JSONL data (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    task = folder / "tiny_mc.yaml"
    task.write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return task


@pytest.fixture(scope="module")
def work(tmp_path_factory, ppo_inits):
    root = tmp_path_factory.mktemp("eval-wandb")
    saved = dict(os.environ)
    os.environ.update(HF_HOME=str(root / "hf"), HF_DATASETS_CACHE=str(root / "hf" / "datasets"))  # to the CLIs
    task = write_task(root / "tasks")
    run_dir = root / "run"
    common = ["ppo", TINY_PPO, f"run.dir={run_dir}", f"ppo.policy_init={ppo_inits / 'sft'}",
              f"ppo.reward_init={ppo_inits / 'rm'}", *SHORT,
              "logging.wandb={project: alfred-tests, mode: offline}"]
    first = run_cli(*common, "train.max_steps=1")
    second = run_cli(*common, "train.max_steps=2", f"ppo.eval_tasks=[{task}]", "ppo.eval_limit=3")
    yield {"root": root, "run_dir": run_dir, "task": task, "first": first, "second": second}
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------------
# W&B offline files, read back with W&B's own record schema.

def read_wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file (a LevelDB-style log: 32 KiB blocks of
    [crc32 u32][length u16][type u8] chunks; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # block padding
            pos += room - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
            rows[row.pop("_step")] = row
    return rows


def test_wandb_offline_gets_every_metric_and_resumes_the_same_run(work):
    run_dir = work["run_dir"]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(f"-{run_id}") for d in offline)  # resumed: same id
    history, configs = {}, []
    for d in offline:
        records = read_wandb_records(d / f"run-{run_id}.wandb")
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert runs and {r.run_id for r in runs} == {run_id} and runs[0].project == "alfred-tests"
        configs += [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                    for item in r.config.update if item.key == "launch"]
        configs += [json.loads(item.value_json) for r in runs for item in r.config.update if item.key == "launch"]
        history.update(wandb_history(records))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 1, 2] and sorted(history) == [0, 1, 2]
    for row in rows:  # every metrics.jsonl key, same value, same step
        logged = history[row["step"]]
        for key, value in row.items():
            if key == "step" or (isinstance(value, float) and not math.isfinite(value)):
                continue
            assert key in logged, (row["step"], key)
            assert logged[key] == pytest.approx(value, rel=1e-6), (row["step"], key)
    assert configs


def test_online_wandb_without_credentials_is_a_config_error(tmp_path, monkeypatch):
    from alfred_train.config import load_config
    from alfred_train.errors import ConfigError

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="logging.wandb.mode: online needs W&B credentials"):
        load_config(TINY_PPO, ["logging.wandb={project: p}"])
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert load_config(TINY_PPO, ["logging.wandb={project: p}"]).logging.wandb.mode is None  # online
    wandb = load_config(TINY_PPO, ["logging.wandb.project=q", "logging.wandb.mode=offline"]).logging.wandb
    assert (wandb.project, wandb.mode) == ("q", "offline")
    with pytest.raises(ConfigError, match="logging.wandb.projekt: unknown key"):
        load_config(TINY_PPO, ["logging.wandb.projekt=q"])


def test_wandb_mode_from_the_environment_unless_the_config_sets_one(tmp_path, monkeypatch):
    """WANDB_MODE=offline (a cluster without internet) was refused for lack of credentials, and the
    run would have gone online: wandb.init's mode argument beats WANDB_MODE, and we always passed one."""
    from alfred_train import tracking
    from alfred_train.config import load_config
    from alfred_train.errors import ConfigError

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.mode(load_config(TINY_PPO, ["logging.wandb={project: p}"]).logging.wandb.mode) == "offline"
    with pytest.raises(ConfigError, match="logging.wandb.mode: online needs W&B credentials"):
        load_config(TINY_PPO, ["logging.wandb={project: p, mode: online}"])  # the config's word wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.mode(None) == "disabled" and tracking.mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.mode(None) == "online"
    # a SageMaker job gets none of this shell's environment: the launch writes the mode it means here
    from alfred_train.launch.cli import _wandb_mode_fixed

    tree = {"run": {"dir": "r"}, "logging": {"tensorboard": False, "wandb": {"project": "p"}}}
    assert _wandb_mode_fixed(tree, {})["logging"] == {"tensorboard": False, "wandb": {"project": "p", "mode": "online"}}
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _wandb_mode_fixed(tree, {})["logging"]["wandb"]["mode"] == "offline"
    assert _wandb_mode_fixed(tree, {"WANDB_MODE": "disabled"})["logging"]["wandb"]["mode"] == "disabled"
    set_here = {"logging": {"wandb": {"project": "p", "mode": "online"}}}
    assert _wandb_mode_fixed(set_here, {}) == set_here and _wandb_mode_fixed({"run": {}}, {}) == {"run": {}}
    assert tree["logging"]["wandb"] == {"project": "p"}  # the run's own tree is not changed


def test_mask_secrets_at_any_depth():
    from alfred_train.tracking import mask_argv, mask_secrets

    cfg = {"launch": {"sagemaker": {"environment": {"WANDB_API_KEY": "k", "NCCL_DEBUG": "INFO"}}},
           "run": {"dir": "runs/x", "token_budget": None}, "optim": {"lr": 1e-5}}
    masked = mask_secrets(cfg)
    assert masked["launch"]["sagemaker"]["environment"] == {"WANDB_API_KEY": "***", "NCCL_DEBUG": "INFO"}
    assert masked["run"] == cfg["run"] and masked["optim"] == cfg["optim"]
    assert mask_argv(["ppo", "c.yaml", "launch.slurm.env={HF_TOKEN: x}", "optim.lr=1", "--api-key"]) == [
        "ppo", "c.yaml", "launch.slurm.env=***", "optim.lr=1", "***"]


# ---------------------------------------------------------------------------------------------
# lm-eval.

def test_ppo_eval_tasks_evaluate_the_final_checkpoint(work):
    out = work["run_dir"] / "eval" / "iter_0000002.json"
    assert out.exists(), work["second"].stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["alfred_train"]["checkpoint"].endswith("checkpoints/iter_0000002")
    assert results["n-samples"]["tiny_mc"] == {"original": 4, "effective": 3}  # ppo.eval_limit=3
    assert results["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "tiny_mc" in work["second"].stdout  # the table
    assert not list((work["run_dir"] / "eval").glob(".hf-export-*"))  # the temporary export is gone


def test_eval_cli_scores_every_choice_and_writes_json(work, tmp_path):
    out = tmp_path / "res.json"
    done = run_cli("eval", str(work["run_dir"]), "--tasks", str(work["task"]), "--output", str(out), "--samples",
                   "--batch-size", "2", cwd=tmp_path)  # not a git repository
    assert "|tiny_mc|" in done.stdout and "acc" in done.stdout
    assert "not a git repository" not in done.stderr  # lm-eval's `git describe`, once in every eval
    results = json.loads(out.read_text())
    assert results["alfred_train"]["offline"] is True
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    hits = []
    for s in samples:  # lm-eval's accuracy is the argmax of the per-choice log-likelihoods of our model
        logliks = [r[0] for r in s["filtered_resps"]]
        assert len(logliks) == len(QUESTIONS[s["doc_id"]][1]) and all(math.isfinite(x) and x < 0 for x in logliks)
        assert len(set(logliks)) == len(logliks)  # the choices are really scored, not tied
        hits.append(float(max(range(len(logliks)), key=logliks.__getitem__) == s["target"]))
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    first = json.loads((work["run_dir"] / "eval" / "iter_0000002.json").read_text())
    # same checkpoint, same task: the 3 examples of the PPO-end run score the same
    assert sum(hits[:3]) / 3 == pytest.approx(first["results"]["tiny_mc"]["acc,none"])


@pytest.mark.parametrize("task,message", [
    ("missing.yaml", "task file missing.yaml does not exist"),
    ("no-name.yaml", "has no `task:` name"),
    ("no-data.yaml", "names no `dataset_path:`"),  # lm-eval's own traceback, before
])
def test_eval_task_errors_are_one_line(tmp_path, capsys, monkeypatch, task, message):
    from alfred_train.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-name.yaml").write_text("dataset_path: json\n")
    (tmp_path / "no-data.yaml").write_text("task: foo\n")
    assert main(["eval", str(tmp_path), "--tasks", task]) == 2  # before the checkpoint is even looked for
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _broken_task(folder: Path, how: str) -> str:
    """A task file of `write_task`'s task, broken as `how` says; returns what the error must hold."""
    task = write_task(folder)
    text, data = task.read_text(), folder / "tiny_mc.jsonl"
    if how == "missing data":
        data.unlink()
        return f"its data file {data} does not exist"
    if how == "bad data line":
        data.write_text(data.read_text() + '{"question": "x", \n')
        return f"{data}:{len(QUESTIONS) + 1}: invalid JSON"
    if how == "misspelt key":
        task.write_text(text.replace("doc_to_text:", "doc_to_txt:"))
        return "unexpected keyword argument 'doc_to_txt'"
    if how == "output type":
        task.write_text(text.replace("output_type: multiple_choice", "output_type: multiple_choise"))
        return "output_type 'multiple_choise' is not one of"
    if how == "group file":
        task.write_text("group: my_group\ntask:\n  - tiny_mc\n")
        return "is an lm-eval group file"
    if how == "yaml syntax":
        task.write_text("task: tiny_mc\ndataset_path: json\n  bad: [\n")
        return "is not a readable lm-eval task file"
    (folder / "sub").mkdir()
    (folder / "sub" / "other.yaml").write_text(text)  # "same name": lm-eval ran whichever it indexed first
    return "both name task 'tiny_mc'"


@pytest.mark.parametrize("how", ["missing data", "bad data line", "misspelt key", "output type", "group file",
                                 "yaml syntax", "same name"])
def test_task_files_are_checked_against_lm_eval_and_their_data(tmp_path, how):
    """What the dry run and the preflight before training let through, for lm-eval to fail on in a
    traceback after the whole PPO run (which then exited 0)."""
    from alfred_train.errors import ConfigError
    from alfred_train.eval_tasks import check_task_names

    words = _broken_task(tmp_path, how)
    with pytest.raises(ConfigError) as caught:
        check_task_names([str(tmp_path / "tiny_mc.yaml")], "ppo.eval_tasks")
    assert str(caught.value).startswith("ppo.eval_tasks: ") and words in str(caught.value), caught.value
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="--tasks: names no task"):
        check_task_names([" , "], "--tasks")


def test_ppo_dry_run_refuses_a_task_whose_data_is_missing(tmp_path, capsys, monkeypatch):
    from alfred_train.cli import main

    monkeypatch.chdir(tmp_path)
    words = _broken_task(tmp_path / "tasks", "missing data")
    assert main(["ppo", TINY_PPO, f"ppo.eval_tasks=[{tmp_path / 'tasks' / 'tiny_mc.yaml'}]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_eval_outputs_and_device_are_checked_before_the_export(work, tmp_path, capsys):
    """A results path that is a directory or under a file, an --hf-dir that is a file, a CUDA device
    on a machine without one: found after the export (and the whole evaluation), with a traceback."""
    import torch

    from alfred_train.cli import main

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    base = ["eval", str(work["run_dir"]), "--tasks", str(work["task"])]
    cases = [(["--output", str(tmp_path / "adir")], "is a directory; name a .json file"),
             (["--output", str(tmp_path / "afile" / "r.json")], "is a file, not a directory"),
             (["--hf-dir", str(tmp_path / "afile")], "--hf-dir: output"),
             # these went to lm-eval after the export (a tpu device, a batch of 0 rows)
             (["--device", "tpu"], "--device tpu: lm-eval runs on cuda (cuda:N) or cpu"),
             (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
             (["--num-fewshot", "-1"], "--num-fewshot -1: must be >= 0"),
             (["--output", str(tmp_path / "r.json"), "--device", "cuda"], "no CUDA GPU is visible")]
    for flags, words in cases[:-1] + (cases[-1:] if not torch.cuda.is_available() else []):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not any((tmp_path / "adir").iterdir())


def test_default_output_does_not_depend_on_how_the_checkpoint_is_spelled(tmp_path, monkeypatch):
    from alfred_train.evaluation import default_output

    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000003"
    ckpt.mkdir(parents=True)
    want = tmp_path / "run" / "eval" / "iter_0000003.json"
    monkeypatch.chdir(ckpt)
    assert default_output(Path(".")) == want
    monkeypatch.chdir(ckpt.parent)
    assert default_output(Path("iter_0000003")) == want == default_output(ckpt)


def test_ppo_eval_tasks_are_checked_at_config_load(tmp_path):
    from alfred_train.config import load_config
    from alfred_train.errors import ConfigError

    with pytest.raises(ConfigError, match="ppo.eval_tasks: task file .*nope.yaml does not exist"):
        load_config(TINY_PPO, [f"ppo.eval_tasks=[{tmp_path / 'nope.yaml'}]"])
    with pytest.raises(ConfigError, match="checkpoint.save_final: true"):
        load_config(TINY_PPO, [f"ppo.eval_tasks=[{write_task(tmp_path)}]", "checkpoint.save_final=false"])


def test_ppo_eval_task_names_are_checked_before_training(tmp_path, capsys, monkeypatch):
    """A misspelt lm-eval task name is refused by the dry run (and the run's preflight, the same
    function), not found after the last PPO iteration."""
    from alfred_train.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ppo", TINY_PPO, "ppo.eval_tasks=[hellaswagg]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "ppo.eval_tasks: lm-eval knows no task hellaswagg" in err and len(err.strip().splitlines()) == 1
    assert main(["ppo", TINY_PPO, "ppo.eval_tasks=[hellaswag]", "--dry-run"]) == 0  # a name lm-eval ships
