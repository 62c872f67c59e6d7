"""Run configuration: one YAML file -> frozen dataclasses, strict at every depth.

A run's YAML has one mapping per section (`model`, `parallel`, `data`, `optim`, `train`,
`checkpoint`, `logging`, `run`, `rm`, `ppo`, `lora`, `launch`). Every field below is documented where it
is declared. The loader rejects unknown keys and wrong types with a one-line `ConfigError` that
names the key path; `a.b.c=value` command-line overrides go through the same path (the value is
parsed as YAML, so `optim.lr=1e-5`, `train.max_steps=4`, `data.template=tulu` all work).

`model.preset: NAME` fills the model section from `configs/presets/NAME.yaml`; keys given in the
run's own `model:` mapping win over the preset.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from alfred_train.errors import ConfigError
from alfred_train.launch.config import LaunchConfig


@dataclass(frozen=True)
class ModelConfig:
    preset: Optional[str] = None  # name of a file in configs/presets/ whose keys fill this section
    arch: Literal["llama", "falcon"] = "llama"  # llama: RMSNorm+SwiGLU; falcon: parallel attn+MLP, GELU
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # None: 4*hidden (falcon) or Llama's 8/3*hidden rounded to 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # key/value heads (GQA); None = one per attention head
    vocab_size: Optional[int] = None  # None: taken from the tokenizer; padded to a multiple of 128
    max_seq_len: int = 128  # longest sequence RoPE and the KV cache are sized for
    rotary_base: int = 10000
    norm_eps: float = 1e-5
    parallel_layernorms: int = 2  # falcon only: 2 = "new decoder architecture" (40B/180B), 1 = 7B
    init_std: float = 0.02  # std of the normal init of new weights (ignored when loading a checkpoint)
    attention_backend: Literal["auto", "te", "flash", "sdpa", "eager"] = "auto"
    tokenizer: Optional[str] = None  # sentencepiece .model, tokenizer.json or a dir; None = tiny shipped one


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: splits each layer's matrices over tp ranks
    pp: int = 1  # pipeline-parallel size: splits the layers into pp stages
    dp: int = 1  # data-parallel size: tp*pp*dp must equal the number of processes
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    zero: bool = False  # shard optimizer state over DP (megatron-core distributed optimizer, ZeRO-1)
    sequence_parallel: bool = False  # shard activations along the sequence in TP regions (GPU only)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo without


@dataclass(frozen=True)
class DataConfig:
    train: Optional[str] = None  # JSONL file; None with `synthetic: true` generates the demo task
    valid: Optional[str] = None  # JSONL file; None = hold out `valid_fraction` of train
    valid_fraction: float = 0.05
    template: Literal["stackllama", "tulu", "vicuna", "plain"] = "stackllama"
    seq_len: int = 64  # tokens per packed SFT sample / max tokens per RM pair member
    pack: bool = True  # SFT: concatenate examples into seq_len blocks (StackLLaMA); False pads each
    synthetic: bool = False  # generate the built-in synthetic task instead of reading files
    synthetic_size: int = 2000  # number of generated records when synthetic
    prompts: Optional[str] = None  # PPO: JSONL prompt set (None with synthetic: generated prompts)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warm-up
    min_lr: float = 1e-4  # floor reached at the end of the decay
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # None: train.max_steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20  # optimizer steps (SFT/RM) or PPO iterations (PPO)
    micro_batch_size: int = 4  # samples per forward/backward on one DP rank
    global_batch_size: int = 8  # samples per optimizer step over all DP ranks (grad accumulation)
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_interval: int = 0  # evaluate every N steps (0: only at the end when there is a valid set)
    eval_batches: int = 4  # micro-batches per evaluation
    log_interval: int = 10  # without a terminal, print a progress line every N steps (metrics.jsonl: every step)


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the newest N checkpoints
    resume: str = "auto"  # auto: resume from run.dir/checkpoints/latest if present; none; or a path
    init: Optional[str] = None  # checkpoint dir to initialize weights from (SFT/RM/PPO policy)
    save_final: bool = True  # save at the last step
    s3_uri: Optional[str] = None  # also upload each checkpoint here (manifest written last)


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    plots: bool = True  # write metrics.png at the end of the run


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/tiny-sft"  # the run directory (config.yaml, metrics.jsonl, tb/, checkpoints/)
    name: Optional[str] = None


@dataclass(frozen=True)
class RMConfig:
    init: Optional[str] = None  # SFT checkpoint to initialize the reward model's trunk from
    margin_loss: bool = False  # reserved: Llama-2 style margin; plain Bradley-Terry when False


@dataclass(frozen=True)
class PPOConfig:
    policy_init: Optional[str] = None  # SFT checkpoint: policy and reference start here
    reward_init: Optional[str] = None  # RM checkpoint: reward model and value model start here
    rollouts_per_iter: int = 16  # rollouts per PPO iteration, counted globally across DP (Alfred: 1024)
    rollout_micro_batch: int = 8  # prompts generated together on one DP rank
    train_micro_batch: int = 4  # samples per forward/backward in the update phase
    policy_epochs: int = 1
    policy_steps_per_epoch: int = 1  # policy optimizer steps (mini-batches) per epoch
    value_epochs: int = 1
    value_steps_per_epoch: int = 8
    kl_coef: float = 0.01  # beta
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0  # adaptive controller target KL
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_policy: float = 0.2
    clip_value: float = 0.2
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    score_on_eod: bool = True  # no EOD in the response: score read at the last token anyway
    max_new_tokens: int = 16  # continuation max length
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    offload_frozen: bool = False  # keep reference and reward models on CPU between phases
    max_bad_steps: int = 3  # stop after this many non-finite updates in a row
    value_lr: Optional[float] = None  # None: optim.lr
    eval_prompts: int = 32  # held-out prompts scored at the start and end of the run
    samples_per_iter: int = 4  # prompt/response pairs written to samples.jsonl each iteration


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # megatron's linear layer names


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (models/lora.py) on the policy, reward and value models; the base is frozen."""

    rank: int = 0  # r of each adapter delta = (alpha / r) * B A x; 0 = off (full fine-tuning)
    alpha: float = 16.0  # scale numerator: StackLLaMA uses r = 16, alpha = 32
    dropout: float = 0.05  # dropout on the adapter's input (training only), as PEFT's lora_dropout
    # which linears get an adapter (attention only by default, as StackLLaMA's q_proj/v_proj):
    # linear_qkv (fused q/k/v), linear_proj (attention output), linear_fc1 (MLP up [gate; up]),
    # linear_fc2 (MLP down)
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp


