"""PPO math against hand-computed numbers, and against DP / micro-batch splitting.

All expected values are worked by hand in the comments; `math.log` / `math.exp` only spell out
constants that appear in those hand computations.
"""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alfred_train.errors import ConfigError
from alfred_train.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    global_token_count,
    kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from alfred_train.ppo.rollout import Rollout


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0)


# --------------------------------------------------------------------------- KL and rewards

def test_kl_estimators_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_k1(logp, ref), [0.5, -1.0])
    close(kl_k2(logp, ref), [0.125, 0.5])  # 0.5 * 0.5^2, 0.5 * 1^2
    # k3 = (r - 1) - log r, r = exp(ref - logp):
    #   r = e^-0.5 = 0.60653066 -> -0.39346934 + 0.5 = 0.10653066
    #   r = e^1    = 2.71828183 ->  1.71828183 - 1.0 = 0.71828183
    close(kl_k3(logp, ref), [0.10653066, 0.71828183])
    assert kl_estimator("k3") is kl_k3
    with pytest.raises(ConfigError, match="unknown KL estimator 'k4'"):
        kl_estimator("k4")


def test_token_rewards_score_on_last_valid_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    score = t([2.0, -1.0, 5.0])
    # beta = 0.1: row 0 [-0.01, -0.02, -0.03 + 2], row 1 [-0.05, -0.05 - 1, 0 (pad)],
    # row 2 has no valid token: nothing, not even its score
    close(token_rewards(kl, score, mask, beta=0.1),
          [[-0.01, -0.02, 1.97], [-0.05, -1.05, 0.0], [0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- GAE

def test_gae_1x3_gamma1_lam095():
    rewards, values, mask = t([[0.1, -0.2, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]])
    # delta_2 = 1.0 + 0 - 0.3 = 0.7;  delta_1 = -0.2 + 0.3 - 0.4 = -0.3
    # delta_0 = 0.1 + 0.4 - 0.5 = 0
    # A_2 = 0.7;  A_1 = -0.3 + 0.95 * 0.7 = 0.365;  A_0 = 0 + 0.95 * 0.365 = 0.34675
    # R = A + V = [0.84675, 0.765, 1.0]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.34675, 0.365, 0.7]])
    close(returns, [[0.84675, 0.765, 1.0]])
    # lam = 1, gamma = 1: R_t is the plain reward-to-go [0.9, 0.8, 1.0]
    close(gae(rewards, values, mask, gamma=1.0, lam=1.0)[1], [[0.9, 0.8, 1.0]])


def test_gae_2x4_masked_row_does_not_leak():
    rewards = t([[0.0, 0.0, 0.0, 1.0], [0.2, 2.0, 9.0, 9.0]])
    values = t([[0.5, 0.5, 0.5, 0.5], [1.0, 0.5, 7.0, 7.0]])  # row 1 padding holds garbage
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    # gamma = 0.9, lam = 0.5, gamma * lam = 0.45
    # row 0: delta_3 = 1 - 0.5 = 0.5; delta_{0,1,2} = 0.9 * 0.5 - 0.5 = -0.05
    #   A_3 = 0.5; A_2 = -0.05 + 0.45 * 0.5 = 0.175; A_1 = -0.05 + 0.45 * 0.175 = 0.02875;
    #   A_0 = -0.05 + 0.45 * 0.02875 = -0.0370625;  R = A + 0.5
    # row 1 (ends at t=1, V_2 counts as 0): delta_1 = 2.0 + 0 - 0.5 = 1.5;
    #   delta_0 = 0.2 + 0.9 * 0.5 - 1.0 = -0.35;  A_1 = 1.5;  A_0 = -0.35 + 0.45 * 1.5 = 0.325
    #   R = [1.325, 2.0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[-0.0370625, 0.02875, 0.175, 0.5], [0.325, 1.5, 0.0, 0.0]])
    close(returns, [[0.4629375, 0.52875, 0.675, 1.0], [1.325, 2.0, 0.0, 0.0]])
    # more right padding (with garbage rewards and values) changes nothing
    def pad(x, fill):
        return torch.cat([x, torch.full((2, 3), fill, dtype=x.dtype)], dim=1)

    padded = gae(pad(rewards, 5.0), pad(values, 5.0), pad(mask, 0.0), gamma=0.9, lam=0.5)
    close(padded[0][:, :4], advantages)
    close(padded[0][:, 4:], torch.zeros(2, 3))


# --------------------------------------------------------------------------- statistics

def test_masked_stats_and_whiten_ignore_padding():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 2.0 / 3.0)  # biased: ((-1)^2 + 0 + 1^2) / 3, not / 2
    # std = sqrt(2/3) = 0.81649658; (x - 2) / std = [-1.22474487, 0, 1.22474487]
    close(whiten(x, mask), [[-1.22474487, 0.0, 1.22474487, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[0.77525513, 2.0, 3.22474487, 0.0]])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64) * 4 + 7
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    w = whiten(x, mask)
    valid = w[mask.bool()]
    close(valid.mean(), 0.0, atol=1e-9)
    close(valid.var(unbiased=False), 1.0, atol=1e-7)
    close(w[~mask.bool()], torch.zeros(6))  # 0 + 4 + 2 padded positions


def test_explained_variance_by_hand():
    returns, mask = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    # residual R - V = [0, 0, 1]: var = 2/9; Var[R] = 2/3; EV = 1 - (2/9) / (2/3) = 2/3
    values = t([[1.0, 2.0, 2.0, -9.0]])
    close(explained_variance(values, returns, mask), 2.0 / 3.0)
    close(explained_variance(returns, returns, mask), 1.0)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 2] = 1000.0  # one-hot: entropy 0
    close(entropy_from_logits(logits), [[math.log(4.0), 0.0]])
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g)
    close(entropy_from_logits(logits),
          torch.distributions.Categorical(logits=logits).entropy(), atol=1e-5)


