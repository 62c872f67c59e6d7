"""The launch: section, its checks, the rendered sbatch script and the SageMaker entry script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alfred_train.errors import ConfigError
from alfred_train.launch import job, slurm
from alfred_train.launch.config import LaunchConfig, slurm_time_s, validate_slurm
from alfred_train.parallel.init import detect_launch_env

REPO = Path(__file__).resolve().parent.parent


def tiny_run(path: Path, **sections) -> Path:
    """configs/tiny-sft.yaml (a valid 2-process run) with `sections` replacing its own."""
    tree = {**yaml.safe_load((REPO / "configs" / "tiny-sft.yaml").read_text()), **sections}
    path.write_text(yaml.safe_dump(tree))
    return path


def test_from_dict_nested_and_strict():
    cfg = LaunchConfig.from_dict(
        {"nodes": 2, "slurm": {"partition": "gpu", "env": {"NCCL_DEBUG": "INFO", "X": 1}, "extra_sbatch": ["--exclusive"]}}
    )
    assert (cfg.nodes, cfg.gpus_per_node, cfg.workers_per_node) == (2, 8, 8)
    assert cfg.slurm.env == {"NCCL_DEBUG": "INFO", "X": "1"} and cfg.slurm.extra_sbatch == ("--exclusive",)
    with pytest.raises(ConfigError, match=r"^launch\.slurm\.partiton: unknown key"):
        LaunchConfig.from_dict({"slurm": {"partiton": "gpu"}})
    with pytest.raises(ConfigError, match=r"^launch\.nodes: expected an integer, got '2'"):
        LaunchConfig.from_dict({"nodes": "2"})
    with pytest.raises(ConfigError, match=r"^launch\.sagemaker\.spot: expected true or false"):
        LaunchConfig.from_dict({"sagemaker": {"spot": 1}})
    with pytest.raises(ConfigError, match=r"^launch\.sagemaker\.subnets: expected a list"):
        LaunchConfig.from_dict({"sagemaker": {"subnets": "subnet-1"}})


def test_resolve_run_template_then_overrides(tmp_path):
    tiny_run(tmp_path / "run.yaml", run={"dir": "out"}, launch={"nodes": 4, "slurm": {"partition": "a"}})
    (tmp_path / "t.yaml").write_text("launch: {nodes: 1, gpus_per_node: 2, slurm: {account: acct}}\n")
    run = job.resolve_run(
        tmp_path / "run.yaml", ["launch.slurm.partition=b", "launch.slurm.env={A: '1'}", "optim.lr=1e-2"],
        template=tmp_path / "t.yaml", backend="slurm",
    )  # fmt: skip
    assert run.launch.nodes == 1 and run.launch.backend == "slurm"
    assert (run.launch.slurm.partition, run.launch.slurm.account) == ("b", "acct")
    assert run.launch.slurm.env == {"A": "1"} and run.config.optim.lr == 1e-2
    assert run.run_dir == "out"
    # The whole run config is checked at launch, including processes = tp * pp * dp.
    with pytest.raises(ConfigError, match=r"^launch.nodes: 1 x 8 \(one per GPU, launch.gpus_per_node\) processes per "
                                          r"node = 8 != tp\*pp\*dp \(2\); change launch.nodes, the processes per node "
                                          r"\(a CPU job: launch.gpus_per_node=0 launch.procs_per_node=N\) or parallel.dp"):
        job.check_world_size(job.resolve_run(tmp_path / "run.yaml", ["launch.nodes=1"]))
    with pytest.raises(ConfigError, match=r"^optim.lrr: unknown key"):
        job.resolve_run(tmp_path / "run.yaml", ["optim.lrr=1"], template=tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match=r"override 'nodes': expected key.path=value"):
        job.resolve_run(tmp_path / "run.yaml", ["nodes"])
    (tmp_path / "bad.yaml").write_text("train: {}\n")
    with pytest.raises(ConfigError, match="holds only a launch: section, not train"):
        job.resolve_run(tmp_path / "run.yaml", template=tmp_path / "bad.yaml")


def test_template_placeholders_leave_the_run_configs_values(tmp_path):
    """sagemaker/alfred-40b-p4d.yaml's empty account fields ("", [], {}) replaced what the run config
    set: its role, image, buckets, inputs and VPC were gone from the job."""
    mine = {"role_arn": "arn:aws:iam::123456789012:role/alfred", "image_uri": "1.dkr.ecr/alfred:1",
            "source_s3_uri": "s3://bucket/jobs", "output_s3_uri": "s3://bucket/out",
            "checkpoint_s3_uri": "s3://bucket/ckpt", "spot": True, "inputs": {"data.prompts": "s3://bucket/p.jsonl"},
            "subnets": ["subnet-1"], "security_group_ids": ["sg-1"], "environment": {"MINE": "1"}}
    tree = yaml.safe_load((REPO / "configs" / "alfred-40b-ppo.yaml").read_text())
    tree["launch"]["sagemaker"].update(mine)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    sm = job.resolve_run(tmp_path / "run.yaml", template=REPO / "sagemaker" / "alfred-40b-p4d.yaml").launch.sagemaker
    for key, value in mine.items():
        got = getattr(sm, key)
        assert (list(got) if isinstance(got, tuple) else got) == value or key == "environment", key
    assert sm.environment["MINE"] == "1" and sm.environment["FI_PROVIDER"] == "efa"  # mappings merge
    assert sm.volume_size_gb == 2500 and sm.instance_type == "ml.p4d.24xlarge"  # what it sets, it sets


def test_a_config_without_run_dir_runs_in_runs_slash_its_name(tmp_path, monkeypatch):
    """The launcher put the job under runs/<config name> while the trainer wrote to runs/tiny-sft (the
    schema's default): two configs without run.dir resumed from each other's checkpoints."""
    monkeypatch.chdir(tmp_path)
    tree = yaml.safe_load((REPO / "configs" / "tiny-sft.yaml").read_text())
    del tree["run"]["dir"]
    (tmp_path / "my-run.yaml").write_text(yaml.safe_dump(tree))
    from alfred_train.config import load_config

    assert load_config(tmp_path / "my-run.yaml").run.dir == "runs/my-run"
    run = job.resolve_run(tmp_path / "my-run.yaml", backend="local")
    assert run.run_dir == run.config.run.dir == run.tree["run"]["dir"] == "runs/my-run"  # the job's copy says it
    assert load_config(tmp_path / "my-run.yaml", ["run.dir=elsewhere"]).run.dir == "elsewhere"


def test_slurm_launch_refuses_what_the_dry_run_refuses(capsys):
    """`launch --backend slurm` checked the layout but not what `ppo --dry-run` refuses (GPU memory,
    unreachable checkpoints): the job failed once it left the queue."""
    from alfred_train.cli import main

    argv = ["launch", str(REPO / "configs" / "alfred-40b-ppo.yaml"), "--backend", "slurm", "--dry-run",
            "launch.gpu_memory_gib=40"]
    assert main([*argv, "train.recompute=none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alfred-train: error: train.recompute: ") and "\n" not in err, err
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash\n") and "alfred-train ppo --dry-run: the configuration is valid" in err


def test_an_empty_or_scalar_launch_section_is_one_line(capsys, tmp_path):
    """With --backend an empty `launch:` (None) was a TypeError traceback; so was `launch=5`."""
    from alfred_train.cli import main

    empty = tmp_path / "empty.yaml"
    empty.write_text((REPO / "configs" / "tiny-sft.yaml").read_text() + "\nlaunch:\n")
    for argv in ([str(empty), "--backend", "local"], [str(empty)], [str(REPO / "configs" / "tiny-sft.yaml"), "launch=5"]):
        assert main(["launch", *argv, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("alfred-train: error: launch: expected a mapping, got ") and err.count("\n") == 1, err


def test_the_stage_comes_from_the_config_sections(tmp_path):
    """`launch configs/tiny-rm.yaml` trained SFT (launch.stage defaulted to sft); the stage is now the
    one the sections name, written into the job's config, and a config naming two must say which."""
    for name, stage in (("tiny-sft", "sft"), ("tiny-rm", "rm"), ("tiny-ppo", "ppo"), ("alfred-40b-ppo", "ppo")):
        run = job.resolve_run(REPO / "configs" / f"{name}.yaml", backend="local")
        assert (run.launch.stage, run.tree["launch"]["stage"]) == (stage, stage), name
    assert job.resolve_run(REPO / "configs" / "tiny-rm.yaml", ["launch.stage=sft"]).launch.stage == "sft"
    both = yaml.safe_load((REPO / "configs" / "tiny-ppo.yaml").read_text())
    both["rm"] = yaml.safe_load((REPO / "configs" / "tiny-rm.yaml").read_text())["rm"]
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(ConfigError, match=r"^launch.stage: .*both.yaml has both rm: and ppo: sections; set launch.stage"):
        job.resolve_run(tmp_path / "both.yaml")


def test_a_misspelt_backend_is_one_line(tmp_path, capsys):
    """launch.backend=k8s (or Slurm) was a KeyError traceback, exit 1."""
    from alfred_train import cli

    tiny_run(tmp_path / "run.yaml", run={"dir": str(tmp_path / "out")})
    for backend in ("k8s", "Slurm"):
        assert cli.main(["launch", str(tmp_path / "run.yaml"), "--dry-run", f"launch.backend={backend}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"launch.backend: '{backend}' is not one of slurm, sagemaker, local") and "\n" not in err, err


def test_an_unquoted_time_limit_says_to_quote_it():
    tree = yaml.safe_load("slurm: {time: 12:00:00}")  # YAML 1.1: 43200
    with pytest.raises(ConfigError, match=r"^launch.slurm.time: expected a string, got 43200 \(YAML reads .*quote the value"):
        LaunchConfig.from_dict(tree)


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"stage": "dpo"}, "launch.stage"),
        ({"nodes": 0}, "launch.nodes"),
        ({"gpus_per_node": 0}, "launch.procs_per_node"),
        ({"gpus_per_node": 1, "procs_per_node": 2}, "launch.procs_per_node"),  # two processes on one GPU
        ({"name": "bad_name"}, "launch.name"),
        ({"slurm": {"time": "90"}}, "launch.slurm.time"),
        ({"slurm": {"time": "00:05:00", "signal_lead_s": 300}}, "launch.slurm.signal_lead_s"),
        ({"slurm": {"extra_sbatch": ["exclusive"]}}, r"launch.slurm.extra_sbatch\[0\]"),
        ({"slurm": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "launch.slurm.env.AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_slurm_checks_name_the_key(tree, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_slurm(LaunchConfig.from_dict(tree))


def test_slurm_time_parsing():
    assert slurm_time_s("01:02:03") == 3723
    assert slurm_time_s("2-00:00:10") == 2 * 86400 + 10


def test_render_sbatch(tmp_path):
    cfg = LaunchConfig.from_dict(
        {
            "name": "tiny", "nodes": 2, "gpus_per_node": 8,
            "slurm": {"partition": "gpu", "account": "rl", "time": "04:00:00", "signal_lead_s": 300,
                      "cpus_per_task": 12, "setup": "source /opt/venv/bin/activate",
                      "env": {"NCCL_DEBUG": "INFO", "ODD": "a b"}, "extra_sbatch": ["--exclusive"]},
        }
    )  # fmt: skip
    script = slurm.render_sbatch(
        cfg, command=["python", "-m", "alfred_train", "sft", "/j/config.yaml"], job_dir=tmp_path, workdir=tmp_path
    )
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=tiny", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --time=04:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --account=rl", f"#SBATCH --output={tmp_path}/%x-%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
        "#SBATCH --exclusive",
    ]  # fmt: skip
    assert "export ODD='a b'\n" in script and "source /opt/venv/bin/activate\n" in script
    assert "srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 python -m alfred_train sft /j/config.yaml &" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "trap on_usr1 USR1" in script
    assert f"export ALFRED_REQUEUE_RECORD={tmp_path}/requeue-record" in script
    no_requeue = LaunchConfig.from_dict({"slurm": {"requeue": False}})
    script = slurm.render_sbatch(no_requeue, command=["true"], job_dir=tmp_path, workdir=tmp_path)
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script
    out = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr


def test_parse_show_job():
    line = "JobId=7 JobName=a b JobState=COMPLETED Restarts=1 ExitCode=3:0 StdOut=/x/a-7.out"
    fields = slurm.parse_show_job(line)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "3:0" and fields["StdOut"] == "/x/a-7.out"


def entry(tmp_path, env, *args):
    done = subprocess.run(
        [sys.executable, str(REPO / "sagemaker" / "entry.py"), *args, "--print-only"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    return done


def test_entry_script_two_hosts(tmp_path):
    resource = tmp_path / "resourceconfig.json"
    resource.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}))
    done = entry(tmp_path, {"ALFRED_SM_RESOURCECONFIG": str(resource)}, "--stage", "ppo", "--config", "job/config.yaml", "--procs_per_node", "8")
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert (flag("--nnodes"), flag("--nproc_per_node"), flag("--node_rank")) == ("2", "8", "1")
    assert (flag("--master_addr"), flag("--master_port")) == ("algo-1", "7777")
    assert argv[-3:] == ["ppo", str(REPO / "sagemaker" / "job" / "config.yaml"), "run.dir=/opt/ml/checkpoints"]

    # Host order is SageMaker's, not sorted: algo-10 listed first is the master and rank 0.
    env = {"ALFRED_SM_RESOURCECONFIG": str(tmp_path / "none.json"), "SM_HOSTS": '["algo-10", "algo-2"]',
           "SM_CURRENT_HOST": "algo-10", "SM_NUM_GPUS": "4"}  # fmt: skip
    argv = entry(tmp_path, env, "--stage", "sft", "--config", "/abs/c.yaml").stdout.split()
    assert (flag("--node_rank"), flag("--master_addr"), flag("--nproc_per_node")) == ("0", "algo-10", "4")
    assert "/abs/c.yaml" in argv

    # Inputs: each key from its channel's directory (SM_CHANNEL_<NAME>), or from the code dir.
    inputs = json.dumps({"ppo.policy_init": ["ppo_policy_init", ""], "data.prompts": ["data_prompts", "p.jsonl"],
                         "model.tokenizer": ["", "configs/t.json"]})
    env = {"ALFRED_SM_RESOURCECONFIG": str(resource), "SM_CHANNEL_DATA_PROMPTS": "/x/data"}
    argv = entry(tmp_path, env, "--stage", "ppo", "--config", "c.yaml", "--procs_per_node", "1", "--inputs", inputs,
                 "--run_dir", "/opt/ml/input/data/fsx/runs/a").stdout.split()
    assert argv[-4:] == ["run.dir=/opt/ml/input/data/fsx/runs/a", "data.prompts=/x/data/p.jsonl",
                         f"model.tokenizer={REPO / 'sagemaker' / 'configs/t.json'}",
                         "ppo.policy_init=/opt/ml/input/data/ppo_policy_init"]

    done = entry(tmp_path, {"ALFRED_SM_RESOURCECONFIG": str(tmp_path / "none.json")}, "--stage", "sft", "--config", "c")
    assert done.returncode != 0 and "not in a SageMaker job" in done.stderr


def test_resolved_config_round_trips(tmp_path):
    tiny_run(tmp_path / "run.yaml", launch={"stage": "rm", "gpus_per_node": 2})
    run = job.resolve_run(tmp_path / "run.yaml", ["train.max_steps=4"])
    path = job.write_job_dir(run, tmp_path / "j")
    assert yaml.safe_load(path.read_text()) == run.tree and run.tree["train"]["max_steps"] == 4
    assert job.train_command(run.launch, str(path)) == ["python", "-m", "alfred_train", "rm", str(path)]


# ---------------------------------------------------------------------------------------------
# Slurm: injection, credentials, multi-node and pyxis, checked on the rendered script

INJECTION = "gpu\ntouch /tmp/alfred-pwned"


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"slurm": {"partition": INJECTION}}, "launch.slurm.partition"),
        ({"slurm": {"partition": "gpu; touch x"}}, "launch.slurm.partition"),
        ({"slurm": {"account": "rl $(touch x)"}}, "launch.slurm.account"),
        ({"slurm": {"time": "01:00:00\ntouch x"}}, "launch.slurm.time"),
        ({"slurm": {"log_dir": "/logs\ntouch x"}}, "launch.slurm.log_dir"),
        ({"slurm": {"extra_sbatch": ["--exclusive\ntouch x"]}}, r"launch.slurm.extra_sbatch\[0\]"),
        ({"slurm": {"extra_sbatch": ["--constraint=a100 `touch x`"]}}, r"launch.slurm.extra_sbatch\[0\]"),
        ({"slurm": {"env": {"A;touch x": "1"}}}, r"launch.slurm.env\['A;touch x'\]"),
        ({"slurm": {"env": {"PATH=/x PY": "1"}}}, r"launch.slurm.env\['PATH=/x PY'\]"),
        ({"slurm": {"container_image": "img\ntouch x"}}, "launch.slurm.container_image"),
        ({"slurm": {"container_image": "img", "container_mounts": ["/a:/b' ; touch x"]}},
         r"launch.slurm.container_mounts\[0\]"),
        ({"slurm": {"container_image": "img", "container_mounts": ["/a:/b,/c:/d"]}}, r"launch.slurm.container_mounts\[0\]"),
        ({"slurm": {"container_mounts": ["/a:/b"]}}, "launch.slurm.container_mounts"),
        ({"name": "x\ntouch"}, "launch.name"),
    ],
)
def test_slurm_injection_through_each_field_is_refused(tree, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_slurm(LaunchConfig.from_dict(tree))


def test_slurm_env_values_are_quoted_not_run(tmp_path):
    value = "$(touch pwned) `touch pwned2`; touch pwned3"
    cfg = LaunchConfig.from_dict({"gpus_per_node": 0, "procs_per_node": 1, "slurm": {"env": {"ODD": value}}})
    validate_slurm(cfg)
    script = slurm.render_sbatch(cfg, command=["true"], job_dir=tmp_path, workdir=tmp_path)
    exports = "".join(line + "\n" for line in script.splitlines() if line.startswith("export ODD="))
    out = subprocess.run(["bash", "-c", exports + 'printf %s "$ODD"'], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout == value and list(tmp_path.iterdir()) == []


SECRET_VALUE = "hf_SENTINEL-93b1-never-printed"


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "hf_token", " HF_TOKEN ", "wandb_api_key ",
                                  "aws_secret_access_key", "DB_PASSWORD", "MY_Credentials", "GITHUB_PAT_TOKEN"])
