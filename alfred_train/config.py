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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

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


DataFormat = Literal["auto", "records", "hh-rlhf", "oasst1", "dolly", "stack-exchange-paired"]


@dataclass(frozen=True)
class DataSource:
    """One file of a data mixture (`data.train: [{path: ..., format: ..., weight: ...}, ...]`)."""

    path: str  # .jsonl / .json (one object per line) or .parquet, as the hubs ship them
    format: Optional[DataFormat] = None  # None: data.format
    weight: float = 1.0  # copies of this file per pass: 2 = every record twice, 0.5 = a seeded half


DataFiles = Union[str, tuple[DataSource, ...]]  # one path (the form of data.format), or a mixture


@dataclass(frozen=True)
class DataConfig:
    train: Optional[DataFiles] = None  # file or mixture; None with `synthetic: true` generates the demo task
    valid: Optional[DataFiles] = None  # file or mixture; None = hold out `valid_fraction` of train
    valid_fraction: float = 0.05
    format: DataFormat = "auto"  # auto: told by each file's keys (alfred_train/data/formats.py)
    languages: tuple[str, ...] = ()  # oasst1: keep messages in these languages (Alfred: en fr de es it); () = all
    skip_bad_records: bool = False  # false: a bad record stops the run (file:line, exit 2); true: skip and count
    template: Literal["stackllama", "tulu", "vicuna", "stable-vicuna", "plain"] = "stackllama"
    seq_len: int = 64  # tokens per packed SFT sample / max tokens per RM pair member
    pack: bool = True  # SFT: concatenate examples into seq_len blocks (StackLLaMA); False pads each
    synthetic: bool = False  # generate the built-in synthetic task instead of reading files
    synthetic_size: int = 2000  # number of generated records when synthetic
    prompts: Optional[DataFiles] = None  # PPO prompt set, file or mixture (None: the contexts of data.train)


@dataclass(frozen=True)
class OptimConfig:
    # Schedule unit: optimizer steps for SFT and RM; PPO *iterations* for PPO, for the policy and the
    # value model alike (the value model's 8 steps per iteration share one rate; with ppo.value_lr
    # unset its rate at iteration k equals the policy's), as the Alfred recipe counts them.
    lr: float = 1e-3  # peak learning rate after warm-up
    min_lr: float = 1e-4  # floor reached at the end of the decay
    warmup_steps: int = 10  # steps (SFT/RM) or PPO iterations from 0 to lr
    decay_steps: Optional[int] = None  # steps or PPO iterations from 0 to the floor; None: train.max_steps
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
    # activation recomputation (megatron-core): none; selective = attention core; full = keep each
    # layer's input only and re-run the layer in the backward pass (~1/3 more compute, least memory)
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end)
    keep: int = 2  # keep the newest N checkpoints by step number (never the one just written), locally and in S3
    # auto: the newest checkpoint under run.dir/checkpoints (or s3_uri) that verifies against its manifest,
    # by step number (`latest` is only a hint); damaged ones are named and skipped; if checkpoints exist
    # but none is sound the run stops (exit 2) instead of starting over. none: start at step 0. Or a path.
    resume: str = "auto"
    init: Optional[str] = None  # checkpoint dir to initialize weights from (SFT/RM/PPO policy)
    save_final: bool = True  # save at the last step
    # s3://bucket/prefix holding iter_N/ folders: each completed checkpoint is uploaded (manifest last,
    # then verified; `keep` applies there too), and resume downloads a newer sound one from it, e.g. into
    # an empty run directory after a spot reclaim. Credentials and endpoint: boto3's usual environment.
    s3_uri: Optional[str] = None
    # run.dir is local to each node (SageMaker's /opt/ml/checkpoints on a multi-instance job): every node's
    # local rank 0 prepares and renames its own copy, which holds its ranks' files and the manifest of all;
    # `latest` moves when every node's part is complete. Resume needs every node's files in each copy
    # (from s3_uri, or SageMaker's checkpoint sync). false: run.dir is one shared directory.
    node_local: bool = False


