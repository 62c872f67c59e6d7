"""SageMaker backend with plain boto3: pack the source, upload it, CreateTrainingJob, follow it.

The request is a direct rendering of `launch.sagemaker` (see `build_request`). Inside the AWS
PyTorch training container the SageMaker training toolkit downloads `sourcedir.tar.gz` to
/opt/ml/code and runs `entry.py` (sagemaker/entry.py) once per instance, passing the
non-`sagemaker_` hyperparameters as `--stage ppo --config job/config.yaml --procs_per_node 8`.
`sagemaker_torch_distributed_enabled` is false on purpose: with it the toolkit would start
torchrun with entry.py as the *worker*; entry.py instead starts torchrun itself, with node rank =
index of the current host in resourceconfig.json's `hosts` (the toolkit's own rule) and master =
hosts[0]. Hyperparameter values are JSON-encoded strings, as the SageMaker Python SDK sends them.

Inputs and checkpoint layouts: alfred_train.launch.sagemaker_plan (InputDataConfig channels, FSx,
the config rewritten to container paths, per-instance disk).

moto (the tests' server) validates nothing and does not store Environment, so every field is checked
by `validate_sagemaker` before a request leaves, and a job name already taken is refused here.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError,
                                 ProfileNotFound)

import alfred_train
from alfred_train.errors import AlfredError, ConfigError
from alfred_train.launch.config import LaunchConfig, validate_job_name
from alfred_train.launch.s3 import parse_s3_uri
from alfred_train.launch.sagemaker_plan import CHECKPOINT_LOCAL_PATH, InputPlan, input_data_config
SOURCE_TARBALL = "sourcedir.tar.gz"
JOB_CONFIG = "job/config.yaml"  # the resolved run config, inside the tarball
ENTRY_POINT = "entry.py"  # sagemaker/entry.py, placed at the tarball's root
SOURCE_PARTS = ("alfred_train", "parallel", "kernels", "sagemaker", "configs", "setup.cfg",
                "pyproject.toml", "README.md")  # fmt: skip
FINISHED = frozenset({"Completed", "Failed", "Stopped"})
LOG_GROUP = "/aws/sagemaker/TrainingJobs"


class SageMakerError(AlfredError):
    """A SageMaker or S3 call failed."""


NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError, ProfileNotFound)


def aws_error(what: str, err: Exception) -> AlfredError:
    """The error to raise for a failed boto3 call: missing credentials are the user's to fix (exit 2)."""
    if isinstance(err, NO_CREDENTIALS):
        return ConfigError(f"{what}: no usable AWS credentials ({err}); set AWS_PROFILE, or "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run `aws configure`")
    return SageMakerError(f"{what}: {type(err).__name__}: {err}")


def job_name(launch: LaunchConfig, now: _dt.datetime | None = None) -> str:
    """`<launch.name>-<YYYYmmdd-HHMMSS>`, checked against SageMaker's job-name rule."""
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return validate_job_name(f"{launch.name}-{stamp}")


def source_root() -> Path:
    """The checkout the package runs from (editable install): where setup.cfg is."""
    root = Path(alfred_train.__file__).resolve().parent.parent
    if not (root / "setup.cfg").is_file():
        raise ConfigError(f"{root}: no setup.cfg; `launch --backend sagemaker` needs a source checkout")
    return root


def _tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def pack_source(root: Path, job_config_yaml: str) -> bytes:
    """sourcedir.tar.gz: the package sources, entry.py at the top, the resolved config in job/.

    Reproducible (sorted, mtime 0, owner root); skips caches, egg-info and hidden files.
    """
    paths = []
    for part in SOURCE_PARTS:
        base = root / part
        if base.is_file():
            paths.append(base)
        elif base.is_dir():
            paths += sorted(p for p in base.rglob("*") if p.is_file())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            rel = path.relative_to(root)
            if any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info") for p in rel.parts):
                continue
            if path.suffix == ".pyc":
                continue
            _tar_add_bytes(tar, rel.as_posix(), path.read_bytes())
        _tar_add_bytes(tar, ENTRY_POINT, (root / "sagemaker" / "entry.py").read_bytes())
        _tar_add_bytes(tar, JOB_CONFIG, job_config_yaml.encode())
    return buf.getvalue()


def source_uri(launch: LaunchConfig, name: str) -> str:
    """Where the tarball goes: <source_s3_uri>/<job name>/source/sourcedir.tar.gz."""
    return f"{str(parse_s3_uri(launch.sagemaker.source_s3_uri).child(name))}/source/{SOURCE_TARBALL}"


def inputs_uri(launch: LaunchConfig, name: str) -> str:
    """Where local inputs are uploaded: <source_s3_uri>/<job name>/inputs (one folder per channel)."""
    return f"{str(parse_s3_uri(launch.sagemaker.source_s3_uri).child(name))}/inputs"


HYPERPARAMETER_LIMIT = 2500  # characters in one CreateTrainingJob HyperParameters value (botocore's model)


def build_request(launch: LaunchConfig, *, name: str, submit_uri: str, plan: InputPlan | None = None) -> dict:
    """The CreateTrainingJob request for `launch` (pure; validate_sagemaker and plan_inputs first)."""
    sm = launch.sagemaker
    plan = plan or InputPlan()
    hyper = {
        "sagemaker_program": ENTRY_POINT,
        "sagemaker_submit_directory": submit_uri,
        "sagemaker_region": sm.region,
        "sagemaker_torch_distributed_enabled": False,  # entry.py runs torchrun (see module doc)
        "stage": launch.stage,
        "config": JOB_CONFIG,
        "procs_per_node": launch.workers_per_node,
        "run_dir": plan.run_dir,
        "inputs": json.dumps(plan.sources, sort_keys=True),  # a JSON text: entry.py's --inputs
        "job_id": name,  # ALFRED_JOB_ID: a restart (spot) knows run.dir's checkpoints for its own
    }
    inputs = json.dumps(hyper["inputs"])
    if len(inputs) > HYPERPARAMETER_LIMIT:  # boto3 does not check it: the job would be refused at submission
        raise ConfigError(f"launch.sagemaker.inputs: the map of where the job reads each input is {len(inputs)} "
                          f"characters, over SageMaker's {HYPERPARAMETER_LIMIT} per hyperparameter; name a mixture's "
                          "files by a glob (data.prompts: /data/prompts/*.jsonl) rather than one by one")
    stopping = {"MaxRuntimeInSeconds": sm.max_run_s}
    if sm.spot:
        stopping["MaxWaitTimeInSeconds"] = sm.max_wait_s or sm.max_run_s
    request = {
        "TrainingJobName": name,
        "RoleArn": sm.role_arn,
        "AlgorithmSpecification": {"TrainingImage": sm.image_uri, "TrainingInputMode": "File"},
        "HyperParameters": {k: json.dumps(v) for k, v in hyper.items()},
        "OutputDataConfig": {"S3OutputPath": sm.output_s3_uri},
        "ResourceConfig": {
            "InstanceType": sm.instance_type,
            "InstanceCount": launch.nodes,
            "VolumeSizeInGB": sm.volume_size_gb,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": sm.spot,
        "Environment": dict(sorted(sm.environment.items())),
        "Tags": [{"Key": k, "Value": v} for k, v in sorted(sm.tags.items())],
    }
    channels = input_data_config(launch, plan)
    if channels:
        request["InputDataConfig"] = channels
    if sm.checkpoint_s3_uri:
        request["CheckpointConfig"] = {"S3Uri": sm.checkpoint_s3_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    if sm.subnets:
        request["VpcConfig"] = {"Subnets": list(sm.subnets), "SecurityGroupIds": list(sm.security_group_ids)}
    return request


def clients(launch: LaunchConfig) -> tuple[Any, Any]:
    """(sagemaker, s3) boto3 clients for launch.sagemaker.region / endpoint_url."""
    return make_client("sagemaker", launch.sagemaker.region, launch.sagemaker.endpoint_url), make_client(
        "s3", launch.sagemaker.region, launch.sagemaker.endpoint_url
    )


def make_client(service: str, region: str, endpoint_url: str = "") -> Any:
    import boto3

    try:
        return boto3.client(service, region_name=region, endpoint_url=endpoint_url or None)
    except BotoCoreError as err:  # e.g. AWS_PROFILE names a profile that does not exist
        raise aws_error(f"{service} client", err) from err


def _job_exists(sm_client: Any, name: str) -> bool:
    try:
        sm_client.describe_training_job(TrainingJobName=name)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound"):
            return False
        raise
    return True


def upload_inputs(plan: InputPlan, s3_client: Any) -> None:
    """Upload the local inputs of `plan` (files, or folders file by file) to their channels' S3 URIs.

    boto3's managed transfer (multipart, retries) moves each file."""
    for ch in plan.channels:
        target = parse_s3_uri(ch.s3_uri) if ch.s3_uri else None
        if ch.copy_from:  # an S3 object and the companions beside it that exist, into the channel's folder
            origin = parse_s3_uri(ch.copy_from)
            folder, _, name = origin.key.rpartition("/")
            if not _object_exists(s3_client, origin.bucket, origin.key):
                raise ConfigError(f"launch.sagemaker.inputs.model.tokenizer: {ch.copy_from} does not exist; "
                                  "give the S3 URI of the tokenizer file (or of its folder, ending in /)")
            for each in (name, *ch.companions):
                key = f"{folder}/{each}" if folder else each
                if each == name or _object_exists(s3_client, origin.bucket, key):
                    s3_client.copy({"Bucket": origin.bucket, "Key": key}, target.bucket, f"{target.key}/{each}")
        if not ch.upload_from:
            continue
        source = Path(ch.upload_from)
        if source.is_file() and ch.s3_uri.endswith("/"):  # a file with its companions, into a folder
            for each in (source.name, *ch.companions):
                s3_client.upload_file(str(source.parent / each), target.bucket, f"{target.key}/{each}")
            continue
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            key = target.key if source.is_file() else f"{target.key}/{path.relative_to(source).as_posix()}"
            s3_client.upload_file(str(path), target.bucket, key)


def _object_exists(s3_client: Any, bucket: str, key: str) -> bool:
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def submit(launch: LaunchConfig, *, name: str, job_config_yaml: str, sm_client: Any, s3_client: Any,
           plan: InputPlan | None = None) -> dict:
    """Upload the local inputs and the source tarball, then create the job; returns the request sent.

    Refuses a name that is already taken (CreateTrainingJob would fail on AWS, and moto would
    silently overwrite the other job).
    """
    uri = source_uri(launch, name)
    request = build_request(launch, name=name, submit_uri=uri, plan=plan)
    try:
        if _job_exists(sm_client, name):
            raise ConfigError(f"launch.name: training job {name!r} already exists; pick another name")
        if plan is not None:
            upload_inputs(plan, s3_client)
        loc = parse_s3_uri(uri)
        s3_client.put_object(Bucket=loc.bucket, Key=loc.key, Body=pack_source(source_root(), job_config_yaml))
        sm_client.create_training_job(**request)
    except (BotoCoreError, ClientError, S3UploadFailedError) as err:  # boto3's transfer wraps a failed upload
        raise aws_error(f"submitting {name}", err) from err
    return request


def describe(sm_client: Any, name: str) -> dict:
    try:
        return sm_client.describe_training_job(TrainingJobName=name)
    except (BotoCoreError, ClientError) as err:
        raise aws_error(f"describe_training_job {name}", err) from err


def status_line(info: dict) -> str:
    """One line: name, status, secondary status, failure reason if any."""
    parts = [info["TrainingJobName"], info["TrainingJobStatus"], info.get("SecondaryStatus", "")]
    if info.get("FailureReason"):
        parts.append(f"reason: {info['FailureReason']}")
    return " ".join(p for p in parts if p)


def stop(sm_client: Any, name: str) -> None:
    try:
        sm_client.stop_training_job(TrainingJobName=name)
    except (BotoCoreError, ClientError) as err:
        raise aws_error(f"stop_training_job {name}", err) from err


def log_text(logs_client: Any, name: str) -> str:
    """All CloudWatch log events of the job's streams (`<job>/algo-N-...`), stream by stream."""
    out = []
    try:
        streams = logs_client.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/")
        for stream in streams.get("logStreams", []):
            events = logs_client.get_log_events(
                logGroupName=LOG_GROUP, logStreamName=stream["logStreamName"], startFromHead=True
            )
            out += [f"[{stream['logStreamName']}] {e['message']}\n" for e in events.get("events", [])]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise aws_error(f"logs of {name}", err) from err
    except BotoCoreError as err:  # no credentials, endpoint unreachable
        raise aws_error(f"logs of {name}", err) from err
    return "".join(out)
