"""The scalar head that turns a GPT trunk into a reward or value model."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


class ScalarHead(MegatronModule):
    """Linear(hidden -> 1) in place of the vocabulary projection: one score per token.

    Its weight is small and replicated on every tensor-parallel rank: the hidden states reaching it
    are identical there (gathered first under sequence parallelism, in training and in eval alike,
    as `ColumnParallelLinear` does), so the gradients are too and no TP all-reduce is needed.
    Signature matches `ColumnParallelLinear` as GPTModel calls it.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        # GPTModel clears this attribute of its output layer when it has gathered the sequence itself
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states)  # (s/tp, b, h) -> (s, b, h)
        scores = hidden_states @ self.weight.t() + self.bias  # (s, b, 1)
        return scores, None
