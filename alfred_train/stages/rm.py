"""Reward modelling: a scalar-head model trained on preference pairs with the Bradley-Terry loss.

For a pair (chosen c, rejected r) of responses to one prompt, the model scores each sequence
[BOS] prompt response EOD at its EOD token: r_c, r_r. The loss is the negative log-likelihood of
"c is preferred" under Bradley-Terry,

    loss = -log sigmoid(r_c - r_r),

averaged over the pairs of the global batch (pair count = the "tokens" of `training.Trainable`).
Reported with it: accuracy = mean [r_c > r_r] and margin = mean (r_c - r_r).

The trunk (embedding, decoder layers, final norm) starts from an SFT checkpoint's policy
(`rm.init`); the scalar head starts from the seeded init (weight ~ N(0, init_std), bias 0). The
checkpoint's model is named "reward"; PPO builds its frozen reward model and its trainable value
model from it.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F

from alfred_train.config import Config
from alfred_train.data import synthetic
from alfred_train.data.datasets import encode_preference
from alfred_train.data.packing import PaddedBatch, collate_pairs
from alfred_train.data.records import parse_preference
from alfred_train.data.sampler import check_enough, iterate_batches
from alfred_train.data.templates import get_template
from alfred_train.errors import ConfigError
from alfred_train.parallel.init import ParallelRuntime
from alfred_train.models import lora_checkpoint
from alfred_train.stages import checkpoint_checks, common, supervised
from alfred_train.training import Trainable, reduce_reports, run_schedule

log = logging.getLogger("alfred_train")
MODEL_NAME = "reward"
TRUNK_SOURCE = "policy"  # the SFT checkpoint's language model
HEAD = "output_layer"  # the LM's vocabulary projection; the scalar head here, not loaded from SFT

EncodedPair = tuple[list[int], list[int]]  # (chosen_ids, rejected_ids), each ending at EOD


# ---------------------------------------------------------------------------------------------
# The math (pure).

def bradley_terry_sums(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over B pairs of the pairwise loss, the correct-order count and the margin.

    scores: (2B,) float, rows 0..B-1 score the chosen responses r_c, rows B..2B-1 the rejected r_r.
    margin_i = r_c,i - r_r,i                                      (B,)
    loss_sum = sum_i -log sigmoid(margin_i)   (= softplus(-margin_i), stable for any margin)
    correct  = sum_i [margin_i > 0]           (a tie counts as wrong)
    margin_sum = sum_i margin_i
    """
    chosen, rejected = scores.float().chunk(2)  # (B,), (B,)
    margin = chosen - rejected  # (B,)
    return -F.logsigmoid(margin).sum(), (margin > 0).sum().float(), margin.sum()


