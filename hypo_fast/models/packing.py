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

from hypo_fast.losses import sequence_logps
from hypo_fast.objective import OnlineLogps, StepLogps
from hypo_fast.segments import RowMetrics, Segments


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


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [R, W], mask [R, W])``: token lists padded to the longest on the right (``left``: on the left, as
    generation wants its prompts), the int64 mask 1 on tokens."""
    W = max(len(r) for r in rows)
    ids = torch.full((len(rows), W), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(W - len(row), W) if left else slice(0, len(row))
        ids[i, cols] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0) -> TokenBatch:
    """One right-padded row per sequence with an attention mask: the fallback for packing."""
    _check(sequences)
    input_ids, attention_mask = pad_rows([list(p) + list(r) for p, r in sequences], pad_id)
    L = input_ids.shape[1]
    loss_positions, targets, segments = [], [], []
    for row, (prompt, response) in enumerate(sequences):
        loss_positions += list(_loss_rows(row * L, len(prompt), len(response)))
        targets += list(response)
        segments += [row] * len(response)
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return TokenBatch(input_ids, position_ids, attention_mask, torch.tensor(loss_positions),
                      torch.tensor(targets), torch.tensor(segments), len(sequences))


@dataclass(frozen=True)
class StepBatch:
    """One micro-step's sequences packed once, in named segments: B chosen, B rejected, then M online.

    ``tokens`` is one padding-free row whose loss positions run chosen, rejected, online, so each
    segment is a contiguous slice of the token log-probs ``[N]``; the online sequences are packed last,
    so the reference can score them on a view of the same row (:meth:`online_tokens`), never repacked.
    """

    tokens: TokenBatch
    num_pairs: int  # B
    num_online: int  # M (k samples per prompt, consecutive)
    offline_positions: int  # loss positions of the pairs: tokens.loss_positions[:offline_positions]
    online_column: int  # first column of the online sequences in the packed row

    def to(self, device) -> "StepBatch":
        return StepBatch(self.tokens.to(device), self.num_pairs, self.num_online, self.offline_positions,
                         self.online_column)

    def segments(self, hidden: torch.Tensor, temperature: float) -> Segments:
        """The ``[N, D]`` rows of ``hidden [rows, L, D]`` at the loss positions, laid out pairs first."""
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.tokens.loss_positions)  # [N, D]
        return Segments(rows, self.tokens.targets, self.offline_positions, temperature)

    def split(self, token_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` per-token values → ``(pairs [N_off], online [N_on])``."""
        return token_values[:self.offline_positions], token_values[self.offline_positions:]

    def pair_logps(self, offline_token_logps: torch.Tensor, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N_off]`` token log-probs of the pairs → ``(chosen [B], rejected [B])`` sums (or means)."""
        ids = self.tokens.segment_ids[:self.offline_positions]
        seq = sequence_logps(offline_token_logps, ids, average=average, num_segments=2 * self.num_pairs)
        return seq[:self.num_pairs], seq[self.num_pairs:]

    @property
    def online_segment_ids(self) -> torch.Tensor:
        """``[N_on]`` sample index (0..M−1) of each online loss position."""
        return self.tokens.segment_ids[self.offline_positions:] - 2 * self.num_pairs

    def online_tokens(self) -> TokenBatch:
        """The online sequences alone, as a view of the packed row (for the reference forward)."""
        t, col = self.tokens, self.online_column
        return TokenBatch(t.input_ids[:, col:], t.position_ids[:, col:], None,
                          t.loss_positions[self.offline_positions:] - col, t.targets[self.offline_positions:],
                          self.online_segment_ids, self.num_online)

    def pair_token_counts(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen [B], rejected [B])`` response token counts (no host sync)."""
        ids = self.tokens.segment_ids[:self.offline_positions]
        ones = torch.ones(ids.shape, dtype=dtype, device=ids.device)
        counts = sequence_logps(ones, ids, num_segments=2 * self.num_pairs)
        return counts[:self.num_pairs], counts[self.num_pairs:]

    def step_logps(self, token_logps: torch.Tensor, ref_pairs: torch.Tensor, ref_online: torch.Tensor | None = None,
                   row_metrics: RowMetrics | None = None, online_token_kls: torch.Tensor | None = None) -> StepLogps:
        """The objective's input, by segment, from one forward's ``[N]`` outputs (no host sync).

        The pairs' log-probs are sums with their token counts beside them: each loss type of the objective
        decides its own length normalisation.

        Args:
            token_logps: ``[N]`` policy log-probs at every loss position (pairs at τ = 1, online at τ).
            ref_pairs: ``[B, 2]`` reference (chosen, rejected) summed sequence log-probs.
            ref_online: ``[N_on]`` reference token log-probs of the online samples at τ.
            row_metrics: per position (for TRL's ``logits/*``, ``entropy`` and ``mean_token_accuracy``).
            online_token_kls: ``[N_on]`` exact KL_t at the online positions, with grad (``exact_token``).
        """
        offline, online = self.split(token_logps)
        chosen, rejected = self.pair_logps(offline)
        online_logps = None
        if self.num_online:
            if ref_online is None or ref_online.shape != online.shape:
                raise ValueError(f"ref_online must hold the {online.shape[0]} online positions' reference log-probs")
            if online_token_kls is not None and online_token_kls.shape != online.shape:
                raise ValueError(f"online_token_kls must hold the {online.shape[0]} online positions' KLs")
            online_logps = OnlineLogps(online, ref_online, self.online_segment_ids, self.num_online, online_token_kls)
        means = token_metrics = (None, None)
        if row_metrics is not None:
            ids = self.tokens.segment_ids[:self.offline_positions]
            pairs = RowMetrics(*(self.split(values)[0] for values in row_metrics))  # [N_off] each
            chosen_mask, rejected_mask = (ids < self.num_pairs).float(), (ids >= self.num_pairs).float()
            means = tuple((pairs.logit_mean * m).sum() / m.sum().clamp_min(1) for m in (chosen_mask, rejected_mask))
            token_metrics = (pairs.entropy.mean() if pairs.entropy.numel() else pairs.entropy.new_zeros(()),
                             (pairs.is_top1 * chosen_mask).sum() / chosen_mask.sum().clamp_min(1))
        return StepLogps(chosen, rejected, ref_pairs[:, 0], ref_pairs[:, 1], online_logps, *means,
                         *self.pair_token_counts(chosen.dtype), *token_metrics)


def pack_step(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
              online: Sequence[tuple[Sequence[int], Sequence[int]]] = (), pad_id: int = 0) -> StepBatch:
    """Pack ``(prompt, chosen, rejected)`` pairs and ``(prompt, response)`` online samples into one row.

    Either part may be empty (evaluation packs online samples alone; DPO steps have none).
    """
    sequences = ([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs] + list(online))
    tokens = pack_sequences(sequences, pad_id=pad_id)
    offline_positions = sum(len(c) + len(r) for _, c, r in pairs)
    online_column = sum(len(p) + len(c) + len(p) + len(r) for p, c, r in pairs)
    return StepBatch(tokens, len(pairs), len(online), offline_positions, online_column)