# --------------------------------------------------------------------------- losses

def test_policy_loss_by_hand():
    eps = 0.2
    ratio = t([[1.5, 0.5, 0.5], [1.5, 1.1, 3.0]])
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    logprobs = (old + ratio.log()).requires_grad_()
    advantages = t([[1.0, -1.0, 2.0], [-2.0, 0.5, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # token: min(rho A, clip(rho) A)              -> L = -min   clipped branch active?
    #   rho 1.5, A  1:  min(1.5,  1.2)  =  1.2     -> -1.2      yes (upper clip)
    #   rho 0.5, A -1:  min(-0.5, -0.8) = -0.8     ->  0.8      yes (lower clip)
    #   rho 0.5, A  2:  min(1.0,  1.6)  =  1.0     -> -1.0      no
    #   rho 1.5, A -2:  min(-3.0, -2.4) = -3.0     ->  3.0      no
    #   rho 1.1, A .5:  0.55 both                  -> -0.55     no
    #   masked token ignored.  sum = 1.05, 5 tokens -> 0.21, clipfrac 2/5
    # approx_kl = k3 with r = rho: (r - 1) - log r
    #   1.5: 0.5 - 0.40546511 = 0.09453489
    #   0.5: -0.5 + 0.69314718 = 0.19314718
    #   1.1: 0.1 - 0.09531018 = 0.00468982;  sum = 2*0.09453489 + 2*0.19314718 + 0.00468982
    #   = 0.58005396 -> / 5 = 0.11601079
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=eps, num_tokens=5)
    close(loss, 0.21)
    close(stats.clipfrac, 0.4)
    close(stats.approx_kl, 0.11601079)
    # gradient d L / d logp = -A * rho / N on unclipped-active tokens, 0 on clipped ones
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, -2.0 * 0.5 / 5], [2.0 * 1.5 / 5, -0.5 * 1.1 / 5, 0.0]])
    # a larger global mini-batch (same tokens, num_tokens 10) halves the piece's loss
    close(policy_loss(logprobs, old, advantages, mask, eps, num_tokens=10)[0], 0.105)


