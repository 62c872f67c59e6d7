"""The disk a SageMaker job's checkpoints need, and where they live.

Checkpoints, two layouts:
- node-local (default): run.dir = /opt/ml/checkpoints on every instance, synced by SageMaker to
  `checkpoint_s3_uri`; each node writes its ranks' files, the nodes' files meet in S3, and on a
  restart SageMaker downloads the whole prefix to every instance. The volume must hold that
  download (keep x the whole checkpoint) plus the node's share of the next save.
- shared FSx: `run_dir` under `fsx.path` with `fsx.access_mode: rw`; one copy on the file system,
  nothing on the instances' volumes and no CheckpointConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

from alfred_train import resources
from alfred_train.errors import ConfigError
from alfred_train.launch.sagemaker_plan import CHECKPOINT_LOCAL_PATH


@dataclass(frozen=True)
class DiskPlan:
    per_instance: float  # bytes of volume each instance needs for checkpoints
    lines: list[str]


def disk_plan(cfg, size: resources.CheckpointSize) -> DiskPlan:
    """Per-instance disk and S3 traffic of the checkpoints; refuses a volume_size_gb that cannot hold them."""
    launch, p = cfg.launch, cfg.parallel
    sm = launch.sagemaker
    keep = cfg.checkpoint.keep
    h = resources.human
    if sm.run_dir:
        lines = [f"  layout: shared run directory on FSx ({sm.run_dir}): one copy; the file system needs "
                 f"{h((keep + 1) * size.total)} (keep {keep} + the one being written); instance volumes hold none"]
        return DiskPlan(0.0, lines)
    share = resources.largest_node_share(size, tp=p.tp, pp=p.pp, zero=p.zero, nodes=launch.nodes,
                                         gpus_per_node=launch.workers_per_node)
    if sm.checkpoint_s3_uri:
        need = keep * size.total + share
        lines = [f"  layout: node-local {CHECKPOINT_LOCAL_PATH} synced to {sm.checkpoint_s3_uri}; each node writes "
                 f"up to {h(share)} per save",
                 f"  S3 traffic: {h(size.total)} uploaded per save; a restart downloads the whole prefix (>= keep "
                 f"{keep} x {h(size.total)}) to each of {launch.nodes} instances = {h(keep * size.total * launch.nodes)}",
                 f"  per-instance disk: {h(need)} (the restart download + this node's share of the next save)"]
    else:
        need = (keep + 1) * share
        lines = [f"  layout: node-local {CHECKPOINT_LOCAL_PATH} without checkpoint_s3_uri: checkpoints are lost "
                 f"with the instances (no resume after a restart)",
                 f"  per-instance disk: {h(need)} ((keep {keep} + 1) x this node's share {h(share)})"]
    volume = sm.volume_size_gb * resources.GB
    lines.append(f"  volume_size_gb: {sm.volume_size_gb} ({h(volume)}); File-mode inputs are copied there too")
    local_max = resources.INSTANCE_LOCAL_STORAGE_GB.get(sm.instance_type)
    if local_max and sm.volume_size_gb > local_max:
        raise ConfigError(f"launch.sagemaker.volume_size_gb: {sm.instance_type} trains on its local NVMe "
                          f"({local_max} GB); ask for at most that")
    if volume < need:
        raise ConfigError(
            f"launch.sagemaker.volume_size_gb: {sm.volume_size_gb} GB cannot hold the checkpoints: each instance needs "
            f"{need / resources.GB:.0f} GB ({'restart download of keep ' + str(keep) + ' x ' + h(size.total) if sm.checkpoint_s3_uri else 'node-local saves'}"
            f" + {h(share)} being written); raise it to >= {int(-(-need // resources.GB))}, lower checkpoint.keep, "
            "or put the run directory on FSx (launch.sagemaker.run_dir)")
    return DiskPlan(need, lines)
