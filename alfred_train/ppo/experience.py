"""One PPO iteration's experience: generate rollouts, score them, estimate advantages.

    prompts (this DP rank's share) --generate (policy, KV cache)--> Rollout(prompt, response)
      --score--> old_logprobs, entropy [policy], ref_logprobs [reference] (logits / temperature),
                 values [value model], scores [reward model at the response's EOD; with
                 score_on_eod an EOD is appended for scoring to a response cut without one]
      --advantages--> rewards = -beta * kl + score at the last token; GAE; whitening over DP

Every function here is collective over the model-parallel group of the models it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alfred_train.ppo import math as ppo_math
from alfred_train.ppo.generation import (SamplingParams, generate_all, score_at_eod, sequence_logprobs,
                                         sequence_values)
from alfred_train.ppo.rollout import Rollout


@dataclass(frozen=True)
class Models:
    """The four PPO models on this rank (unwrapped megatron chunks)."""

    policy: list
    value: list
    reference: list
    reward: list


def left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids (B, P), mask (B, P)) left-padded to P = width or the longest."""
    width = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    return ids, mask


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def generate_rollouts(policy, runtime, prompts: list[list[int]], params: SamplingParams, *, micro_batch: int,
                      eod_id: int, pad_id: int, vocab_size: int, seed: int, keys: list[int] | None = None,
                      continuous: bool = False, pipelined: bool = False, compiled: bool = False) -> tuple[Rollout, float]:
    """Sample one response per prompt, `micro_batch` rows decoded together; a (B, P) x (B, T) Rollout
    with P the longest prompt and T = max_new_tokens (shapes fixed for the pipeline schedule), whose
    old_logprobs are the sampler's, and the slot utilisation (useful tokens / slot-steps, over every
    DP rank: collective over the DP group too).
    keys: each prompt's key for the random stream (its global index; default its position), so a
    prompt's response depends neither on the micro-batching nor on continuous batching (on/off).
    compiled: the decode step compiled on CPU (`ppo.compile_decode`)."""
    width = max(len(p) for p in prompts)
    keys = torch.tensor(keys if keys is not None else range(len(prompts)), dtype=torch.long)
    ids, mask = left_pad(prompts, pad_id, width)
    kw = dict(eod_id=eod_id, vocab_size=vocab_size, seed=seed, pad_id=pad_id)
    chunks = [slice(0, len(prompts))] if continuous else \
        [slice(i, i + micro_batch) for i in range(0, len(prompts), micro_batch)]
    parts = [generate_all(policy, runtime, ids[c], mask[c], params, keys=keys[c], slots=micro_batch,
                          pipelined=pipelined, compiled=compiled, **kw) for c in chunks]
    n = params.max_new_tokens
    rollout = Rollout(prompt_ids=ids, prompt_mask=mask,
                      response_ids=torch.cat([_pad_right(g.response_ids.cpu(), n, pad_id) for g in parts]),
                      response_mask=torch.cat([_pad_right(g.response_mask.cpu(), n, 0) for g in parts]),
                      old_logprobs=torch.cat([_pad_right(g.logprobs.cpu(), n, 0) for g in parts]))
    # useful tokens and slot-steps summed over the DP ranks: the iteration's utilisation, not this rank's
    counts = torch.tensor([sum(float(g.response_mask.sum()) for g in parts), sum(g.slot_steps for g in parts)],
                          dtype=torch.float64)
    useful, slot_steps = ppo_math.all_reduce_sum(counts, runtime.dp_group).tolist()
    return rollout, useful / max(slot_steps, 1)


