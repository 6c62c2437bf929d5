"""HyPOObjective's loss settings: TRL's loss-type lists and weights, token counts, option errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from hypo_fast.losses import dpo_loss, hypo_loss
from hypo_fast.objective import HyPOObjective, OnlineLogps, OptionError, StepLogps


def _step(B=5, online=None, counts=True):
    logps = [-10 * torch.rand(B, dtype=torch.float64) for _ in range(4)]
    logps[0].requires_grad_()
    tokens = torch.randint(1, 9, (2, B)).double() if counts else (None, None)
    return StepLogps(*logps, online, None, None, tokens[0], tokens[1])


def test_a_list_of_loss_types_is_trl_s_weighted_sum(seed):
    step = _step()
    objective = HyPOObjective(beta=0.3, loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.5, 1.0, 2.0])
    assert objective.loss_type == ("sigmoid", "ipo", "sft") and objective.loss_weights == (0.5, 1.0, 2.0)
    hash(objective)  # frozen settings stay hashable
    loss, aux = objective(step)
    counts = dict(chosen_tokens=step.chosen_tokens, rejected_tokens=step.rejected_tokens)
    expected = sum(w * dpo_loss(*step[:4], beta=0.3, loss_type=t, **counts)[0].mean()
                   for t, w in (("sigmoid", 0.5), ("ipo", 1.0), ("sft", 2.0)))
    torch.testing.assert_close(loss, expected)
    assert aux.metrics()["loss/dpo"] == pytest.approx(expected.item())
    # rewards: β·(Σ log π − Σ log π_ref) whatever the loss types (TRL 1.16)
    torch.testing.assert_close(aux.chosen_rewards, 0.3 * (step.chosen - step.ref_chosen).detach())


def test_the_online_term_adds_to_any_loss_list(seed):
    mask = torch.rand(4, 6) < 0.8
    online = OnlineLogps(-torch.rand(4, 6, dtype=torch.float64), -torch.rand(4, 6, dtype=torch.float64), mask)
    step = _step(online=online)
    settings = dict(beta=0.2, loss_type=("aot", "sigmoid_norm"), label_smoothing=0.1)
    loss, _ = HyPOObjective(**settings, kl_coef=0.4, num_samples=2)(step)
    expected = hypo_loss(*step[:4], *online[:3], kl_coef=0.4, num_samples=2, chosen_tokens=step.chosen_tokens,
                         rejected_tokens=step.rejected_tokens, **settings)
    torch.testing.assert_close(loss, expected.loss)
    dpo_only, _ = HyPOObjective(**settings)(step)
    assert not torch.allclose(loss, dpo_only)


def test_exact_token_needs_the_token_kls_and_reports_the_exact_kl(seed):
    mask = torch.rand(4, 6) < 0.8
    logps = (-torch.rand(4, 6, dtype=torch.float64)).requires_grad_()
    kls = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    objective = HyPOObjective(kl_coef=0.4, num_samples=2, kl_loss="exact_token")
    with pytest.raises(ValueError, match="token_kls"):
        objective(_step(online=OnlineLogps(logps, -torch.rand(4, 6, dtype=torch.float64), mask)))
    online = OnlineLogps(logps, -torch.rand(4, 6, dtype=torch.float64), mask, token_kls=kls)
    loss, aux = objective(_step(online=online))
    metrics = aux.metrics()
    exact_kl = (kls * mask).sum(-1).mean().item()
    assert metrics["kl/online_exact"] == pytest.approx(exact_kl) and metrics["loss/kl"] == pytest.approx(exact_kl)
    loss.backward()
    assert kls.grad is not None and logps.grad is not None  # the analytic term and the score-function term
    rloo_metrics = HyPOObjective(kl_coef=0.4, num_samples=2)(_step(online=online))[1].metrics()
    assert rloo_metrics["kl/online_exact"] == pytest.approx(exact_kl)  # logged whenever the KLs are there


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sft", ["sigmoid", "sft"]])
def test_length_normalised_types_need_token_counts(loss_type):
    objective = HyPOObjective(loss_type=loss_type)
    assert objective.needs_token_counts
    with pytest.raises(ValueError, match="chosen_tokens"):
        objective(_step(counts=False))


def test_sums_only_types_need_no_counts():
    objective = HyPOObjective(loss_type=["sigmoid", "aot", "nca_pair"])
    assert not objective.needs_token_counts
    objective(_step(counts=False))


def test_label_smoothing_with_plain_sigmoid_warns_and_points_at_cdpo():
    with pytest.warns(UserWarning, match="cdpo"):
        HyPOObjective(label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HyPOObjective(loss_type="cdpo", label_smoothing=0.1)
        HyPOObjective(loss_type=["sigmoid", "robust"], label_smoothing=0.1)


@pytest.mark.parametrize("options,option", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": ["sigmoid", "aot_pair"]}, "loss_type"),
    ({"loss_type": ()}, "loss_type"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
    ({"loss_weights": [-1.0]}, "loss_weights"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"discopop_tau": -1.0}, "discopop_tau"),
    ({"beta": float("inf")}, "beta"),
    ({"kl_loss": "exact"}, "kl_loss"),
    ({"kl_loss": "kl_estimator"}, "kl_loss"),
])
def test_bad_options_name_the_option(options, option):
    with pytest.raises(OptionError) as err:
        HyPOObjective(**options)
    assert err.value.option == option


def test_held_out_batches_join_into_one_step():
    """Evaluation scores held-out pairs in batches; joined, they are one step: per-pair fields concatenated,
    the scalar logits means weighted by each batch's pair count."""
    parts = [StepLogps(*(torch.randn(n, dtype=torch.float64) for _ in range(4)), None,
                       torch.tensor(mean, dtype=torch.float64), torch.tensor(-mean, dtype=torch.float64),
                       torch.full((n,), 3.0, dtype=torch.float64), torch.full((n,), 4.0, dtype=torch.float64))
             for n, mean in ((2, 1.0), (3, 6.0))]
    joined = StepLogps.of_pairs(parts)
    for name in ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(joined, name), torch.cat([getattr(p, name) for p in parts]))
    torch.testing.assert_close(joined.chosen_logits_mean, torch.tensor((2 * 1.0 + 3 * 6.0) / 5, dtype=torch.float64))
    torch.testing.assert_close(joined.rejected_logits_mean, -joined.chosen_logits_mean)
    assert joined.online is None
