"""The `launch:` section of a run YAML: where and how the training job runs.

One frozen dataclass per YAML section (`launch`, `launch.slurm`, `launch.sagemaker`). The sizes of
the job live once, at the top (`nodes`, `gpus_per_node`, `procs_per_node`) and both backends read
them: on SageMaker `nodes` is the instance count, on Slurm the `--nodes` of the allocation.

Checks across fields are functions (`validate_slurm`, `validate_sagemaker`) raising ConfigError
with the key path to change; nothing is rewritten after loading.

Example::

    launch:
      backend: slurm
      stage: sft
      nodes: 2
      gpus_per_node: 8
      slurm: {partition: gpu, time: "12:00:00", setup: "source /shared/venv/bin/activate"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from alfred_train.errors import ConfigError

BACKENDS = ("slurm", "sagemaker", "local")
STAGES = ("sft", "rm", "ppo")


@dataclass(frozen=True)
class SlurmConfig:
    """How the sbatch script is rendered (see alfred_train.launch.slurm)."""

    partition: str = ""  # sbatch --partition; "" = the cluster's default partition
    account: str = ""  # sbatch --account; "" = the user's default account
    time: str = "24:00:00"  # wall-clock limit "HH:MM:SS" or "D-HH:MM:SS" (sbatch --time)
    signal_lead_s: int = 600  # USR1 this long before the limit: time to finish a step and save
    cpus_per_task: int = 0  # sbatch --cpus-per-task; 0 = leave it to the partition's default
    requeue: bool = True  # requeue after a checkpoint-and-exit (signal or preemption); resumes
    extra_sbatch: tuple[str, ...] = ()  # more sbatch options, one per item, e.g. "--exclusive"
    setup: str = ""  # shell run before srun: venv/module/container activation line(s)
    env: dict[str, str] = field(default_factory=dict)  # exported in the script (NCCL_*, FI_*)
    log_dir: str = ""  # folder of the job's log %x-%j.out; "" = the job folder
    master_port: int = 0  # rendezvous port; 0 = 20000 + job id % 20000, so jobs on a node differ
    container_image: str = ""  # pyxis/enroot: `srun --container-image`, e.g. "nvcr.io#nvidia/pytorch:25.01-py3"
    container_mounts: tuple[str, ...] = ()  # pyxis `--container-mounts`, "SRC:DST[:ro]" each (run dir, data)


@dataclass(frozen=True)
class FsxConfig:
    """An FSx for Lustre file system mounted into every instance (FileSystemDataSource channel).

    Config paths under `path` (where the login nodes mount it, e.g. /fsx) are rewritten to the
    channel's mount point /opt/ml/input/data/<channel>/... in the job's config.
    """

    file_system_id: str = ""  # fs-0123456789abcdef0; "" = no file system
    directory_path: str = ""  # "/<MountName>[/dir]" on the file system, mounted at the channel
    path: str = "/fsx"  # prefix of the run config's paths that live on this file system
    access_mode: Literal["ro", "rw"] = "ro"  # rw: needed for a run directory on FSx (launch.sagemaker.run_dir)
    channel: str = "fsx"  # channel name: mounted at /opt/ml/input/data/<channel>


@dataclass(frozen=True)
class SageMakerConfig:
    """The CreateTrainingJob request (see alfred_train.launch.sagemaker)."""

    instance_type: str = "ml.p4d.24xlarge"  # one of KNOWN_INSTANCE_GPUS; count is launch.nodes
    role_arn: str = ""  # execution role, arn:aws:iam::<12 digits>:role/<name>; required
    image_uri: str = ""  # training image (AWS PyTorch DLC + megatron-core); required
    region: str = "us-east-1"  # AWS region of the job and its buckets
    source_s3_uri: str = ""  # prefix for <job>/source/sourcedir.tar.gz; required
    output_s3_uri: str = ""  # OutputDataConfig.S3OutputPath (model/output tarballs); required
    checkpoint_s3_uri: str = ""  # CheckpointConfig.S3Uri, synced with /opt/ml/checkpoints; "" = off
    spot: bool = False  # managed spot: cheaper, may be interrupted (resumes from checkpoints)
    max_run_s: int = 5 * 24 * 3600  # StoppingCondition.MaxRuntimeInSeconds
    max_wait_s: int = 0  # spot only: MaxWaitTimeInSeconds >= max_run_s; 0 = equal to max_run_s
    volume_size_gb: int = 500  # EBS scratch per instance (ResourceConfig.VolumeSizeInGB)
    subnets: tuple[str, ...] = ()  # VpcConfig.Subnets (EFA needs a VPC); () = no VPC
    security_group_ids: tuple[str, ...] = ()  # VpcConfig; group must allow all traffic to itself
    environment: dict[str, str] = field(default_factory=dict)  # job env (FI_*, NCCL_*); no secrets
    endpoint_url: str = ""  # SageMaker/S3 endpoint override (tests: a moto server); "" = AWS
    tags: dict[str, str] = field(default_factory=dict)  # job tags, e.g. {project: alfred}
    # Run-config keys -> where the job reads them: an S3 URI (object, or a prefix ending in "/") or
    # a local path the launcher uploads under <source_s3_uri>/<job>/inputs/. Each is one channel
    # (InputDataConfig) and the key is rewritten to /opt/ml/input/data/<channel>/...
    # e.g. {ppo.policy_init: "s3://b/sft/", data.prompts: "s3://b/data/prompts.jsonl"}
    inputs: dict[str, str] = field(default_factory=dict)
    input_mode: Literal["File", "FastFile"] = "File"  # File: copied before start; FastFile: streamed
    fsx: FsxConfig = field(default_factory=FsxConfig)
    run_dir: str = ""  # "" = node-local /opt/ml/checkpoints synced to checkpoint_s3_uri; or a path under fsx.path (rw)


@dataclass(frozen=True)
class LaunchConfig:
    """Where the job runs and with how many processes."""

    backend: str = "local"  # slurm | sagemaker | local; `--backend` on the command line wins
    stage: str = "sft"  # sft | rm | ppo: the `alfred-train <stage>` the job runs; unset, `launch` reads it from the sections (job.stage_from_sections)
    name: str = "alfred"  # job name (Slurm --job-name; SageMaker <name>-<timestamp>)
    nodes: int = 1  # machines (Slurm nodes, SageMaker instance count)
    gpus_per_node: int = 8  # GPUs per machine; 0 = CPU job (then set procs_per_node)
    procs_per_node: int = 0  # worker processes per machine; 0 = one per GPU
    python: str = "python"  # interpreter the job runs, after slurm.setup has activated an env
    gpu_memory_gib: float = 0.0  # one GPU's memory for the dry run's check; 0 = from sagemaker.instance_type (Slurm: unchecked)
    job_dir: str = ""  # job script + resolved config + logs; "" = <run.dir>/launch/<time>
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    sagemaker: SageMakerConfig = field(default_factory=SageMakerConfig)

    def __post_init__(self):
        # Refused at every load (trainer, dry run, launcher), so no written config can hold one.
        check_no_credentials(self.slurm.env, "launch.slurm.env")
        check_no_credentials(self.sagemaker.environment, "launch.sagemaker.environment")
        for name in _ASSIGNMENT.findall(self.slurm.setup):
            if looks_like_credential(name):
                raise ConfigError(f"launch.slurm.setup: sets {name}, which looks like a credential; {CREDENTIAL_HELP}")

    @property
    def workers_per_node(self) -> int:
        """Processes started on each machine: procs_per_node, or one per GPU."""
        return self.procs_per_node or self.gpus_per_node

    @classmethod
    def from_dict(cls, tree: dict | None, key: str = "launch") -> "LaunchConfig":
        """Build from the `launch:` mapping of a run YAML; unknown keys and wrong types raise."""
        from alfred_train.config import from_dict  # the run config's strict loader (imports this module)

        return from_dict(cls, tree or {}, key)


# ---------------------------------------------------------------------------------------------
# Checks across fields

# GPUs per instance of the SageMaker training instance types we accept (0 = CPU instance).
KNOWN_INSTANCE_GPUS = {
    "ml.m5.xlarge": 0, "ml.m5.2xlarge": 0, "ml.m5.4xlarge": 0, "ml.c5.4xlarge": 0,
    "ml.g4dn.xlarge": 1, "ml.g4dn.12xlarge": 4, "ml.g5.xlarge": 1, "ml.g5.12xlarge": 4,
    "ml.g5.48xlarge": 8, "ml.p3.2xlarge": 1, "ml.p3.8xlarge": 4, "ml.p3.16xlarge": 8,
    "ml.p3dn.24xlarge": 8, "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8, "ml.p5.48xlarge": 8,
    "ml.p5e.48xlarge": 8, "ml.p5en.48xlarge": 8,
}  # fmt: skip

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@\-/]{1,512}$")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$")
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(])(?:export\s+|declare\s+-x\s+)?([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)
# A Slurm option value: no whitespace, quotes or shell metacharacters (it lands in #SBATCH lines).
_SLURM_VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%/+#\-]+$")
CREDENTIAL_HELP = (
    "credentials must not go into a job's configuration (it is written to the job folder, the run "
    "directory and the job request); SageMaker: grant them to the execution role or read them from "
    "Secrets Manager; Slurm: export them in the shell that runs `alfred-train launch` (README: Secrets)"
)


def slurm_time_s(text: str, key: str = "launch.slurm.time") -> int:
    """Seconds in a Slurm time limit: "HH:MM:SS" or "D-HH:MM:SS"."""
    match = _TIME.match(text)
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a time limit of the form HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def looks_like_credential(name: str) -> bool:
    """HF_TOKEN, wandb_api_key, ' AWS_SECRET_ACCESS_KEY ', DB_PASSWORD ...: any case, any padding."""
    return bool(_CREDENTIAL_NAME.search(name.strip()))


def env_key(key: str, name: str) -> str:
    """Key path of an environment entry: `key.NAME`, or `key[' odd name ']` when it is not a shell name."""
    return f"{key}.{name}" if _SHELL_NAME.match(name) else f"{key}[{name!r}]"


def check_no_credentials(env: dict[str, str], key: str) -> None:
    """Refuse any credential-looking name; the message never shows the value."""
    for name in env:
        if looks_like_credential(str(name)):
            raise ConfigError(f"{env_key(key, str(name))}: looks like a credential; {CREDENTIAL_HELP}")


def _check_shell_names(env: dict[str, str], key: str) -> None:
    for name in env:
        if not _SHELL_NAME.match(name):
            raise ConfigError(f"{env_key(key, name)}: not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


def _check_slurm_value(value: str, key: str) -> None:
    if value and not _SLURM_VALUE.match(value):
        raise ConfigError(
            f"{key}: {value!r} holds whitespace, quotes or shell characters; "
            "use letters, digits and _ . , : = @ % / + # - only"
        )


def check_processes(cfg: LaunchConfig, world_size: int) -> None:
    """The job starts nodes x workers_per_node processes: refused when that is not tp * pp * dp."""
    procs = cfg.nodes * cfg.workers_per_node
    if procs != world_size:
        per_node = f"{cfg.procs_per_node} (launch.procs_per_node)" if cfg.procs_per_node else \
            f"{cfg.workers_per_node} (one per GPU, launch.gpus_per_node)"
        raise ConfigError(f"launch.nodes: {cfg.nodes} x {per_node} processes per node = {procs} != tp*pp*dp "
                          f"({world_size}); change launch.nodes, the processes per node (a CPU job: "
                          "launch.gpus_per_node=0 launch.procs_per_node=N) or parallel.dp")


def validate_common(cfg: LaunchConfig) -> None:
    """Checks every backend needs: stage, sizes, job name."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"launch.backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.stage not in STAGES:
        raise ConfigError(f"launch.stage: {cfg.stage!r} is not one of {', '.join(STAGES)}")
    if cfg.nodes < 1:
        raise ConfigError(f"launch.nodes: must be >= 1, got {cfg.nodes}")
    if cfg.gpus_per_node < 0 or cfg.procs_per_node < 0:
        raise ConfigError("launch.procs_per_node: gpus_per_node and procs_per_node must be >= 0")
    if cfg.workers_per_node == 0:
        raise ConfigError("launch.procs_per_node: set it (>= 1) for a CPU job with gpus_per_node: 0")
    if 0 < cfg.gpus_per_node < cfg.procs_per_node:  # the processes past the last GPU found no device at start
        raise ConfigError(f"launch.procs_per_node: {cfg.procs_per_node} processes per node on {cfg.gpus_per_node} "
                          f"GPU(s): each process needs a GPU of its own; set at most {cfg.gpus_per_node} "
                          "(0 = one per GPU)")
    if not JOB_NAME.match(cfg.name) or len(cfg.name) > 40:
        raise ConfigError(
            f"launch.name: {cfg.name!r} must be 1-40 letters, digits or inner hyphens "
            "(a timestamp is appended for SageMaker's 63-character limit)"
        )


