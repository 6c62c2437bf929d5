"""The pure HyPO loss functions: closed forms, statistical properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hypo_fast.losses import dpo_loss, hypo_loss, k3_kl_loss, rloo_kl_loss, sampled_kl, sequence_logps


def test_sequence_logps_mask_and_segments_agree(seed):
    token_logps = -torch.rand(3, 7, dtype=torch.float64)
    mask = torch.rand(3, 7) < 0.6
    mask[1] = False  # a row with nothing scored sums to 0 and averages to 0
    sums = sequence_logps(token_logps, mask)
    torch.testing.assert_close(sums, torch.stack([token_logps[i][mask[i]].sum() for i in range(3)]))
    means = sequence_logps(token_logps, mask, average=True)
    assert means[1] == 0
    torch.testing.assert_close(means[0], token_logps[0][mask[0]].mean())
    # packed: the same tokens flattened, with segment ids (−1 = not scored)
    ids = torch.arange(3)[:, None].expand(3, 7).masked_fill(~mask, -1)
    torch.testing.assert_close(sequence_logps(token_logps.reshape(-1), ids.reshape(-1), num_segments=3), sums)
    torch.testing.assert_close(sequence_logps(token_logps.reshape(-1), ids.reshape(-1), average=True,
                                              num_segments=3), means)


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mask_or_segment_ids"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="segment ids"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def _trl_losses(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL DPOTrainer.dpo_loss, restated: the formulas our dpo_loss must reproduce."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_matches_trl_formulas(loss_type, label_smoothing, seed):
    pc, pr, rc, rr = (-10 * torch.rand(6, dtype=torch.float64, requires_grad=True) for _ in range(4))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type,
                                                        label_smoothing=label_smoothing)
    expected = _trl_losses(pc, pr, rc, rr, 0.3, loss_type, label_smoothing)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen_rewards, 0.3 * (pc - rc).detach())
    torch.testing.assert_close(rejected_rewards, 0.3 * (pr - rr).detach())
    assert not chosen_rewards.requires_grad
    g = torch.randn(6, dtype=torch.float64)
    grads = torch.autograd.grad((losses * g).sum(), (pc, pr))
    expected_grads = torch.autograd.grad((expected * g).sum(), (pc, pr))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_dpo_loss_hand_values():
    zero = torch.zeros(1)
    losses, _, _ = dpo_loss(zero, zero, zero, zero)  # equal log-ratios: −log σ(0) = log 2
    assert math.isclose(losses.item(), math.log(2), rel_tol=1e-6)
    # margin h = 1/(2β): IPO's target, loss 0; hinge with βh = 1: loss 0
    one = torch.tensor([5.0])
    assert dpo_loss(one, zero, zero, zero, beta=0.1, loss_type="ipo")[0].item() == 0
    assert dpo_loss(torch.tensor([10.0]), zero, zero, zero, beta=0.1, loss_type="hinge")[0].item() == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"beta": 0.0}, "beta"),
])
def test_dpo_loss_bad_options(kwargs, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, x, torch.zeros(3))


def _tiny_policy(V=3, seed=0):
    """A two-token autoregressive policy over V symbols: θ1 [V] then θ2 [V, V] (next-token logits)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)


def _seq_logp(theta, y):  # y [M, 2] → log π(y) [M]
    t1, t2 = theta
    return torch.log_softmax(t1, -1)[y[:, 0]] + torch.log_softmax(t2, -1)[y[:, 0], y[:, 1]]


def _token_logps(theta, y):  # [M, 2]
    t1, t2 = theta
    return torch.stack([torch.log_softmax(t1, -1)[y[:, 0]], torch.log_softmax(t2, -1)[y[:, 0], y[:, 1]]], 1)


def _all_sequences(V):
    return torch.cartesian_prod(torch.arange(V), torch.arange(V))


def _exact_kl(theta, ref, V):
    ys = _all_sequences(V)
    logp = _seq_logp(theta, ys)
    return (logp.exp() * (logp - _seq_logp(ref, ys))).sum()