@pytest.mark.parametrize("section", ["slurm.env", "sagemaker.environment"])
def test_credential_names_refused_at_load_without_the_value(name, section):
    outer, inner = section.split(".")
    with pytest.raises(ConfigError) as err:
        LaunchConfig.from_dict({outer: {inner: {name: SECRET_VALUE}}})
    text = str(err.value)
    assert text.startswith(f"launch.{section}") and "looks like a credential" in text
    assert SECRET_VALUE not in text and "Secrets Manager" in text


@pytest.mark.parametrize("setup", [f"export HF_TOKEN={SECRET_VALUE}", f"module load x; wandb_api_key={SECRET_VALUE} y",
                                   f"source venv/bin/activate\nexport  DB_PASSWORD='{SECRET_VALUE}'"])
def test_credentials_set_in_slurm_setup_refused(setup):
    with pytest.raises(ConfigError, match=r"^launch\.slurm\.setup: sets \w+, which looks like a credential") as err:
        LaunchConfig.from_dict({"slurm": {"setup": setup}})
    assert SECRET_VALUE not in str(err.value)
    LaunchConfig.from_dict({"slurm": {"setup": "source /opt/venv/bin/activate\nexport NCCL_DEBUG=INFO"}})


FAKE_SRUN = r"""#!/usr/bin/env python3
# Stand-in for srun on N fake nodes: starts --nodes x --ntasks-per-node copies of the command with
# the variables Slurm gives each task (node by node, like Slurm's block distribution).
import json, os, subprocess, sys
args, options = sys.argv[1:], {}
while args[0].startswith("--"):
    key, _, value = args.pop(0).partition("=")
    options[key] = value
nodes, per_node = int(options["--nodes"]), int(options["--ntasks-per-node"])
json.dump(options, open("srun-options.json", "w"))
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per_node), SLURM_STEP_ID="0",
                   SLURMD_NODENAME=f"gpu-{node + 1:03d}")
        procs.append(subprocess.Popen(args, env=env))
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && { echo gpu-001; echo gpu-002; exit 0; }
exit 1
"""