@dataclass(frozen=True)
class WandbConfig:
    project: str = "alfred-train"
    name: Optional[str] = None  # the W&B run's display name (default: run.name, else the run dir's name)
    entity: Optional[str] = None  # team or user (default: the logged-in user's)
    mode: Literal["online", "offline"] = "online"  # offline: files under run.dir/wandb, `wandb sync` later


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    plots: bool = True  # write metrics.png at the end of the run
    wandb: Optional[WandbConfig] = None  # also send metrics.jsonl rows and the config to Weights & Biases


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
    # score_on_eod: the RM reads its score at the response's EOD; a response cut at max_new_tokens
    # without one gets an EOD appended for scoring (the input the RM was trained on). False: the
    # score is read at the last response token, whatever it is.
    score_on_eod: bool = True
    missing_eod_penalty: Optional[float] = None  # subtracted from the score of a response without EOD (TRL's missing_eos_penalty)
    max_new_tokens: int = 16  # continuation max length
    min_new_tokens: int = 0
    # max_prompt_tokens: a longer prompt keeps BOS and its last tokens (the template's answer cue) and
    # is counted in the `prompts_cut` metric. None: model.max_seq_len - max_new_tokens (- 1 for the
    # EOD appended with score_on_eod). prompt + response (+ EOD) must fit model.max_seq_len.
    max_prompt_tokens: Optional[int] = None
    # Sampling. The old/new/reference log-probs of the PPO ratio and KL use logits / temperature, the
    # distribution the rollouts were drawn from (as TRL, OpenRLHF, verl). top_k / top_p truncate the
    # sampler only: the log-probs are of the full tempered softmax, so with them on the sampled
    # tokens' probabilities are slightly understated (the same approximation those trainers make).
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    offload_frozen: bool = False  # keep reference and reward models on CPU between phases
    max_bad_steps: int = 3  # stop after this many non-finite updates in a row
    value_lr: Optional[float] = None  # None: optim.lr
    eval_prompts: int = 32  # held-out prompts scored at the start and end of the run
    samples_per_iter: int = 4  # prompt/response pairs written to samples.jsonl each iteration
    eval_tasks: tuple[str, ...] = ()  # lm-eval task names or task YAML files run on the final policy
    eval_limit: Optional[int] = None  # at most this many examples per eval task (None: all)
    # true: the scoring pass re-computes the policy's log-probs (and reports the largest difference to
    # the sampler's as logprob_gap); false: PPO uses the sampler's own log-probs, one forward fewer
    recompute_logprobs: bool = True
    # a rollout row that reaches EOD takes the iteration's next prompt at once (rollout_micro_batch rows
    # decoded together); false: static micro-batches, each held by its longest response. Same tokens.
    continuous_batching: bool = True
    # PP > 1: decode with pp row groups in flight across the stages, every stage busy (continuously
    # batched as well); false: one token through the stages at a time. Same tokens. Off by
    # default: it pays when a stage's step is compute-bound (large models); on the tiny CPU model,
    # overhead-bound, half-size groups cost as much as whole batches (bench_pp_generation.py).
    pipelined_decode: bool = False


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


def _optional_inner(tp: Any) -> Any:
    """Optional[X] -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


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
    _check(cfg.checkpoint.s3_uri is None or re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?$",
                                                     cfg.checkpoint.s3_uri) is not None,
           f"checkpoint.s3_uri: {cfg.checkpoint.s3_uri!r} is not an S3 URI of the form s3://bucket/prefix")
    _check(cfg.data.synthetic or cfg.data.train is not None or cfg.data.prompts is not None,
           "data.train: no training data; set data.train to a JSONL or Parquet file, a mixture, or data.synthetic: true")
    for key, files in [("data.train", cfg.data.train), ("data.valid", cfg.data.valid), ("data.prompts", cfg.data.prompts)]:
        if isinstance(files, tuple):
            _check(len(files) > 0, f"{key}: an empty mixture; list at least one {{path: ..., weight: ...}}")
            for i, source in enumerate(files):
                _check(source.weight > 0, f"{key}[{i}].weight: must be > 0, got {source.weight}")
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
    _validate_extras(cfg)
    _validate_lora(cfg)


def _validate_extras(cfg: Config) -> None:
    """Optional packages and files the run will need, checked before any model is built."""
    import importlib.util

    if cfg.logging.wandb is not None:
        _check(importlib.util.find_spec("wandb") is not None,
               "logging.wandb: the wandb package is not installed; pip install 'alfred-train[wandb]' "
               "or remove logging.wandb")
        from alfred_train.tracking import has_credentials

        _check(cfg.logging.wandb.mode == "offline" or has_credentials(),
               "logging.wandb.mode: online needs W&B credentials (WANDB_API_KEY or `wandb login`); "
               "or set logging.wandb.mode: offline and `wandb sync` later")
    if cfg.ppo.eval_tasks:
        from alfred_train.evaluation import check_tasks

        check_tasks(cfg.ppo.eval_tasks, "ppo.eval_tasks")
        _check(cfg.checkpoint.save_final, "ppo.eval_tasks: evaluates the final checkpoint; set "
               "checkpoint.save_final: true")


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
