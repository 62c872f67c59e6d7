"""Forward steps for the PPO policy and value updates (megatron-core schedule signature).

Each micro-batch is a scored `Rollout`. The loss function returns the micro-batch's token *sum*
and its token count; `Trainable.step` (calculate_per_token_loss) divides the gradients by the
token count of the global mini-batch, so the update is the token mean over the whole mini-batch
across micro-batches and DP ranks, as notes/rlhf-recipes.md asks.
"""

from __future__ import annotations

from functools import partial

import torch

from alfred_train.ppo import math as ppo_math
from alfred_train.ppo.generation import attention_mask_for, position_ids_from_mask, response_logprobs


def _inputs(rollout, device):
    seqs = rollout.sequences().to(device)  # (b, L)
    real = rollout.attention_mask().to(device)  # (b, L)
    return seqs, position_ids_from_mask(real), attention_mask_for(real, seqs.shape[1])


def policy_forward_step(runtime, *, clip: float, vocab_size: int, temperature: float = 1.0):
    """New log-probs under logits / temperature: the distribution old_logprobs were scored with."""
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        seqs, positions, mask = _inputs(mb, runtime.device)
        logits = model(seqs, positions, mask)  # (b, L, V/tp)
        return logits, partial(_policy_loss, mb.to(runtime.device))

    def _policy_loss(mb, logits):
        logprobs, entropy = response_logprobs(logits, mb.response_ids, mb.prompt_len, runtime, vocab_size,
                                              temperature)
        mask = mb.response_mask.float()  # (b, T)
        loss, stats = ppo_math.policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, clip, num_tokens=1.0)
        tokens = mask.sum()
        report = {"loss": loss.detach(), "tokens": tokens, "clipfrac": stats.clipfrac,
                  "approx_kl": stats.approx_kl, "entropy": (entropy.detach() * mask).sum(),
                  "ratio": ((logprobs.detach() - mb.old_logprobs).exp() * mask).sum()}  # pi / pi_old
        return loss, tokens.to(torch.int), report

    return forward_step


def value_forward_step(runtime, *, clip: float):
    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        seqs, positions, mask = _inputs(mb, runtime.device)
        scores = model(seqs, positions, mask)  # (b, L, 1)
        return scores, partial(_value_loss, mb.to(runtime.device))

    def _value_loss(mb, scores):
        values = mb.response_logits(scores)[..., 0].float()  # (b, T)
        mask = mb.response_mask.float()  # (b, T)
        loss, stats = ppo_math.value_loss(values, mb.values, mb.returns, mask, clip, num_tokens=1.0)
        tokens = mask.sum()
        return loss, tokens.to(torch.int), {"loss": loss.detach(), "tokens": tokens, "clipfrac": stats.clipfrac}

    return forward_step


def minibatch_rows(batch: int, num_minibatches: int, *, first_row: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This rank's row indices of each of the epoch's `num_minibatches` mini-batches: (batch / k,) each.

    The rank holds global rows first_row .. first_row + batch - 1 of the iteration (DP ranks hold
    contiguous shares of the global batch). Global rows are dealt in aligned groups of
    k = num_minibatches consecutive rows (k divides every rank's share, so no group spans two ranks):
    each group gives one row to each mini-batch, by a permutation drawn from (seed, epoch, group).
    Mini-batch j, united over the DP ranks, is thus the same set of global rows at any DP size, and
    its token-mean update equals the one-process run's.
    """
    k = num_minibatches
    rows: list[list[int]] = [[] for _ in range(k)]
    for g in range(batch // k):
        group = first_row // k + g
        key = ((seed * 1_000_003 + epoch) * 1_000_003 + group) % (2 ** 63)
        for j, mini in enumerate(torch.randperm(k, generator=torch.Generator().manual_seed(key)).tolist()):
            rows[mini].append(g * k + j)
    return [torch.tensor(r, dtype=torch.long) for r in rows]
