"""Run configuration: one YAML file -> frozen dataclasses, strict at every depth.

The schema (one dataclass per section, every field documented where it is declared) is
`config_schema.py`, re-exported here; the checks across fields are `config_checks.py`. The loader
rejects unknown keys and wrong types with a one-line `ConfigError` that names the key path;
`a.b.c=value` command-line overrides go through the same path (the value is parsed as YAML, so
`optim.lr=1e-5`, `train.max_steps=4`, `data.template=tulu` all work).

`model.preset: NAME` fills the model section from `configs/presets/NAME.yaml`; keys given in the
run's own `model:` mapping win over the preset.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from alfred_train.config_checks import validate
from alfred_train.config_schema import (LORA_TARGETS, CheckpointConfig, Config, DataConfig, DataFiles,  # noqa: F401
                                        DataFormat, DataSource, LoggingConfig, LoRAConfig, ModelConfig, OptimConfig,
                                        ParallelConfig, PPOConfig, RMConfig, RunConfig, TrainConfig, WandbConfig)
from alfred_train.errors import ConfigError


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_name(tp: Any) -> str:
    return _TYPE_WORDS.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. data.train: a path or a list of sources; the value's shape picks
            is_list = isinstance(value, (list, tuple))
            inner = [a for a in inner if (typing.get_origin(a) in (tuple, list)) == is_list] or inner
        return _convert(inner[0], value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        if vt is str:  # environment-style mappings: YAML scalars (1, true) are their text
            value = {k: str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v
                     for k, v in value.items()}
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (et, *_) = typing.get_args(tp)
        return tuple(_convert(et, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # .inf, 1e400, .nan
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected a string, got {value!r} (YAML reads an unquoted number as a "
                          "number, and a time like 12:00:00 as its seconds, 43200: quote the value)")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


MOVED = {"ppo.max_bad_steps": "train.max_bad_steps"}  # key -> where it is now


def _unknown_key(where: str, valid, override: str = "") -> ConfigError:
    if where in MOVED:
        return ConfigError(f"{where}: moved to {MOVED[where]}; rename it")
    there = f" in override {override!r}" if override else ""
    listed = f" (valid keys here: {', '.join(sorted(valid))})" if valid else ""
    return ConfigError(f"{where}: unknown key{there}{listed}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(f"{path}.{key}" if path else str(key), names)
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _optional_inner(tp: Any) -> Any:
    """Optional[X] -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _override_value(override: str, raw: str) -> Any:
    """The YAML value of `key=raw`; empty is null. A value that is not YAML names the override."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem}); "
                          "fix it, or quote it to pass a string") from None


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in nested dict `data`; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. optim.lr=1e-5")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node, cls = data, Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise _unknown_key(".".join(parts[: i + 1]), hints, override)
        if i == len(parts) - 1:
            node[part] = _override_value(override, raw)
        else:
            cls = _optional_inner(hints[part])  # logging.wandb.project=x reaches into Optional[WandbConfig]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping")


def preset_path(name: str) -> Path:
    return Path(str(importlib.resources.files("alfred_train.configs"))) / "presets" / f"{name}.yaml"


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def default_run_dir(data: dict, path: Path) -> None:
    """Set run.dir to runs/<config file stem> when the file sets none: two configs never share one."""
    run = data.setdefault("run", {})
    if isinstance(run, dict) and not run.get("dir"):
        run["dir"] = f"runs/{path.stem}"


def load_dict(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The raw nested dict of a run: file, then preset expansion, then overrides."""
    data = _read_yaml(Path(path), "config") if path else {}
    for ov in overrides:
        apply_override(data, ov)
    if path:
        default_run_dir(data, Path(path))
    model = data.get("model") or {}
    if isinstance(model, dict) and model.get("preset"):
        pfile = preset_path(str(model["preset"]))
        if not pfile.exists():
            names = sorted(p.stem for p in pfile.parent.glob("*.yaml"))
            raise ConfigError(f"model.preset: no preset {model['preset']!r} (known: {', '.join(names)})")
        data["model"] = {**_read_yaml(pfile, "model.preset"), **model}
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), *, here: bool = True) -> Config:
    """here=False: a config for another machine (a SageMaker job's, its paths in the container):
    the files it names are not read."""
    cfg = from_dict(Config, load_dict(path, overrides))
    validate(cfg, here=here)
    return cfg


def default_config_path() -> Path:
    """The embedded default recipe (tiny SFT, runs on CPU)."""
    return Path(str(importlib.resources.files("alfred_train.configs"))) / "tiny-sft.yaml"

def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
