"""Nothing in a checkpoint can run code when it is loaded.

- Each rank's RNG states go to `rng/rank_<r>.safetensors` (tensors plus JSON metadata): no pickle.
  Trainer state is JSON (`meta.json`).
- The files that dist_checkpointing itself reads with pickle are opened here first, without
  executing anything: torch DCP's `.metadata` (plain `pickle.load` in torch) with an unpickler that
  knows only DCP's metadata classes, and every pickled item inside the shards (megatron's
  `_extra_state`, read by torch with `weights_only=False`) with `torch.load(weights_only=True)`.
  `common.pt` (read by megatron with `torch.load`'s default) is opened with `weights_only=True` too.
A crafted pickle anywhere in these is refused with UnsafeCheckpointError before megatron opens it.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from alfred_train.errors import AlfredError

RNG_SUFFIX = ".safetensors"


class UnsafeCheckpointError(AlfredError):
    """A checkpoint file holds a pickle that would run code, or one we cannot read safely."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / "rng" / f"rank_{rank:05d}{RNG_SUFFIX}"


def save_rng(path: Path) -> None:
    """This process's python / numpy / torch (and CUDA + megatron tracker) RNG states."""
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python_mt": torch.tensor(mt, dtype=torch.int64),
               "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    meta = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": pos,
            "numpy_has_gauss": has_gauss, "numpy_cached": cached}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensors["cuda"] = torch.cuda.get_rng_state()
        for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            tensors[f"tracker.{name}"] = state
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"json": json.dumps(meta)})


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    random.setstate((meta["python_version"], tuple(tensors["python_mt"].tolist()), meta["python_gauss"]))
    np.random.set_state((meta["numpy_kind"], tensors["numpy_keys"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_cached"]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(tensors["cuda"])
        tracker = {k[len("tracker."):]: v for k, v in tensors.items() if k.startswith("tracker.")}
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


# ---------------------------------------------------------------------------------------------
# The pickle gate


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only torch DCP metadata: its dataclasses, torch.Size, dtypes, layouts."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")

    def find_class(self, module, name):
        if module in self._MODULES and isinstance(obj := super().find_class(module, name), type):
            return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def check_pickles(ckpt_dir: Path) -> None:
    """Open every pickle dist_checkpointing would read from `ckpt_dir` without running code."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    where = ckpt_dir / ".metadata"
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        state_meta, storage = metadata.state_dict_metadata, metadata.storage_data
    except Exception as err:  # anything a crafted pickle can raise
        raise UnsafeCheckpointError(f"{where}: refused ({type(err).__name__}: {err})") from None
    common = ckpt_dir / "common.pt"  # megatron reads it with torch.load's default: check it does not depend on that
    if common.exists():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsafeCheckpointError(f"{common}: refused ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:200]})") from None
    for index, info in storage.items():
        if not isinstance(state_meta.get(index.fqn), BytesStorageMetadata):
            continue
        where = ckpt_dir / info.relative_path
        try:
            with open(where, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as err:
            raise UnsafeCheckpointError(f"{where} item {index.fqn}: refused ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:200]})") from None