def scores_at_eod(scores: torch.Tensor, eod_index: torch.Tensor) -> torch.Tensor:
    """scores (b, S, 1) from the scalar head, eod_index (b,) -> each row's score at its EOD: (b,)."""
    return scores[..., 0].float().gather(1, eod_index[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Data.

def load_preference_pairs(cfg: Config):
    """(train, valid) PreferencePair lists from data files or the synthetic task."""
    return common.load_records(cfg, synthetic.make_preference_pairs, parse_preference, "preference")


def prepare_data(cfg: Config, tokenizer) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, valid) encoded pairs, as the run trains on them; a bad record or a train set smaller
    than one global batch is refused here, before any model is built. The dry run calls it too."""
    train_pairs, valid_pairs = load_preference_pairs(cfg)
    encode = partial(encode_preference, tokenizer, get_template(cfg.data.template), max_len=cfg.data.seq_len)
    train_set, valid_set = _distinct(cfg, [encode(p) for p in train_pairs], "training"), \
        _distinct(cfg, [encode(p) for p in valid_pairs], "held-out")
    check_enough(len(train_set), cfg.train.global_batch_size, 0 if cfg.data.valid else cfg.data.valid_fraction)
    return train_set, valid_set


def _distinct(cfg: Config, pairs: list[EncodedPair], what: str) -> list[EncodedPair]:
    """The pairs whose chosen and rejected sequences differ. Equal ones (equal responses, or a prompt
    that fills data.seq_len, so both are cut to the same tokens) teach nothing and score a tie, which
    counts as wrong: left out and counted; refused when none is left."""
    kept = [pair for pair in pairs if pair[0] != pair[1]]
    seq_len = cfg.data.seq_len
    if pairs and not kept and all(len(chosen) < seq_len for chosen, _ in pairs):
        raise ConfigError(f"data: every {what} pair has the same chosen and rejected response; check the files' "
                          "chosen/rejected fields (or data.format)")
    if pairs and not kept:
        raise ConfigError(f"data.seq_len: every {what} pair reads the same for chosen and rejected once cut to "
                          f"data.seq_len ({seq_len}) tokens (or has equal responses); raise data.seq_len")
    if cut := sum(len(chosen) == seq_len or len(rejected) == seq_len for chosen, rejected in kept):
        log.warning("%d of %d %s pairs fill data.seq_len (%d tokens): their responses are cut there and scored "
                    "cut (raise data.seq_len to keep more of them)", cut, len(kept), what, seq_len)
    if len(kept) < len(pairs):
        log.warning("%d of %d %s pairs left out: chosen and rejected are the same tokens once cut to data.seq_len "
                    "(%d): equal responses, or a prompt that fills it (raise data.seq_len to keep those)",
                    len(pairs) - len(kept), len(pairs), what, cfg.data.seq_len)
    return kept


def micro_batches(pairs: list[EncodedPair], indices: list[int], micro_batch_size: int, tokenizer,
                  seq_len: int) -> list[PaddedBatch]:
    """Consecutive groups of `micro_batch_size` pairs, each a (2b, seq_len) PaddedBatch."""
    return [collate_pairs([pairs[i] for i in indices[k:k + micro_batch_size]], tokenizer.pad_id,
                          tokenizer.eod_id, seq_len=seq_len)
            for k in range(0, len(indices), micro_batch_size)]


# ---------------------------------------------------------------------------------------------
# Forward step (megatron-core schedule contract).

def rm_forward_step(data_iterator, model):
    """Scores (2b, S, 1) of one micro-batch of b pairs; the loss function reduces them at EOD."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    ids = batch.ids.to(device)  # (2b, S)
    position_ids = torch.arange(ids.shape[1], device=device).expand_as(ids)  # (2b, S)
    scores = model(ids, position_ids, None)  # (2b, S, 1) on the last stage
    return scores, partial(_pair_loss, batch.eod_index.to(device))


def _pair_loss(eod_index, scores):
    loss_sum, correct, margin_sum = bradley_terry_sums(scores_at_eod(scores, eod_index))
    pairs = torch.tensor(eod_index.shape[0] // 2, dtype=torch.int, device=eod_index.device)
    return loss_sum, pairs, {"loss": loss_sum.detach(), "tokens": pairs.float(),
                             "correct": correct.detach(), "margin": margin_sum.detach()}


# ---------------------------------------------------------------------------------------------
# The stage.

def _init_checkpoint(cfg: Config, shape):
    """(path, meta) of `rm.init` (or `checkpoint.init`), refused unless it holds an SFT policy or an
    RM of this model shape (`checkpoint_checks.checked`)."""
    use, = checkpoint_checks.init_uses(cfg, "rm")
    return checkpoint_checks.checked(cfg, use, shape, required=True)


def init_from(cfg: Config, chunks, shape) -> None:
    """Load the trunk of `rm.init` (or `checkpoint.init`): an SFT policy (head skipped) or an RM."""
    path, meta = _init_checkpoint(cfg, shape)
    if TRUNK_SOURCE in meta["models"]:
        common.load_full(chunks, path, TRUNK_SOURCE, MODEL_NAME, skip=(HEAD,))
    else:
        common.load_full(chunks, path, MODEL_NAME, MODEL_NAME)
    log.info("reward model initialized from %s", path)


def lora_base_ref(cfg: Config, shape):
    """The frozen base of a LoRA reward model: an SFT policy's trunk (the head trains from its seeded
    init) or an RM (head included, trainable)."""
    path, meta = _init_checkpoint(cfg, shape)
    if TRUNK_SOURCE in meta["models"]:
        return lora_checkpoint.base_ref(path, TRUNK_SOURCE, skip=(HEAD,))
    return lora_checkpoint.base_ref(path, MODEL_NAME)


def run(cfg: Config, runtime: ParallelRuntime) -> int:
    t = cfg.train
    tokenizer = common.tokenizer_for(cfg)
    train_set, valid_set = prepare_data(cfg, tokenizer)  # bad data stops the run before any model is built
    shape = common.shape_for(cfg, tokenizer)
    init = supervised.Init(given=bool(cfg.rm.init or cfg.checkpoint.init),
                           load=lambda chunks: init_from(cfg, chunks, shape), lora_base=lambda: lora_base_ref(cfg, shape))
    started = supervised.start(cfg, runtime, "rm", shape, model_name=MODEL_NAME, kind="scalar", init=init)
    trainable = started.trainable
    valid_batches = _valid_batches(valid_set, cfg, runtime, tokenizer)

    def one_step(indices):
        mbs = micro_batches(train_set, indices, t.micro_batch_size, tokenizer, cfg.data.seq_len)
        return trainable.step(mbs, rm_forward_step, seq_len=cfg.data.seq_len, micro_batch_size=2 * t.micro_batch_size)

    def row(result, seconds):
        return {"loss": result.loss, "accuracy": result.reports["correct"], "margin": result.reports["margin"],
                "lr": result.lr, "grad_norm": result.grad_norm, "pairs_per_s": t.global_batch_size / seconds}

    positions = iterate_batches(len(train_set), t.global_batch_size, runtime.dp_rank, cfg.parallel.dp, t.seed,
                                started.consumed)
    return supervised.train(
        cfg, runtime, started, "rm", one_step=one_step, row=row,
        batches=((position, position.indices) for position in positions),
        evaluate=(lambda: evaluate(trainable, valid_batches, cfg, runtime)) if valid_batches else None,
        plotted=["loss", "valid_loss", "accuracy", "valid_accuracy", "margin", "lr"])


def _valid_batches(valid_set, cfg: Config, runtime: ParallelRuntime, tokenizer) -> list:
    """The held-out micro-batches this rank evaluates; [] (with a warning) when the split cannot fill
    one evaluation: the RM still trains, only the valid_* metrics are missing (as SFT's valid_loss)."""
    if not valid_set:
        return []
    try:
        indices = common.eval_indices(len(valid_set), cfg, runtime.dp_rank)
    except ConfigError as err:
        if runtime.is_main:
            log.warning("no valid_accuracy: %s", err)
        return []
    return micro_batches(valid_set, indices, cfg.train.micro_batch_size, tokenizer, cfg.data.seq_len)


@torch.no_grad()
def evaluate(trainable: Trainable, batches: list[PaddedBatch], cfg: Config, runtime: ParallelRuntime) -> dict:
    """valid_loss, valid_accuracy, valid_margin: means over the held-out pairs of `batches` (all DP ranks)."""
    trainable.eval()
    reports = run_schedule(trainable.chunks, batches, rm_forward_step, seq_len=cfg.data.seq_len,
                           micro_batch_size=2 * cfg.train.micro_batch_size, forward_only=True)
    sums = reduce_reports(reports, runtime)
    n = max(sums["tokens"], 1.0)
    return {"valid_loss": sums["loss"] / n, "valid_accuracy": sums["correct"] / n,
            "valid_margin": sums["margin"] / n}
