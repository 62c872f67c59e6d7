"""Checks across a run configuration's fields, before anything is built: each failure is one
`ConfigError` line naming the key to change (the CLI exits 2 with it)."""

from __future__ import annotations

import re
from typing import Optional

from alfred_train.config_schema import LORA_TARGETS, Config
from alfred_train.errors import ConfigError


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


MAX_WEIGHT = 1000  # a mixture weight is a number of copies of its source: inf overflowed in the mixer


def validate(cfg: Config, world_size: Optional[int] = None, *, here: bool = True) -> None:
    """here=False: the config of a job on another machine: the files it names are not looked at."""
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
    _check(cfg.logging.profile_step is None or 1 <= cfg.logging.profile_step <= t.max_steps,
           f"logging.profile_step: {cfg.logging.profile_step} is not a step of this run (1 .. train.max_steps = "
           f"{t.max_steps}); pick one in that range or remove it")
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
    _check(m.arch != "falcon" or m.parallel_layernorms in (1, 2),
           f"model.parallel_layernorms: must be 1 or 2, got {m.parallel_layernorms}")
    _validate_ranges(cfg)  # optim.lr > 0 first: a negative lr is its own mistake, not min_lr's
    _check(cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr ({cfg.optim.lr})")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep: must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.checkpoint.s3_uri is None or re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?$",
                                                     cfg.checkpoint.s3_uri) is not None,
           f"checkpoint.s3_uri: {cfg.checkpoint.s3_uri!r} is not an S3 URI of the form s3://bucket/prefix")
    _check(cfg.data.synthetic or cfg.data.train is not None or cfg.data.prompts is not None,
           "data.train: no training data; set data.train to a JSONL or Parquet file, a mixture, or data.synthetic: true")
    if cfg.data.synthetic and cfg.data.train is not None:  # the message names the paths: no _check
        raise ConfigError(f"data.synthetic: true generates the demo task and would ignore data.train "
                          f"({_named(cfg.data.train)}); set data.synthetic=false to train on it")
    _check(cfg.data.seq_len <= m.max_seq_len,
           f"data.seq_len: {cfg.data.seq_len} is above model.max_seq_len ({m.max_seq_len}), the positions the model "
           "is built (and exported) for; lower data.seq_len or raise model.max_seq_len")
    for key, files in [("data.train", cfg.data.train), ("data.valid", cfg.data.valid), ("data.prompts", cfg.data.prompts)]:
        _check(not isinstance(files, str) or files.strip() != "", f"{key}: an empty path; name a data file "
               "(or remove the key)")
        if isinstance(files, tuple):
            _check(len(files) > 0, f"{key}: an empty mixture; list at least one {{path: ..., weight: ...}}")
            for i, source in enumerate(files):
                _check(source.path.strip() != "", f"{key}[{i}].path: an empty path; name a data file")
                _check(0 < source.weight <= MAX_WEIGHT, f"{key}[{i}].weight: must be > 0 and at most {MAX_WEIGHT} "
                       f"(the copies of the source in the mixture), got {source.weight}")
    _check(not (p.sequence_parallel and p.tp == 1), "parallel.sequence_parallel: needs parallel.tp > 1")
    o = cfg.ppo  # how PPO's batches split over dp: ppo.checks.check_config (an SFT run at dp 3 has no rollouts)
    _check(0 < o.top_p <= 1.0, f"ppo.top_p: must be in (0, 1], got {o.top_p}")
    _check(o.temperature > 0, f"ppo.temperature: must be > 0, got {o.temperature}")
    _check(o.min_new_tokens <= o.max_new_tokens,
           f"ppo.min_new_tokens: {o.min_new_tokens} is above ppo.max_new_tokens ({o.max_new_tokens})")
    _validate_extras(cfg, here)
    _validate_lora(cfg)


def validate_stage(cfg: Config, stage: str) -> None:
    """The checks of keys only some stages read (after `validate`): SFT and RM step on
    train.global_batch_size in micro-batches of train.micro_batch_size; PPO reads neither (its
    batches are ppo.*, checked by ppo.checks) and starts from ppo.policy_init / ppo.reward_init.
    One YAML may serve several stages (a recipe's rm.init is the RM stage's), so a key that belongs
    to another stage is ignored, except checkpoint.init, which PPO would silently not load."""
    p, t = cfg.parallel, cfg.train
    if stage == "ppo":
        _check(not cfg.checkpoint.init, f"checkpoint.init: PPO does not load it ({cfg.checkpoint.init}); its policy and "
               "reference start from ppo.policy_init, its value and reward models from ppo.reward_init: set those "
               "and remove checkpoint.init")
        return
    micro_per_step = t.global_batch_size // max(t.micro_batch_size * p.dp, 1)
    _check(p.vpp is None or micro_per_step % p.pp == 0,
           f"parallel.vpp: the interleaved schedule needs the micro-batches per step ({micro_per_step} = "
           f"global_batch_size / (micro_batch_size x dp)) to be a multiple of pp ({p.pp})")
    _check(t.global_batch_size % (t.micro_batch_size * p.dp) == 0,
           f"train.global_batch_size: {t.global_batch_size} is not divisible by "
           f"micro_batch_size ({t.micro_batch_size}) x dp ({p.dp})")


