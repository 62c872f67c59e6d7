"""The SFT dataset: examples encoded, shuffled once, packed (or padded) into fixed-length rows.

Deterministic end to end: the same records, tokenizer, template, seq_len and seed give the same
rows on every rank and every run; batches then come from `sampler.iterate_batches`, resumable
from `consumed_samples`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from alfred_train.data.datasets import encode_sft
from alfred_train.data.packing import SFTBlocks, pack_examples, pad_examples
from alfred_train.data.records import SFTExample
from alfred_train.data.sampler import RankBatch, iterate_batches, sampler
from alfred_train.data.templates import PromptTemplate
from alfred_train.data.tokenizer import Tokenizer
from alfred_train.errors import ConfigError


class NoResponseTokens(ConfigError):
    """Every example's prompt fills data.seq_len: nothing to train on (or to score)."""


class SFTDataset:
    """Fixed-length SFT rows (`SFTBlocks`, each field (N, S)) and their data-parallel batches."""

    def __init__(self, blocks: SFTBlocks, no_loss: int = 0, cut: int = 0):
        self.blocks = blocks
        self.no_loss = no_loss  # examples left out: their prompt fills seq_len, no response token is left
        self.cut = cut  # examples longer than seq_len + 1 tokens, cut on the right (their EOD lost)

    @classmethod
    def build(
        cls,
        examples: Sequence[SFTExample],
        tokenizer: Tokenizer,
        template: PromptTemplate,
        seq_len: int,
        pack: bool = True,
        seed: int = 0,
    ) -> "SFTDataset":
        """Encode each example (cut to seq_len + 1 tokens: S inputs and one more label), shuffle the
        examples with `seed` (so packed blocks mix sources, as StackLLaMA's shuffled stream), then
        pack them into seq_len blocks, or pad one example per row when `pack` is False. An example
        whose prompt fills seq_len + 1 tokens trains on nothing: it is left out (counted in `no_loss`);
        one cut before its EOD is counted in `cut`."""
        cut = [encode_sft(tokenizer, template, example, seq_len + 1) for example in examples]
        encoded = [(ids, mask) for ids, mask in cut if any(mask)]
        if cut and not encoded:
            raise NoResponseTokens(f"data.seq_len: the prompt of every example fills data.seq_len ({seq_len}) tokens, so "
                              "no response token is left to train on; raise data.seq_len")
        order = np.random.default_rng([seed, 0x5F7]).permutation(len(encoded))
        shuffled = [encoded[i] for i in order]
        blocks = pack_examples(shuffled, seq_len) if pack else pad_examples(shuffled, seq_len, tokenizer.pad_id)
        longer = sum(len(ids) == seq_len + 1 and ids[-1] != tokenizer.eod_id for ids, mask in encoded)
        return cls(blocks, no_loss=len(cut) - len(encoded), cut=longer)

    def __len__(self) -> int:
        return len(self.blocks)

    def sampler(self, global_batch: int, dp_rank: int, dp_size: int, seed: int, epoch: int) -> list[list[int]]:
        """This rank's row indices for each global batch of `epoch` (see `sampler.sampler`)."""
        return sampler(len(self), global_batch, dp_rank, dp_size, seed, epoch)

    def batches(
        self, global_batch: int, dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0
    ) -> Iterator[tuple[RankBatch, SFTBlocks]]:
        """Endless (position, rows) pairs for this rank; rows fields are (G/D, S)."""
        for batch in iterate_batches(len(self), global_batch, dp_rank, dp_size, seed, consumed_samples):
            yield batch, self.blocks.select(batch.indices)