def _sample(theta, M, generator):
    t1, t2 = theta
    y1 = torch.multinomial(torch.softmax(t1, -1), M, replacement=True, generator=generator)
    y2 = torch.multinomial(torch.softmax(t2, -1)[y1], 1, generator=generator).squeeze(1)
    return torch.stack([y1, y2], 1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_sampled_kl_estimators(estimator):
    V = 3
    theta, ref = _tiny_policy(V, 1), _tiny_policy(V, 2)
    y = _sample(theta, 200_000, torch.Generator().manual_seed(0))
    mask = torch.ones(y.shape, dtype=torch.bool)
    est = sampled_kl(_token_logps(theta, y), _token_logps(ref, y), mask, estimator)
    exact = _exact_kl(theta, ref, V).item()
    if estimator in ("k1", "k3"):  # unbiased for the sequence KL
        assert abs(est.mean().item() - exact) < 4 * est.std().item() / len(est) ** 0.5 + 1e-9
    if estimator in ("k2", "k3"):
        assert (est >= 0).all()


@pytest.mark.parametrize("num_samples", [1, 2, 4])
def test_rloo_gradient_is_unbiased_for_the_kl_gradient(num_samples):
    """E[∇ℓ_kl] = ∇KL(π‖π_ref), enumerated exactly on a 3-symbol, 2-token policy (fixed seed)."""
    V, batches, per_batch = 3, 40, 3000
    theta = [t.requires_grad_() for t in _tiny_policy(V, 1)]
    ref = _tiny_policy(V, 2)
    exact = torch.autograd.grad(_exact_kl(theta, ref, V), theta)
    generator = torch.Generator().manual_seed(0)
    estimates = []  # one gradient estimate per independent batch → mean and standard error
    for _ in range(batches):
        y = _sample([t.detach() for t in theta], per_batch, generator)
        out = rloo_kl_loss(_seq_logp(theta, y), _seq_logp(ref, y), num_samples)
        estimates.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, theta)]))
    estimates = torch.stack(estimates)
    mean, stderr = estimates.mean(0), estimates.std(0) / batches**0.5
    exact = torch.cat([g.reshape(-1) for g in exact])
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all(), (mean, exact, stderr)


def test_rloo_advantages_by_hand():
    seq = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], requires_grad=True)
    ref = torch.zeros(6)
    out = rloo_kl_loss(seq, ref, num_samples=3)
    # group 1: r = 1,2,6 → b = 4, 3.5, 1.5; group 2: r = 0,0,3 → b = 1.5, 1.5, 0
    torch.testing.assert_close(out.advantages, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    out.loss.backward()
    torch.testing.assert_close(seq.grad, out.advantages / 6)
    assert torch.equal(rloo_kl_loss(seq, ref, 1).advantages, seq.detach())


@pytest.mark.parametrize("kwargs,match", [
    ({"num_samples": 4}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"seq_ref_logps": torch.zeros(5)}, "seq_ref_logps"),
])
def test_rloo_bad_input(kwargs, match):
    args = {"seq_logps": torch.zeros(6), "seq_ref_logps": torch.zeros(6), "num_samples": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        rloo_kl_loss(**args)


def test_hypo_loss_composes_dpo_and_rloo(seed):
    pairs = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    online = -torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    online_ref = -torch.rand(6, 5, dtype=torch.float64)
    mask = torch.rand(6, 5) < 0.8
    dpo_only = hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.0, num_samples=3)
    torch.testing.assert_close(dpo_only.loss, dpo_loss(*pairs)[0].mean())
    out = hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=3)
    rloo = rloo_kl_loss(sequence_logps(online, mask), sequence_logps(online_ref, mask), 3)
    torch.testing.assert_close(out.loss, dpo_loss(*pairs)[0].mean() + 0.5 * rloo.loss)
    torch.testing.assert_close(out.online_kl, rloo.rewards.mean())
    k3 = hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=3, kl_loss="k3")
    torch.testing.assert_close(k3.loss, dpo_loss(*pairs)[0].mean() + 0.5 * k3_kl_loss(online, online_ref, mask))
    with pytest.raises(ValueError, match="kl_loss"):
        hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=3, kl_loss="k2")
    with pytest.raises(ValueError, match="num_samples"):
        hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=4)
