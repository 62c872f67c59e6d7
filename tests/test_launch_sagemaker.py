"""SageMaker launcher against a real moto server process, through the CLI."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from launch_fixtures import REPO, SECRET_MARKER, aws_env, boto_client

from alfred_train.errors import ConfigError
from alfred_train.launch import cli, sagemaker
from alfred_train.launch.config import LaunchConfig

BUCKET = "alfred-test"
TEMPLATE = REPO / "sagemaker" / "alfred-40b-p4d.yaml"


def account_fields(endpoint: str) -> list[str]:
    """The overrides a user adds to the p4d template (account-specific), pointed at moto."""
    return [
        "launch.sagemaker.role_arn=arn:aws:iam::123456789012:role/AlfredSageMaker",
        "launch.sagemaker.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/alfred-train:0.1",
        f"launch.sagemaker.source_s3_uri=s3://{BUCKET}/jobs",
        f"launch.sagemaker.output_s3_uri=s3://{BUCKET}/output",
        f"launch.sagemaker.checkpoint_s3_uri=s3://{BUCKET}/alfred-40b-ppo/checkpoints",
        f"launch.sagemaker.endpoint_url={endpoint}",
        f"launch.sagemaker.inputs={{{', '.join(f'{k}: {v}' for k, v in S3_INPUTS.items())}}}",
    ]


# Where the recipe's four /fsx/alfred/... inputs come from in the p4d test job.
S3_INPUTS = {
    "ppo.policy_init": f"s3://{BUCKET}/alfred/falcon-40b-sft/",
    "ppo.reward_init": f"s3://{BUCKET}/alfred/falcon-40b-rm/",
    "data.prompts": f"s3://{BUCKET}/alfred/data/",  # the folder of the recipe's five prompt files
    "model.tokenizer": f"s3://{BUCKET}/alfred/falcon-40b/tokenizer.json",
}


PROMPTS = yaml.safe_load((REPO / "configs" / "alfred-40b-ppo.yaml").read_text())["data"]["prompts"]


@pytest.fixture
def run_config(tmp_path) -> Path:
    """configs/alfred-40b-ppo.yaml when it exists, else a minimal stand-in run config."""
    recipe = REPO / "configs" / "alfred-40b-ppo.yaml"
    if recipe.is_file():
        return recipe
    path = tmp_path / "alfred-40b-ppo.yaml"
    path.write_text(
        "run: {dir: runs/alfred-40b-ppo}\nparallel: {tp: 8, pp: 4, dp: 4}\n"
        "model: {num_layers: 8, hidden_size: 512, num_attention_heads: 8}\ndata: {synthetic: true}\n"
        "train: {micro_batch_size: 1, global_batch_size: 64}\nppo: {rollouts_per_iter: 64}\n"
    )
    return path


def launch_cli(*args: str, endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alfred_train.launch.cli", *args],
        capture_output=True, text=True, env=aws_env(endpoint), cwd=REPO, timeout=120,
    )  # fmt: skip


def test_p4d_job_created_field_by_field(moto, run_config, tmp_path):
    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    for name in ("tokenizer.json", "tokenizer_config.json", "model-00001-of-00009.safetensors"):
        s3.put_object(Bucket=BUCKET, Key=f"alfred/falcon-40b/{name}", Body=name.encode())
    common = [str(run_config), "--backend", "sagemaker", "--template", str(TEMPLATE), *account_fields(moto)]
    extra = ["launch.sagemaker.spot=true", "launch.sagemaker.max_wait_s=500000"]

    dry = launch_cli("launch", *common, "--dry-run", *extra, endpoint=moto)
    assert dry.returncode == 0, dry.stderr
    rendered = json.loads(dry.stdout)
    assert rendered["Environment"] == {
        "FI_EFA_USE_DEVICE_RDMA": "1", "FI_PROVIDER": "efa", "NCCL_DEBUG": "WARN",
        "NCCL_SOCKET_IFNAME": "eth0", "RDMAV_FORK_SAFE": "1",
    }  # fmt: skip
    sm = boto_client("sagemaker", moto)
    assert sm.list_training_jobs()["TrainingJobSummaries"] == []  # dry run submitted nothing
    assert len(s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == 3  # the three put above: nothing uploaded

    done = launch_cli("launch", *common, *extra, endpoint=moto)
    assert done.returncode == 0, done.stderr
    name = done.stdout.split()[-1]
    assert name.startswith("alfred-40b-ppo-") and len(name) == len("alfred-40b-ppo-") + 15
    job = sm.describe_training_job(TrainingJobName=name)
    assert job["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 16
    assert job["ResourceConfig"]["VolumeSizeInGB"] == 2500
    assert job["AlgorithmSpecification"]["TrainingImage"].endswith("/alfred-train:0.1")
    assert job["RoleArn"] == "arn:aws:iam::123456789012:role/AlfredSageMaker"
    source = f"s3://{BUCKET}/jobs/{name}/source/sourcedir.tar.gz"
    assert job["HyperParameters"] == {
        "sagemaker_program": '"entry.py"',
        "sagemaker_submit_directory": json.dumps(source),
        "sagemaker_region": '"us-east-1"',
        "sagemaker_torch_distributed_enabled": "false",
        "stage": '"ppo"',
        "config": '"job/config.yaml"',
        "procs_per_node": "8",
        "run_dir": '"/opt/ml/checkpoints"',
        "inputs": json.dumps(json.dumps({
            "data.prompts": {"items": [{**item, "path": ["data_prompts", item["path"][len("/fsx/alfred/data/"):]]}
                                       for item in PROMPTS]},
            "model.tokenizer": ["model_tokenizer", "tokenizer.json"],
            "ppo.policy_init": ["ppo_policy_init", ""], "ppo.reward_init": ["ppo_reward_init", ""]}, sort_keys=True)),
        "job_id": json.dumps(name),
    }
    assert job["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/alfred-40b-ppo/checkpoints",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 432000, "MaxWaitTimeInSeconds": 500000}
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/output"
    channels = {c["ChannelName"]: c for c in rendered["InputDataConfig"]}
    assert set(channels) == {"ppo_policy_init", "ppo_reward_init", "data_prompts", "model_tokenizer"}
    for key, uri in S3_INPUTS.items():
        channel = channels[key.replace(".", "_")]
        if key == "model.tokenizer":  # its own folder: the file and the tokenizer_config.json beside it
            uri = f"s3://{BUCKET}/jobs/{rendered['TrainingJobName']}/inputs/model_tokenizer/"
        assert channel["DataSource"]["S3DataSource"] == {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        assert channel["InputMode"] == "File"
    tokenizer_uri = next(c for c in job["InputDataConfig"] if c["ChannelName"] == "model_tokenizer")
    prefix = tokenizer_uri["DataSource"]["S3DataSource"]["S3Uri"].split(f"s3://{BUCKET}/", 1)[1]
    copied = {o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert copied == {"tokenizer.json", "tokenizer_config.json"}  # not the weights beside them
    assert "copy s3://alfred-test/alfred/falcon-40b/tokenizer.json (and the tokenizer files beside it)" in dry.stderr
    assert "Checkpoint: 1.16 TB each" in dry.stderr and "per-instance disk: 2.43 TB" in dry.stderr
    assert "S3 traffic: 1.16 TB uploaded per save" in dry.stderr and "Image (launch.sagemaker.image_uri)" in dry.stderr
    for key in ("ResourceConfig", "CheckpointConfig", "StoppingCondition", "RoleArn", "OutputDataConfig"):
        assert job[key] == rendered[key]  # the dry run showed what was then sent

    # The uploaded source: the package, entry.py on top, the resolved config; no secret anywhere.
    body = s3.get_object(Bucket=BUCKET, Key=f"jobs/{name}/source/sourcedir.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {"entry.py", "job/config.yaml", "alfred_train/launch/cli.py", "sagemaker/entry.py", "setup.cfg"} <= set(members)
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)
    assert members["entry.py"] == (REPO / "sagemaker" / "entry.py").read_bytes()
    resolved = yaml.safe_load(members["job/config.yaml"])
    assert resolved["launch"]["stage"] == "ppo" and resolved["launch"]["sagemaker"]["spot"] is True
    # The job's config reads its inputs where the channels put them.
    assert resolved["ppo"]["policy_init"] == "/opt/ml/input/data/ppo_policy_init"
    assert resolved["ppo"]["reward_init"] == "/opt/ml/input/data/ppo_reward_init"
    assert resolved["data"]["prompts"] == [  # each source of the mixture, inside the folder's channel
        {**item, "path": f"/opt/ml/input/data/data_prompts/{item['path'][len('/fsx/alfred/data/'):]}"} for item in PROMPTS]
    assert resolved["model"]["tokenizer"] == "/opt/ml/input/data/model_tokenizer/tokenizer.json"
    assert json.loads(job["HyperParameters"]["run_dir"]) == "/opt/ml/checkpoints"
    assert resolved["checkpoint"]["node_local"] is True  # each instance's own /opt/ml/checkpoints
    for text in (dry.stdout, dry.stderr, done.stdout, done.stderr, *members.values()):
        assert SECRET_MARKER.encode() not in (text if isinstance(text, bytes) else text.encode())

    status = launch_cli("jobs", "status", name, "--backend", "sagemaker", "--endpoint-url", moto, endpoint=moto)
    assert status.returncode == 0 and status.stdout.split()[:2] == [name, "Completed"], status.stderr
    logs = launch_cli("jobs", "logs", name, "--backend", "sagemaker", "--endpoint-url", moto, endpoint=moto)
    assert logs.returncode == 0 and logs.stdout.startswith(f"no log events yet for {name} Completed"), logs
    # a job that does not exist has no log events either: it said so with exit 0, where status says exit 1
    nope = launch_cli("jobs", "logs", "nope-123", "--backend", "sagemaker", "--endpoint-url", moto, endpoint=moto)
    assert nope.returncode == 1 and "error: describe_training_job nope-123: " in nope.stderr, nope
    assert nope.stderr.count("\n") == 1 and "Could not find training job" in nope.stderr


def test_existing_job_name_is_refused(moto):
    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    tree = yaml.safe_load(TEMPLATE.read_text())["launch"]
    for override in account_fields(moto):
        key, value = override.split("=", 1)
        tree["sagemaker"][key.split(".")[-1]] = yaml.safe_load(value)
    launch = LaunchConfig.from_dict(tree)
    sm = boto_client("sagemaker", moto)
    sagemaker.submit(launch, name="alfred-dup", job_config_yaml="{}", sm_client=sm, s3_client=s3)
    with pytest.raises(ConfigError, match="launch.name: training job 'alfred-dup' already exists"):
        sagemaker.submit(launch, name="alfred-dup", job_config_yaml="{}", sm_client=sm, s3_client=s3)
    assert len(sm.list_training_jobs()["TrainingJobSummaries"]) == 1


def test_local_tokenizer_goes_with_its_config_and_a_failed_upload_is_one_error(moto, tmp_path):
    """A local tokenizer.json went up alone (bos/eos/pad are in the tokenizer_config.json beside it),
    and an upload boto3's transfer gave up on was a traceback (S3UploadFailedError)."""
    from alfred_train.launch.sagemaker_plan import plan_inputs
    from alfred_train.launch.sagemaker import SageMakerError

    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    hub = tmp_path / "falcon"
    hub.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (hub / name).write_text(name)
    tree = yaml.safe_load(TEMPLATE.read_text())["launch"]
    for override in account_fields(moto):
        key, value = override.split("=", 1)
        tree["sagemaker"][key.split(".")[-1]] = yaml.safe_load(value)
    tree["sagemaker"]["inputs"] = {"model.tokenizer": str(hub / "tokenizer.json")}
    launch = LaunchConfig.from_dict(tree)
    plan = plan_inputs({"model": {"tokenizer": "x"}}, launch, upload_root=f"s3://{BUCKET}/up", source_root=REPO)
    assert plan.rewrites["model.tokenizer"] == "/opt/ml/input/data/model_tokenizer/tokenizer.json"
    sagemaker.upload_inputs(plan, s3)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="up/")["Contents"]}
    assert keys == {"up/model_tokenizer/tokenizer.json", "up/model_tokenizer/tokenizer_config.json"}

    missing = plan_inputs({}, launch, upload_root="s3://no-such-bucket/up", source_root=REPO)
    sm = boto_client("sagemaker", moto)
    with pytest.raises(SageMakerError, match=r"^submitting alfred-up: S3UploadFailedError: .*NoSuchBucket") as err:
        sagemaker.submit(launch, name="alfred-up", job_config_yaml="{}", sm_client=sm, s3_client=s3, plan=missing)
    assert "\n" not in str(err.value)


