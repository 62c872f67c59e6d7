"""SFT packing (as StackLLaMA's ConstantLengthDataset), padded SFT rows, and padded RM batches.

Packing concatenates the encoded examples (each `[BOS] prompt response EOD` from `encode_sft`)
into one token stream t_0 t_1 ... and cuts it into N = (len - 1) // S blocks of S inputs:
    tokens[n, s]    = t[n*S + s]
    labels[n, s]    = t[n*S + s + 1]                      next token, crossing block edges
    loss_mask[n, s] = m[n*S + s + 1]                      1 when the label is a response/EOD token
    position_ids[n, s] = s                                continuous positions within a block
Positions are continuous and attention crosses document boundaries inside a block, as StackLLaMA
trained (no per-document reset): the model learns to ignore what precedes an EOD. The tail that
does not fill a block is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from alfred_train.errors import ConfigError

EncodedExample = tuple[list[int], list[int]]  # (input_ids, loss_mask) from encode_sft


@dataclass(frozen=True)
class SFTBlocks:
    tokens: torch.Tensor  # (N, S) int64 input ids
    labels: torch.Tensor  # (N, S) int64 next-token targets
    loss_mask: torch.Tensor  # (N, S) float32, 1 where labels[n, s] is trained on
    position_ids: torch.Tensor  # (N, S) int64, 0..S-1 in every row

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, indices: Sequence[int]) -> "SFTBlocks":
        """The rows `indices`, in that order (a micro-batch)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return SFTBlocks(self.tokens[index], self.labels[index], self.loss_mask[index], self.position_ids[index])


def _positions(num_rows: int, seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len, dtype=torch.long).expand(num_rows, seq_len).contiguous()  # (N, S)


def pack_examples(examples: Sequence[EncodedExample], seq_len: int) -> SFTBlocks:
    """Concatenate examples in the given order and cut the stream into seq_len blocks (see module doc)."""
    stream = torch.tensor([t for ids, _ in examples for t in ids], dtype=torch.long)  # (L,)
    mask = torch.tensor([m for _, loss_mask in examples for m in loss_mask], dtype=torch.float32)  # (L,)
    num_blocks = (stream.numel() - 1) // seq_len
    if num_blocks < 1:
        raise ConfigError(
            f"SFT data holds {stream.numel()} tokens, too few for one packed block of data.seq_len={seq_len}; "
            "lower data.seq_len or add data"
        )
    end = num_blocks * seq_len
    return SFTBlocks(
        tokens=stream[:end].view(num_blocks, seq_len),  # (N, S)
        labels=stream[1 : end + 1].view(num_blocks, seq_len),  # (N, S)
        loss_mask=mask[1 : end + 1].view(num_blocks, seq_len),  # (N, S)
        position_ids=_positions(num_blocks, seq_len),
    )


def pad_examples(examples: Sequence[EncodedExample], seq_len: int, pad_id: int) -> SFTBlocks:
    """One example per row, right-padded (data.pack=false): the same fields as `pack_examples`.

    Row b: tokens = ids[:S], labels = ids[1:S+1], loss_mask = mask[1:S+1]; padding has label
    pad_id and loss_mask 0. Causal attention never lets a real token see the padding after it.
    """
    rows = len(examples)
    tokens = torch.full((rows, seq_len), pad_id, dtype=torch.long)  # (B, S)
    labels = torch.full((rows, seq_len), pad_id, dtype=torch.long)  # (B, S)
    loss_mask = torch.zeros((rows, seq_len), dtype=torch.float32)  # (B, S)
    for row, (ids, mask) in enumerate(examples):
        inputs, targets, target_mask = ids[:seq_len], ids[1 : seq_len + 1], mask[1 : seq_len + 1]
        tokens[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        labels[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        loss_mask[row, : len(target_mask)] = torch.tensor(target_mask, dtype=torch.float32)
    return SFTBlocks(tokens, labels, loss_mask, _positions(rows, seq_len))


@dataclass(frozen=True)
class PaddedBatch:
    ids: torch.Tensor  # (B, S) int64, right-padded with pad_id
    eod_index: torch.Tensor  # (B,) int64 position of each row's EOD (its last real token)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, eod_id: int, seq_len: Optional[int] = None
) -> PaddedBatch:
    """Right-pad sequences that end with EOD (from `encode_scored`) to S = seq_len or the longest.

    The reward model reads row b's score at eod_index[b] = len(sequence b) - 1; with causal
    attention the right padding cannot change it. Pass a fixed seq_len under pipeline parallelism,
    where every micro-batch must have the same shape.
    """
    lengths = [len(seq) for seq in sequences]
    width = seq_len if seq_len is not None else max(lengths)
    for b, seq in enumerate(sequences):
        if not seq or seq[-1] != eod_id:
            raise ValueError(f"sequence {b} does not end with EOD id {eod_id}; encode it with encode_scored")
        if len(seq) > width:
            raise ValueError(f"sequence {b} has {len(seq)} tokens, more than seq_len={width}")
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, S)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return PaddedBatch(ids, torch.tensor(lengths, dtype=torch.long) - 1)


def collate_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, eod_id: int, seq_len: Optional[int] = None
) -> PaddedBatch:
    """Preference pairs as one (2B, S) batch: rows 0..B-1 chosen, rows B..2B-1 rejected."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id, eod_id, seq_len)
