"""score_segments: the one place τ meets a segment (pairs at 1, online samples at τ)."""

from __future__ import annotations

import torch

from hypo_fast.segments import RowMetrics, Segments, score_segments


def _recording_score(calls):
    def score(rows, targets, tau, metrics):
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


def _metric_score(rows, targets, tau, metrics):
    """logps = Σ row · τ; the metrics tag each row: logit_mean = τ, entropy = row[0], top-1 where row[0] > 0."""
    logps = rows.sum(-1) * tau
    if not metrics:
        return logps
    return logps, RowMetrics(torch.full_like(logps, tau), rows[:, 0].clone(), rows[:, 0] > 0)


def test_metrics_stay_row_aligned_on_every_path():
    pairs, online = torch.randn(3, 4), torch.randn(2, 4)
    targets = torch.zeros(5, dtype=torch.long)
    for tau, calls in ((1.0, "one"), (0.5, "two")):
        out = score_segments(_metric_score, Segments((pairs, online), targets, 3, tau), metrics=True)
        rows = torch.cat([pairs, online])
        torch.testing.assert_close(out.metrics.entropy, rows[:, 0])
        assert torch.equal(out.metrics.is_top1, rows[:, 0] > 0)
        expected_tau = torch.tensor([1.0] * 3 + [tau] * 2)
        torch.testing.assert_close(out.metrics.logit_mean, expected_tau, msg=calls)

    def token_kl(rows, targets, tau):
        return torch.ones(rows.shape[0]), rows.sum(-1), None

    out = score_segments(_metric_score, Segments((pairs, online), targets, 3, 0.5), metrics=True, token_kl=token_kl)
    torch.testing.assert_close(out.metrics.entropy, torch.cat([pairs[:, 0], torch.zeros(2)]))  # samples: zeros
    assert not out.metrics.is_top1[3:].any() and out.metrics.is_top1.dtype == torch.bool
    assert score_segments(_metric_score, Segments((pairs, online), targets, 3, 0.5)).metrics is None