def test_a_task_file_goes_with_what_it_includes(moto, tmp_path):
    """A task YAML uploaded from here went up alone: the job failed at its `include:` (an lm-eval
    template) or its `!function` module, at start. Delivered as SageMaker would, lm-eval now
    loads it with its functions; a file it reads outside its folder is refused at launch."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from sagemaker_rehearsal import _download_prefix

    from alfred_train.launch.sagemaker_plan import plan_inputs

    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    tasks = tmp_path / "tasks"
    (tasks / "common").mkdir(parents=True)
    (tasks / "common" / "_mc_template_yaml").write_text("output_type: multiple_choice\ndataset_path: json\n")
    (tasks / "utils.py").write_text("def docs(dataset):\n    return dataset\n")
    (tasks / "mine.yaml").write_text("include: common/_mc_template_yaml\ntask: mine\nprocess_docs: !function utils.docs\n")
    (tasks / "other.yaml").write_text("task: other\n")  # not read by mine.yaml: stays here
    tree = yaml.safe_load(TEMPLATE.read_text())["launch"]
    tree["sagemaker"] = {**tree["sagemaker"], "inputs": {"ppo.eval_tasks[0]": str(tasks / "mine.yaml")}}
    plan = plan_inputs({"ppo": {"eval_tasks": [str(tasks / "mine.yaml")]}}, LaunchConfig.from_dict(tree),
                       upload_root=f"s3://{BUCKET}/up", source_root=REPO)
    assert plan.rewrites["ppo.eval_tasks"] == ["/opt/ml/input/data/ppo_eval_tasks_0/mine.yaml"]
    assert "(and common/_mc_template_yaml, utils.py beside it)" in "\n".join(plan.lines())
    sagemaker.upload_inputs(plan, s3)
    data = tmp_path / "job" / "input" / "data"
    for ch in plan.channels:
        _download_prefix(s3, ch.s3_uri, data / ch.name)
    delivered = data / "ppo_eval_tasks_0"
    assert sorted(p.relative_to(delivered).as_posix() for p in delivered.rglob("*") if p.is_file()) == [
        "common/_mc_template_yaml", "mine.yaml", "utils.py"]
    task = load_yaml(delivered / "mine.yaml", resolve_func=True)
    assert task["output_type"] == "multiple_choice" and task["process_docs"].__name__ == "docs"

    (tasks / "mine.yaml").write_text("include: ../_shared_yaml\ntask: mine\n")
    (tmp_path / "_shared_yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs.ppo.eval_tasks\[0\]: .*mine.yaml reads "
                                          r".*_shared_yaml, outside its folder; deliver a folder holding both as "
                                          r"launch.sagemaker.inputs.ppo.eval_tasks$"):
        plan_inputs({"ppo": {"eval_tasks": [str(tasks / "mine.yaml")]}}, LaunchConfig.from_dict(tree),
                    upload_root=f"s3://{BUCKET}/up", source_root=REPO)
    tree["sagemaker"]["inputs"] = {"ppo.eval_tasks": str(tasks)}  # the folder of the list: the same holds
    with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs.ppo.eval_tasks: .*mine.yaml reads .*_shared_yaml, "
                                          r"outside the folder that stands for .*tasks; move it there"):
        plan_inputs({"ppo": {"eval_tasks": [str(tasks / "mine.yaml"), str(tasks / "other.yaml")]}},
                    LaunchConfig.from_dict(tree), upload_root=f"s3://{BUCKET}/up", source_root=REPO)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("launch.sagemaker.instance_type=ml.p4d.48xlarge", "launch.sagemaker.instance_type"),
        ("launch.nodes=0", "launch.nodes"),
        ("launch.gpus_per_node=4", "launch.gpus_per_node"),
        ("launch.sagemaker.role_arn=arn:aws:iam::1234:role/x", "launch.sagemaker.role_arn"),
        ("launch.sagemaker.role_arn=AlfredSageMaker", "launch.sagemaker.role_arn"),
        ("launch.sagemaker.image_uri=", "launch.sagemaker.image_uri"),
        ("launch.sagemaker.region=moon", "launch.sagemaker.region"),
        ("launch.sagemaker.source_s3_uri=https://b/jobs", "launch.sagemaker.source_s3_uri"),
        ("launch.sagemaker.output_s3_uri=", "launch.sagemaker.output_s3_uri"),
        ("launch.sagemaker.checkpoint_s3_uri=s3:/b/c", "launch.sagemaker.checkpoint_s3_uri"),
        ("launch.sagemaker.max_wait_s=3600", "launch.sagemaker.max_wait_s"),
        ("launch.name=alfred_40b", "launch.name"),
        ("launch.name=-alfred", "launch.name"),
        ("launch.sagemaker.environment={AWS_SECRET_ACCESS_KEY: x}", "launch.sagemaker.environment.AWS_SECRET_ACCESS_KEY"),
        ("launch.sagemaker.subnets=[subnet-1]", "launch.sagemaker.security_group_ids"),
        ("launch.sagemaker.volume_size_gb=big", "launch.sagemaker.volume_size_gb"),
        ("launch.sagemaker.instance_count=16", "launch.sagemaker.instance_count"),
        ("launch.nodes=2", "launch.nodes"),  # 2 x 8 processes != tp*pp*dp = 128
        ("launch.sagemaker.inputs={}", "model.tokenizer"),  # /fsx/... does not exist in the job
        ("launch.sagemaker.inputs={ppo.policy_init: s3://bkt/x/}", "model.tokenizer"),
        ("launch.sagemaker.inputs={ppo.value_init: s3://bkt/x/}", "launch.sagemaker.inputs.ppo.value_init"),
        ("launch.sagemaker.inputs={model.tokenizer: s3://bkt/t.json, data.prompts: /nonexistent/prompts.jsonl}",
         "launch.sagemaker.inputs.data.prompts"),
        ("launch.sagemaker.volume_size_gb=1000", "launch.sagemaker.volume_size_gb"),  # 2 x 1.16 TB restart download
        ("launch.sagemaker.volume_size_gb=9000", "launch.sagemaker.volume_size_gb"),  # p4d's NVMe is 8 TB
        ("train.recompute=none", "train.recompute"),  # 41.7 GiB > A100 40GB
        ("launch.sagemaker.environment={HF_TOKEN: x}", "launch.sagemaker.environment.HF_TOKEN"),
        ("launch.sagemaker.environment={' wandb_api_key ': x}", "launch.sagemaker.environment[' wandb_api_key ']"),
        ("launch.sagemaker.fsx={file_system_id: fs-0123456789abcdef0, directory_path: /abcdefgh}",
         "launch.sagemaker.subnets"),
        ("launch.sagemaker.fsx.file_system_id=fs-0123456789abcdef0", "launch.sagemaker.fsx.directory_path"),
        ("launch.sagemaker.run_dir=/fsx/alfred/runs/x", "launch.sagemaker.run_dir"),
        ("checkpoint.node_local=false", "checkpoint.node_local"),  # 16 instances' own /opt/ml/checkpoints
        ("launch.sagemaker.checkpoint_s3_uri=", "launch.sagemaker.checkpoint_s3_uri"),  # spot: lost at each reclaim
    ],
)
def test_bad_field_exit_2_names_it_submits_nothing(moto, run_config, capsys, override, key):
    s3 = boto_client("s3", moto)
    s3.create_bucket(Bucket=BUCKET)
    spot = ["launch.sagemaker.spot=true"] if "max_wait" in override or "checkpoint_s3_uri" in override else []
    argv = ["launch", str(run_config), "--backend", "sagemaker", "--template", str(TEMPLATE),
            *account_fields(moto), *spot, override]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}: ") and "\n" not in err, err
    assert boto_client("sagemaker", moto).list_training_jobs()["TrainingJobSummaries"] == []
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


def test_fsx_inputs_and_shared_run_dir_request(tmp_path, capsys):
    """The recipe's /fsx/alfred/... paths through an FSx for Lustre channel, the run directory on it."""
    from alfred_train.launch import job, sagemaker_plan

    fsx = ["launch.sagemaker.fsx={file_system_id: fs-0123456789abcdef0, directory_path: /abcdefgh/alfred, "
           "path: /fsx/alfred, access_mode: rw}", "launch.sagemaker.subnets=[subnet-0a1b]",
           "launch.sagemaker.security_group_ids=[sg-0c2d]", "launch.sagemaker.run_dir=/fsx/alfred/runs/ppo-1",
           "launch.sagemaker.input_mode=FastFile", "launch.sagemaker.inputs={data.prompts: s3://alfred-test/p/}"]
    overrides = [*account_fields("http://unused"), *fsx]
    overrides = [o for o in overrides if not o.startswith(("launch.sagemaker.inputs={ppo", "launch.sagemaker.checkpoint"))]
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", overrides, template=TEMPLATE)
    plan = sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/jobs/x/inputs",
                                      source_root=REPO)
    request = sagemaker.build_request(run.launch, name="x", submit_uri="s3://alfred-test/x.tgz", plan=plan)
    assert request["InputDataConfig"] == [
        {"ChannelName": "fsx", "DataSource": {"FileSystemDataSource": {
            "FileSystemId": "fs-0123456789abcdef0", "FileSystemType": "FSxLustre", "FileSystemAccessMode": "rw",
            "DirectoryPath": "/abcdefgh/alfred"}}},
        {"ChannelName": "data_prompts", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": "s3://alfred-test/p/", "S3DataDistributionType": "FullyReplicated"}},
         "InputMode": "FastFile"},
    ]
    assert request["VpcConfig"] == {"Subnets": ["subnet-0a1b"], "SecurityGroupIds": ["sg-0c2d"]}
    assert "CheckpointConfig" not in request
    # SageMaker takes at most 2,500 characters per hyperparameter value (boto3 and moto do not check): a
    # mixture of many files named one by one passed every check and would be refused at submission
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker").operation_model("CreateTrainingJob")
    assert model.input_shape.members["HyperParameters"].value.metadata["max"] == sagemaker.HYPERPARAMETER_LIMIT
    plan.sources["data.prompts"] = {"items": [{"path": ["data_prompts", f"shard-{i:03d}.jsonl"], "weight": 1.0}
                                              for i in range(60)]}
    with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs: the map of where the job reads each input is "
                                          r"\d+ characters, over SageMaker's 2500 per hyperparameter; name a mixture's "
                                          r"files by a glob"):
        sagemaker.build_request(run.launch, name="x", submit_uri="s3://alfred-test/x.tgz", plan=plan)
    tree = sagemaker_plan.rewritten_tree(run.tree, plan)
    assert tree["ppo"]["policy_init"] == "/opt/ml/input/data/fsx/checkpoints/falcon-40b-sft"
    assert tree["model"]["tokenizer"] == "/opt/ml/input/data/fsx/hf/falcon-40b/tokenizer.json"
    assert [s["path"] for s in tree["data"]["prompts"]][1:3] == [  # the mixture's folder, from S3
        "/opt/ml/input/data/data_prompts/hh-rlhf/*/train.jsonl.gz", "/opt/ml/input/data/data_prompts/databricks-dolly-15k.jsonl"]
    assert tree["checkpoint"]["node_local"] is False  # one shared copy on FSx
    assert json.loads(request["HyperParameters"]["run_dir"]) == "/opt/ml/input/data/fsx/runs/ppo-1"
    assert json.loads(json.loads(request["HyperParameters"]["inputs"]))["ppo.policy_init"] == [
        "fsx", "checkpoints/falcon-40b-sft"]
    from alfred_train.dryrun import describe

    report = describe(run.config, "ppo")
    assert "layout: shared run directory on FSx (/fsx/alfred/runs/ppo-1)" in report


