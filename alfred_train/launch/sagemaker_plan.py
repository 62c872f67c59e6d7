"""What a SageMaker job reads and writes: its input channels, the rewritten config, its disk.

Inputs. Every path the stage reads (READ_BY_STAGE) must exist inside the container. Three ways:

- `launch.sagemaker.inputs: {KEY: SOURCE}`: one S3 channel per key (InputDataConfig, File or
  FastFile mode), named after the key (`ppo.policy_init` -> channel `ppo_policy_init`).
  SOURCE `s3://b/sft/` (a prefix, ending in /) -> KEY = /opt/ml/input/data/ppo_policy_init;
  SOURCE `s3://b/data/prompts.jsonl` (one object) -> /opt/ml/input/data/data_prompts/prompts.jsonl;
  a local file or folder is uploaded by the launcher to <source_s3_uri>/<job>/inputs/<channel>/
  first and then delivered the same way.
- `launch.sagemaker.fsx`: an FSx for Lustre file system as a FileSystemDataSource channel (needs
  the VPC: subnets + security groups); paths under `fsx.path` (e.g. /fsx/alfred/...) are rewritten
  to /opt/ml/input/data/<fsx.channel>/alfred/...
- a relative path inside the uploaded source (e.g. configs/...): the job runs in /opt/ml/code.
A list (a data mixture, ppo.eval_tasks' YAML files) is placed file by file (KEY[i] in `inputs`), or
through one folder input for KEY that stands for the files' common folder.
Anything else is refused before submission (exit 2, naming the key).

Checkpoints and the disk they need: alfred_train.launch.sagemaker_disk.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from alfred_train.errors import ConfigError
from alfred_train.launch.config import LaunchConfig
from alfred_train.launch.s3 import parse_s3_uri

CHANNEL_ROOT = "/opt/ml/input/data"
CODE_DIR = "/opt/ml/code"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # CheckpointConfig.LocalPath
# Every run-config key holding a path the trainer reads.
INPUT_KEYS = ("model.tokenizer", "data.train", "data.valid", "data.prompts", "rm.init", "checkpoint.init",
              "ppo.policy_init", "ppo.reward_init", "checkpoint.resume", "ppo.eval_tasks")
# The ones each stage reads (PPO: data.train only for want of data.prompts, as its prompt set): a path
# only another stage reads is left as it is, not required inside the job (a recipe names them all).
READ_BY_STAGE = {"sft": ("model.tokenizer", "data.train", "data.valid", "checkpoint.init", "checkpoint.resume"),
                 "rm": ("model.tokenizer", "data.train", "data.valid", "rm.init", "checkpoint.init",
                        "checkpoint.resume"),
                 "ppo": ("model.tokenizer", "data.prompts", "ppo.policy_init", "ppo.reward_init", "checkpoint.resume",
                         "ppo.eval_tasks")}
LIST_KEYS = ("data.train", "data.valid", "data.prompts", "ppo.eval_tasks")  # a mixture / task names and files
FILE_KEYS = LIST_KEYS  # they name files (a folder delivered for one stands for the folder that holds it)
_FSX_ID = re.compile(r"^fs-[0-9a-f]{8,21}$")
SOURCE_DIRS = ("alfred_train", "parallel", "kernels", "sagemaker", "configs")  # shipped in the tarball


@dataclass(frozen=True)
class Channel:
    name: str
    s3_uri: str  # S3Prefix to deliver
    container_path: str  # what the run config's key becomes
    upload_from: str = ""  # local file/folder the launcher uploads to s3_uri first
    copy_from: str = ""  # an S3 object the launcher copies to s3_uri first (with `companions`)
    companions: tuple[str, ...] = ()  # files beside upload_from / copy_from that go with it, where they exist


@dataclass
class InputPlan:
    channels: list[Channel] = field(default_factory=list)
    rewrites: dict[str, Any] = field(default_factory=dict)  # key -> path in the container (a mixture: its sources)
    # key -> (channel, path inside it) or ("", path inside /opt/ml/code): entry.py resolves them with
    # the toolkit's SM_CHANNEL_<NAME> variables, so a run outside /opt/ml (the rehearsal) agrees
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)
    run_dir: str = CHECKPOINT_LOCAL_PATH  # run.dir inside the container

    @property
    def node_local(self) -> bool:
        """checkpoint.node_local of the job: each instance's own /opt/ml/checkpoints, or one FSx copy."""
        return self.run_dir == CHECKPOINT_LOCAL_PATH

    def lines(self) -> list[str]:
        out = ["Inputs (run-config key -> path inside the job):"]
        for key, path in self.rewrites.items():
            out += ([f"  {key}[{i}] -> {item['path'] if isinstance(item, dict) else item}"
                     for i, item in enumerate(path)] if isinstance(path, list) else [f"  {key} -> {path}"])
        if not self.rewrites:
            out.append("  (none)")
        for ch in self.channels:
            if ch.upload_from or ch.copy_from:
                also = (" (and the tokenizer files beside it)" if ch.name == "model_tokenizer" else
                        f" (and {', '.join(ch.companions)} beside it)") if ch.companions else ""
                verb = "upload" if ch.upload_from else "copy"
                out.append(f"  {verb} {ch.upload_from or ch.copy_from}{also} -> {ch.s3_uri}")
        out.append(f"  run.dir -> {self.run_dir}  (checkpoint.node_local: {str(self.node_local).lower()})")
        return out


