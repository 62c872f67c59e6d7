"""Read and write Hugging Face safetensors directories, one tensor at a time.

A Hugging Face checkpoint directory holds either
    model.safetensors                       every tensor in one file, or
    model.safetensors.index.json            {"weight_map": {tensor name: shard file name}}
    model-00001-of-0000N.safetensors ...    the shards it names.
`SafetensorsDir` opens a tensor only when asked for it (memory-mapped by the safetensors
library), so a process converting one pipeline stage reads that stage's tensors and no others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from alfred_train.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3  # transformers' own default shard size (5 GB)


def open_safetensors(path: Path):
    """`safe_open` a file (its header is read and checked here); a damaged one is a one-line ConfigError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: damaged or truncated safetensors file ({err}); "
                          "re-download it or save it again") from err


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one file (see `open_safetensors`)."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory, read lazily by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            from alfred_train.convert.hf_config import read_json

            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: has no weight_map {{tensor name: shard file}}; re-save the model")
            self._file_of = {name: self.path / fname for name, fname in weight_map.items()}
        elif (self.path / SINGLE_FILE).is_file():
            with open_safetensors(self.path / SINGLE_FILE) as f:
                self._file_of = {name: self.path / SINGLE_FILE for name in f.keys()}
        else:
            raise ConfigError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; "
                              "save the model with save_pretrained(..., safe_serialization=True)")
        self._open = {}

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        fname = self._file_of[name]
        if fname not in self._open:
            if not fname.is_file():
                raise ConfigError(f"{self.path}: shard {fname.name} named in {INDEX_FILE} does not exist")
            self._open[fname] = open_safetensors(fname)
        return self._open[fname]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from the header without loading the data."""
        return tuple(self._handle(name).get_slice(name).get_shape())


class ShardWriter:
    """Write tensors as they come: one `model.safetensors`, or shards + index past `max_shard_bytes`.

    A shard is flushed once adding the next tensor would exceed `max_shard_bytes` (a tensor larger
    than that gets a shard of its own), so at most one shard is held in memory. `close()` names the
    shards `model-0000i-of-0000N.safetensors` and writes the index; with a single shard it is
    renamed to `model.safetensors`. Used as a context manager, an exception before `close()` removes
    the hidden shards written so far (and `out_dir` if this writer made it and it is left empty).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = Path(out_dir)
        self._made_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._closed = False
        self.total_bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def abort(self) -> None:
        """Remove the shards not yet renamed into place."""
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)
        self._shards, self._pending, self._pending_bytes = [], {}, 0
        if self._made_dir and not any(self.out.iterdir()):
            self.out.rmdir()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self._shards):05d}.tmp"
        self._shards.append((path, sorted(self._pending)))  # first: `abort` removes a half-written one
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self._closed = True
        if self._pending or not self._shards:
            self._flush()
        for stale in [self.out / SINGLE_FILE, self.out / INDEX_FILE, *self.out.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)  # a previous export into the same directory
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.out / SINGLE_FILE)
            return [self.out / SINGLE_FILE]
        files, weight_map = [], {}
        for i, (tmp, names) in enumerate(self._shards):
            final = self.out / f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            os.replace(tmp, final)
            weight_map.update({n: final.name for n in names})
            files.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.out / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out / INDEX_FILE)
        return files


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: str | Path,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write `tensors` in name order (see `ShardWriter`)."""
    with ShardWriter(out_dir, max_shard_bytes) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        return writer.close()