def test_value_loss_by_hand():
    values = t([[1.0, 0.0, 0.6, 1.0, 42.0]]).requires_grad_()
    old_values = t([[0.5, 0.5, 0.5, 0.5, 0.0]])
    returns = t([[1.0, 0.0, 2.0, 0.0, -42.0]])
    mask = t([[1, 1, 1, 1, 0]])
    # eps = 0.2          V_clip   (V-R)^2  (Vc-R)^2  0.5*max   clipped active?
    #   V 1.0 R 1.0     0.7      0        0.09      0.045     yes (upper)
    #   V 0.0 R 0.0     0.3      0        0.09      0.045     yes (lower)
    #   V 0.6 R 2.0     0.6      1.96     1.96      0.98      no (inside the clip range)
    #   V 1.0 R 0.0     0.7      1.0      0.49      0.5       no
    #   sum 1.57 over 4 tokens -> 0.3925; clipfrac 2/4
    loss, stats = value_loss(values, old_values, returns, mask, clip_eps=0.2, num_tokens=4)
    close(loss, 0.3925)
    close(stats.clipfrac, 0.5)
    loss.backward()  # d/dV 0.5 (V-R)^2 / 4 on unclipped-active tokens, 0 where V_clip is active
    close(values.grad, [[0.0, 0.0, (0.6 - 2.0) / 4, 1.0 / 4, 0.0]])


def _ragged_batch():
    """4 rows, T = 5, valid lengths 5, 3, 1, 4 (13 tokens), fixed seed."""
    g = torch.Generator().manual_seed(1234)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = (torch.arange(5) < lengths[:, None]).double()  # (4, 5)
    rand = lambda: torch.randn(4, 5, generator=g, dtype=torch.float64)  # noqa: E731
    old = rand() - 2.0
    return dict(logprobs=old + 0.3 * rand(), old=old, advantages=rand(), mask=mask,
                values=rand(), old_values=rand(), returns=rand())


def _losses(b, rows, num_tokens):
    """(policy loss, value loss, clipfrac, approx_kl, value clipfrac) of batch rows `rows`."""
    pick = {k: v[rows] for k, v in b.items()}
    p_loss, p_stats = policy_loss(pick["logprobs"], pick["old"], pick["advantages"],
                                  pick["mask"], clip_eps=0.2, num_tokens=num_tokens)
    v_loss, v_stats = value_loss(pick["values"], pick["old_values"], pick["returns"],
                                 pick["mask"], clip_eps=0.2, num_tokens=num_tokens)
    return torch.stack([p_loss, v_loss, p_stats.clipfrac, p_stats.approx_kl, v_stats.clipfrac])


def test_loss_is_the_global_token_mean_however_split():
    b = _ragged_batch()
    n = 13  # global valid tokens: 5 + 3 + 1 + 4
    assert global_token_count(b["mask"]).item() == n
    whole = _losses(b, [0, 1, 2, 3], n)
    # the whole batch at once is the plain token mean
    ratio = (b["logprobs"] - b["old"]).exp()
    per_token = -torch.minimum(ratio * b["advantages"], ratio.clamp(0.8, 1.2) * b["advantages"])
    close(whole[0], per_token[b["mask"].bool()].mean(), atol=1e-12)

    micro_batches = sum(_losses(b, [i], n) for i in range(4))  # 4 micro-batches, 1 DP rank
    dp_ranks = {0: [[0], [1]], 1: [[2], [3]]}  # 2 DP ranks x 2 micro-batches each
    per_rank = [sum(_losses(b, rows, n) for rows in dp_ranks[rank]) for rank in (0, 1)]
    close(micro_batches, whole, atol=1e-6)
    close(per_rank[0] + per_rank[1], whole, atol=1e-6)
    close(sum(_losses(b, rows, n) for rows in ([0, 3], [1, 2])), whole, atol=1e-6)
    # the naive mean of per-micro-batch means weights the 1-token row like the 5-token row
    naive = sum(_losses(b, [i], int(b["mask"][i].sum())) for i in range(4)) / 4
    assert abs(naive[0] - whole[0]) > 1e-3