def _get(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(tree: dict, key: str, value: str) -> None:
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def channel_name(key: str) -> str:
    """ppo.policy_init -> ppo_policy_init; data.prompts[1] (source 1 of a mixture) -> data_prompts_1."""
    return key.replace(".", "_").replace("[", "_").replace("]", "")


def _s3_channel(key: str, source: str, upload_root: str) -> Channel:
    name = channel_name(key)
    where = f"launch.sagemaker.inputs.{key}"
    if source.startswith("s3://"):
        try:
            loc = parse_s3_uri(source)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not loc.key:
            raise ConfigError(f"{where}: {source!r} names a whole bucket; give a prefix ending in / or an object")
        if source.endswith("/"):
            return Channel(name, f"{loc}/", f"{CHANNEL_ROOT}/{name}")
        return Channel(name, str(loc), f"{CHANNEL_ROOT}/{name}/{loc.key.rsplit('/', 1)[-1]}")
    local = Path(source).expanduser()
    if not local.exists():
        raise ConfigError(f"{where}: {source!r} is neither an s3:// URI nor an existing local path to upload")
    prefix = f"{upload_root}/{name}"
    if local.is_dir():
        return Channel(name, f"{prefix}/", f"{CHANNEL_ROOT}/{name}", upload_from=str(local.resolve()))
    return Channel(name, f"{prefix}/{local.name}", f"{CHANNEL_ROOT}/{name}/{local.name}",
                   upload_from=str(local.resolve()))


def _tokenizer_channel(source: str, upload_root: str) -> Channel:
    """model.tokenizer naming one file (tokenizer.json, a .model) reads bos / eos / pad from the
    tokenizer_config.json beside it, which a channel of that one object left behind. The file and the
    tokenizer files beside it go to a folder of their own (uploaded, or copied within S3: the
    object's folder may hold the weights too); a folder source is delivered whole as it is."""
    from alfred_train.convert.tokenizer_files import TOKENIZER_FILES

    ch = _s3_channel("model.tokenizer", source, upload_root)
    if ch.s3_uri.endswith("/"):
        return ch
    name = ch.container_path.rsplit("/", 1)[-1]
    companions = tuple(n for n in TOKENIZER_FILES if n != name)
    if ch.upload_from:  # local: only those that exist
        companions = tuple(n for n in companions if (Path(ch.upload_from).parent / n).is_file())
    return Channel(ch.name, f"{upload_root}/{ch.name}/", ch.container_path, upload_from=ch.upload_from,
                   copy_from="" if ch.upload_from else ch.s3_uri, companions=companions)


def _task_channel(key: str, source: str, upload_root: str) -> Channel:
    """A task YAML file uploaded from here goes with what lm-eval reads beside it (its `include:`s,
    the modules of its `!function`s), into a folder of its own: alone, the job stopped at its start."""
    from alfred_train.eval_tasks import files_read_beside, is_task_file

    ch = _s3_channel(key, source, upload_root)
    file = Path(ch.upload_from)
    if not ch.upload_from or not file.is_file() or not is_task_file(file.name):
        return ch
    companions = []
    for need in files_read_beside(file):
        if not need.is_relative_to(file.parent):
            raise ConfigError(f"launch.sagemaker.inputs.{key}: {file} reads {need}, outside its folder; deliver a "
                              f"folder holding both as launch.sagemaker.inputs.{_MIXTURE_ITEM.sub('', key)}")
        companions.append(need.relative_to(file.parent).as_posix())
    if not companions:
        return ch
    return Channel(ch.name, f"{upload_root}/{ch.name}/", ch.container_path, upload_from=ch.upload_from,
                   companions=tuple(companions))


_MIXTURE_ITEM = re.compile(r"\[\d+\]$")  # data.prompts[1]: source 1 of a mixture
_GLOB = re.compile(r"[*?\[]")


def _place(key: str, value, sm, plan: InputPlan, upload_root: str, source_root: Path) -> tuple[str, tuple[str, str]]:
    """Where the job reads `key` (a path, or source i of a mixture as KEY[i]): (path in the container,
    (channel, path inside it)); a channel of launch.sagemaker.inputs is added to `plan`."""
    fsx = sm.fsx
    if key in sm.inputs:
        make = (_tokenizer_channel if key == "model.tokenizer" else partial(_task_channel, key)
                if key.startswith("ppo.eval_tasks[") else partial(_s3_channel, key))
        ch = make(sm.inputs[key], upload_root)
        plan.channels.append(ch)
        path = ch.container_path
        folder = ch.container_path == f"{CHANNEL_ROOT}/{ch.name}"  # a folder delivered, not a file (with companions)
        if folder and value is not None and _GLOB.search(str(value)):
            pattern = _glob_part(str(value))  # a folder for data/*.jsonl: the job globs inside it
            path = f"{path}/{pattern}"
        elif folder and value is not None and _MIXTURE_ITEM.sub("", key) in FILE_KEYS:
            path = f"{path}/{_in_folder(key, str(value), ch)}"  # the job read the folder as the data file
        return path, (ch.name, path[len(f"{CHANNEL_ROOT}/{ch.name}"):].lstrip("/"))
    value = str(value)
    rest = _under(value, fsx.path) if fsx.file_system_id else None
    if rest is not None:
        return f"{CHANNEL_ROOT}/{fsx.channel}" + (f"/{rest}" if rest else ""), (fsx.channel, rest)
    if _in_source(value, source_root):
        return f"{CODE_DIR}/{value}", ("", value)
    where = f"{key}.path" if key.endswith("]") and not key.startswith("ppo.eval_tasks") else key
    raise ConfigError(
        f"{where}: {value!r} would not exist inside the SageMaker job; deliver it with "
        f"launch.sagemaker.inputs.{key} (an s3:// URI or a local path the launcher uploads) or put "
        f"it on the file system of launch.sagemaker.fsx"
    )


def _place_list(key: str, value: list, sm, plan: InputPlan, upload_root: str, source_root: Path) -> None:
    """A mixture (each source's path) or ppo.eval_tasks (each task YAML file; names stay), each file
    placed as KEY[i] is, or all through one folder input for KEY standing for their common folder
    (the recipe's five /fsx/alfred/data/*.jsonl from s3://b/alfred/data/). Sets the job's list and,
    for entry.py, {"items": [...]} with each path as [channel, path inside it]."""
    from alfred_train.eval_tasks import is_task_file

    files = {i: str(item.get("path") if isinstance(item, dict) else item) for i, item in enumerate(value)
             if isinstance(item, dict) or key != "ppo.eval_tasks" or is_task_file(str(item))}
    placed = {}
    if key in sm.inputs:  # one folder for them all: it stands for their common folder
        ch = _s3_channel(key, sm.inputs[key], upload_root)
        if not ch.s3_uri.endswith("/"):
            raise ConfigError(f"launch.sagemaker.inputs.{key}: {key} is a list of {len(files)} files; give the folder "
                              f"that holds them (an s3:// prefix ending in /, or a local folder), or deliver each as "
                              f"launch.sagemaker.inputs.{key}[i]")
        plan.channels.append(ch)
        common = os.path.commonpath([_fixed_folder(f) for f in files.values()]) if files else ""
        if key == "ppo.eval_tasks":
            _check_tasks_inside(files.values(), common, key)
        for i, f in files.items():
            rel = os.path.relpath(f, common) if common else os.path.basename(f)
            placed[i] = (f"{ch.container_path}/{rel}", (ch.name, rel))
    for i, f in files.items():
        if i not in placed:
            placed[i] = _place(f"{key}[{i}]", f, sm, plan, upload_root, source_root)
    rewritten, items = [], []
    for i, item in enumerate(value):
        if i not in placed:  # an lm-eval task name
            rewritten.append(item)
            items.append(item)
        elif isinstance(item, dict):  # a mixture's source
            rewritten.append({**item, "path": placed[i][0]})
            items.append({**item, "path": list(placed[i][1])})
        else:
            rewritten.append(placed[i][0])
            items.append(list(placed[i][1]))
    plan.rewrites[key] = rewritten
    plan.sources[key] = {"items": items}


def _check_tasks_inside(files, common: str, key: str) -> None:
    """The folder delivered for the task files must hold what lm-eval reads beside them too."""
    from alfred_train.eval_tasks import files_read_beside

    for file in (Path(f) for f in files if Path(f).is_file()):
        for need in files_read_beside(file):
            if not need.is_relative_to(Path(common).resolve()):
                raise ConfigError(f"launch.sagemaker.inputs.{key}: {file} reads {need}, outside the folder that "
                                  f"stands for {common}; move it there, or deliver a folder above both")


def _in_folder(key: str, value: str, ch: Channel) -> str:
    """The name of file `value` inside the folder delivered for `key`: its own name (a local folder
    must hold it)."""
    name = Path(value).name
    if ch.upload_from and not (Path(ch.upload_from) / name).is_file():
        raise ConfigError(f"launch.sagemaker.inputs.{key}: {ch.upload_from} holds no {name} ({key} names {value}); "
                          "give the file itself, or the folder that holds it")
    return name


def _fixed_folder(path: str) -> str:
    """The folder of a file, or of a glob the folder before its first wildcard: /d/hh/*/x.jsonl -> /d/hh."""
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if _GLOB.search(part)), len(parts) - 1)
    return "/".join(parts[:first]) or ("/" if path.startswith("/") else ".")


