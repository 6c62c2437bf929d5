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

# score(rows [n, D], targets [n], temperature, logit_mean) → logps [n], or (logps [n], logit means [n])
Score = Callable[[torch.Tensor, torch.Tensor, float, bool], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
# token_kl(rows [n, D], targets [n], temperature) → (exact KL_t [n], logps [n], reference logps [n] | None)
TokenKL = Callable[[torch.Tensor, torch.Tensor, float], tuple]


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
    logit_means: torch.Tensor | None = None  # [N] mean logit per row (a metric; 0 on rows scored by token_kl)
    online_kls: torch.Tensor | None = None  # [N_on] exact KL(π_τ ‖ π_ref,τ) per online row (``token_kl`` given)
    online_ref_logps: torch.Tensor | None = None  # [N_on] log π_ref,τ from token_kl's pass, if it returns them


def score_segments(score: Score, segments: Segments, *, logit_mean: bool = False,
                   token_kl: TokenKL | None = None) -> SegmentLogps:
    """Pairs at τ = 1 and online samples at τ, in one ``score`` call when the two temperatures agree.

    With ``token_kl`` the online rows go through the fused exact-KL op instead (their log-prob and exact
    KL_t against the reference in one pass; the ``exact_token`` estimator), the pairs through ``score``.
    """
    pair_rows, online_rows = segments.row_parts()
    pair_targets, online_targets = segments.split(segments.targets)
    tau = segments.temperature
    exact = token_kl is not None and segments.online_rows > 0
    if not exact and (tau == 1.0 or segments.online_rows == 0 or segments.pair_rows == 0):
        out = score(segments.joined_rows(), segments.targets, 1.0 if segments.pair_rows else tau, logit_mean)
        return SegmentLogps(*out) if logit_mean else SegmentLogps(out)
    pairs = score(pair_rows, pair_targets, 1.0, logit_mean)
    online_kls = online_ref = None
    if exact:
        online_kls, online, online_ref = token_kl(online_rows, online_targets, tau)
        online = (online, torch.zeros_like(online)) if logit_mean else online  # the metric reads the pairs only
    else:
        online = score(online_rows, online_targets, tau, logit_mean)
    if not logit_mean:
        return SegmentLogps(torch.cat([pairs, online]), None, online_kls, online_ref)
    return SegmentLogps(torch.cat([pairs[0], online[0]]), torch.cat([pairs[1], online[1]]), online_kls, online_ref)
