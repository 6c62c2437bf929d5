"""Batches of (prompt, response) sequences for one training forward: padding-free packing or padding.

Either way the batch carries ``loss_positions``: flat indices into the ``[rows·L]`` hidden states of
the positions whose *next* token is a response token, with ``targets`` (that token) and
``segment_ids`` (which sequence it belongs to). Only these rows reach the vocabulary projection, and
they are computed here, on the data side, so the training step needs no host sync to find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # [rows, L]
    position_ids: torch.Tensor  # [rows, L]; restarts at 0 for every packed sequence
    attention_mask: torch.Tensor | None  # [rows, L] for padded batches; None when packed
    loss_positions: torch.Tensor  # [N] int64 flat indices into rows·L
    targets: torch.Tensor  # [N] the response token each loss position predicts
    segment_ids: torch.Tensor  # [N] sequence index (0..num_sequences-1) of each loss position
    num_sequences: int

    def to(self, device) -> "TokenBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TokenBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.loss_positions), move(self.targets), move(self.segment_ids), self.num_sequences)


def _check(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    if not sequences:
        raise ValueError("sequences is empty")
    for i, (prompt, response) in enumerate(sequences):
        if len(prompt) == 0:
            raise ValueError(f"sequence {i}: empty prompt")
        if len(response) == 0:
            raise ValueError(f"sequence {i}: empty response")


def _loss_rows(start: int, prompt_len: int, response_len: int) -> range:
    """Positions (relative to the batch) predicting the response: the last prompt token onwards."""
    return range(start + prompt_len - 1, start + prompt_len - 1 + response_len)


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
                   max_tokens: int | None = None) -> TokenBatch:
    """Concatenate every ``prompt + response`` into one row with restarting ``position_ids``.

    Hugging Face attention (SDPA, eager, flash-attention-2, flex) reads the restarts in ``position_ids``
    as sequence boundaries when no attention mask is given, so no token attends across sequences.
    ``max_tokens`` pads the row to a fixed length (stable shapes for compiled code).
    """
    _check(sequences)
    ids, pos, loss_positions, targets, segments = [], [], [], [], []
    for seg, (prompt, response) in enumerate(sequences):
        start = len(ids)
        ids += list(prompt) + list(response)
        pos += list(range(len(prompt) + len(response)))
        loss_positions += list(_loss_rows(start, len(prompt), len(response)))
        targets += list(response)
        segments += [seg] * len(response)
    if max_tokens is not None:
        if len(ids) > max_tokens:
            raise ValueError(f"packed length {len(ids)} exceeds max_tokens={max_tokens}")
        pad = max_tokens - len(ids)
        ids += [pad_id] * pad
        pos += list(range(pad))  # a padding "sequence" of its own; never scored
    return TokenBatch(torch.tensor([ids]), torch.tensor([pos]), None, torch.tensor(loss_positions),
                      torch.tensor(targets), torch.tensor(segments), len(sequences))


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0) -> TokenBatch:
    """One right-padded row per sequence with an attention mask: the fallback for packing."""
    _check(sequences)
    L = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), L), dtype=torch.long)
    loss_positions, targets, segments = [], [], []
    for row, (prompt, response) in enumerate(sequences):
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(list(prompt) + list(response))
        attention_mask[row, :n] = 1
        loss_positions += list(_loss_rows(row * L, len(prompt), len(response)))
        targets += list(response)
        segments += [row] * len(response)
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return TokenBatch(input_ids, position_ids, attention_mask, torch.tensor(loss_positions),
                      torch.tensor(targets), torch.tensor(segments), len(sequences))