def _glob_part(path: str) -> str:
    """The pattern of a glob from its first part that holds a wildcard: /d/shard-*.jsonl -> shard-*.jsonl."""
    parts = path.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB.search(part))
    return "/".join(parts[first:])


def _under(path: str, root: str) -> str | None:
    """`path` relative to `root` ("" when equal), or None when it is not under it."""
    root = root.rstrip("/") or "/"
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


def _in_source(path: str, source_root: Path) -> bool:
    rel = Path(path)
    return (not rel.is_absolute() and ".." not in rel.parts and rel.parts[:1] != () and rel.parts[0] in SOURCE_DIRS
            and (source_root / rel).exists())


def validate_fsx(launch: LaunchConfig) -> None:
    sm, key = launch.sagemaker, "launch.sagemaker"
    fsx = sm.fsx
    if sm.spot and not (sm.checkpoint_s3_uri or sm.run_dir):  # a reclaim would restart it from step 0
        raise ConfigError(f"{key}.checkpoint_s3_uri: spot: true restarts the job after each reclaim, and without "
                          "checkpoint_s3_uri (or a run_dir on FSx) its checkpoints are lost with the instances; "
                          "set one, or spot=false")
    if not fsx.file_system_id:
        if sm.run_dir:
            raise ConfigError(f"{key}.run_dir: a shared run directory needs launch.sagemaker.fsx (rw)")
        return
    if not _FSX_ID.match(fsx.file_system_id):
        raise ConfigError(f"{key}.fsx.file_system_id: {fsx.file_system_id!r} is not an FSx id like fs-0123456789abcdef0")
    if not fsx.directory_path.startswith("/") or any(c.isspace() for c in fsx.directory_path):
        raise ConfigError(f"{key}.fsx.directory_path: {fsx.directory_path!r} must be /<MountName>[/dir] on the file system")
    if not fsx.path.startswith("/"):
        raise ConfigError(f"{key}.fsx.path: {fsx.path!r} must be the absolute path where your run config's FSx paths start")
    if not re.match(r"^[A-Za-z0-9.\-_]{1,64}$", fsx.channel):
        raise ConfigError(f"{key}.fsx.channel: {fsx.channel!r} is not a channel name ([A-Za-z0-9.-_], up to 64)")
    if not sm.subnets:
        raise ConfigError(f"{key}.subnets: FSx for Lustre is reached through the VPC; set subnets and "
                          "security_group_ids of the file system's VPC")
    if sm.run_dir:
        if _under(sm.run_dir, fsx.path) is None:
            raise ConfigError(f"{key}.run_dir: {sm.run_dir!r} is not under launch.sagemaker.fsx.path ({fsx.path})")
        if fsx.access_mode != "rw":
            raise ConfigError(f"{key}.fsx.access_mode: a run directory on FSx needs rw")
        if sm.checkpoint_s3_uri:
            raise ConfigError(f"{key}.checkpoint_s3_uri: the run directory is on FSx (launch.sagemaker.run_dir); "
                              "leave checkpoint_s3_uri empty (it syncs /opt/ml/checkpoints only)")


