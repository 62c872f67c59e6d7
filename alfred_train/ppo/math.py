"""PPO math as pure functions: KL estimates, rewards, GAE, whitening, losses, KL controllers.

Vocabulary (fixed here, used across `alfred_train.ppo`):
  B          rows (rollouts) in the tensor at hand: a rollout batch, mini-batch or micro-batch
  T          response length (padded); token t is the t-th generated token a_t
  mask       response_mask (B, T): 1 on response tokens up to and including EOD, 0 on padding.
             Rows are right-padded: the valid tokens of a row form a prefix.
  logprobs   log pi_theta(a_t | x, a_<t) under the policy being trained          (B, T)
  old_logprobs  the same under the policy that generated the rollout            (B, T)
  ref_logprobs  the same under the frozen reference (the SFT model)             (B, T)
  values     V_t, the value model's output at the same positions                (B, T)
  score      the reward model's scalar for the whole response (read at EOD)     (B,)
  num_tokens number of valid tokens in the GLOBAL mini-batch: summed over every micro-batch
             and every data-parallel rank that contribute to one optimizer step.

Losses are token sums divided by `num_tokens`, so the sum of the per-micro-batch losses over all
micro-batches and DP ranks is exactly the token mean of the global mini-batch, however the data
is split. (If the DP gradient reduction *averages* over ranks instead of summing, the caller
multiplies the loss by the DP size.)

Statistics that must be global (whitening, explained variance) take an optional
`torch.distributed` process group: the valid-token count, sum and sum of squares are all-reduced
over it in one collective. `group=None` means no communication (this rank's tokens only).
Variances are the *biased* (population) variance, sum((x - mean)^2) / n: a whitened batch then has
exactly mean 0 and std 1 on its valid tokens, and n is the same on every split.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from alfred_train.errors import ConfigError

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- KL estimates

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref: unbiased per-token estimate of KL(pi || ref), can be negative.

    logprobs, ref_logprobs: (B, T) -> (B, T)
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref)^2: biased, low-variance, always >= 0 (for metrics).

    logprobs, ref_logprobs: (B, T) -> (B, T)
    """
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = exp(ref - logp): unbiased, always >= 0 ("approx KL").

    Samples come from the distribution of `logprobs`; estimates KL(pi || ref).
    logprobs, ref_logprobs: (B, T) -> (B, T)
    """
    log_ratio = ref_logprobs - logprobs  # (B, T), log r
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimator(name: str) -> KLEstimator:
    """Return the per-token KL estimate function called `name` ("k1", "k2" or "k3").

    Call once at config load and keep the function; the hot loop never looks at the name.
    """
    if name not in KL_ESTIMATORS:
        raise ConfigError(
            f"unknown KL estimator {name!r}: choose one of {sorted(KL_ESTIMATORS)}"
        )
    return KL_ESTIMATORS[name]


# --------------------------------------------------------------------------- rewards and GAE

def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row; 0 for a row with no valid token.

    response_mask: (B, T) -> (B,) long
    """
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)  # (T,)
    return (positions * (response_mask > 0)).amax(dim=-1)  # (B,)


