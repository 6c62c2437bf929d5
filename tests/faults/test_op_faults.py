"""Bad use of the op and the losses: a clear error naming the argument, never a silent result."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import FusedLinearHyPOLoss, dpo_loss, hypo_loss, linear_logprobs, sequence_logps
from hypo_fast.ops import native
from hypo_fast.objective import HyPOObjective, OptionError

IMPLS = ["torch", "triton"] + (["native"] if native.available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises_on_every_backend(impl):
    """A gradient penalty on ∂logp/∂hidden needs the gradient's own gradient: refused, never wrong."""
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.randint(0, 13, (6,)), impl=impl)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(logp.sum(), hidden, create_graph=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_backward_still_works_beside_create_graph_free_calls(impl):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(13, 8)
    targets = torch.randint(0, 13, (6,))
    grad, = torch.autograd.grad(linear_logprobs(hidden, weight, targets, impl=impl).sum(), hidden)
    expected, = torch.autograd.grad(torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).sum(), hidden)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_zero_width_hidden_is_refused():
    with pytest.raises(ValueError, match="hidden size D"):
        linear_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), 0.0, -1.0])
def test_beta_must_be_positive_and_finite(beta):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=beta)
    with pytest.raises(OptionError, match="beta"):
        HyPOObjective(beta=beta)


def test_kl_coef_must_be_finite():
    with pytest.raises(OptionError, match="kl_coef"):
        HyPOObjective(kl_coef=float("nan"))


def test_segment_ids_out_of_range_name_the_problem():
    with pytest.raises(ValueError, match="segment id 5 is out of range for num_segments=3"):
        sequence_logps(torch.zeros(4), torch.tensor([0, 1, 2, 5]), num_segments=3)


def test_online_log_probs_without_a_mask_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="online_mask"):
        hypo_loss(x, x, x, x, torch.zeros(4, 3), torch.zeros(4, 3), None, kl_coef=0.1, num_samples=2)


def _pairs():
    hidden, target = torch.randn(4, 5, 8), torch.randint(0, 11, (4, 5))
    return torch.randn(11, 8), hidden, target


def test_online_target_without_online_input_is_refused_not_run_as_dpo():
    weight, hidden, target = _pairs()
    loss = FusedLinearHyPOLoss(kl_coef=0.1, num_samples=2)
    with pytest.raises(ValueError, match="online_input"):
        loss(weight, hidden, target, ref_input=hidden, online_target=torch.randint(0, 11, (2, 5)),
             online_ref_logps=torch.zeros(2, 5))


def test_reference_input_of_the_wrong_width_is_refused():
    weight, hidden, target = _pairs()
    with pytest.raises(ValueError, match="ref_input's hidden size 7"):
        FusedLinearHyPOLoss(kl_coef=0.1)(weight, hidden, target, ref_input=torch.randn(4, 5, 7))