def validate_slurm(cfg: LaunchConfig) -> None:
    """Checks for `--backend slurm`; raises ConfigError naming the key."""
    validate_common(cfg)
    s = cfg.slurm
    limit_s = slurm_time_s(s.time)
    if not 0 < s.signal_lead_s < limit_s:
        raise ConfigError(
            f"launch.slurm.signal_lead_s: {s.signal_lead_s} must be > 0 and below the time limit "
            f"launch.slurm.time={s.time} ({limit_s} s)"
        )
    if s.cpus_per_task < 0:
        raise ConfigError(f"launch.slurm.cpus_per_task: must be >= 0, got {s.cpus_per_task}")
    if not 0 <= s.master_port < 65536:
        raise ConfigError(f"launch.slurm.master_port: {s.master_port} is not a port number")
    for i, line in enumerate(s.extra_sbatch):
        if not line.startswith("--") or not _SLURM_VALUE.match(line):
            raise ConfigError(
                f"launch.slurm.extra_sbatch[{i}]: {line!r} must be one sbatch option like '--exclusive' "
                "or '--constraint=a100' (no whitespace or shell characters)"
            )
    for name in ("partition", "account", "log_dir", "container_image"):
        _check_slurm_value(getattr(s, name), f"launch.slurm.{name}")
    for i, mount in enumerate(s.container_mounts):
        _check_slurm_value(mount, f"launch.slurm.container_mounts[{i}]")
        if "," in mount or mount.count(":") not in (1, 2):
            raise ConfigError(f"launch.slurm.container_mounts[{i}]: {mount!r} must be SRC:DST or SRC:DST:ro")
    if s.container_mounts and not s.container_image:
        raise ConfigError("launch.slurm.container_mounts: set launch.slurm.container_image too (pyxis)")
    _check_shell_names(s.env, "launch.slurm.env")
    check_no_credentials(s.env, "launch.slurm.env")


