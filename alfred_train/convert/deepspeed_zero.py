"""A DeepSpeed ZeRO checkpoint, as the Hugging Face Trainer writes it, as a source for `hf-to-mcore`.

    checkpoint-500/                  HF_DIR: the directory the user passes
        config.json                  the model's HF config (architecture, shape)
        latest                       "global_step500": the tag to read
        global_step500/
            zero_pp_rank_{r}_mp_rank_00_model_states.pt     per DP rank: buffers, parameter shapes
            *zero_pp_rank_{r}_mp_rank_00_optim_states.pt    per DP rank: its fp32 master partition
        tokenizer.* ...

DeepSpeed's own loader (`deepspeed.utils.zero_to_fp32`) assembles the fp32 master weights of ZeRO
stage 1, 2 or 3 into one state dict named like the HF model's parameters; `ZeroCheckpoint` serves it
through the same small interface as `SafetensorsDir` (keys, `in`, get), so the import rules do not
care where the tensors come from. The fp32 masters are the trained weights exactly: they are
preferred over any 16-bit `model.safetensors` saved beside them. Every converting process holds the
whole fp32 state dict in memory, so convert large models at --tp 1 --pp 1 (our checkpoints reshard
on load).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from alfred_train.errors import ConfigError

log = logging.getLogger("alfred_train")
TAG = re.compile(r"global_step\d+")


def zero_tags(path: Path) -> list[str]:
    """The `global_step*` subdirectories holding ZeRO model-state shards, oldest first."""
    tags = [p.name for p in path.glob("global_step*") if TAG.fullmatch(p.name) and any(p.glob("*model_states.pt"))]
    return sorted(tags, key=lambda t: int(t[len("global_step"):]))


def is_zero_checkpoint(path: str | Path) -> bool:
    return bool(zero_tags(Path(path)))


def require_deepspeed(path: str | Path) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{path}: is a DeepSpeed ZeRO checkpoint (global_step*/ shards); reading it needs "
                          "DeepSpeed: pip install 'alfred-train[deepspeed]'")


def pick_tag(path: Path) -> str:
    """The tag named in `latest` (what DeepSpeed resumes from), else the only / newest global_step."""
    tags = zero_tags(path)
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag not in tags:
            raise ConfigError(f"{latest}: names {tag!r}, but {path} holds ZeRO shards only for {tags}")
        return tag
    if len(tags) > 1:
        log.warning("%s has no 'latest' file; reading the newest ZeRO checkpoint %s of %s", path, tags[-1], tags)
    return tags[-1]


class ZeroCheckpoint:
    """The fp32 weights of a ZeRO checkpoint directory, read once with DeepSpeed's zero_to_fp32."""

    def __init__(self, path: str | Path, tag: str | None = None):
        self.path = Path(path)
        self.tag = tag or pick_tag(self.path)
        require_deepspeed(self.path)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        log.info("assembling fp32 weights from the ZeRO shards in %s with DeepSpeed's zero_to_fp32",
                 self.path / self.tag)
        try:
            self._state = get_fp32_state_dict_from_zero_checkpoint(str(self.path), tag=self.tag)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ConfigError(f"{self.path / self.tag}: DeepSpeed cannot assemble this ZeRO checkpoint: {err}") from err
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch.load of a truncated or damaged shard
            first = str(err).splitlines()[0].split(". ")[0][:200] if str(err) else type(err).__name__
            raise ConfigError(f"{self.path / self.tag}: a ZeRO shard is damaged or incomplete ({first}); copy the "
                              "checkpoint again, or convert another global_step*") from None

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def get(self, name: str) -> torch.Tensor:
        if name not in self._state:
            raise ConfigError(f"{self.path / self.tag}: tensor {name!r} is missing from the ZeRO checkpoint")
        return self._state[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)