def plan_inputs(tree: dict, launch: LaunchConfig, *, upload_root: str, source_root: Path) -> InputPlan:
    """Channels and rewrites for every path the run reads; ConfigError naming a key that would
    not exist in the container. `upload_root`: S3 prefix for local inputs (<source>/<job>/inputs)."""
    sm = launch.sagemaker
    validate_fsx(launch)
    for key in sm.inputs:
        base = _MIXTURE_ITEM.sub("", key)
        if base not in INPUT_KEYS or (base != key and not isinstance(_get(tree, base), list)):
            raise ConfigError(f"launch.sagemaker.inputs.{key}: not a path the run reads "
                              f"(one of {', '.join(INPUT_KEYS)}, or KEY[i] for source i of a mixture)")
    plan = InputPlan()
    fsx = sm.fsx
    if fsx.file_system_id:
        mount = f"{CHANNEL_ROOT}/{fsx.channel}"
        plan.channels.append(Channel(fsx.channel, "", mount))
    read = set(READ_BY_STAGE[launch.stage])
    if launch.stage == "ppo" and not _get(tree, "data.prompts"):
        read.add("data.train")  # PPO's prompt set, for want of data.prompts
    for key in INPUT_KEYS:
        value = _get(tree, key)
        if key not in read and not any(_MIXTURE_ITEM.sub("", k) == key for k in sm.inputs):
            continue
        if isinstance(value, list) and key in LIST_KEYS:
            _place_list(key, value, sm, plan, upload_root, source_root)
            continue
        if key not in sm.inputs and (value is None or (key == "checkpoint.resume" and value in ("auto", "none"))):
            continue
        path, where = _place(key, value, sm, plan, upload_root, source_root)
        plan.rewrites[key], plan.sources[key] = path, where
        if key in CHECKPOINT_KEYS:
            _check_self_contained(key, plan.channels[-1] if key in sm.inputs else None)
    if sm.run_dir:
        rest = _under(sm.run_dir, fsx.path)
        plan.run_dir = f"{CHANNEL_ROOT}/{fsx.channel}" + (f"/{rest}" if rest else "")
    given = _get(tree, "checkpoint.node_local")
    if given is not None and given != plan.node_local:
        layout = "on FSx (one shared copy)" if sm.run_dir else "node-local /opt/ml/checkpoints on every instance"
        raise ConfigError(f"checkpoint.node_local: {str(given).lower()}, but the job's run directory is {layout}; "
                          f"remove it (the launcher sets {str(plan.node_local).lower()})")
    return plan