def _validate_ranges(cfg: Config) -> None:
    """Single values outside the range where they mean something: refused here, not by a traceback
    (or a NaN loss, or a silent no-op) once the models are built."""
    m, o, op, d = cfg.model, cfg.optim, cfg.ppo, cfg.data
    positive = [("model.max_seq_len", m.max_seq_len), ("model.rotary_base", m.rotary_base),
                ("model.norm_eps", m.norm_eps), ("model.init_std", m.init_std), ("optim.lr", o.lr),
                ("optim.eps", o.eps), ("ppo.max_new_tokens", op.max_new_tokens), ("ppo.kl_target", op.kl_target),
                ("ppo.kl_horizon", op.kl_horizon), ("ppo.policy_epochs", op.policy_epochs),
                ("ppo.value_epochs", op.value_epochs),
                ("ppo.clip_policy", op.clip_policy), ("ppo.clip_value", op.clip_value)]
    positive += [("train.eval_batches", cfg.train.eval_batches), ("train.log_interval", cfg.train.log_interval),
                 ("train.max_bad_steps", cfg.train.max_bad_steps)]
    if d.synthetic:
        positive.append(("data.synthetic_size", d.synthetic_size))
    for key, value in [("model.vocab_size", m.vocab_size), ("model.ffn_hidden_size", m.ffn_hidden_size),
                       ("optim.decay_steps", o.decay_steps), ("ppo.value_lr", op.value_lr),
                       ("ppo.eval_limit", op.eval_limit)]:
        if value is not None:
            positive.append((key, value))
    for key, value in positive:
        _check(value > 0, f"{key}: must be > 0, got {value}")
    intervals = [("checkpoint.interval", cfg.checkpoint.interval), ("train.eval_interval", cfg.train.eval_interval)]
    for key, value in intervals:
        _check(value >= 0, f"{key}: must be >= 0 (0: at the end only), got {value}")
    for key, value in [("optim.min_lr", o.min_lr), ("optim.weight_decay", o.weight_decay),
                       ("optim.clip_grad", o.clip_grad), ("optim.warmup_steps", o.warmup_steps),
                       ("ppo.top_k", op.top_k), ("ppo.min_new_tokens", op.min_new_tokens), ("ppo.kl_coef", op.kl_coef),
                       ("ppo.eval_prompts", op.eval_prompts), ("ppo.samples_per_iter", op.samples_per_iter)]:
        _check(value >= 0, f"{key}: must be >= 0, got {value}")
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2), ("data.valid_fraction", d.valid_fraction)]:
        _check(0 <= value < 1, f"{key}: must be in [0, 1), got {value}")
    for key, value in [("ppo.gamma", op.gamma), ("ppo.lam", op.lam)]:
        _check(0 <= value <= 1, f"{key}: must be in [0, 1], got {value}")
    _check(not (cfg.rm.init and cfg.checkpoint.init and cfg.rm.init != cfg.checkpoint.init),
           f"rm.init: {cfg.rm.init} and checkpoint.init: {cfg.checkpoint.init} both name the checkpoint the reward "
           f"model starts from; keep one")


def _validate_extras(cfg: Config, here: bool = True) -> None:
    """Optional packages and files the run will need, checked before any model is built (the files
    only `here`: a SageMaker job's task files are at their container paths)."""
    import importlib.util

    if cfg.logging.wandb is not None:
        _check(importlib.util.find_spec("wandb") is not None,
               "logging.wandb: the wandb package is not installed; pip install 'alfred-train[wandb]' "
               "or remove logging.wandb")
        from alfred_train import tracking

        run_mode = tracking.mode(cfg.logging.wandb.mode)
        _check(not tracking.needs_login(run_mode) or tracking.has_credentials(),
               f"logging.wandb.mode: {run_mode} needs W&B credentials (WANDB_API_KEY or `wandb login`); "
               "or set logging.wandb.mode: offline (or WANDB_MODE=offline) and `wandb sync` later")
    if cfg.ppo.eval_tasks:
        from alfred_train.eval_tasks import check_tasks

        if here:
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


def _named(files) -> str:
    """A data.* value as a user wrote it: the path, or a mixture's paths."""
    return files if isinstance(files, str) else ", ".join(source.path for source in files)
