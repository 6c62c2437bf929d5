"""Fused DPO / HyPO modules against naive float64 PyTorch and against Liger's DPO loss."""

from __future__ import annotations

import inspect

import pytest
import torch

from hypo_fast import FusedLinearDPOLoss, FusedLinearHyPOLoss
from hypo_fast.dpo_losses import USES_LABEL_SMOOTHING
from hypo_fast.losses import LOSS_TYPES, dpo_loss, exact_token_kl_loss, rloo_kl_loss
from hypo_fast.reference import linear_token_kl_reference

from tests.oracle import assert_no_worse_than_naive

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
              loss_weights=None, tau=0.05, dtype=torch.float64):
    mask = target != IGNORE
    logp, logits = naive_token_logps(hidden, weight, bias, target, dtype)
    ref_logp, _ = naive_token_logps(ref_hidden, ref_weight, None, target, dtype)
    seq, ref_seq, counts = logp.sum(-1), ref_logp.sum(-1), mask.sum(-1).to(dtype)
    if average:  # Liger's average_log_prob: per-token means, each sequence then one unit
        seq, ref_seq, counts = seq / counts, ref_seq / counts, torch.ones_like(counts)
    n = target.shape[0] // 2
    losses, cr, rr = dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], beta=beta, loss_type=loss_type,
                              label_smoothing=ls, loss_weights=loss_weights, discopop_tau=tau,
                              chosen_tokens=counts[:n], rejected_tokens=counts[n:])
    logit_means = [logits[sl].mean(-1)[mask[sl]].mean() for sl in (slice(0, n), slice(n, None))]
    return losses.mean(), (seq[:n], seq[n:], *logit_means, cr, rr)


