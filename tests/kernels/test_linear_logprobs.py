"""Launcher-level tests of the Triton kernels: vocabulary splits, row order, accumulation dtype, CUDA."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import linear_logprobs
from hypo_fast.kernels import launch
from hypo_fast.kernels.linear_logprobs import (bwd_launch, fwd_launch, linear_logprobs_bwd, linear_logprobs_fwd,
                                               row_order)
from hypo_fast.reference import linear_logprobs_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton)")


def _inputs(N, V, D, dtype=torch.float32, device=DEVICE, ignore_frac=0.25):
    hidden = torch.randn(N, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * 2 / D**0.5).to(dtype)
    bias = torch.randn(V, device=device).to(dtype)
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.rand(N, device=device) < ignore_frac] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_vocabulary_splits_merge_exactly(splits, seed):
    hidden, weight, bias, targets = _inputs(45, 300, 40)
    one = linear_logprobs_fwd(hidden, weight, targets, bias, temperature=0.9, return_entropy=True,
                              return_logit_mean=True, return_top1=True, num_splits=1)
    many = linear_logprobs_fwd(hidden, weight, targets, bias, temperature=0.9, return_entropy=True,
                               return_logit_mean=True, return_top1=True, num_splits=splits)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    logp, entropy = linear_logprobs_reference(hidden.double(), weight.double(), targets, bias.double(), 0.9)
    torch.testing.assert_close(many[0].double(), logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many[2].double(), entropy, atol=1e-5, rtol=1e-5)


def test_row_order_puts_ignored_rows_last_stably():
    targets = torch.tensor([5, -100, 2, -100, 7, 1])
    assert row_order(targets, -100).tolist() == [0, 2, 4, 5, 1, 3]


def test_tiles_of_ignored_rows_are_skipped_but_outputs_zeroed(seed):
    # 100 rows, only 3 scored: most token tiles exit early; their outputs must still be 0, not NaN
    hidden, weight, bias, targets = _inputs(100, 130, 24, ignore_frac=1.0)
    targets[[3, 50, 97]] = torch.tensor([0, 129, 64], device=DEVICE)
    logp, lse, entropy, *_ = linear_logprobs_fwd(hidden, weight, targets, bias, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all() and torch.isfinite(entropy).all()
    assert (logp.count_nonzero() == 3) and (entropy.count_nonzero() == 3)
    d_hidden, _, _ = linear_logprobs_bwd(hidden, weight, targets, bias, lse, torch.ones_like(logp))
    assert (d_hidden.abs().sum(1) > 0).tolist() == (targets != -100).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_dtype_accumulation(dtype, seed):
    hidden, weight, bias, targets = _inputs(64, 200, 32, dtype)
    logp, lse, *_ = linear_logprobs_fwd(hidden, weight, targets, bias)
    g = torch.randn_like(logp)
    _, dw32, _ = linear_logprobs_bwd(hidden, weight, targets, bias, lse, g, fp32_weight_grad=True)
    _, dw16, _ = linear_logprobs_bwd(hidden, weight, targets, bias, lse, g, fp32_weight_grad=False)
    assert dw16.dtype == dtype
    scale = dw32.float().abs().max()
    assert ((dw16.float() - dw32.float()).abs().max() / scale) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_only_requested_grads_are_computed(seed):
    hidden, weight, bias, targets = _inputs(20, 50, 16)
    logp, lse, *_ = linear_logprobs_fwd(hidden, weight, targets, bias)
    grads = linear_logprobs_bwd(hidden, weight, targets, bias, lse, torch.ones_like(logp),
                                needs_grad=(False, True, False))
    assert grads[0] is None and grads[1] is not None and grads[2] is None


@pytest.mark.parametrize("arch", launch.ARCHS)
def test_launch_plans_follow_the_arch_table(arch):
    """What a GPU launch would get, planned on meta tensors: the arch's tiles, exact fp32 dots unless
    allow_tf32, and bf16 dW accumulated in bf16 only where the arch has bf16 atomics."""
    meta = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    h, w, t, rows = meta(300, 64), meta(1000, 64), meta(300, dt=torch.long), meta(300, dt=torch.float32)
    plan, out = bwd_launch(h, w, t, None, rows, rows, arch=arch, fp32_weight_grad=False)
    cfg = launch.TILES["linear_logprobs_bwd"]["half"][arch]
    assert (plan.constexprs["BLOCK_N"], plan.constexprs["BLOCK_V"], plan.constexprs["num_warps"]) == \
        (cfg.block_n, cfg.block_v, cfg.num_warps)
    assert out.dw.dtype == (torch.bfloat16 if arch >= 90 else torch.float32)
    plan, out = bwd_launch(h.half(), w.half(), t, None, rows, rows, arch=arch, fp32_weight_grad=False)
    assert out.dw.dtype == torch.float16
    for allow_tf32, precision in ((False, "ieee"), (True, "tf32")):
        plan, _ = fwd_launch(h.float(), w.float(), t, None, arch=arch, allow_tf32=allow_tf32)
        cfg = launch.TILES["linear_logprobs_fwd"][precision][arch]
        assert plan.constexprs["DOT_PRECISION"] == precision and plan.constexprs["BLOCK_D"] == cfg.block_d


def test_allow_tf32_reaches_every_backend(seed):
    """Accepted by every impl; on CPU (interpreter, PyTorch) the dots stay exact fp32, on a GPU the
    Triton kernels use TF32 (10-bit mantissas)."""
    hidden, weight, bias, targets = _inputs(20, 50, 16)
    exact = linear_logprobs(hidden, weight, targets, bias=bias, impl="torch")
    tolerance = 1e-2 if CUDA else 1e-5
    for impl in ("triton", "torch"):
        torch.testing.assert_close(linear_logprobs(hidden, weight, targets, bias=bias, impl=impl, allow_tf32=True),
                                   exact, atol=tolerance, rtol=tolerance)


def test_launcher_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs_fwd(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_at_realistic_shape(dtype, seed):
    """Compiled Triton (tensor cores for bf16) against the fp64 oracle and naive PyTorch in dtype."""
    hidden, weight, bias, targets = _inputs(2048 + 3, 32000 + 7, 1024 + 8, dtype, "cuda")
    g = torch.randn(targets.shape, device="cuda")
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    ours = linear_logprobs(*leaves, targets, impl="triton")
    (ours * g).sum().backward()
    naive_leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    naive, _ = linear_logprobs_reference(*naive_leaves, targets)
    (naive.float() * g).sum().backward()
    oracle_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    oracle, _ = linear_logprobs_reference(*oracle_leaves, targets)
    (oracle * g.double()).sum().backward()
    for a, n, o in [(ours, naive, oracle)] + [(x.grad, y.grad, z.grad) for x, y, z in
                                                zip(leaves, naive_leaves, oracle_leaves)]:
        err = lambda t: ((t.double() - o).abs().max() / o.abs().max().clamp_min(1)).item()  # noqa: E731
        assert err(a) <= 2 * err(n) + (2e-5 if dtype == torch.float32 else 1e-2)
