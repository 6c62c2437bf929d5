"""Fused DPO / HyPO modules against naive float64 PyTorch and against Liger's DPO loss."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import FusedLinearDPOLoss, FusedLinearHyPOLoss
from hypo_fast.losses import dpo_loss, rloo_kl_loss

B, T, D, V = 3, 11, 24, 97
IGNORE = -100


def _on_device(impl, *tensors):
    """Triton runs compiled on CUDA when there is one, interpreted on CPU otherwise."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    return [t.to(device) for t in tensors]


def _batch(rows, T_, *, dtype=torch.float32, prompt=3):
    hidden = torch.randn(rows, T_, D, dtype=dtype)
    target = torch.randint(0, V, (rows, T_))
    target[:, :prompt] = IGNORE  # prompt tokens
    target[0, -2:] = IGNORE  # ragged response ends
    return hidden, target


def _head(dtype=torch.float32):
    return torch.randn(V, D, dtype=dtype) * 0.4, torch.randn(V, dtype=dtype) * 0.1


def naive_token_logps(hidden, weight, bias, target, dtype=torch.float64):
    logits = hidden.to(dtype) @ weight.to(dtype).T + (0 if bias is None else bias.to(dtype))  # [R, T, V]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    return logp * (target != IGNORE), logits


def naive_dpo(weight, hidden, target, bias, ref_hidden, ref_weight, *, beta, loss_type, ls, average,
              dtype=torch.float64):
    mask = target != IGNORE
    logp, logits = naive_token_logps(hidden, weight, bias, target, dtype)
    ref_logp, _ = naive_token_logps(ref_hidden, ref_weight, None, target, dtype)
    seq, ref_seq = logp.sum(-1), ref_logp.sum(-1)
    if average:
        seq, ref_seq = seq / mask.sum(-1), ref_seq / mask.sum(-1)
    n = target.shape[0] // 2
    losses, cr, rr = dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], beta=beta, loss_type=loss_type,
                              label_smoothing=ls)
    logit_means = [logits[sl].mean(-1)[mask[sl]].mean() for sl in (slice(0, n), slice(n, None))]
    return losses.mean(), (seq[:n], seq[n:], *logit_means, cr, rr)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                          ("ipo", 0.0)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dpo_module_matches_naive_float64(loss_type, ls, impl, seed):
    hidden, target, weight, bias = _on_device(impl, *_batch(2 * B, T), *_head())
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fn = FusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=ls, impl=impl)
    loss, aux = fn(leaves[1], leaves[0], target, leaves[2], ref_hidden, ref_weight)
    (loss * 1.3).backward()

    oracle_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected, parts = naive_dpo(oracle_leaves[1], oracle_leaves[0], target, oracle_leaves[2], ref_hidden,
                                ref_weight, beta=0.2, loss_type=loss_type, ls=ls, average=loss_type == "ipo")
    (expected * 1.3).backward()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    for ours, ref in zip((aux.chosen_logps, aux.rejected_logps, aux.chosen_logits_mean, aux.rejected_logits_mean,
                          aux.chosen_rewards, aux.rejected_rewards), parts):
        torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    for ours, ref in zip(leaves, oracle_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_precomputed_reference_equals_live_reference(seed):
    hidden, target = _batch(2 * B, T)
    weight, _ = _head()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    fn = FusedLinearDPOLoss(beta=0.1)
    live, aux = fn(weight, hidden, target, ref_input=ref_hidden, ref_weight=weight)
    ref_seq, _ = naive_token_logps(ref_hidden, weight, None, target)
    ref_seq = ref_seq.sum(-1).float()
    pre, _ = fn(weight, hidden, target, ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:])
    torch.testing.assert_close(live, pre, atol=1e-5, rtol=1e-5)
    no_ref, aux = FusedLinearDPOLoss(use_ref_model=False)(weight, hidden, target)
    torch.testing.assert_close(aux.chosen_rewards, 0.1 * aux.chosen_logps)


liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0)])
@pytest.mark.parametrize("nll,average,use_bias", [(False, False, True), (True, False, False), (True, True, True)])
def test_same_call_same_results_as_liger(loss_type, ls, nll, average, use_bias, seed):
    hidden, target = _batch(2 * B, T)
    weight, bias = _head()
    bias = bias if use_bias else None
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    kwargs = dict(beta=0.2, loss_type=loss_type, label_smoothing=ls, compute_nll_loss=nll, alpha=0.7,
                  average_log_prob=average)
    results = []
    for module in (liger.LigerFusedLinearDPOLoss(compiled=False, **kwargs), FusedLinearDPOLoss(**kwargs)):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, aux = module(leaves[1], leaves[0], target, leaves[2], ref_hidden, ref_weight)
        (loss * 0.9).backward()
        results.append((loss, aux, [None if t is None else t.grad for t in leaves]))
    (l_loss, l_aux, l_grads), (o_loss, o_aux, o_grads) = results
    torch.testing.assert_close(o_loss, l_loss, atol=1e-5, rtol=1e-5)
    for i in (0, 1, 4, 5, 6):  # chosen/rejected logps, nll, chosen/rejected rewards: Liger's aux order
        torch.testing.assert_close(o_aux[i].detach(), l_aux[i].detach(), atol=1e-4, rtol=1e-5)
    for ours, theirs in zip(o_grads, l_grads):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def naive_hypo(weight, hidden, target, online_hidden, online_target, ref_weight, ref_hidden, ref_online, *,
               beta, kl_coef, k, dtype=torch.float64):
    dpo, _ = naive_dpo(weight, hidden, target, None, ref_hidden, ref_weight, beta=beta, loss_type="sigmoid",
                       ls=0.0, average=False, dtype=dtype)
    seq, _ = naive_token_logps(online_hidden, weight, None, online_target, dtype)
    ref_seq, _ = naive_token_logps(ref_online, ref_weight, None, online_target, dtype)
    rloo = rloo_kl_loss(seq.sum(-1), ref_seq.sum(-1), k)
    return dpo + kl_coef * rloo.loss, rloo


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("k", [1, 3])
def test_hypo_module_matches_naive_float64(impl, k, seed):
    hidden, target, online_hidden, online_target, weight = _on_device(
        impl, *_batch(2 * B, T), *_batch(2 * k, T + 4, prompt=5), _head()[0])
    ref_weight = weight + 0.05 * torch.randn_like(weight)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_online = online_hidden + 0.1 * torch.randn_like(online_hidden)
    leaves = [t.clone().requires_grad_() for t in (weight, hidden, online_hidden)]
    fn = FusedLinearHyPOLoss(beta=0.2, kl_coef=0.3, num_samples=k, impl=impl)
    loss, aux = fn(leaves[0], leaves[1], target, None, ref_hidden, ref_weight, online_input=leaves[2],
                   online_target=online_target, ref_online_input=ref_online)
    loss.backward()
    oracle_leaves = [t.double().requires_grad_() for t in (weight, hidden, online_hidden)]
    expected, rloo = naive_hypo(oracle_leaves[0], oracle_leaves[1], target, oracle_leaves[2], online_target,
                                ref_weight, ref_hidden, ref_online, beta=0.2, kl_coef=0.3, k=k)
    expected.backward()
    # ℓ_kl = mean (r_i − b_i)·log π(y_i): an fp32 error δ in the sequence sums (|log π| ~ 10²) moves it by
    # about (|log π| + |r − b|)·δ·|log π|/|log π|, so the tolerance scales with |log π|·(|log π| + |r − b|);
    # the advantages and every gradient are checked tightly below
    seq = naive_token_logps(online_hidden, weight, None, online_target)[0].sum(-1)
    scale = 0.3 * (seq.abs() * (seq.abs() + rloo.advantages.abs())).mean().item()
    torch.testing.assert_close(loss.double(), expected, atol=2e-6 * scale + 1e-5, rtol=0)
    torch.testing.assert_close(aux.advantages.double(), rloo.advantages, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(aux.online_kl.double(), rloo.rewards.mean(), atol=1e-4, rtol=1e-5)
    for ours, ref in zip(leaves, oracle_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)
    metrics = aux.metrics()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "kl/online", "loss/dpo", "loss/kl"):
        assert isinstance(metrics[key], float)


def test_hypo_with_precomputed_online_reference_and_zero_kl_coef(seed):
    hidden, target = _batch(2 * B, T)
    online_hidden, online_target = _batch(4, T)
    weight, _ = _head()
    ref_online, _ = naive_token_logps(online_hidden * 0.9, weight, None, online_target)
    ref_online = ref_online.float()
    fn = FusedLinearHyPOLoss(kl_coef=0.5, num_samples=2)
    loss_pre, _ = fn(weight, hidden, target, None, hidden, weight, online_input=online_hidden,
                     online_target=online_target, online_ref_logps=ref_online)
    loss_live, _ = fn(weight, hidden, target, None, hidden, weight, online_input=online_hidden,
                      online_target=online_target, ref_online_input=online_hidden * 0.9)
    torch.testing.assert_close(loss_pre, loss_live, atol=1e-5, rtol=1e-5)
    dpo, _ = FusedLinearDPOLoss()(weight, hidden, target, None, hidden, weight)
    no_kl, aux = FusedLinearHyPOLoss(kl_coef=0.0)(weight, hidden, target, None, hidden, weight,
                                                  online_input=online_hidden, online_target=online_target)
    torch.testing.assert_close(no_kl, dpo)
    assert aux.advantages is None


def _good_call():
    hidden, target = _batch(2 * B, T)
    weight, _ = _head()
    online_hidden, online_target = _batch(4, T)
    return dict(lin_weight=weight, _input=hidden, target=target, ref_input=hidden, online_input=online_hidden,
                online_target=online_target, ref_online_input=online_hidden)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(_input=c["_input"][:5], target=c["target"][:5], ref_input=c["ref_input"][:5]), "even"),
    (lambda c: c.update(target=c["target"][:, :-1]), "target"),
    (lambda c: c.update(ref_input=None), "ref_input"),
    (lambda c: c.update(online_input=c["online_input"][:3], online_target=c["online_target"][:3],
                        ref_online_input=c["ref_online_input"][:3]), "num_samples"),
    (lambda c: c.update(ref_online_input=None), "online_ref_logps"),
    (lambda c: c.update(ref_online_input=c["ref_online_input"][:, :-1]), "ref_online_input"),
    (lambda c: c.update(ref_chosen_logps=torch.zeros(B)), "ref_rejected_logps"),
])
def test_bad_input_names_the_argument(change, match):
    call = _good_call()
    change(call)
    with pytest.raises(ValueError, match=match):
        FusedLinearHyPOLoss(kl_coef=0.1, num_samples=2)(**call)


@pytest.mark.parametrize("kwargs,match", [({"loss_type": "kto"}, "loss_type"), ({"num_samples": 0}, "num_samples"),
                                          ({"kl_loss": "k2"}, "kl_loss"), ({"label_smoothing": 0.7}, "smoothing")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearHyPOLoss(**kwargs)