def _trl_token_metrics(hidden, weight, bias, target):
    """TRL's ``entropy`` (all scored tokens, chosen and rejected) and ``mean_token_accuracy`` (scored chosen
    tokens whose target is the argmax), from float64 logits."""
    logits = hidden.double() @ weight.double().T + bias.double()  # [2B, T, V]
    mask = target != IGNORE
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    chosen = mask[:target.shape[0] // 2]
    hits = (logits.argmax(-1) == target)[:target.shape[0] // 2]
    return float(entropy[mask].mean()), float(hits[chosen].float().mean())


MPO = ("sigmoid", "bco_pair", "sft"), 0.0, (0.8, 0.2, 1.0)  # TRL's MPO example: types, ε, weights


def _case(impl, loss_type, ls=None, loss_weights=None, average=False):
    if ls is None:
        ls = 0.1 if {loss_type} & USES_LABEL_SMOOTHING or isinstance(loss_type, tuple) else 0.0
    name = "+".join(loss_type) if isinstance(loss_type, tuple) else loss_type
    return pytest.param(impl, loss_type, ls, loss_weights, average, id=f"{impl}-{name}{'-avg' * average}")


NAIVE_CASES = ([_case("torch", t) for t in LOSS_TYPES]
               + [_case("torch", *MPO), _case("torch", "sigmoid", 0.0), _case("torch", "ipo", average=True),
                  _case("torch", ("aot", "sigmoid_norm", "sft"), average=True)]
               + [_case("triton", t, ls) for t, ls in (("sigmoid", 0.0), ("cdpo", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                                       ("ipo", 0.0), ("aot", 0.1))]
               + [_case("triton", *MPO)])


@pytest.mark.parametrize("impl,loss_type,ls,loss_weights,average", NAIVE_CASES)
def test_dpo_module_matches_naive_float64(impl, loss_type, ls, loss_weights, average, seed):
    hidden, target, weight, bias = _on_device(impl, *_batch(2 * B, T), *_head())
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fn = FusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=ls, discopop_tau=0.3,
                            average_log_prob=average, loss_weights=loss_weights, impl=impl)
    loss, aux = fn(leaves[1], leaves[0], target, leaves[2], ref_hidden, ref_weight)
    (loss * 1.3).backward()

    oracle_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected, parts = naive_dpo(oracle_leaves[1], oracle_leaves[0], target, oracle_leaves[2], ref_hidden,
                                ref_weight, beta=0.2, loss_type=loss_type, ls=ls, average=average,
                                loss_weights=loss_weights, tau=0.3)
    (expected * 1.3).backward()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    trl_logits = [torch.tensor(aux.metrics()[k]) for k in ("logits/chosen", "logits/rejected")]  # TRL's masked means
    for ours, ref in zip((aux.chosen_logps, aux.rejected_logps, *trl_logits, aux.chosen_rewards,
                          aux.rejected_rewards), parts):
        torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    entropy, accuracy = _trl_token_metrics(hidden, weight, bias, target)
    assert aux.metrics()["entropy"] == pytest.approx(entropy, abs=1e-5)
    assert aux.metrics()["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    for i, rows in ((2, slice(0, B)), (3, slice(B, None))):  # the aux tuple itself holds Liger's definition
        torch.testing.assert_close(aux[i].double(), _liger_logits_mean(hidden, weight, bias, rows), atol=1e-5,
                                   rtol=1e-5)
    # Gradients: no worse than naive float32 PyTorch (sppo_hard's squared log-ratios amplify fp32 rounding).
    naive_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    naive, _ = naive_dpo(naive_leaves[1], naive_leaves[0], target, naive_leaves[2], ref_hidden, ref_weight,
                         beta=0.2, loss_type=loss_type, ls=ls, average=average, loss_weights=loss_weights, tau=0.3,
                         dtype=torch.float32)
    (naive * 1.3).backward()
    for name, ours, theirs, ref in zip(("hidden", "weight", "bias"), leaves, naive_leaves, oracle_leaves):
        assert_no_worse_than_naive(f"grad {name} (seed {seed})", ours.grad.cpu(), theirs.grad.cpu(), ref.grad.cpu(),
                                   torch.float32)


def test_sft_in_the_list_is_liger_s_nll_term(seed):
    """RPO two ways: loss_type ["sigmoid", "sft"] with weights [1, α] is compute_nll_loss with alpha=α."""
    hidden, target = _batch(2 * B, T)
    weight, bias = _head()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    as_list, _ = FusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])(
        weight, hidden, target, bias, ref_hidden)
    as_nll, aux = FusedLinearDPOLoss(compute_nll_loss=True, alpha=0.7)(weight, hidden, target, bias, ref_hidden)
    torch.testing.assert_close(as_list, as_nll)
    assert aux.nll_loss > 0


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


@pytest.fixture
def liger():
    """Liger-Kernel's chunked losses (an independent oracle; runs on CPU with ``compiled=False``)."""
    return pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")


# Liger 0.8.5's loss types; it refuses ipo and has no aot, aot_unpaired, sft, sigmoid_norm or cdpo
LIGER_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop")


def _liger_logits_mean(hidden, weight, bias, rows):
    """Liger's ``*_logits_mean``: the logits summed over every position of the rows (prompt and padding
    included) divided by B·T·V (TRL's ``logits/*`` metric is the mean over scored tokens instead)."""
    logits = hidden[rows].double() @ weight.double().T + (0 if bias is None else bias.double())
    return logits.sum() / logits.numel()


@pytest.mark.filterwarnings("ignore:label_smoothing")  # sigmoid with ε: ignored by both, as TRL 1.16 does
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
@pytest.mark.parametrize("nll,average,use_bias", [(False, False, True), (True, False, False), (True, True, True)])
@pytest.mark.parametrize("form", ["positional", "keyword"])
def test_same_call_same_results_as_liger(liger, loss_type, nll, average, use_bias, form, seed):
    """The swap is one import line: the same constructor and forward call, positional or by keyword, give
    the same loss, the same seven aux elements (logits means by their documented definitions) and the same
    gradients for the hidden states, the head weight and its bias."""
    hidden, target = _batch(2 * B, T)
    weight, bias = _head()
    bias = bias if use_bias else None
    ref_hidden, ref_weight = hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    ref_bias = None if bias is None else bias + 0.05 * torch.randn_like(bias)
    # Liger's positional order: ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model,
    # average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau
    args = (IGNORE, 0.2, 0.7, nll, False, True, average, 2, loss_type, 0.1, 0.3)
    names = ("ignore_index", "beta", "alpha", "compute_nll_loss", "compiled", "use_ref_model", "average_log_prob",
             "chunk_size", "loss_type", "label_smoothing", "discopop_tau")
    results = []
    for cls in (liger.LigerFusedLinearDPOLoss, FusedLinearDPOLoss):
        module = cls(*args) if form == "positional" else cls(**dict(zip(names, args)))
        leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, bias)]
        call = (leaves[1], leaves[0], target, leaves[2], ref_hidden, ref_weight, ref_bias)
        if form == "positional":
            loss, aux = module(*call)
        else:
            loss, aux = module(**dict(zip(("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight",
                                           "ref_bias"), call)))
        (loss * 0.9).backward()
        results.append((loss, aux, [None if t is None else t.grad for t in leaves]))
    (l_loss, l_aux, l_grads), (o_loss, o_aux, o_grads) = results
    torch.testing.assert_close(o_loss, l_loss, atol=1e-5, rtol=1e-5)
    assert len(o_aux) == len(l_aux) == 7
    for i in range(7):  # Liger's aux, element for element (its logits means included)
        torch.testing.assert_close(o_aux[i].detach(), l_aux[i].detach(), atol=1e-4, rtol=1e-5)
    mask = target != IGNORE
    for i, rows, name in ((2, slice(0, B), "logits/chosen"), (3, slice(B, None), "logits/rejected")):
        torch.testing.assert_close(l_aux[i].double(), _liger_logits_mean(hidden, weight, bias, rows), atol=1e-5,
                                   rtol=1e-5)
        logits = naive_token_logps(hidden[rows], weight, bias, target[rows])[1]  # metrics(): TRL's masked mean
        torch.testing.assert_close(torch.tensor(o_aux.metrics()[name]).double(), logits.mean(-1)[mask[rows]].mean(),
                                   atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(o_grads, l_grads):
        if theirs is None:
            assert ours is None
        else:
            # both fp32, neither an oracle: absolute error relative to the gradient's scale (sppo_hard's are ~5×)
            scale = max(1.0, theirs.abs().max().item())
            torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-4)


