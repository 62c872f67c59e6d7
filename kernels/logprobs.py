"""Log-probabilities of target tokens and entropy from vocab-parallel logits, memory-lean.

Each tensor-parallel rank holds a vocabulary shard of the logits, `z[..., v0 : v0 + V/tp]`
(megatron's `ColumnParallelLinear` output layer without gather). For every token, with the
full vocabulary's log-sum-exp

    lse      = log sum_v exp(z_v)                       (all-reduce MAX, then SUM over tp_group)
    logprob  = z_target - lse                           (= -vocab_parallel_cross_entropy)
    entropy  = -sum_v p_v log p_v = lse - sum_v p_v z_v,   p_v = exp(z_v - lse)

and the gradients (g = upstream gradient of each output)

    d logprob / d z_v = 1[v == target] - p_v
    d entropy / d z_v = -p_v (log p_v + entropy)

Tokens are processed `chunk_tokens` at a time so only one chunk of shard-sized float32
temporaries is alive. Memory, for N tokens and a shard of Vs = V/tp columns:
  * forward transient:  2 x (chunk_tokens, Vs) float32 (shifted logits and their exp) + O(chunk)
  * saved for backward: 2 float32 per token (lse and entropy), plus references (no copies) to
                        `logits_shard` and `targets`, which therefore stay alive until backward.
                        (megatron's vocab_parallel_cross_entropy saves the float32 softmax instead:
                        4 * Vs bytes per token.)
  * backward:           the gradient (N, Vs) in the logits' dtype, which autograd needs anyway,
                        + 2 x (chunk_tokens, Vs) float32 transient (log p and p of one chunk)
Communication: per chunk in forward, one all-reduce MAX of (chunk,) and one SUM of (chunk, 4);
nothing in backward. Both outputs are float32 and both are differentiable (the PPO loss uses the
log-probs; an entropy bonus may use the entropy; as a metric, `.detach()` it).

All TP ranks must pass the same targets and the same number of tokens. No global megatron state
is read: the group is passed explicitly, so this runs alone under any process group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _tp_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _local_targets(targets: Tensor, vocab_start: int, shard_size: int) -> tuple[Tensor, Tensor]:
    """Targets as column indices of this shard (clamped to 0 where not owned) and ownership."""
    local = targets - vocab_start  # (N,)
    owned = (local >= 0) & (local < shard_size)  # (N,)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """(logits_shard (N, Vs), targets (N,)) -> (logprobs (N,), entropy (N,)), both float32."""

    @staticmethod
    def forward(ctx, logits_shard, targets, tp_group, vocab_start, chunk_tokens):
        ctx.set_materialize_grads(False)
        n, shard_size = logits_shard.shape
        tp_size, _ = _tp_size_rank(tp_group)
        local_idx, owned = _local_targets(targets, vocab_start, shard_size)  # (N,), (N,)
        lse = torch.empty(n, dtype=torch.float32, device=logits_shard.device)  # (N,)
        logprobs = torch.empty_like(lse)  # (N,)
        entropy = torch.empty_like(lse)  # (N,)
        misowned = torch.zeros((), dtype=torch.int64, device=logits_shard.device)
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            z = logits_shard[rows]  # (c, Vs), logits dtype
            z_max = z.max(dim=-1).values.float()  # (c,)
            if tp_size > 1:
                dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
            shifted = z - z_max[:, None]  # (c, Vs) float32 by type promotion: z - max
            target_shifted = shifted.gather(1, local_idx[rows, None]).view(-1) * owned[rows]  # (c,)
            exp = shifted.exp()  # (c, Vs) float32
            sum_exp = exp.sum(dim=-1)  # (c,)
            weighted = shifted.mul_(exp).sum(dim=-1)  # (c,) sum exp(z - max) * (z - max), in place
            del shifted, exp
            stats = torch.stack([sum_exp, weighted, target_shifted, owned[rows].float()], dim=1)
            if tp_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
            # (c, 4) columns: sum exp(z - max), sum exp*(z - max), z_target - max, ranks owning target
            sum_exp, weighted, target_shifted, owners = stats.unbind(dim=1)  # each (c,)
            log_sum_exp = sum_exp.log()  # (c,)
            lse[rows] = z_max + log_sum_exp
            logprobs[rows] = target_shifted - log_sum_exp
            entropy[rows] = log_sum_exp - weighted / sum_exp
            misowned += (owners != 1).sum()
        if misowned.item() != 0:
            raise ValueError(
                f"{misowned.item()} target ids lie outside the vocabulary [0, {shard_size * tp_size}) "
                "(an ignore index such as -100?): give every position a real token id and mask it "
                "in the loss instead"
            )
        ctx.save_for_backward(logits_shard, targets, lse, entropy)
        ctx.vocab_start, ctx.chunk_tokens = vocab_start, chunk_tokens
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        logits_shard, targets, lse, entropy = ctx.saved_tensors
        n, shard_size = logits_shard.shape
        local_idx, owned = _local_targets(targets, ctx.vocab_start, shard_size)  # (N,), (N,)
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad = torch.empty_like(logits_shard)  # (N, Vs), logits dtype
        for start in range(0, n, ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            g_lp = grad_logprobs[rows, None].float()  # (c, 1)
            log_p = logits_shard[rows] - lse[rows, None]  # (c, Vs) float32
            p = log_p.exp()  # (c, Vs)
            # dL/dz = -p * (g_lp + g_ent * (log p + H)) + g_lp * onehot(target)
            if grad_entropy is None:
                coeff = log_p.copy_(g_lp.expand_as(log_p))
            else:
                g_ent = grad_entropy[rows, None].float()  # (c, 1)
                coeff = log_p.add_(entropy[rows, None]).mul_(g_ent).add_(g_lp)
            chunk_grad = coeff.mul_(p).neg_()  # (c, Vs), in the storage of log_p
            del p
            chunk_grad.scatter_add_(1, local_idx[rows, None], g_lp * owned[rows, None])
            grad[rows] = chunk_grad
            del log_p, coeff, chunk_grad  # free before the next chunk allocates its own
        return grad, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_shard: Tensor,
    targets: Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    chunk_tokens: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy of softmax(logits), both (...,) float32, differentiable.

    logits_shard: (..., V/tp) this rank's vocabulary columns [vocab_start, vocab_start + V/tp);
                  with tp_group None (or of size 1) the full logits (..., V).
    targets:      (...,) int64 token ids in [0, V), identical on every rank of tp_group.
    vocab_start:  first vocabulary id of this shard; default tp_rank * V/tp (megatron's split).
    """
    if logits_shard.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits_shard {tuple(logits_shard.shape)} and targets {tuple(targets.shape)} disagree: "
            "logits must be (..., V/tp) for targets (...)"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    shard_size = logits_shard.shape[-1]
    if vocab_start is None:
        vocab_start = _tp_size_rank(tp_group)[1] * shard_size
    logprobs, entropy = _VocabParallelLogprobsEntropy.apply(
        logits_shard.reshape(-1, shard_size),  # (N, Vs), a view for contiguous logits
        targets.reshape(-1),  # (N,)
        tp_group,
        vocab_start,
        chunk_tokens,
    )
    return logprobs.view(targets.shape), entropy.view(targets.shape)


def vocab_parallel_logprobs(
    logits_shard: Tensor,
    targets: Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    chunk_tokens: int = 1024,
) -> Tensor:
    """log softmax(z)[target], (...,) float32; equals -megatron vocab_parallel_cross_entropy."""
    return vocab_parallel_logprobs_and_entropy(
        logits_shard, targets, tp_group, vocab_start, chunk_tokens
    )[0]


def vocab_parallel_entropy(
    logits_shard: Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: int = 1024,
) -> Tensor:
    """Entropy -sum p log p of softmax(z) over the full vocabulary, (...,) float32."""
    # any valid id will do; id 0 sits on tp rank 0 under the default split
    targets = torch.zeros(logits_shard.shape[:-1], dtype=torch.long, device=logits_shard.device)
    return vocab_parallel_logprobs_and_entropy(
        logits_shard, targets, tp_group, None, chunk_tokens
    )[1]
