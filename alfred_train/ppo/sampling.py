"""Choosing each next token: sampling parameters, filters, and a random stream keyed per prompt.

    logits (B, V) at the newest position -> real vocabulary only (ids >= vocab_size dropped)
      -> / temperature -> log-probs (B, V') of the sampling distribution (returned per token)
      -> EOD blocked while step < min_new_tokens -> greedy argmax, or top-k / top-p filtered
         inverse-CDF sampling on a uniform draw u = uniform_draws(seed, key, step)

Each row's draws are a pure function of (seed, the row's prompt key, step): a prompt gets the same
tokens wherever it sits in the batch, on any TP/PP layout, and with continuous batching on or off
(a counter-based generator, as JAX and Philox do; `torch.Generator` streams are per batch, not per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alfred_train.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen (the `ppo.*` sampling keys, or `generate` flags)."""

    max_new_tokens: int = 16  # response length cap
    min_new_tokens: int = 0  # EOD is masked out before this many tokens
    temperature: float = 1.0  # logits / temperature before top-k / top-p
    top_p: float = 1.0  # nucleus: keep the smallest set of ids whose probability reaches top_p
    top_k: int = 0  # keep the k most likely ids; 0 = off
    greedy: bool = False  # argmax (temperature, top-k and top-p unused)

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                  (0 <= self.min_new_tokens <= self.max_new_tokens,
                   f"min_new_tokens ({self.min_new_tokens}) must be in [0, max_new_tokens={self.max_new_tokens}]"),
                  (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                  (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"sampling: {msg}")

    @classmethod
    def from_ppo(cls, ppo_cfg, greedy: bool = False) -> "SamplingParams":
        p = ppo_cfg
        return cls(p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, greedy)


def mask_logits(logits: torch.Tensor, *, vocab_size: int, eod_id: int, block_eod: bool) -> torch.Tensor:
    """float32 copy of logits (B, V) with padded-vocabulary ids (>= vocab_size), and EOD if asked, at -inf."""
    out = logits.float().clone()  # (B, V)
    out[:, vocab_size:] = float("-inf")
    if block_eod:
        out[:, eod_id] = float("-inf")
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -inf. (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep, by descending probability, ids until their mass reaches top_p. (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of the more likely ids
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    return logits.masked_fill(drop, float("-inf"))  # the most likely id always stays


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic): a bijective bit mixer."""
    x = x ^ _shift_right(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ _shift_right(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    return x ^ _shift_right(x, 31)


def uniform_draws(seed: int, keys: torch.Tensor, step) -> torch.Tensor:
    """One uniform number in [0, 1) per row, float64 (B,), a pure function of (seed, key, step).

    keys (B,) int64 name each row's prompt (e.g. its global index in the iteration); step: the token
    index, an int or (B,) per row. A row draws the same numbers wherever it sits in the batch, on
    any layout, with continuous batching or not.
    """
    base = _mix64(torch.tensor(seed % (2 ** 62), dtype=torch.long, device=keys.device) * 2 + 1)
    steps = torch.as_tensor(step, dtype=torch.long, device=keys.device)
    x = _mix64(_mix64(keys.long() ^ base) + steps * 0x3C6EF372FE94F82B)  # a Weyl sequence per step (wraps)
    return _shift_right(x, 11).double() / float(2 ** 53)  # 53 random bits -> [0, 1)


def draw_table(seed: int, keys: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Every draw of a generation at once: (Q, N) float64, row q = `uniform_draws(seed, keys[q], 0 .. N-1)`
    (one vectorised pass instead of ~30 small ops in every decode step)."""
    steps = torch.arange(max_new_tokens, device=keys.device)
    return uniform_draws(seed, keys[:, None], steps[None, :])


def sample_next(logits: torch.Tensor, params: SamplingParams, *, step, vocab_size: int, eod_id: int,
                seed: int = 0, keys: torch.Tensor | None = None,
                draws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose token `step` (int, or (B,) per row) of each row from its logits (B, V):
    (tokens (B,) long, log-probs (B,) float32).

    The log-prob is the sampling distribution's before top-k / top-p / min-length filtering:
    log softmax(logits / temperature) over the real vocabulary (what the scoring pass computes).
    Sampling is inverse-CDF on `uniform_draws(seed, keys, step)`; keys default to the row index.
    draws (B,): those numbers already taken from a `draw_table` (seed and keys then unused).
    """
    z = logits[:, :vocab_size].float()  # (B, V') padded-vocabulary ids dropped: never drawn, probability 0
    if params.temperature != 1.0:
        z = z / params.temperature
    logp = z.log_softmax(dim=-1)  # (B, V') the sampling distribution, before filters
    allowed = z
    if isinstance(step, int) and step < params.min_new_tokens:
        allowed = z.clone()
        allowed[:, eod_id] = float("-inf")
    elif not isinstance(step, int) and params.min_new_tokens > 0:  # (B,) per-row token indices
        allowed = z.clone()
        allowed[:, eod_id] = allowed[:, eod_id].masked_fill(step < params.min_new_tokens, float("-inf"))
    if params.greedy:
        tokens = allowed.argmax(dim=-1)
    else:
        filtered = params.top_k > 0 or params.top_p < 1.0 or allowed is not z
        probs = filter_top_p(filter_top_k(allowed, params.top_k), params.top_p).softmax(dim=-1) if filtered \
            else logp.exp()
        cdf = probs.double().cumsum(dim=-1)  # (B, V')
        if draws is None:
            keys = torch.arange(z.shape[0], device=z.device) if keys is None else keys
            draws = uniform_draws(seed, keys, step)  # (B,)
        total = cdf[:, -1]  # (B,) ~1
        target = torch.minimum(draws * total, total.nextafter(torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_max(z.shape[-1] - 1)
    logprobs = logp.gather(1, tokens[:, None])[:, 0]  # (B,)
    return tokens, logprobs