def test_a_prompt_mixture_and_a_glob_reach_the_job(tmp_path):
    """A mixture of prompt files (stable-vicuna's) was refused even on FSx (its list was read as one
    path); an input for the whole mixture replaced it silently; a glob's pattern was lost under a
    folder input. Each source now lands where the job reads it, entry.py's override included."""
    import importlib.util

    from alfred_train.config import load_config
    from alfred_train.launch import job, sagemaker_plan

    fsx = ["launch.sagemaker.fsx={file_system_id: fs-0123456789abcdef0, directory_path: /abcdefgh/alfred, path: /fsx/alfred}",
           "launch.sagemaker.subnets=[subnet-0a1b]", "launch.sagemaker.security_group_ids=[sg-0c2d]",
           "data.prompts=[{path: /fsx/alfred/data/oasst1.jsonl, weight: 2.0}, {path: /home/me/alpaca/*.json, format: alpaca}]",
           "launch.sagemaker.inputs={'data.prompts[1]': s3://alfred-test/alpaca/}"]
    overrides = [o for o in account_fields("http://unused") if not o.startswith("launch.sagemaker.inputs")] + fsx
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", overrides, template=TEMPLATE)
    plan = sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/jobs/x/inputs", source_root=REPO)
    tree = sagemaker_plan.rewritten_tree(run.tree, plan)
    assert tree["data"]["prompts"] == [{"path": "/opt/ml/input/data/fsx/data/oasst1.jsonl", "weight": 2.0},
                                       {"path": "/opt/ml/input/data/data_prompts_1/*.json", "format": "alpaca"}]
    assert [c.name for c in plan.channels] == ["fsx", "data_prompts_1"]
    # entry.py (standard library only) turns the sources into one override the trainer loads
    spec = importlib.util.spec_from_file_location("entry", REPO / "sagemaker" / "entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    env = {"SM_CHANNEL_FSX": "/x/fsx", "SM_CHANNEL_DATA_PROMPTS_1": "/x/p1"}
    over = [o for o in entry.input_overrides(json.dumps(plan.sources), env) if o.startswith("data.prompts=")]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    sources = load_config(tmp_path / "config.yaml", over).data.prompts
    assert [(s.path, s.weight, s.format) for s in sources] == [
        ("/x/fsx/data/oasst1.jsonl", 2.0, None), ("/x/p1/*.json", 1.0, "alpaca")]

    whole = [*overrides[:-1], "launch.sagemaker.inputs={data.prompts: s3://alfred-test/p/one.jsonl}"]
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", whole, template=TEMPLATE)
    with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs.data.prompts: data.prompts is a list of 2 files; "
                                          r"give the folder that holds them"):
        sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)
    alone = [*overrides[:-2], "data.prompts=/home/me/shards/part-*.jsonl",
             "launch.sagemaker.inputs={data.prompts: s3://alfred-test/shards/}"]
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", alone, template=TEMPLATE)
    plan = sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)
    assert plan.rewrites["data.prompts"] == "/opt/ml/input/data/data_prompts/part-*.jsonl"
    assert plan.sources["data.prompts"] == ("data_prompts", "part-*.jsonl")

    # one data file delivered through the folder that holds it: the job read the folder as the file
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"prompt": "q"}\n')
    folder = [*overrides[:-2], f"data.prompts={tmp_path / 'data' / 'prompts.jsonl'}",
              f"launch.sagemaker.inputs={{data.prompts: {tmp_path / 'data'}}}"]
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", folder, template=TEMPLATE)
    plan = sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)
    assert plan.rewrites["data.prompts"] == "/opt/ml/input/data/data_prompts/prompts.jsonl"
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", [*folder[:-2], "data.prompts=/home/me/other.jsonl",
                                                                      folder[-1]], template=TEMPLATE)
    with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs.data.prompts: .*/data holds no other.jsonl"):
        sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)

    # ppo.eval_tasks: a task YAML file of the user's was not delivered (the job failed after training)
    (tmp_path / "my-task.yaml").write_text("task: mine\ndataset_path: json\n")
    tasks = [*overrides[:-2], f"ppo.eval_tasks=[hellaswag, {tmp_path / 'my-task.yaml'}]"]
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", tasks, template=TEMPLATE)
    with pytest.raises(ConfigError, match=r"^ppo.eval_tasks\[1\]: .*my-task.yaml' would not exist inside the SageMaker "
                                          r"job; deliver it with launch.sagemaker.inputs.ppo.eval_tasks\[1\]"):
        sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)
    tasks.append(f"launch.sagemaker.inputs={{'ppo.eval_tasks[1]': {tmp_path / 'my-task.yaml'}}}")
    run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", tasks, template=TEMPLATE)
    plan = sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x", source_root=REPO)
    assert plan.rewrites["ppo.eval_tasks"] == ["hellaswag", "/opt/ml/input/data/ppo_eval_tasks_1/my-task.yaml"]
    over = [o for o in entry.input_overrides(json.dumps(plan.sources), {}) if o.startswith("ppo.eval_tasks=")]
    assert over == ['ppo.eval_tasks=["hellaswag", "/opt/ml/input/data/ppo_eval_tasks_1/my-task.yaml"]']


