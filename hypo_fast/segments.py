"""A step's scored tokens in named segments, and the one place the sampling temperature τ meets them.

One HyPO step scores two kinds of tokens (see :mod:`hypo_fast.objective`): the offline pairs' responses
(chosen, then rejected) under π at τ = 1 for the DPO term, and the online samples' under π_τ for the KL
term, the reference alike. Every path lays its rows out as :class:`Segments` and scores them with
:func:`score_segments`: the packed trainer (``StepBatch.segments``), the padded loss modules
(:mod:`hypo_fast.fused_losses`) and the TRL adapter (:mod:`hypo_fast.integrations.trl`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

# score(rows [n, D], targets [n], temperature, metrics) → logps [n], or (logps [n], RowMetrics) with metrics
Score = Callable[[torch.Tensor, torch.Tensor, float, bool], "torch.Tensor | tuple[torch.Tensor, RowMetrics]"]
# token_kl(rows [n, D], targets [n], temperature) → (exact KL_t [n], logps [n], reference logps [n] | None)
TokenKL = Callable[[torch.Tensor, torch.Tensor, float], tuple]


class RowMetrics(NamedTuple):
    """Per-row values behind TRL's token metrics (no grad): ``logits/*``, ``entropy``, ``mean_token_accuracy``."""

    logit_mean: torch.Tensor  # [n] mean logit over the vocabulary
    entropy: torch.Tensor  # [n] entropy of the next-token distribution, detached
    is_top1: torch.Tensor  # [n] bool: the target is the most likely token (a tie counts)

    @classmethod
    def of_linear_logprobs(cls, logp, entropy, logit_mean, is_top1) -> tuple[torch.Tensor, "RowMetrics"]:
        """``linear_logprobs(...)``'s ``(logp, entropy, logit_mean, is_top1)`` (every extra requested) →
        ``(logp, RowMetrics)``."""
        return logp, cls(logit_mean, entropy.detach(), is_top1)

    @classmethod
    def zeros(cls, like: torch.Tensor) -> "RowMetrics":
        """For rows the metrics do not read (online samples scored by the exact-KL op)."""
        zero = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        return cls(zero, zero, zero.bool())

    @classmethod
    def cat(cls, parts: "tuple[RowMetrics, ...]") -> "RowMetrics":
        return cls(*(torch.cat(column) for column in zip(*parts)))


class Segments(NamedTuple):
    """The hidden states whose next token is scored, pairs first: ``rows[:pair_rows]`` predict the pairs'
    response tokens (chosen rows, then rejected), ``rows[pair_rows:]`` the online samples' tokens."""

    rows: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [N, D], or apart as (pairs [N_off, D], online
                                                            # [N_on, D]): joined only if one call scores both
    targets: torch.Tensor  # [N] the scored token of each row (ignore_index where a padded row scores nothing)
    pair_rows: int  # N_off
    temperature: float = 1.0  # τ the online samples were drawn at

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, ...]`` per-row values → ``(pairs [N_off, ...], online [N_on, ...])``."""
        return values[:self.pair_rows], values[self.pair_rows:]

    def row_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pairs [N_off, D], online [N_on, D])``: views, never a copy."""
        return self.rows if isinstance(self.rows, tuple) else self.split(self.rows)

    def joined_rows(self) -> torch.Tensor:
        """``[N, D]``: the rows as one tensor (a copy only when they were given apart)."""
        return torch.cat(self.rows) if isinstance(self.rows, tuple) else self.rows

    @property
    def online_rows(self) -> int:
        return self.targets.shape[0] - self.pair_rows


class SegmentLogps(NamedTuple):
    """:func:`score_segments`' output, row-aligned with the :class:`Segments` it scored."""

    logps: torch.Tensor  # [N] pairs under π (τ = 1), online samples under π_τ
    metrics: RowMetrics | None = None  # per row (0 on rows scored by token_kl): with metrics=True
    online_kls: torch.Tensor | None = None  # [N_on] exact KL(π_τ ‖ π_ref,τ) per online row (``token_kl`` given)
    online_ref_logps: torch.Tensor | None = None  # [N_on] log π_ref,τ from token_kl's pass, if it returns them


def score_segments(score: Score, segments: Segments, *, metrics: bool = False,
                   token_kl: TokenKL | None = None) -> SegmentLogps:
    """Pairs at τ = 1 and online samples at τ, in one ``score`` call when the two temperatures agree.
    ``metrics``: also the :class:`RowMetrics` of every row (the trainer's logs read the pairs').

    With ``token_kl`` the online rows go through the fused exact-KL op instead (their log-prob and exact
    KL_t against the reference in one pass; the ``exact_token`` estimator), the pairs through ``score``.
    """
    pair_rows, online_rows = segments.row_parts()
    pair_targets, online_targets = segments.split(segments.targets)
    tau = segments.temperature
    exact = token_kl is not None and segments.online_rows > 0
    if not exact and (tau == 1.0 or segments.online_rows == 0 or segments.pair_rows == 0):
        out = score(segments.joined_rows(), segments.targets, 1.0 if segments.pair_rows else tau, metrics)
        return SegmentLogps(*out) if metrics else SegmentLogps(out)
    pairs = score(pair_rows, pair_targets, 1.0, metrics)
    online_kls = online_ref = None
    if exact:
        online_kls, online, online_ref = token_kl(online_rows, online_targets, tau)
        online = (online, RowMetrics.zeros(online)) if metrics else online  # the metrics read the pairs only
    else:
        online = score(online_rows, online_targets, tau, metrics)
    if not metrics:
        return SegmentLogps(torch.cat([pairs, online]), None, online_kls, online_ref)
    return SegmentLogps(torch.cat([pairs[0], online[0]]), RowMetrics.cat((pairs[1], online[1])), online_kls,
                        online_ref)