def token_rewards(
    kl: torch.Tensor, score: torch.Tensor, response_mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token reward r_t = -beta * kl_t, plus `score` at the last valid token of each row.

    kl: (B, T) per-token KL estimate (k1 in the reference recipe); score: (B,);
    response_mask: (B, T). Returns (B, T), 0 on padding. A row with no valid token gets no score.
    """
    mask = response_mask.to(kl.dtype)  # (B, T)
    rewards = -beta * kl * mask  # (B, T)
    has_token = mask.amax(dim=-1)  # (B,), 1 if the row has any valid token
    last = last_token_index(response_mask).unsqueeze(-1)  # (B, 1)
    bonus = (score.to(kl.dtype) * has_token).unsqueeze(-1)  # (B, 1)
    return rewards.scatter_add(-1, last, bonus)  # (B, T)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid prefix of each row.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_{t+1} = 0 past the last valid token)
        A_t     = delta_t + gamma * lam * A_{t+1}      = sum_l (gamma*lam)^l delta_{t+l}
        R_t     = A_t + V_t

    rewards, values, response_mask: (B, T). Returns (advantages, returns), both (B, T) with 0 on
    padding; rewards and values at padded positions are ignored, never leaked into the response.
    No gradient flows through (values are the rollout's old values).
    """
    with torch.no_grad():
        mask = response_mask.to(values.dtype)  # (B, T)
        values = values * mask  # (B, T), so V past the end is 0
        rewards = rewards * mask  # (B, T)
        advantages = torch.zeros_like(values)  # (B, T)
        next_value = torch.zeros_like(values[:, 0])  # (B,)
        next_advantage = torch.zeros_like(values[:, 0])  # (B,)
        for t in reversed(range(values.shape[-1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
            next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,)
            next_value = values[:, t]
            advantages[:, t] = next_advantage
        returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


# --------------------------------------------------------------------------- global statistics

def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum `t` over `group` (no-op for None). NCCL reduces only CUDA tensors, so a CPU tensor makes
    the round trip through the current GPU; gloo reduces it in place."""
    if group is None:
        return t
    if not t.is_cuda and dist.get_backend(group) == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        return on_gpu.to(t.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) of x over valid tokens on every rank of `group`, in float64.

    One all_reduce of [sum, sum of squares, count]; float64 keeps E[x^2] - E[x]^2 accurate.
    """
    m = mask.to(torch.float64)  # (B, T)
    xd = x.detach().to(torch.float64) * m  # (B, T)
    moments = all_reduce_sum(torch.stack([xd.sum(), xd.square().sum(), m.sum()]), group)  # (3,)
    total, total_sq, count = moments.unbind()
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return count, mean, var


def global_token_count(mask: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Number of valid tokens summed over every rank of `group`: the `num_tokens` of the losses.

    mask: (B, T) -> scalar float tensor. Call it on the mask of the whole local mini-batch (all
    its micro-batches), with the data-parallel group.
    """
    return all_reduce_sum(mask.detach().to(torch.float64).sum(), group)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """sum(x * m) / sum(m) over every rank of `group` (a statistic: no gradient). (B, T) -> ()"""
    return _masked_moments(x, mask, group)[1].to(x.dtype)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Biased variance sum(m * (x - mean)^2) / sum(m) over every rank of `group`. (B, T) -> ()"""
    return _masked_moments(x, mask, group)[2].to(x.dtype)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / (std + eps) with mean and biased std over valid tokens of every rank of `group`.

    With shift_mean=False the mean is added back: only the scale changes.
    x, mask: (B, T) -> (B, T), 0 on padding.
    """
    _, mean, var = _masked_moments(x, mask, group)
    whitened = (x.to(torch.float64) - mean) / (var.sqrt() + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return (whitened * mask).to(x.dtype)


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (1 is perfect, 0 is no better than the mean).

    values, returns, mask: (B, T) -> (); nan when the returns have zero variance.
    """
    residual_var = _masked_moments(returns - values, mask, group)[2]
    returns_var = _masked_moments(returns, mask, group)[2]
    return 1.0 - residual_var / returns_var


# --------------------------------------------------------------------------- losses

class PolicyLossStats(NamedTuple):
    """Token sums divided by num_tokens (add them across micro-batches and DP ranks)."""

    clipfrac: torch.Tensor  # share of tokens whose clipped term is the active (larger) loss
    approx_kl: torch.Tensor  # k3 estimate of KL(pi_old || pi_theta)


class ValueLossStats(NamedTuple):
    """Token sums divided by num_tokens (add them across micro-batches and DP ranks)."""

    clipfrac: torch.Tensor  # share of tokens whose clipped error is the active (larger) loss


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: torch.Tensor | float,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped-ratio PPO policy loss, token sum / num_tokens.

        rho_t = exp(logp_t - logp_old_t)
        L_t   = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
        loss  = sum_t m_t * L_t / num_tokens

    logprobs (with grad), old_logprobs, advantages, mask: (B, T) -> loss () and stats.
    """
    mask = mask.to(logprobs.dtype)  # (B, T)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    with torch.no_grad():
        clipfrac = ((clipped > unclipped).to(mask.dtype) * mask).sum() / num_tokens
        approx_kl = (kl_k3(old_logprobs, logprobs) * mask).sum() / num_tokens
    return loss, PolicyLossStats(clipfrac=clipfrac, approx_kl=approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    num_tokens: torch.Tensor | float,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Clipped value loss, token sum / num_tokens.

        V_clip = V_old + clip(V - V_old, -eps, eps)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)
        loss   = sum_t m_t * L_t / num_tokens

    values (with grad), old_values, returns, mask: (B, T) -> loss () and stats.
    """
    mask = mask.to(values.dtype)  # (B, T)
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, T)
    unclipped = (values - returns).square()  # (B, T)
    clipped = (values_clipped - returns).square()  # (B, T)
    loss = 0.5 * (torch.maximum(unclipped, clipped) * mask).sum() / num_tokens
    with torch.no_grad():
        clipfrac = ((clipped > unclipped).to(mask.dtype) * mask).sum() / num_tokens
    return loss, ValueLossStats(clipfrac=clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the full vocabulary, computed in float32.

        H = logsumexp(z) - sum_v softmax(z)_v * z_v

    logits: (B, T, V) -> (B, T). (The vocab-parallel version lives in alfred_train.kernels.)
    """
    z = logits.float()  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # (B, T)


# --------------------------------------------------------------------------- KL controllers

class FixedKLController:
    """Constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError(
                f"KL coefficient must be >= 0, got {kl_coef}: set a non-negative kl_coef"
            )
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns beta."""
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "adaptive": False}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: a fixed beta is the config's (ppo.kl_coef changed on resume applies)."""


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient of Ziegler et al. (2019), proportional control toward `target`.

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)

    current_kl: the batch mean of the per-sequence KL, sum_t kl_t; n_steps: samples in the step.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        super().__init__(init_kl_coef)
        if target <= 0:
            raise ConfigError(
                f"adaptive KL target must be > 0, got {target}: set a positive target"
            )
        if horizon <= 0:
            raise ConfigError(
                f"adaptive KL horizon must be > 0, got {horizon}: set a positive horizon"
            )
        self.target = float(target)
        self.horizon = float(horizon)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "adaptive": True}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the saved beta, unless it was a fixed one (adaptive KL turned on at the resume:
        ppo.kl_coef is the starting value). Checkpoints before "adaptive" was saved were adaptive or not."""
        if state.get("adaptive", True):
            self.kl_coef = float(state["kl_coef"])

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta toward the target KL; returns the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef
