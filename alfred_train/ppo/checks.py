"""Everything PPO can check before a model is built: one `preflight` for `--dry-run` and the real run.

A config `--dry-run` calls valid must not fail later for a reason the config holds, so the dry run
and `stages.ppo.run` call the same function. It raises a one-line `ConfigError` (exit 2) naming the
key to change:

  * layout: one model chunk per rank (no parallel.vpp) and no sequence parallelism in rollout
    generation; an attention backend that honours the left-padding mask (sdpa, eager);
  * batches: the rollouts of one DP rank (rollouts_per_iter / dp) split into generation batches
    (rollout_micro_batch), scoring/update micro-batches (train_micro_batch) and policy / value
    mini-batches (steps_per_epoch), each mini-batch a whole number of micro-batches; the held-out
    prompts split over DP ranks into whole micro-batches;
  * lengths: prompt (max_prompt_tokens) + response (max_new_tokens) + the EOD appended for scoring
    fit model.max_seq_len;
  * ppo.eval_tasks: lm-eval knows every task name (rank 0);
  * files (read, never a model): enough prompts for one iteration after the held-out ones; the
    SFT and RM checkpoints (and the one resumed) hold the right models of this model shape
    (`stages.checkpoint_checks.check_checkpoints`); the tokenizer and the template recorded in the SFT and RM
    checkpoints equal the run's.

The dry run checks the files it can reach and says which it could not (placeholders such as
/fsx/... on a laptop, each source of a prompt mixture); the real run requires them. A path that
exists but is not a checkpoint is an error in both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alfred_train.config import Config
from alfred_train.errors import ConfigError
from alfred_train.kernels.backends import PADDING_MASK_BACKENDS

log = logging.getLogger("alfred_train")



def prompt_token_limit(cfg: Config) -> int:
    """ppo.max_prompt_tokens, or what model.max_seq_len leaves after the response (and its EOD)."""
    o = cfg.ppo
    if o.max_prompt_tokens is not None:
        return o.max_prompt_tokens
    return cfg.model.max_seq_len - o.max_new_tokens - int(o.score_on_eod)


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        _fail(msg)


def check_config(cfg: Config) -> None:
    """The checks that need nothing but the config (see the module docstring)."""
    o, p, m = cfg.ppo, cfg.parallel, cfg.model
    if p.vpp:
        _fail(f"parallel.vpp: PPO generates rollouts with one model chunk per rank; set parallel.vpp=null "
              f"(got {p.vpp})")
    if cfg.data.valid is not None:
        _fail("data.valid: PPO does not read it (its held-out prompts are the first ppo.eval_prompts distinct ones "
              "of its prompt set); remove data.valid")
    if p.sequence_parallel:
        _fail("parallel.sequence_parallel: PPO rollout generation does not support sequence parallelism; "
              "set parallel.sequence_parallel=false")
    # te (megatron's TE spec, causal mask type) and flash (causal only) ignore the padding mask:
    # left-padded rows would attend to padding, and log-probs, values and scores would be wrong.
    if m.attention_backend not in PADDING_MASK_BACKENDS + ("auto",):
        _fail(f"model.attention_backend: {m.attention_backend} ignores the padding mask PPO's left-padded "
              f"rollouts need (padded rows would attend to padding); set model.attention_backend=sdpa "
              f"(PyTorch's fused kernels with the mask) or eager")
    if o.rollouts_per_iter % p.dp:
        _fail(f"ppo.rollouts_per_iter: {o.rollouts_per_iter} is not divisible by parallel.dp ({p.dp})")
    per_rank = o.rollouts_per_iter // p.dp
    for key, size in [("ppo.rollout_micro_batch", o.rollout_micro_batch),
                      ("ppo.train_micro_batch", o.train_micro_batch)]:
        if size < 1 or per_rank % size:
            _fail(f"{key}: the {per_rank} rollouts per DP rank (ppo.rollouts_per_iter {o.rollouts_per_iter} / "
                  f"dp {p.dp}) do not split into batches of {size}; pick a divisor of {per_rank}")
    for key, steps in [("ppo.policy_steps_per_epoch", o.policy_steps_per_epoch),
                       ("ppo.value_steps_per_epoch", o.value_steps_per_epoch)]:
        if steps < 1 or per_rank % steps or (per_rank // steps) % o.train_micro_batch:
            _fail(f"{key}: the {per_rank} rollouts per DP rank do not split into {steps} mini-batches of whole "
                  f"micro-batches (ppo.train_micro_batch {o.train_micro_batch}); make rollouts_per_iter / dp a "
                  f"multiple of {steps} x {o.train_micro_batch}")
    if o.eval_prompts:
        eval_per_rank = o.eval_prompts // p.dp
        if o.eval_prompts % p.dp or eval_per_rank % min(o.train_micro_batch, eval_per_rank):
            _fail(f"ppo.eval_prompts: {o.eval_prompts} held-out prompts do not split over dp ({p.dp}) into whole "
                  f"micro-batches of ppo.train_micro_batch ({o.train_micro_batch}); use a multiple of "
                  f"{p.dp * o.train_micro_batch} (or 0 to turn held-out evaluation off)")
    if o.adaptive_kl:  # beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * rollouts_per_iter / horizon)
        _require(o.kl_coef > 0, "ppo.kl_coef: the adaptive KL controller multiplies it each iteration, so from 0 it "
                 "stays 0; set ppo.kl_coef > 0 (its starting value) or ppo.adaptive_kl: false")
        _require(o.kl_horizon > o.rollouts_per_iter / 5,
                 f"ppo.kl_horizon: {o.kl_horizon} is too short for ppo.rollouts_per_iter {o.rollouts_per_iter}: an "
                 f"iteration multiplies the KL coefficient by as little as 1 - 0.2 x {o.rollouts_per_iter} / "
                 f"{o.kl_horizon}, which is not > 0; set ppo.kl_horizon above {o.rollouts_per_iter / 5:g} (Ziegler "
               "et al. and trlx use 10000)")
    if o.missing_eod_penalty is not None and o.missing_eod_penalty < 0:
        _fail(f"ppo.missing_eod_penalty: is subtracted from the score, so it must be >= 0 (got {o.missing_eod_penalty})")
    limit = prompt_token_limit(cfg)
    eod = int(o.score_on_eod)
    eod_part = " + 1 EOD for scoring" if eod else ""
    if o.max_prompt_tokens is None and limit < 2:  # the prompt limit is what max_seq_len leaves: name the response
        _fail(f"ppo.max_new_tokens: {o.max_new_tokens} response tokens{eod_part} leave no room for a prompt of 2+ "
              f"tokens within model.max_seq_len ({m.max_seq_len}); lower it to at most "
              f"{m.max_seq_len - 2 - eod} or raise model.max_seq_len")
    if limit < 2 or limit + o.max_new_tokens + eod > m.max_seq_len:
        _fail(f"ppo.max_prompt_tokens: {limit} prompt + {o.max_new_tokens} response tokens{eod_part} exceed "
              f"model.max_seq_len ({m.max_seq_len}) or leave no room for a prompt; lower ppo.max_prompt_tokens "
              f"or ppo.max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Files: prompts and the SFT / RM checkpoints


@dataclass(frozen=True)
class Prompts:
    """Encoded prompts: `train` for the iterations, `held_out` for evaluation; `cut` holds the
    indices into `train` of prompts longer than ppo.max_prompt_tokens (kept: BOS + last tokens)."""

    train: list[list[int]]
    held_out: list[list[int]]
    cut: frozenset[int]


def load_prompts(cfg: Config, tokenizer) -> Prompts:
    """ppo.eval_prompts distinct prompts are held out (`mixture.load_prompts`); the rest must fill
    one iteration."""
    from alfred_train.data import mixture, synthetic
    from alfred_train.data.datasets import encode_prompt
    from alfred_train.data.records import parse_prompt
    from alfred_train.data.templates import get_template

    d, o = cfg.data, cfg.ppo
    if d.prompts or d.train:  # data.prompts, else the contexts of data.train
        train, held = mixture.load_prompts(d, cfg.train.seed, o.eval_prompts)
        source = "data.prompts" if d.prompts else "data.train"
        if len(held) < o.eval_prompts:
            _fail(f"ppo.eval_prompts: {source} holds {len(held)} distinct prompts, fewer than the {o.eval_prompts} "
                  "to hold out; lower ppo.eval_prompts or add prompts")
    elif d.synthetic:  # the demo task has 8 distinct prompts: its held-out ones repeat training prompts
        records = [parse_prompt(r, f"synthetic:{i}") for i, r in
                   enumerate(synthetic.make_prompts(d.synthetic_size + o.eval_prompts, cfg.train.seed))]
        train, held = records[o.eval_prompts:], records[:o.eval_prompts]
        source = "the synthetic prompts"
    else:
        raise ConfigError("data.prompts: PPO needs a prompt set (a file, a mixture, data.train or data.synthetic: true)")
    if len(train) < o.rollouts_per_iter:
        _fail(f"ppo.rollouts_per_iter: {source} leaves {len(train)} training prompts after the {len(held)} held out "
              f"(ppo.eval_prompts) and their copies, fewer than one iteration's {o.rollouts_per_iter}; add prompts "
              "or lower ppo.rollouts_per_iter / ppo.eval_prompts")
    records = held + train
    template, limit = get_template(d.template), prompt_token_limit(cfg)
    encoded, cut = [], set()
    for i, r in enumerate(records):
        full = encode_prompt(tokenizer, template, r.context, 2 ** 62)  # BOS + every prompt token
        if len(full) > limit:
            full = encode_prompt(tokenizer, template, r.context, limit)  # BOS + the last tokens
            if i >= o.eval_prompts:
                cut.add(i - o.eval_prompts)
        encoded.append(full)
    if cut:
        log.warning("%d of %d training prompts are longer than ppo.max_prompt_tokens (%d): each keeps BOS and "
                    "its last tokens (metric prompts_cut counts them per iteration)", len(cut),
                    len(records) - o.eval_prompts, limit)
    return Prompts(encoded[o.eval_prompts:], encoded[:o.eval_prompts], frozenset(cut))


def check_checkpoints(cfg: Config, tokenizer, tokenizer_path: str, *, required: bool) -> list[str]:
    """Every checkpoint the run loads (ppo.policy_init, ppo.reward_init, the one it resumes) holds
    the right models of this model shape, trained with this run's tokenizer and template
    (`stages.checkpoint_checks.check_checkpoints`). Returns what could not be checked (only when not
    `required`, i.e. the dry run)."""
    from alfred_train.stages import checkpoint_checks, common

    o = cfg.ppo
    if not o.policy_init or not o.reward_init:
        _fail("ppo.policy_init and ppo.reward_init: PPO starts from an SFT and an RM checkpoint; set both")
    return checkpoint_checks.check_checkpoints(cfg, "ppo", common.shape_for(cfg, tokenizer), required=required)[1]


def unreachable_prompts(cfg: Config) -> list[str]:
    """The prompt files (data.prompts, else data.train; each source of a mixture, each a path or a
    glob) that do not exist here: the dry run notes them and checks the prompts only without any."""
    from alfred_train.data import mixture

    d = cfg.data
    if d.prompts is not None:
        return mixture.unreachable(d.prompts, d.format, "data.prompts")
    return [] if d.synthetic else mixture.unreachable(d.train, d.format, "data.train")


def preflight(cfg: Config, *, dry_run: bool, main: bool = True):
    """All of PPO's checks, in the order a run meets them; nothing is built. Returns (tokenizer,
    Prompts, notes on what the dry run could not reach). main=False (a rank other than 0) skips
    the lm-eval task names, which rank 0 checks for every rank."""
    from alfred_train.stages.common import tokenizer_for, tokenizer_path

    check_config(cfg)
    if cfg.ppo.eval_tasks and main:  # before training: a misspelt task must not wait for the run's end
        from alfred_train.eval_tasks import check_task_names

        check_task_names(cfg.ppo.eval_tasks, "ppo.eval_tasks")
    path = tokenizer_path(cfg)
    if dry_run and not Path(path).exists():  # what is checked with the tokenizer is named, not passed over
        from alfred_train.stages.checkpoint_checks import checkpoints_to_load

        return None, None, [
            f"model.tokenizer: {path} is not reachable here: the prompts and the checkpoints' tokenizer are "
            "checked when the run starts, before any model is built",
            *(f"{use.key}: {use.where}: its shape and tokenizer are checked against model.tokenizer's when the "
              "run starts" for use in checkpoints_to_load(cfg, "ppo")),
            *(f"{m} is not reachable here: the prompts' number and lengths are checked when the run starts"
              for m in unreachable_prompts(cfg))]
    tokenizer = tokenizer_for(cfg)
    notes = check_checkpoints(cfg, tokenizer, path, required=not dry_run)
    missing = unreachable_prompts(cfg) if dry_run else []
    if missing:
        return tokenizer, None, notes + [f"{m} is not reachable here: the prompts' number and lengths are checked "
                                         "when the run starts" for m in missing]
    return tokenizer, load_prompts(cfg, tokenizer), notes