TASK = """
import json, os
json.dump(dict(os.environ), open(f"task.{os.environ['SLURM_PROCID']}.json", "w"))
"""


def test_two_node_script_starts_one_worker_per_gpu_on_every_node(tmp_path, monkeypatch):
    """The rendered 2 x 8-GPU script, run by bash with srun/scontrol standing in for two nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "task.py").write_text(TASK)
    cfg = LaunchConfig.from_dict({"name": "two", "nodes": 2, "gpus_per_node": 8, "slurm": {
        "container_image": "nvcr.io#nvidia/pytorch:25.01-py3", "container_mounts": ["/fsx:/fsx", "/home:/home:ro"]}})
    validate_slurm(cfg)
    script = slurm.render_sbatch(cfg, command=[sys.executable, str(tmp_path / "task.py")], job_dir=tmp_path,
                                 workdir=tmp_path)
    (tmp_path / "job.sbatch").write_text(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[001-002]"}
    done = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    task_envs = [json.loads((tmp_path / f"task.{r}.json").read_text()) for r in range(16)]
    assert [t["SLURMD_NODENAME"] for t in task_envs] == ["gpu-001"] * 8 + ["gpu-002"] * 8
    seen = []
    for task_env in task_envs:  # how the trainer reads each task's environment
        for key in [k for k in os.environ if k.startswith(("SLURM", "MASTER", "RANK", "WORLD"))]:
            monkeypatch.delenv(key)
        for key, value in task_env.items():
            monkeypatch.setenv(key, value)
        launch = detect_launch_env()
        seen.append((launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port))
    assert seen == [(r, 16, r % 8, "gpu-001", 20000 + 4242 % 20000) for r in range(16)]
    options = json.loads((tmp_path / "srun-options.json").read_text())
    assert options == {"--nodes": "2", "--ntasks-per-node": "8", "--kill-on-bad-exit": "1",
                       "--container-image": "nvcr.io#nvidia/pytorch:25.01-py3",
                       "--container-workdir": str(tmp_path), "--container-mounts": "/fsx:/fsx,/home:/home:ro"}
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" in script


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "hf_token", " HF_TOKEN ", "wandb_api_key "])
@pytest.mark.parametrize("backend", ["slurm", "sagemaker"])
def test_secret_sentinel_never_written_or_printed(tmp_path, capsys, name, backend):
    """A credential in the run config: the launcher's dry run and real launch, and the trainer's own
    dry run, all exit 2 naming the key; the value appears in no output and no file."""
    from alfred_train import cli as trainer_cli
    from alfred_train.launch import cli

    section = {"slurm": {"env": {name: SECRET_VALUE}}} if backend == "slurm" else \
        {"sagemaker": {"environment": {name: SECRET_VALUE}}}
    run = tiny_run(tmp_path / "run.yaml", run={"dir": str(tmp_path / "run")},
                   launch={"backend": backend, "gpus_per_node": 0, "procs_per_node": 2, **section})
    for argv in (["launch", str(run), "--dry-run"], ["launch", str(run)]):
        assert cli.main(argv) == 2
        out = capsys.readouterr()
        assert out.err.startswith(f"error: launch.{'slurm.env' if backend == 'slurm' else 'sagemaker.environment'}")
        assert SECRET_VALUE not in out.out + out.err
    assert trainer_cli.main(["sft", str(run), "--dry-run"]) == 2
    assert trainer_cli.main(["sft", str(run)]) == 2
    out = capsys.readouterr()
    assert "looks like a credential" in out.err and SECRET_VALUE not in out.out + out.err
    assert not (tmp_path / "run").exists()  # no run dir, job folder or config.yaml was written
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]
