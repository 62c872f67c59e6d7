"""The rollout batch: prompts, generated responses and, once scored, the per-token PPO fields.

Layout of one row (P prompt positions, T response positions):

    sequence  = [pad pad x_1 .. x_k | a_1 a_2 .. a_n EOD pad ..]      (B, P + T)
                 prompt: left-padded   response: right-padded
    logits[:, i] predict sequence[:, i + 1], so the logits of response token t (and its value
    V_t, the value of the state before it) sit at sequence position P - 1 + t:
    `response_logits(logits)` = logits[:, P-1 : P-1+T]. The reward model's score is read at the
    EOD token itself: `last_token_positions()`; a response cut at T without EOD is scored at an
    EOD appended for scoring (ppo.score_on_eod, `experience.scoring_input`).

Scoring fills old_logprobs, ref_logprobs, values and scores; advantage estimation fills
advantages and returns. `select(rows)` takes one mini-batch (`update.minibatch_rows`), and
`split(n)` its equal-size micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from alfred_train.errors import ConfigError
from alfred_train.ppo.math import last_token_index


@dataclass(frozen=True)
class Rollout:
    """A batch of B rollouts. Optional fields are None until the scoring phase fills them."""

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on prompt tokens, 0 on left padding
    response_ids: torch.Tensor  # (B, T) long, right-padded after EOD (or cut at max length)
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including EOD
    old_logprobs: torch.Tensor | None = None  # (B, T) policy that generated the responses
    ref_logprobs: torch.Tensor | None = None  # (B, T) frozen reference model
    values: torch.Tensor | None = None  # (B, T) value model, before the update
    scores: torch.Tensor | None = None  # (B,) reward model score read at EOD
    advantages: torch.Tensor | None = None  # (B, T) from GAE (whitened or not)
    returns: torch.Tensor | None = None  # (B, T) value targets A + V

    def __post_init__(self) -> None:
        batch, prompt_len = self.prompt_ids.shape
        batch_r, response_len = self.response_ids.shape
        expected = {"prompt_mask": (batch, prompt_len), "response_ids": (batch, response_len),
                    "response_mask": (batch, response_len), "scores": (batch,)}
        for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
            expected[name] = (batch, response_len)
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"Rollout.{name} has shape {tuple(tensor.shape)}, expected {shape}"
                )

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    def num_tokens(self) -> int:
        """Valid response tokens in this batch (local; see ppo.math.global_token_count)."""
        return int(self.response_mask.sum())

    def replace(self, **fields: torch.Tensor) -> Rollout:
        """A copy with some fields set, e.g. rollout.replace(advantages=a, returns=r)."""
        return dataclasses.replace(self, **fields)

    def _map(self, fn) -> Rollout:
        """Apply fn to every tensor field that is set."""
        return dataclasses.replace(self, **{
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self) if getattr(self, f.name) is not None
        })

    def to(self, device: torch.device | str) -> Rollout:
        return self._map(lambda t: t.to(device))

    def select(self, indices: torch.Tensor | list[int]) -> Rollout:
        """Rows `indices` (in that order), e.g. select(torch.randperm(B)) to shuffle."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.prompt_ids.device)
        return self._map(lambda t: t.index_select(0, index))

    def split(self, n_minibatches: int) -> list[Rollout]:
        """n_minibatches consecutive, equal-size pieces (B must be divisible by n_minibatches)."""
        if n_minibatches <= 0 or self.batch_size % n_minibatches != 0:
            raise ConfigError(
                f"cannot split a rollout batch of {self.batch_size} rows into {n_minibatches} "
                f"equal mini-batches: make the per-rank rollout batch a multiple of the "
                f"number of mini-batches (steps per epoch)"
            )
        size = self.batch_size // n_minibatches
        return [self.select(range(i * size, (i + 1) * size)) for i in range(n_minibatches)]

    # ----------------------------------------------------------------- model inputs

    def sequences(self) -> torch.Tensor:
        """cat(prompt_ids, response_ids): (B, P + T)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """cat(prompt_mask, response_mask): (B, P + T), 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (left padding gets 0): (B, P + T)."""
        return (self.attention_mask().long().cumsum(dim=1) - 1).clamp_min(0)

    def response_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The per-position outputs that belong to the response tokens: logits[:, P-1 : P-1+T].

        logits: (B, P + T, ...) over the full sequence -> (B, T, ...). Position P-1+t holds the
        state before token t (x, a_<t): the logits predicting a_t, and likewise the value V_t,
        so value-head outputs (B, P + T) take the same slice.
        """
        start = self.prompt_len - 1
        return logits[:, start:start + self.response_len]  # (B, T, ...)

    def last_token_positions(self) -> torch.Tensor:
        """Sequence position of each row's last response token (EOD): where the RM score is read.

        Returns (B,) long indices into sequences(); a row with no valid token gives P.
        """
        return self.prompt_len + last_token_index(self.response_mask)  # (B,)