def validate_sagemaker(cfg: LaunchConfig) -> None:
    """Checks for `--backend sagemaker`; moto validates nothing, so every field is checked here."""
    validate_common(cfg)
    sm = cfg.sagemaker
    key = "launch.sagemaker"
    if sm.instance_type not in KNOWN_INSTANCE_GPUS:
        raise ConfigError(
            f"{key}.instance_type: {sm.instance_type!r} is not a known training instance type "
            f"(e.g. ml.p4d.24xlarge, ml.p5.48xlarge, ml.g5.12xlarge)"
        )
    gpus = KNOWN_INSTANCE_GPUS[sm.instance_type]
    if cfg.gpus_per_node != gpus:
        raise ConfigError(
            f"launch.gpus_per_node: {cfg.gpus_per_node} but {sm.instance_type} has {gpus} GPUs"
        )
    if not _ROLE_ARN.match(sm.role_arn):
        raise ConfigError(
            f"{key}.role_arn: {sm.role_arn!r} is not an IAM role ARN "
            "(arn:aws:iam::<12-digit account>:role/<name>)"
        )
    if not sm.image_uri or any(c.isspace() for c in sm.image_uri):
        raise ConfigError(f"{key}.image_uri: set the training image URI (ECR repository:tag)")
    if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", sm.region):
        raise ConfigError(f"{key}.region: {sm.region!r} is not an AWS region like us-east-1")
    for name in ("source_s3_uri", "output_s3_uri", "checkpoint_s3_uri"):
        uri = getattr(sm, name)
        if (uri or name != "checkpoint_s3_uri") and not _S3_URI.match(uri):
            raise ConfigError(f"{key}.{name}: {uri!r} is not an S3 URI of the form s3://bucket/prefix")
    if sm.max_run_s < 1:
        raise ConfigError(f"{key}.max_run_s: must be >= 1 second, got {sm.max_run_s}")
    if sm.max_wait_s and not sm.spot:
        raise ConfigError(f"{key}.max_wait_s: only used with spot: true; remove it or set spot")
    if sm.spot and sm.max_wait_s and sm.max_wait_s < sm.max_run_s:
        raise ConfigError(
            f"{key}.max_wait_s: {sm.max_wait_s} must be >= max_run_s ({sm.max_run_s}) for spot"
        )
    if sm.volume_size_gb < 1:
        raise ConfigError(f"{key}.volume_size_gb: must be >= 1, got {sm.volume_size_gb}")
    if bool(sm.subnets) != bool(sm.security_group_ids):
        raise ConfigError(f"{key}.security_group_ids: a VPC needs both subnets and security groups")
    _check_shell_names(sm.environment, f"{key}.environment")
    check_no_credentials(sm.environment, f"{key}.environment")


def validate_job_name(name: str, key: str = "launch.name") -> str:
    """Return `name` when it obeys SageMaker's rule ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$."""
    if not JOB_NAME.match(name):
        raise ConfigError(f"{key}: job name {name!r} breaks ^[a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}}$")
    return name

