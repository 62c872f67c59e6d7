"""The scalar head that turns a GPT trunk into a reward or value model."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


class ScalarHead(MegatronModule):
    """Linear(hidden -> 1) in place of the vocabulary projection: one score per token.

    Its weight is small and replicated on every tensor-parallel rank: the hidden states reaching it
    are identical there (gathered first under sequence parallelism), so the gradients are too and
    no TP all-reduce is needed. Signature matches `ColumnParallelLinear` as GPTModel calls it.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        self.sequence_parallel = False  # GPTModel toggles this attribute on its output layer

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.config.sequence_parallel and self.training:
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        scores = hidden_states @ self.weight.t() + self.bias  # (s, b, 1)
        return scores, None