def test_a_lora_init_uploaded_from_here_must_hold_its_base(tmp_path):
    """Its base is named by this machine's absolute path, which the job does not have: it was
    uploaded, and the job failed at start (StackLLaMA's LoRA SFT -> RM -> PPO)."""
    from alfred_train.launch import job, sagemaker_plan

    def checkpoint(path, lora):
        path.mkdir(parents=True)
        (path / "meta.json").write_text(json.dumps({"step": 2, "models": ["policy"], "state": {"lora": lora}}))
        return path

    base = {"path": str(tmp_path / "base" / "iter_0000001"), "model": "policy", "skip": [], "seed": None}
    lora = checkpoint(tmp_path / "lora-sft" / "iter_0000002", {"policy": {"targets": {}, "dropout": 0.0, "base": base}})
    whole = checkpoint(tmp_path / "sft" / "iter_0000002", {})
    overrides = [*account_fields("http://unused"), "launch.sagemaker.checkpoint_s3_uri=s3://alfred-test/c"]
    overrides = [o for o in overrides if not o.startswith("launch.sagemaker.inputs=")]
    for init, refused in ((lora, True), (whole, False)):
        inputs = {**S3_INPUTS, "ppo.policy_init": init}
        run = job.resolve_run(REPO / "configs" / "alfred-40b-ppo.yaml", [
            *overrides, f"launch.sagemaker.inputs={{{', '.join(f'{k}: {v}' for k, v in inputs.items())}}}"],
            template=TEMPLATE)
        plan = lambda: sagemaker_plan.plan_inputs(run.tree, run.launch, upload_root="s3://alfred-test/x",  # noqa: E731
                                                  source_root=REPO)
        if not refused:
            plan()
            continue
        with pytest.raises(ConfigError, match=r"^launch.sagemaker.inputs.ppo.policy_init: .*lora-sft/iter_0000002 is a "
                                              r"LoRA checkpoint over the base .*base/iter_0000001 \(this machine's path"):
            plan()