def scoring_input(rollout: Rollout, *, eod_id: int, pad_id: int, score_on_eod: bool):
    """(sequences (B, L'), attention mask (B, L'), score positions (B,), ends_with_eod (B,) bool): what
    the reward model reads. A row whose response ends at EOD is scored there. A row cut at
    max_new_tokens without EOD is scored at its last token, or, with `score_on_eod`, at an EOD
    appended for scoring (the input the RM was trained on): then L' = P + T + 1, else L' = P + T."""
    seqs, mask = rollout.sequences(), rollout.attention_mask()  # (B, P + T) each
    last = rollout.last_token_positions()  # (B,)
    ends_with_eod = (seqs.gather(1, last[:, None])[:, 0] == eod_id) & rollout.response_mask.bool().any(1)  # (B,)
    if not score_on_eod or bool(ends_with_eod.all()):
        return seqs, mask, last, ends_with_eod
    seqs = torch.nn.functional.pad(seqs, (0, 1), value=pad_id)  # (B, P + T + 1)
    mask = torch.nn.functional.pad(mask, (0, 1), value=0)
    append = ~ends_with_eod  # (B,)
    at = torch.where(append, last + 1, last)  # (B,)
    rows = append.nonzero()[:, 0]
    seqs[rows, at[rows]] = eod_id
    mask[rows, at[rows]] = 1
    return seqs, mask, at, ends_with_eod


@torch.no_grad()
def score_rollouts(models: Models, runtime, rollout: Rollout, *, micro_batch: int, vocab_size: int, eod_id: int,
                   pad_id: int, temperature: float = 1.0, score_on_eod: bool = True,
                   missing_eod_penalty: float | None = None, recompute_logprobs: bool = True):
    """Fill old_logprobs, ref_logprobs (both under logits / temperature, the sampling distribution),
    values, scores (the RM's, minus `missing_eod_penalty` for a response without EOD); also return
    the policy's entropy (B, T). recompute_logprobs=False keeps the sampler's old_logprobs (no policy
    forward); the entropy is then the per-token estimate -log p(sampled token) (its expectation is
    the entropy)."""
    seqs, mask, p = rollout.sequences(), rollout.attention_mask(), rollout.prompt_len
    if recompute_logprobs or rollout.old_logprobs is None:
        old_logprobs, entropy = sequence_logprobs(models.policy, runtime, seqs, mask, p, vocab_size=vocab_size,
                                                  micro_batch_size=micro_batch, temperature=temperature)
    else:
        old_logprobs, entropy = rollout.old_logprobs, -rollout.old_logprobs * rollout.response_mask
    ref_logprobs, _ = sequence_logprobs(models.reference, runtime, seqs, mask, p, vocab_size=vocab_size,
                                        micro_batch_size=micro_batch, temperature=temperature)
    values = sequence_values(models.value, runtime, seqs, mask, p, micro_batch_size=micro_batch)
    rm_seqs, rm_mask, at, ends_with_eod = scoring_input(rollout, eod_id=eod_id, pad_id=pad_id,
                                                        score_on_eod=score_on_eod)
    scores = score_at_eod(models.reward, runtime, rm_seqs, rm_mask, at, micro_batch_size=micro_batch).cpu()
    if missing_eod_penalty:
        scores = scores - missing_eod_penalty * (~ends_with_eod).float()  # (B,)
    cpu = torch.device("cpu")
    rollout = rollout.replace(old_logprobs=old_logprobs.to(cpu), ref_logprobs=ref_logprobs.to(cpu),
                              values=values.to(cpu), scores=scores)
    return rollout, entropy.to(cpu)


def compute_advantages(rollout: Rollout, *, kl_estimator, beta: float, gamma: float, lam: float,
                       whiten_rewards: bool, whiten_advantages: bool, dp_group) -> tuple[Rollout, torch.Tensor]:
    """Per-token rewards, GAE and (global) whitening, as in notes/rlhf-recipes.md. Returns the
    rollout with advantages/returns and the per-token KL estimate (B, T) used in the reward."""
    mask = rollout.response_mask.float()  # (B, T)
    kl = kl_estimator(rollout.old_logprobs, rollout.ref_logprobs) * mask  # (B, T)
    rewards = ppo_math.token_rewards(kl, rollout.scores, mask, beta)  # (B, T)
    if whiten_rewards:
        rewards = ppo_math.whiten(rewards, mask, group=dp_group, shift_mean=False)
    advantages, returns = ppo_math.gae(rewards, rollout.values * mask, mask, gamma, lam)  # (B, T) each
    if whiten_advantages:
        advantages = ppo_math.whiten(advantages, mask, group=dp_group) * mask
    return rollout.replace(advantages=advantages, returns=returns), kl