# --------------------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_two_updates_and_resume():
    kl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 - 1 = 0.5) = 0.2; beta = 0.1 * (1 + 0.2 * 256/10000) = 0.1 * 1.00512
    close(kl.update(9.0, n_steps=256), 0.100512, atol=1e-12)
    # KL 5.4: e = -0.1; beta = 0.100512 * (1 - 0.1 * 512/10000) = 0.100512 * 0.99488
    close(kl.update(5.4, n_steps=512), 0.09999737856, atol=1e-12)
    resumed = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(kl.state_dict())
    assert resumed.kl_coef == kl.kl_coef
    fixed = FixedKLController(0.01)
    assert fixed.update(100.0, n_steps=64) == 0.01 and fixed.state_dict() == {"kl_coef": 0.01, "adaptive": False}
    # a resume with another ppo.kl_coef: a fixed beta is the config's (the saved one won, warned as replaced);
    # adaptive KL turned on at a resume starts from ppo.kl_coef, not from the fixed beta saved
    changed = FixedKLController(0.5)
    changed.load_state_dict(fixed.state_dict())
    assert changed.kl_coef == 0.5
    turned_on = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    turned_on.load_state_dict(fixed.state_dict())
    assert turned_on.kl_coef == 0.2
    with pytest.raises(ConfigError, match="target must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)


# --------------------------------------------------------------------------- rollout container

def test_rollout_layout_select_split():
    prompt_ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])  # (2, 4), row 0 left-padded
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    response_ids = torch.tensor([[31, 32, 2], [41, 2, 0]])  # (2, 3), EOD = 2, pad = 0
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask,
                      scores=torch.tensor([0.5, -0.5]))
    seq = rollout.sequences()
    assert seq.tolist() == [[0, 0, 11, 12, 31, 32, 2], [21, 22, 23, 24, 41, 2, 0]]
    assert rollout.position_ids().tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 5]]
    assert rollout.last_token_positions().tolist() == [6, 5]
    # logits that put all mass on the next token: the response slice recovers the response
    logits = torch.nn.functional.one_hot(seq.roll(-1, dims=1), num_classes=50).float()
    assert rollout.response_logits(logits).argmax(-1).tolist() == response_ids.tolist()
    assert rollout.num_tokens() == 5

    swapped = rollout.select([1, 0])
    assert swapped.response_ids[0].tolist() == [41, 2, 0] and swapped.scores.tolist() == [-0.5, 0.5]
    assert swapped.old_logprobs is None
    halves = rollout.split(2)
    assert [h.batch_size for h in halves] == [1, 1]
    assert halves[1].prompt_ids.tolist() == [[21, 22, 23, 24]]
    with pytest.raises(ConfigError, match="cannot split a rollout batch of 2 rows into 3"):
        rollout.split(3)
    with pytest.raises(ValueError, match="Rollout.values has shape"):
        rollout.replace(values=torch.zeros(2, 4))


# --------------------------------------------------------------------------- 2-process gloo

def _rank_rows(rank):
    """Rank 0 holds rows 0-1, rank 1 rows 2-4 of one fixed ragged (5, 6) batch."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3 + 1
    y = x + 0.5 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = (torch.arange(6) < torch.tensor([6, 2, 4, 1, 5])[:, None]).double()
    rows = slice(0, 2) if rank == 0 else slice(2, 5)
    return (x, y, mask), (x[rows], y[rows], mask[rows])


def _gloo_worker(rank, world_size, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        group = dist.group.WORLD
        (x, y, mask), (x_r, y_r, mask_r) = _rank_rows(rank)
        rows = slice(0, 2) if rank == 0 else slice(2, 5)
        close(whiten(x_r, mask_r, group=group), whiten(x, mask)[rows], atol=1e-10)
        close(whiten(x_r, mask_r, group=group, shift_mean=False),
              whiten(x, mask, shift_mean=False)[rows], atol=1e-10)
        close(masked_mean(x_r, mask_r, group=group), masked_mean(x, mask), atol=1e-12)
        close(masked_var(x_r, mask_r, group=group), masked_var(x, mask), atol=1e-10)
        close(explained_variance(y_r, x_r, mask_r, group=group),
              explained_variance(y, x, mask), atol=1e-10)
        assert global_token_count(mask_r, group=group).item() == 18
        # local statistics differ: the group is what makes them global
        assert (whiten(x_r, mask_r) - whiten(x, mask)[rows]).abs().max() > 1e-3
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_whiten_across_two_gloo_ranks_equals_whole_batch():
    mp.spawn(_gloo_worker, args=(2, _free_port()), nprocs=2, join=True)
