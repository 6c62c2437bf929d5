"""Launcher-level tests of the linear_token_kl Triton kernels: vocabulary splits, skipped tiles, the
per-arch launch plans, accumulation dtype, and (CUDA only) the compiled kernel at a realistic shape."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import linear_token_kl
from hypo_fast.kernels import launch
from hypo_fast.kernels.linear_token_kl import bwd_launch, fwd_launch, linear_token_kl_bwd, linear_token_kl_fwd
from hypo_fast.reference import linear_token_kl_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton)")


def _inputs(N, V, D, dtype=torch.float32, device=DEVICE, ignore_frac=0.25):
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) * 2 / D**0.5
    ref_hidden = hidden + 0.5 * torch.randn(N, D, device=device)
    ref_weight = weight + torch.randn(V, D, device=device) / D**0.5
    bias, ref_bias = torch.randn(V, device=device), torch.randn(V, device=device)
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.rand(N, device=device) < ignore_frac] = -100
    cast = [t.to(dtype) for t in (hidden, weight, ref_hidden, ref_weight, bias, ref_bias)]
    return (*cast, targets)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_vocabulary_splits_merge_exactly(splits, seed):
    hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets = _inputs(45, 300, 40)
    args = (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias)
    one = linear_token_kl_fwd(*args, temperature=0.9, return_logprobs=True, num_splits=1)
    many = linear_token_kl_fwd(*args, temperature=0.9, return_logprobs=True, num_splits=splits)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    oracle = linear_token_kl_reference(*[t.double() for t in (hidden, weight, ref_hidden, ref_weight)], targets,
                                       bias.double(), ref_bias.double(), 0.9)
    for ours, expected in zip((many[0], many[3], many[4]), oracle):
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_tiles_of_ignored_rows_are_skipped_but_outputs_zeroed(seed):
    # 100 rows, only 3 scored: most token tiles exit early; their outputs must still be 0, not NaN
    hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets = _inputs(100, 130, 24, ignore_frac=1.0)
    targets[[3, 50, 97]] = torch.tensor([0, 129, 64], device=DEVICE)
    args = (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias)
    kl, lse, mu, logp, ref_logp = linear_token_kl_fwd(*args, return_logprobs=True)
    for t in (kl, lse, mu, logp, ref_logp):
        assert torch.isfinite(t).all() and t.count_nonzero() == 3
    d_hidden, _, _ = linear_token_kl_bwd(*args, lse, mu, torch.ones_like(kl))
    assert (d_hidden.abs().sum(1) > 0).tolist() == (targets != -100).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_dtype_accumulation(dtype, seed):
    hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets = _inputs(64, 200, 32, dtype)
    args = (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias)
    kl, lse, mu, _, _ = linear_token_kl_fwd(*args)
    g = torch.randn_like(kl)
    _, dw32, _ = linear_token_kl_bwd(*args, lse, mu, g, fp32_weight_grad=True)
    _, dw16, _ = linear_token_kl_bwd(*args, lse, mu, g, fp32_weight_grad=False)
    assert dw16.dtype == dtype
    scale = dw32.float().abs().max()
    assert ((dw16.float() - dw32.float()).abs().max() / scale) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_only_requested_grads_are_computed(seed):
    hidden, weight, ref_hidden, ref_weight, bias, ref_bias, targets = _inputs(20, 50, 16)
    args = (hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias)
    kl, lse, mu, _, _ = linear_token_kl_fwd(*args)
    grads = linear_token_kl_bwd(*args, lse, mu, torch.ones_like(kl), needs_grad=(False, True, False))
    assert grads[0] is None and grads[1] is not None and grads[2] is None


@pytest.mark.parametrize("arch", launch.ARCHS)
def test_launch_plans_follow_the_arch_table(arch):
    """What a GPU launch would get, planned on meta tensors: the arch's tiles, exact fp32 dots unless
    allow_tf32, and bf16 dW accumulated in bf16 only where the arch has bf16 atomics."""
    meta = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    h, w, t, rows = meta(300, 64), meta(1000, 64), meta(300, dt=torch.long), meta(300, dt=torch.float32)
    heads = (h, w, meta(300, 48), meta(1000, 48), t, None, None)
    plan, out = bwd_launch(*heads, rows, rows, rows, arch=arch, fp32_weight_grad=False)
    cfg = launch.TILES["linear_token_kl_bwd"]["half"][arch]
    assert (plan.constexprs["BLOCK_N"], plan.constexprs["BLOCK_V"], plan.constexprs["BLOCK_D"],
            plan.constexprs["num_warps"]) == (cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps)
    assert out.dw.dtype == (torch.bfloat16 if arch >= 90 else torch.float32)
    assert plan.args[17:19] == (64, 48)  # D and D_ref, each head's own dot loop
    for allow_tf32, precision in ((False, "ieee"), (True, "tf32")):
        fp32 = tuple(x.float() if x is not None and x.is_floating_point() else x for x in heads)
        plan, _ = fwd_launch(*fp32, arch=arch, allow_tf32=allow_tf32)
        cfg = launch.TILES["linear_token_kl_fwd"][precision][arch]
        assert plan.constexprs["DOT_PRECISION"] == precision and plan.constexprs["BLOCK_D"] == cfg.block_d


def test_launcher_rejects_a_mismatched_reference():
    args = [torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8), torch.randn(9, 8),
            torch.zeros(4, dtype=torch.long), None, None]
    with pytest.raises(ValueError, match="ref_weight"):
        linear_token_kl_fwd(*args)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_at_realistic_shape(dtype, seed):
    """Compiled Triton (tensor cores for bf16) against the fp64 oracle and naive PyTorch in dtype."""
    hidden, weight, ref_hidden, ref_weight, _, _, targets = _inputs(2048 + 3, 32000 + 7, 1024 + 8, dtype, "cuda")
    g = torch.randn(targets.shape, device="cuda")

    def run(fn, leaves):
        kl = fn(*leaves)
        (kl.float() * g).sum().backward()
        return [kl.detach()] + [t.grad for t in leaves]

    ours = run(lambda h, w: linear_token_kl(h, w, ref_hidden, ref_weight, targets, impl="triton"),
               [t.detach().clone().requires_grad_() for t in (hidden, weight)])
    naive = run(lambda h, w: linear_token_kl_reference(h, w, ref_hidden, ref_weight, targets)[0],
                [t.detach().clone().requires_grad_() for t in (hidden, weight)])
    oracle = run(lambda h, w: linear_token_kl_reference(h, w, ref_hidden.double(), ref_weight.double(), targets)[0],
                 [t.detach().double().requires_grad_() for t in (hidden, weight)])
    for a, n, o in zip(ours, naive, oracle):
        err = lambda t: ((t.double() - o).abs().max() / o.abs().max().clamp_min(1)).item()  # noqa: E731
        assert err(a) <= 2 * err(n) + (2e-5 if dtype == torch.float32 else 1e-2)
