"""score_segments: the one place τ meets a segment (pairs at 1, online samples at τ)."""

from __future__ import annotations

import torch

from hypo_fast.segments import Segments, score_segments


def _recording_score(calls):
    def score(rows, targets, tau, logit_mean):
        calls.append((rows, tau))
        return rows.sum(-1) * tau

    return score


def test_pairs_at_one_samples_at_tau_and_one_call_when_they_agree():
    pairs, online = torch.randn(3, 4), torch.randn(2, 4)
    targets = torch.zeros(5, dtype=torch.long)
    calls = []
    out = score_segments(_recording_score(calls), Segments((pairs, online), targets, 3, 0.5))
    assert [tau for _, tau in calls] == [1.0, 0.5]
    assert calls[0][0] is pairs and calls[1][0] is online  # rows given apart are scored apart, never copied
    torch.testing.assert_close(out.logps, torch.cat([pairs.sum(-1), 0.5 * online.sum(-1)]))

    calls.clear()
    out = score_segments(_recording_score(calls), Segments((pairs, online), targets, 3, 1.0))
    assert [tau for _, tau in calls] == [1.0]  # τ = 1: one call over pairs and samples
    torch.testing.assert_close(out.logps, torch.cat([pairs, online]).sum(-1))

    calls.clear()
    score_segments(_recording_score(calls), Segments(online, targets[:2], 0, 0.5))  # samples alone: at τ
    assert [tau for _, tau in calls] == [0.5]