def test_constructor_and_forward_take_liger_s_arguments_in_liger_s_order(liger):
    for theirs, ours in ((liger.LigerFusedLinearDPOLoss.__init__, FusedLinearDPOLoss.__init__),
                         (liger.LigerFusedLinearDPOLoss.forward, FusedLinearDPOLoss.forward)):
        theirs = list(inspect.signature(theirs).parameters.values())
        ours = list(inspect.signature(ours).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == \
            [(p.name, p.kind, p.default) for p in theirs]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])
    module = FusedLinearDPOLoss(-1, 0.3, 0.5, True, False, False, True, 4, "robust", 0.2, 0.1)
    assert (module.ignore_index, module.beta, module.alpha, module.compute_nll_loss, module.compiled,
            module.use_ref_model, module.average_log_prob, module.chunk_size, module.loss_type,
            module.label_smoothing, module.discopop_tau) == (-1, 0.3, 0.5, True, False, False, True, 4, "robust",
                                                             0.2, 0.1)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": -0.1}, "label_smoothing"),
])
def test_options_liger_refuses_are_refused_naming_the_argument(liger, kwargs, match):
    with pytest.raises(ValueError):
        liger.LigerFusedLinearDPOLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        FusedLinearDPOLoss(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"compiled": "yes"}, "compiled"), ({"compiled": None}, "compiled"), ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.0}, "chunk_size"), ({"chunk_size": True}, "chunk_size"), ({"alpha": float("nan")}, "alpha"),
    ({"discopop_tau": 0.0}, "discopop_tau"), ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
])
def test_bad_liger_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearDPOLoss(**kwargs)


