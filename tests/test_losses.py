"""The pure HyPO loss functions: closed forms, statistical properties, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from hypo_fast.losses import (LOSS_TYPES, dpo_loss, exact_token_kl_loss, hypo_loss, k3_kl_loss, rloo_kl_loss,
                              sampled_kl, sequence_logps)


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


def _oracle(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, tau):
    """TRL 1.16's per-pair losses restated independently with plain float64 σ/log/exp (no logsigmoid), from
    the log-ratios a = pc − rc, b = pr − rr of summed log-probs and the token counts nc, nr."""
    sig = torch.sigmoid
    a, b = pc - rc, pr - rr
    h = a - b

    def smoothed(d):  # the probability of the observed label is (1−ε)σ(βd) + ε(1−σ(βd)) for cDPO's bound
        p = sig(beta * d)
        return -(1 - eps) * torch.log(p) - eps * torch.log(1 - p)

    if loss_type == "sigmoid":
        return -torch.log(sig(beta * h))
    if loss_type == "cdpo":
        return smoothed(h)
    if loss_type == "robust":
        p = sig(beta * h)
        return ((1 - eps) * -torch.log(p) - eps * -torch.log(1 - p)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if loss_type == "ipo":
        return (a / nc - b / nr - 0.5 / beta) ** 2
    if loss_type == "sigmoid_norm":
        return -torch.log(sig(beta * (a / nc - b / nr)))
    if loss_type == "exo_pair":
        q = sig(beta * h)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if loss_type == "nca_pair":
        return -torch.log(sig(beta * a)) - 0.5 * torch.log(1 - sig(beta * a)) - 0.5 * torch.log(1 - sig(beta * b))
    if loss_type == "bco_pair":
        return -torch.log(sig(beta * a)) - torch.log(1 - sig(beta * b))
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(beta * a)) + sig(beta * b)
    if loss_type == "apo_down":
        return sig(beta * a) + (1 - sig(beta * h))
    if loss_type == "discopop":
        m = sig(beta * h / tau)
        return (1 - m) * -torch.log(sig(beta * h)) + m * torch.exp(-beta * h)
    if loss_type == "aot":
        return smoothed(torch.sort(pc - pr).values - torch.sort(rc - rr).values)
    if loss_type == "aot_unpaired":
        return smoothed(torch.sort(a).values - torch.sort(b).values)
    assert loss_type == "sft"
    return -(pc.sum() / nc.sum()) * torch.ones_like(pc)


def _pairs(B=6):
    logps = [(-10 * torch.rand(B, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    counts = torch.randint(1, 12, (2, B)).double()
    return logps, counts


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_loss_matches_trl_formulas(loss_type, label_smoothing, seed):
    if loss_type == "exo_pair" and label_smoothing == 0:
        pytest.skip("exo_pair needs label_smoothing > 0")
    (pc, pr, rc, rr), (nc, nr) = _pairs()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type,
                                                        label_smoothing=label_smoothing, discopop_tau=0.2,
                                                        chosen_tokens=nc, rejected_tokens=nr)
    expected = _oracle(loss_type, pc, pr, rc, rr, nc, nr, 0.3, label_smoothing, 0.2)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen_rewards, 0.3 * (pc - rc).detach())  # Σ log-ratios for every type (TRL)
    torch.testing.assert_close(rejected_rewards, 0.3 * (pr - rr).detach())
    assert not chosen_rewards.requires_grad
    g = torch.randn(6, dtype=torch.float64)
    grads = torch.autograd.grad((losses * g).sum(), (pc, pr, rc, rr), allow_unused=True)
    expected_grads = torch.autograd.grad((expected * g).sum(), (pc, pr, rc, rr), allow_unused=True)
    for a, b in zip(grads, expected_grads):
        if b is None:  # sft reads only the chosen policy log-probs
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b)


def test_sigmoid_ignores_label_smoothing_and_cdpo_uses_it(seed):
    (pc, pr, rc, rr), _ = _pairs()
    plain = dpo_loss(pc, pr, rc, rr, beta=0.3)[0]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)[0], plain)
    cdpo = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="cdpo", label_smoothing=0.2)[0]
    assert not torch.allclose(cdpo, plain)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="cdpo")[0], plain)


def test_loss_list_is_the_weighted_sum_of_pair_means(seed):
    (pc, pr, rc, rr), (nc, nr) = _pairs()
    kw = dict(beta=0.3, label_smoothing=0.1, chosen_tokens=nc, rejected_tokens=nr)
    types, weights = ["sigmoid", "bco_pair", "sft", "aot"], [0.8, 0.2, 1.0, 0.5]
    combined = dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=weights, **kw)[0]
    expected = sum(w * dpo_loss(pc, pr, rc, rr, loss_type=t, **kw)[0].mean() for t, w in zip(types, weights))
    torch.testing.assert_close(combined.mean(), expected)
    equal = dpo_loss(pc, pr, rc, rr, loss_type=("hinge", "ipo"), **kw)[0]  # no weights: 1.0 each
    torch.testing.assert_close(equal, dpo_loss(pc, pr, rc, rr, loss_type="hinge", **kw)[0]
                               + dpo_loss(pc, pr, rc, rr, loss_type="ipo", **kw)[0])


def test_token_counts_normalise_only_their_loss_types(seed):
    (pc, pr, rc, rr), (nc, nr) = _pairs()
    # ipo on sums with counts = ipo on per-token means without counts (each sequence one unit)
    with_counts = dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_tokens=nc, rejected_tokens=nr)[0]
    torch.testing.assert_close(with_counts, dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, loss_type="ipo")[0])
    # the token-mean NLL of every chosen token, not the mean of per-sequence means
    sft = dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_tokens=nc, rejected_tokens=nr)[0]
    torch.testing.assert_close(sft, torch.full_like(pc, -(pc.sum() / nc.sum()).item()))
    for loss_type in ("sigmoid", "nca_pair", "aot"):  # sums: counts change nothing
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, loss_type=loss_type, chosen_tokens=nc,
                                            rejected_tokens=nr)[0], dpo_loss(pc, pr, rc, rr, loss_type=loss_type)[0])


def test_aot_couples_the_pairs_through_sorting(seed):
    (pc, pr, rc, rr), _ = _pairs(8)
    perm = torch.randperm(8)
    while torch.equal(perm, torch.arange(8)):
        perm = torch.randperm(8)
    aot = dpo_loss(pc, pr, rc, rr, loss_type="aot")[0]
    # AOT compares the two margin distributions: re-pairing the reference margins changes nothing …
    torch.testing.assert_close(dpo_loss(pc, pr, rc[perm], rr[perm], loss_type="aot")[0], aot)
    # … while DPO's per-pair margins do change
    assert not torch.allclose(dpo_loss(pc, pr, rc[perm], rr[perm])[0].mean(), dpo_loss(pc, pr, rc, rr)[0].mean())
    # unpaired AOT compares the chosen and rejected log-ratio distributions: shuffle the rejected side alone
    unpaired = dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired")[0]
    torch.testing.assert_close(dpo_loss(pc, pr[perm], rc, rr[perm], loss_type="aot_unpaired")[0], unpaired)
    assert not torch.allclose(dpo_loss(pc, pr[perm], rc, rr[perm], loss_type="aot")[0].mean(), aot.mean())


def test_dpo_loss_hand_values():
    zero = torch.zeros(1)
    losses, _, _ = dpo_loss(zero, zero, zero, zero)  # equal log-ratios: −log σ(0) = log 2
    assert math.isclose(losses.item(), math.log(2), rel_tol=1e-6)
    # margin h = 1/(2β): IPO's target, loss 0; hinge with βh = 1: loss 0
    one = torch.tensor([5.0])
    assert dpo_loss(one, zero, zero, zero, beta=0.1, loss_type="ipo")[0].item() == 0
    assert dpo_loss(torch.tensor([10.0]), zero, zero, zero, beta=0.1, loss_type="hinge")[0].item() == 0
    # SPPO's targets: ρ+ = 1/(2β), ρ− = −1/(2β)
    assert dpo_loss(one, -one, zero, zero, beta=0.1, loss_type="sppo_hard")[0].item() == 0
    # at zero log-ratios: APO-zero 1 − ½ + ½, APO-down ½ + 1 − ½, BCO 2·log 2, NCA log 2 + log 2
    for loss_type, value in (("apo_zero", 1.0), ("apo_down", 1.0), ("bco_pair", 2 * math.log(2)),
                             ("nca_pair", 2 * math.log(2)), ("discopop", 0.5 * math.log(2) + 0.5)):
        assert math.isclose(dpo_loss(zero, zero, zero, zero, loss_type=loss_type)[0].item(), value, rel_tol=1e-6)
    # EXO at h = 0: KL((½, ½) ‖ (1−ε, ε))
    eps = 0.01
    exo = dpo_loss(zero, zero, zero, zero, loss_type="exo_pair", label_smoothing=eps)[0].item()
    assert math.isclose(exo, 0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps), rel_tol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": ["sigmoid", "aot_pair"]}, "loss_type"),  # TRL 1.16 renamed it aot_unpaired
    ({"loss_type": []}, "loss_type"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"beta": 0.0}, "beta"),
    ({"discopop_tau": 0.0}, "discopop_tau"),
    ({"loss_weights": [1.0, 2.0]}, "loss_weights"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}, "loss_weights"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("nan")]}, "loss_weights"),
    ({"chosen_tokens": torch.ones(2)}, "rejected_tokens"),
    ({"chosen_tokens": torch.ones(3), "rejected_tokens": torch.ones(3)}, "one shape"),
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


def _token_kls(theta, ref, y):  # [M, 2]: exact KL of the next-token distributions at each sampled prefix
    def kl(a, b):
        log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    return torch.stack([kl(theta[0], ref[0]).expand(y.shape[0]), kl(theta[1][y[:, 0]], ref[1][y[:, 0]])], 1)


def _exact_token_loss(theta, ref, y, num_samples):
    return exact_token_kl_loss(_token_logps(theta, y), _token_kls(theta, ref, y), torch.ones(y.shape, dtype=torch.bool),
                               num_samples).loss


@pytest.mark.parametrize("num_samples", [1, 2, 4])
def test_exact_token_gradient_is_unbiased_for_the_kl_gradient(num_samples):
    """E[∇ℓ_kl] = ∇KL(π‖π_ref) for the exact_token estimator, enumerated as for RLOO (fixed seed)."""
    V, batches, per_batch = 3, 40, 3000
    theta = [t.requires_grad_() for t in _tiny_policy(V, 1)]
    ref = _tiny_policy(V, 2)
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(_exact_kl(theta, ref, V), theta)])
    generator = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(batches):
        y = _sample([t.detach() for t in theta], per_batch, generator)
        estimates.append(torch.cat([g.reshape(-1) for g in
                                    torch.autograd.grad(_exact_token_loss(theta, ref, y, num_samples), theta)]))
    estimates = torch.stack(estimates)
    mean, stderr = estimates.mean(0), estimates.std(0) / batches**0.5
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all(), (mean, exact, stderr)
    assert (exact.abs() > 20 * stderr).any()  # the test has power: a wrong term would be many SEs off


@pytest.mark.parametrize("num_samples", [2, 4])
def test_exact_token_gradient_varies_less_than_rloo(num_samples):
    """The variance (trace of the covariance) of one prompt's gradient estimate from k samples: the exact
    per-token estimator at most half RLOO's on the toy (measured 0.11 at k = 2 and 0.13 at k = 4)."""
    V, draws = 3, 2000
    theta = [t.requires_grad_() for t in _tiny_policy(V, 1)]
    ref = _tiny_policy(V, 2)
    variance = {}
    for name in ("rloo", "exact_token"):
        generator = torch.Generator().manual_seed(0)
        estimates = []
        for _ in range(draws):
            y = _sample([t.detach() for t in theta], num_samples, generator)
            loss = (rloo_kl_loss(_seq_logp(theta, y), _seq_logp(ref, y), num_samples).loss if name == "rloo"
                    else _exact_token_loss(theta, ref, y, num_samples))
            estimates.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)]))
        variance[name] = torch.stack(estimates).var(0).sum().item()
    assert variance["exact_token"] < 0.5 * variance["rloo"], variance