CHECKPOINT_KEYS = ("rm.init", "checkpoint.init", "ppo.policy_init", "ppo.reward_init")


def _check_self_contained(key: str, ch: Channel | None) -> None:
    """An init uploaded from here must hold its weights: a LoRA checkpoint refers to its base by this
    machine's absolute path, which the job does not have (it failed at start, after the uploads)."""
    from alfred_train import checkpoint
    from alfred_train.models import lora_checkpoint

    if ch is None or not ch.upload_from or not Path(ch.upload_from).is_dir():
        return
    try:
        found = checkpoint.resolve_checkpoint(ch.upload_from)
        meta = checkpoint.read_meta(found)
    except ConfigError:
        return  # not a checkpoint: the job's own checks name it
    for model in meta.get("models") or []:
        if bases := lora_checkpoint.base_paths(meta, model):
            raise ConfigError(f"launch.sagemaker.inputs.{key}: {found} is a LoRA checkpoint over the base {bases[0][0]} "
                              "(this machine's path, which the job does not have); deliver a self-contained one: "
                              "`convert mcore-to-hf CKPT HF`, then `convert hf-to-mcore HF OUT --adapter HF/adapter`")


def rewritten_tree(tree: dict, plan: InputPlan) -> dict:
    """The run config as the job reads it: input paths pointing into the container, and the
    checkpoint layout (node-local /opt/ml/checkpoints: checkpoint.node_local; FSx: shared)."""
    out = copy.deepcopy(tree)
    for key, path in plan.rewrites.items():
        _set(out, key, path)
    _set(out, "checkpoint.node_local", plan.node_local)
    return out