def test_the_dry_run_sees_the_jobs_run_dir_not_this_machines(tmp_path, capsys):
    """The launch dry run checked run.dir on the launching machine: its checkpoints (which the job never
    sees) refused a `checkpoint.resume: none` job, or were said to be resumed."""
    local = tmp_path / "local"
    (local / "checkpoints" / "iter_0000010").mkdir(parents=True)
    argv = ["launch", str(REPO / "configs" / "tiny-ppo.yaml"), "--backend", "sagemaker", "--dry-run",
            "parallel.tp=1", "launch.nodes=1", "launch.gpus_per_node=0", "launch.procs_per_node=1",
            "launch.sagemaker.instance_type=ml.m5.xlarge", "launch.sagemaker.role_arn=arn:aws:iam::123456789012:role/A",
            "launch.sagemaker.image_uri=1.dkr.ecr.us-east-1.amazonaws.com/a:1", f"launch.sagemaker.source_s3_uri=s3://{BUCKET}/j",
            f"launch.sagemaker.output_s3_uri=s3://{BUCKET}/o", f"launch.sagemaker.checkpoint_s3_uri=s3://{BUCKET}/c",
            f"launch.sagemaker.inputs={{ppo.policy_init: s3://{BUCKET}/sft/, ppo.reward_init: s3://{BUCKET}/rm/}}",
            f"run.dir={local}", "checkpoint.resume=none"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "run.dir -> /opt/ml/checkpoints" in capsys.readouterr().err
    # a task YAML delivered to the job: the job's config was loaded here, and its task file looked for at its
    # container path (every eval_tasks file was refused, in any delivery form)
    task = tmp_path / "tiny_mc.yaml"
    task.write_text("task: tiny_mc\ndataset_path: json\noutput_type: multiple_choice\n")
    inputs = argv[-3].replace("}", f", 'ppo.eval_tasks[0]': {task}}}")
    assert cli.main([*argv[:-3], inputs, *argv[-2:], f"ppo.eval_tasks=[{task}]"]) == 0, capsys.readouterr().err


def test_a_ppo_job_needs_only_the_paths_ppo_reads(tmp_path, capsys):
    """A recipe names every stage's paths (stable-vicuna-ppo: data.train for SFT, rm.init for the RM):
    launching its PPO stage demanded a channel for each, although PPO reads neither."""
    argv = ["launch", str(REPO / "configs" / "tiny-ppo.yaml"), "--backend", "sagemaker", "--dry-run",
            "parallel.tp=1", "launch.nodes=1", "launch.gpus_per_node=0", "launch.procs_per_node=1",
            "launch.sagemaker.instance_type=ml.m5.xlarge", "launch.sagemaker.role_arn=arn:aws:iam::123456789012:role/A",
            "launch.sagemaker.image_uri=1.dkr.ecr.us-east-1.amazonaws.com/a:1", f"launch.sagemaker.source_s3_uri=s3://{BUCKET}/j",
            f"launch.sagemaker.output_s3_uri=s3://{BUCKET}/o", f"launch.sagemaker.checkpoint_s3_uri=s3://{BUCKET}/c",
            f"run.dir={tmp_path / 'run'}", "launch.stage=ppo", "data.synthetic=false",
            "data.train=/data/oasst1/train-*.parquet", "rm.init=/data/sft-run", "data.prompts=/data/prompts.jsonl"]
    inputs = f"launch.sagemaker.inputs={{ppo.policy_init: s3://{BUCKET}/sft/, ppo.reward_init: s3://{BUCKET}/rm/"
    assert cli.main([*argv, inputs + f", data.prompts: s3://{BUCKET}/p/prompts.jsonl}}"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "data.train" not in err and "rm.init" not in err, err
    # without data.prompts, data.train is PPO's prompt set: then it must reach the job
    assert cli.main([*argv[:-1], inputs + "}"]) == 2
    assert "data.train" in capsys.readouterr().err.splitlines()[-1]


def test_the_dry_run_checks_the_inits_it_uploads(tmp_path, capsys, ppo_inits):
    """The launch dry run checked the run config's init paths (not reachable here, so skipped), not
    the local folders it was about to upload: an RM uploaded as the policy passed, and the job failed
    at start after the upload."""
    argv = ["launch", str(REPO / "configs" / "tiny-ppo.yaml"), "--backend", "sagemaker", "--dry-run",
            "parallel.tp=1", "launch.nodes=1", "launch.gpus_per_node=0", "launch.procs_per_node=1",
            "launch.sagemaker.instance_type=ml.m5.xlarge", "launch.sagemaker.role_arn=arn:aws:iam::123456789012:role/A",
            "launch.sagemaker.image_uri=1.dkr.ecr.us-east-1.amazonaws.com/a:1", f"launch.sagemaker.source_s3_uri=s3://{BUCKET}/j",
            f"launch.sagemaker.output_s3_uri=s3://{BUCKET}/o", f"launch.sagemaker.checkpoint_s3_uri=s3://{BUCKET}/c",
            f"run.dir={tmp_path / 'run'}", "ppo.policy_init=/fsx/alfred/sft", "ppo.reward_init=/fsx/alfred/rm"]
    swapped = f"launch.sagemaker.inputs={{ppo.policy_init: {ppo_inits / 'rm'}, ppo.reward_init: {ppo_inits / 'sft'}}}"
    assert cli.main([*argv, swapped]) == 2
    assert re.match(r"error: ppo.policy_init: .*/rm/checkpoints/iter_0000001 holds the models "
                    r"\['reward'\]; ppo.policy_init takes an SFT checkpoint", capsys.readouterr().err.splitlines()[-1])
    right = f"launch.sagemaker.inputs={{ppo.policy_init: {ppo_inits / 'sft'}, ppo.reward_init: {ppo_inits / 'rm'}}}"
    assert cli.main([*argv, right]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"weights start from ppo.policy_init: {ppo_inits / 'sft'}\n" in err, err


def test_missing_aws_credentials_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    import os

    import boto3

    from alfred_train.cli import main

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a fresh credential chain, not one cached by a test
    how = "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run `aws configure`"
    for action, call in (("logs", "logs of nope"), ("status", "describe_training_job nope")):
        assert main(["jobs", action, "nope", "--backend", "sagemaker", "--endpoint-url", "http://127.0.0.1:9"]) == 2
        want = f"alfred-train: error: {call}: no usable AWS credentials (Unable to locate credentials); {how}\n"
        assert capsys.readouterr().err == want
    monkeypatch.setenv("AWS_PROFILE", "nope")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    assert main(["jobs", "cancel", "nope", "--backend", "sagemaker"]) == 2
    err = capsys.readouterr().err
    assert "sagemaker client: no usable AWS credentials (The config profile (nope) could not be found)" in err
