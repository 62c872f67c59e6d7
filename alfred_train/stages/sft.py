"""Supervised fine-tuning: packed prompt/response data, loss on response tokens only."""

from __future__ import annotations

import logging
from functools import partial

import torch

from alfred_train.config import Config
from alfred_train.data import synthetic
from alfred_train.data.records import parse_sft
from alfred_train.data.sampler import check_enough
from alfred_train.data.sft_dataset import NoResponseTokens, SFTDataset
from alfred_train.data.templates import get_template
from alfred_train.errors import ConfigError
from alfred_train.parallel.init import ParallelRuntime
from alfred_train.models import lora_checkpoint
from alfred_train.stages import common, supervised
from alfred_train.training import Trainable, reduce_reports, run_schedule

log = logging.getLogger("alfred_train")
MODEL_NAME = "policy"  # SFT checkpoints hold the policy that PPO starts from


def load_sft_examples(cfg: Config):
    """(train, valid) SFT example lists from data files or the synthetic task."""
    return common.load_records(cfg, synthetic.make_sft_records, parse_sft, "sft")


def prepare_data(cfg: Config, tokenizer) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, valid) SFTDatasets (valid None without held-out examples), as the run trains on them;
    a bad record or a train set smaller than one global batch is refused here, before any model is
    built. The dry run calls it too."""
    d, t = cfg.data, cfg.train
    train_ex, valid_ex = load_sft_examples(cfg)
    template = get_template(d.template)
    try:
        train_set = SFTDataset.build(train_ex, tokenizer, template, d.seq_len, d.pack, t.seed)
    except ConfigError as err:
        if d.valid or not len(valid_ex) or isinstance(err, NoResponseTokens):
            raise
        raise ConfigError(f"{err}, or lower data.valid_fraction ({d.valid_fraction:g}: {len(valid_ex)} of "
                          f"{len(train_ex) + len(valid_ex)} examples held out)") from None
    valid_set = None
    if len(valid_ex):
        try:
            valid_set = SFTDataset.build(valid_ex, tokenizer, template, d.seq_len, d.pack, t.seed)
        except ConfigError as err:
            if d.valid:
                raise ConfigError(f"data.valid: the held-out examples: {err}") from None
            # a split too small for one row (a small data set at the default fraction): trains, without valid_loss
            why = ("the prompt of each fills data.seq_len (%d), no response token is left to score; training goes "
                   "on without valid_loss (raise data.seq_len)" if isinstance(err, NoResponseTokens) else
                   "too few held-out tokens for one row of data.seq_len (%d); training goes on without valid_loss "
                   "(raise data.valid_fraction, or set it to 0 to train on them too)")
            log.warning("data.valid_fraction (%g: %d examples): " + why, d.valid_fraction, len(valid_ex), d.seq_len)
    for name, built, n in [("training", train_set, len(train_ex)), ("held-out", valid_set, len(valid_ex))]:
        if built is not None and built.no_loss:
            log.warning("%d of %d %s examples left out: their prompt fills data.seq_len (%d tokens), no response "
                        "token is left to train on (raise data.seq_len to keep them)", built.no_loss, n, name, d.seq_len)
        if built is not None and built.cut:
            log.warning("%d of %d %s examples are longer than data.seq_len + 1 (%d tokens) and are cut there: the rest "
                        "of their response is not trained on (raise data.seq_len to keep more)", built.cut, n, name,
                        d.seq_len + 1)
    check_enough(len(train_set), t.global_batch_size, 0 if d.valid else d.valid_fraction)
    return train_set, valid_set


def lm_forward_step(data_iterator, model):
    """megatron-core forward step: per-token LM loss, summed over response tokens."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)  # (b, S)
    losses = model(tokens, batch.position_ids.to(device), None, labels=batch.labels.to(device))  # (b, S)
    return losses, partial(_lm_loss, batch.loss_mask.to(device))


def _lm_loss(loss_mask, losses):
    loss_sum = (losses.float() * loss_mask).sum()
    tokens = loss_mask.sum().to(torch.int)
    return loss_sum, tokens, {"loss": loss_sum.detach(), "tokens": tokens.detach().float()}


def micro_batches(rows, micro_batch_size: int) -> list:
    return [rows.select(range(i, min(i + micro_batch_size, len(rows))))
            for i in range(0, len(rows), micro_batch_size)]


def run(cfg: Config, runtime: ParallelRuntime) -> int:
    t = cfg.train
    tokenizer = common.tokenizer_for(cfg)
    train_set, valid_set = prepare_data(cfg, tokenizer)  # bad data stops the run before any model is built
    shape = common.shape_for(cfg, tokenizer)
    init = supervised.Init(
        given=bool(cfg.checkpoint.init),
        load=lambda chunks: common.load_full(chunks, cfg.checkpoint.init, MODEL_NAME, MODEL_NAME),
        lora_base=lambda: lora_checkpoint.base_ref(cfg.checkpoint.init, MODEL_NAME))
    started = supervised.start(cfg, runtime, "sft", shape, model_name=MODEL_NAME, kind="lm", init=init)
    trainable = started.trainable
    valid_rows = _valid_rows(valid_set, cfg, runtime)

    def one_step(rows):
        return trainable.step(micro_batches(rows, t.micro_batch_size), lm_forward_step, seq_len=cfg.data.seq_len,
                              micro_batch_size=t.micro_batch_size)

    def row(result, seconds):
        return {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                "tokens_per_s": t.global_batch_size * cfg.data.seq_len / seconds}

    return supervised.train(
        cfg, runtime, started, "sft", one_step=one_step, row=row,
        batches=train_set.batches(t.global_batch_size, runtime.dp_rank, cfg.parallel.dp, t.seed, started.consumed),
        evaluate=None if valid_rows is None else lambda: {"valid_loss": evaluate(trainable, valid_rows, cfg, runtime)},
        plotted=["loss", "valid_loss", "lr", "grad_norm", "tokens_per_s"])


def _valid_rows(valid_set, cfg: Config, runtime: ParallelRuntime):
    """The held-out rows this rank evaluates, chosen before any step; None (with a warning) when the
    split cannot fill one evaluation: SFT still trains, only valid_loss is missing."""
    if valid_set is None:
        return None
    try:
        return valid_set.blocks.select(common.eval_indices(len(valid_set), cfg, runtime.dp_rank))
    except ConfigError as err:
        if runtime.is_main:
            log.warning("no valid_loss: %s", err)
        return None


@torch.no_grad()
def evaluate(trainable: Trainable, rows, cfg: Config, runtime: ParallelRuntime) -> float:
    """Token-mean loss over this rank's held-out rows (`common.eval_indices`), all DP ranks."""
    t = cfg.train
    trainable.eval()
    reports = run_schedule(trainable.chunks, micro_batches(rows, t.micro_batch_size), lm_forward_step,
                           seq_len=cfg.data.seq_len, micro_batch_size=t.micro_batch_size, forward_only=True)
    sums = reduce_reports(reports, runtime)
    return sums["loss"] / max(sums["tokens"], 1.0)