def uploaded_tree(tree: dict, plan: InputPlan) -> dict:
    """The run config with each input uploaded from here at its local path: what the launch dry run
    checks (the config's own path, e.g. /fsx/..., may not be there, or hold something else)."""
    local = {ch.name: Path(ch.upload_from) for ch in plan.channels if ch.upload_from}

    def here(source, given):
        channel, rel = source
        if channel not in local:
            return given
        base = local[channel] if local[channel].is_dir() else local[channel].parent
        return str(base / rel) if rel else str(base)

    def item_here(item, source):  # a list's item: a task name, a mixture's source, a file
        if isinstance(source, dict):
            return {**item, "path": here(source["path"], item["path"])}
        return here(source, item) if isinstance(source, list) else item

    out = copy.deepcopy(tree)
    for key, source in plan.sources.items():
        value = _get(tree, key)
        if isinstance(source, dict):
            _set(out, key, [item_here(item, src) for item, src in zip(value, source["items"])])
        else:
            _set(out, key, here(source, value))
    return out


def input_data_config(launch: LaunchConfig, plan: InputPlan) -> list[dict]:
    """CreateTrainingJob's InputDataConfig for the plan's channels."""
    sm = launch.sagemaker
    out = []
    for ch in plan.channels:
        if not ch.s3_uri:  # the FSx channel
            source = {"FileSystemDataSource": {
                "FileSystemId": sm.fsx.file_system_id, "FileSystemType": "FSxLustre",
                "FileSystemAccessMode": sm.fsx.access_mode, "DirectoryPath": sm.fsx.directory_path}}
            out.append({"ChannelName": ch.name, "DataSource": source})
            continue
        source = {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": ch.s3_uri,
                                   "S3DataDistributionType": "FullyReplicated"}}
        out.append({"ChannelName": ch.name, "DataSource": source, "InputMode": sm.input_mode})
    return out