# ---------------------------------------------------------------------------------------------
# Loading: dict -> dataclass, strict.

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
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


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
            where = ".".join(parts[: i + 1])
            valid = f" (valid keys here: {', '.join(sorted(hints))})" if hints else ""
            raise ConfigError(f"{where}: unknown key in override {override!r}{valid}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else None
        else:
            cls = hints[part]
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


def load_dict(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The raw nested dict of a run: file, then preset expansion, then overrides."""
    data = _read_yaml(Path(path), "config") if path else {}
    for ov in overrides:
        apply_override(data, ov)
    model = data.get("model") or {}
    if isinstance(model, dict) and model.get("preset"):
        pfile = preset_path(str(model["preset"]))
        if not pfile.exists():
            names = sorted(p.stem for p in pfile.parent.glob("*.yaml"))
            raise ConfigError(f"model.preset: no preset {model['preset']!r} (known: {', '.join(names)})")
        data["model"] = {**_read_yaml(pfile, "model.preset"), **model}
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    cfg = from_dict(Config, load_dict(path, overrides))
    validate(cfg)
    return cfg


def default_config_path() -> Path:
    """The embedded default recipe (tiny SFT, runs on CPU)."""
    return Path(str(importlib.resources.files("alfred_train.configs"))) / "tiny-sft.yaml"


# ---------------------------------------------------------------------------------------------
# Checks across fields: each names the key to change.

def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, val in [("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.dp", p.dp),
                     ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                     ("model.num_attention_heads", m.num_attention_heads),
                     ("train.max_steps", t.max_steps), ("train.micro_batch_size", t.micro_batch_size),
                     ("train.global_batch_size", t.global_batch_size), ("data.seq_len", cfg.data.seq_len)]:
        _check(val >= 1, f"{key}: must be >= 1, got {val}")
    if world_size is not None:
        _check(cfg.world_size == world_size,
               f"parallel: dp({p.dp}) * tp({p.tp}) * pp({p.pp}) = {cfg.world_size} != WORLD_SIZE({world_size}); "
               f"change parallel.dp/tp/pp or the number of processes")
    _check(m.hidden_size % m.num_attention_heads == 0,
           f"model.hidden_size: {m.hidden_size} is not divisible by model.num_attention_heads ({m.num_attention_heads})")
    _check(m.num_attention_heads % p.tp == 0,
           f"parallel.tp: model.num_attention_heads ({m.num_attention_heads}) is not divisible by tp ({p.tp}); "
           f"pick a tp that divides it")
    groups = m.num_query_groups or m.num_attention_heads
    _check(m.num_attention_heads % groups == 0,
           f"model.num_query_groups: {groups} does not divide model.num_attention_heads ({m.num_attention_heads})")
    _check(groups % p.tp == 0,
           f"parallel.tp: model.num_query_groups ({groups}) is not divisible by tp ({p.tp}); "
           f"pick a tp that divides the number of key/value groups")
    layers_per_rank = p.pp * (p.vpp or 1)
    _check(m.num_layers % layers_per_rank == 0,
           f"parallel.pp: model.num_layers ({m.num_layers}) is not divisible by pp ({p.pp})"
           + (f" x vpp ({p.vpp})" if p.vpp else "") + "; pick a pp that divides the layer count")
    _check(p.vpp is None or p.pp > 1, "parallel.vpp: virtual pipeline stages need parallel.pp > 1")
    micro_per_step = t.global_batch_size // max(t.micro_batch_size * p.dp, 1)
    _check(p.vpp is None or micro_per_step % p.pp == 0,
           f"parallel.vpp: the interleaved schedule needs the micro-batches per step ({micro_per_step} = "
           f"global_batch_size / (micro_batch_size x dp)) to be a multiple of pp ({p.pp})")
    _check(t.global_batch_size % (t.micro_batch_size * p.dp) == 0,
           f"train.global_batch_size: {t.global_batch_size} is not divisible by "
           f"micro_batch_size ({t.micro_batch_size}) x dp ({p.dp})")
    _check(m.arch != "falcon" or m.parallel_layernorms in (1, 2),
           f"model.parallel_layernorms: must be 1 or 2, got {m.parallel_layernorms}")
    _check(cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr ({cfg.optim.lr})")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep: must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.data.synthetic or cfg.data.train is not None or cfg.data.prompts is not None,
           "data.train: no training data; set data.train to a JSONL file or data.synthetic: true")
    _check(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel: needs parallel.tp > 1")
    o = cfg.ppo
    _check(o.rollouts_per_iter % p.dp == 0,
           f"ppo.rollouts_per_iter: {o.rollouts_per_iter} is not divisible by parallel.dp ({p.dp})")
    for key, steps in [("ppo.policy_steps_per_epoch", o.policy_steps_per_epoch),
                       ("ppo.value_steps_per_epoch", o.value_steps_per_epoch)]:
        _check(steps >= 1 and o.rollouts_per_iter % (steps * p.dp) == 0,
               f"{key}: rollouts_per_iter ({o.rollouts_per_iter}) must split into {steps} mini-batches x dp ({p.dp})")
    _check(0 < o.top_p <= 1.0, f"ppo.top_p: must be in (0, 1], got {o.top_p}")
    _check(o.temperature > 0, f"ppo.temperature: must be > 0, got {o.temperature}")
    _check(o.min_new_tokens <= o.max_new_tokens,
           f"ppo.min_new_tokens: {o.min_new_tokens} is above ppo.max_new_tokens ({o.max_new_tokens})")
    _validate_lora(cfg)


def _validate_lora(cfg: Config) -> None:
    """The layer-size check (rank <= the wrapped layer) needs the model shape: models/lora.py."""
    lo = cfg.lora
    _check(lo.rank >= 0, f"lora.rank: must be >= 0 (0 = off), got {lo.rank}")
    if not lo.rank:
        return
    for t in lo.targets:
        _check(t in LORA_TARGETS, f"lora.targets: unknown target {t!r}; megatron's linear names are "
                                  f"{', '.join(LORA_TARGETS)}")
    _check(len(lo.targets) > 0, f"lora.targets: empty; name at least one of {', '.join(LORA_TARGETS)}")
    _check(len(set(lo.targets)) == len(lo.targets), f"lora.targets: {list(lo.targets)} names a layer twice")
    _check(lo.alpha > 0, f"lora.alpha: must be > 0, got {lo.alpha}")
    _check(0.0 <= lo.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    _check(not cfg.parallel.sequence_parallel,
           "lora: adapters do not support parallel.sequence_parallel yet; set it false")
    _check(not cfg.ppo.offload_frozen,
           "ppo.offload_frozen: with lora.rank > 0 the reference and reward models are the policy and value "
           "models with adapters off (no separate copy to offload); set it false")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