def test_compiled_and_chunk_size_change_nothing(seed):
    hidden, target = _batch(2 * B, T)
    weight, bias = _head()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    default, _ = FusedLinearDPOLoss()(weight, hidden, target, bias, ref_hidden)
    other, _ = FusedLinearDPOLoss(compiled=False, chunk_size=3)(weight, hidden, target, bias, ref_hidden)
    assert torch.equal(default, other)


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


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("k", [1, 2])
def test_hypo_module_exact_token_matches_naive_float64(impl, k, seed):
    """kl_loss='exact_token' at τ = 0.7: DPO on the pairs + λ·ℓ_kl from the exact per-token KLs of the
    samples against the reference head, scored in one fused pass; values, gradients and both KL metrics."""
    hidden, target, online_hidden, online_target, weight, bias = _on_device(
        impl, *_batch(2 * B, T), *_batch(2 * k, T + 4, prompt=5), *_head())
    ref_weight, ref_bias = weight + 0.05 * torch.randn_like(weight), bias + 0.1 * torch.randn_like(bias)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_online = online_hidden + 0.1 * torch.randn_like(online_hidden)
    tau, mask = 0.7, online_target != IGNORE
    leaves = [t.clone().requires_grad_() for t in (weight, hidden, online_hidden)]
    fn = FusedLinearHyPOLoss(beta=0.2, kl_coef=0.3, num_samples=k, kl_loss="exact_token", temperature=tau, impl=impl)
    loss, aux = fn(leaves[0], leaves[1], target, None, ref_hidden, ref_weight, ref_bias, online_input=leaves[2],
                   online_target=online_target, ref_online_input=ref_online)
    loss.backward()

    w, h, oh = [t.detach().double().requires_grad_() for t in (weight, hidden, online_hidden)]
    seq = naive_token_logps(h, w, None, target)[0].sum(-1)
    ref_seq = naive_token_logps(ref_hidden, ref_weight, ref_bias, target)[0].sum(-1)  # the pairs' reference too
    dpo = dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=0.2)[0].mean()
    kl, logp, ref_logp = linear_token_kl_reference(oh, w, ref_online.double(), ref_weight.double(), online_target,
                                                   None, ref_bias.double(), tau)
    exact = exact_token_kl_loss(logp, kl, mask, k)
    (dpo + 0.3 * exact.loss).backward()
    torch.testing.assert_close(loss.double(), dpo + 0.3 * exact.loss, atol=1e-5, rtol=1e-5)
    for ours, expected in zip(leaves, (w, h, oh)):
        torch.testing.assert_close(ours.grad.double(), expected.grad, atol=1e-5, rtol=1e-4)
    metrics = aux.metrics()
    assert metrics["kl/online_exact"] == pytest.approx(exact.sequence_kls.mean().item(), rel=1e-5)
    assert metrics["kl/online"] == pytest.approx(((logp - ref_logp) * mask).sum(-1).mean().item(), rel=1e-4, abs=1e-5)
    assert metrics["loss/kl"] == pytest.approx(metrics["kl/online_exact"], rel=1e-5)


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


def test_hypo_module_takes_the_same_loss_list(seed):
    hidden, target = _batch(2 * B, T)
    online_hidden, online_target = _batch(4, T)
    weight, _ = _head()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    types, _, weights = MPO
    dpo, dpo_aux = FusedLinearDPOLoss(loss_type=types, loss_weights=weights)(weight, hidden, target, None, ref_hidden)
    hypo = FusedLinearHyPOLoss(kl_coef=0.5, num_samples=2, loss_type=types, loss_weights=weights)
    loss, aux = hypo(weight, hidden, target, None, ref_hidden, online_input=online_hidden, online_target=online_target,
                     ref_online_input=online_hidden * 0.9)
    torch.testing.assert_close(aux.dpo_loss, dpo)
    torch.testing.assert_close(loss, dpo + 0.5 * aux.kl_loss)


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


def test_exact_token_needs_the_reference_hidden_states():
    call = _good_call()
    call.update(ref_online_input=None, online_ref_logps=torch.zeros(call["online_target"].shape))
    with pytest.raises(ValueError, match="ref_online_input"):
        FusedLinearHyPOLoss(kl_coef=0.1, num_samples=2, kl_loss="exact_token")(**call)


@pytest.mark.parametrize("kwargs,match", [({"loss_type": "kto"}, "loss_type"), ({"num_samples": 0}, "num_samples"),
                                          ({"kl_loss": "k2"}, "kl_loss"), ({"label_smoothing": 0.7}, "smoothing")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearHyPOLoss(**kwargs)