def test_exact_token_advantages_by_hand():
    """k = 2, two prompts, ragged lengths: future KL minus the other sample's at the same position."""
    kls = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [1.0, 1.0, 1.0], [7.0, 0.0, 0.0]], requires_grad=True)
    logps = torch.zeros(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = exact_token_kl_loss(logps, kls, mask, num_samples=2)
    # futures: [5, 3, 0], [5, 0]; [2, 1, 0], [0] → minus the partner's future at the same position (0 past its end)
    expected = torch.tensor([[0.0, 3.0, 0.0], [0.0, -3.0, 0.0], [2.0, 1.0, 0.0], [-2.0, 0.0, 0.0]])
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.sequence_kls, torch.tensor([6.0, 9.0, 3.0, 7.0]))
    assert out.loss.item() == pytest.approx(25.0 / 4)  # the value is the mean exact sequence KL
    out.loss.backward()
    torch.testing.assert_close(logps.grad, expected / 4)
    torch.testing.assert_close(kls.grad, mask.float() / 4)
    no_baseline = exact_token_kl_loss(logps, kls, mask, num_samples=1)
    torch.testing.assert_close(no_baseline.advantages,
                               torch.tensor([[5.0, 3.0, 0.0], [5.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_exact_token_packed_segments_equal_the_mask(seed):
    """Packed [N] tokens with segment ids (interleaved samples, unscored tokens between) give what the
    [M, T] mask gives."""
    M, T = 6, 5
    logps, kls = -torch.rand(M, T, dtype=torch.float64), torch.rand(M, T, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 3, 1, 4, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    padded = exact_token_kl_loss(logps, kls, mask, num_samples=3)
    ids = torch.arange(M)[None, :].expand(T, M)  # column-major: sample tokens interleave, order kept
    packed_ids = torch.where(mask.t(), ids, -1).reshape(-1)
    packed = exact_token_kl_loss(logps.t().reshape(-1), kls.t().reshape(-1), packed_ids, num_samples=3,
                                 num_segments=M)
    torch.testing.assert_close(packed.loss, padded.loss)
    torch.testing.assert_close(packed.sequence_kls, padded.sequence_kls)
    torch.testing.assert_close(packed.advantages, padded.advantages.t().reshape(-1))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_samples": 4}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"token_kls": torch.zeros(6, 2)}, "token_kls"),
    ({"mask_or_segment_ids": torch.ones(6, 2, dtype=torch.bool)}, "mask_or_segment_ids"),
])
def test_exact_token_bad_input(kwargs, match):
    args = {"token_logps": torch.zeros(6, 3), "token_kls": torch.zeros(6, 3),
            "mask_or_segment_ids": torch.ones(6, 3, dtype=torch.bool), "num_samples": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        exact_token_kl_loss(**args)


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
    kls = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    exact = hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=3, kl_loss="exact_token",
                      online_token_kls=kls)
    expected = exact_token_kl_loss(online, kls, mask, 3)
    torch.testing.assert_close(exact.loss, dpo_loss(*pairs)[0].mean() + 0.5 * expected.loss)
    torch.testing.assert_close(exact.online_kl_exact, expected.sequence_kls.mean())
    torch.testing.assert_close(exact.online_kl, rloo.rewards.mean())  # the k1 estimate is still reported
    assert out.online_kl_exact is None
    with pytest.raises(ValueError, match="online_token_kls"):
        hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=3, kl_loss="exact_token")
    with pytest.raises(ValueError, match="num_samples"):
        hypo_loss(*pairs, online, online_ref, mask, kl_coef=0.5, num_samples=4)
