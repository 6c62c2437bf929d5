"""Helpers that compare a fused op with a float64 oracle and with naive PyTorch in the same dtype."""

from __future__ import annotations

import torch

# A result passes when its error is within twice naive PyTorch's in that dtype plus this tolerance
# (errors are relative to the oracle's largest magnitude, absolute below 1). The factor 2 absorbs
# rounding-order noise where both are at the dtype's floor (e.g. logits of magnitude 1e3 in fp32).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    scale = oracle.abs().max().clamp_min(1.0)  # absolute below magnitude 1
    return float(((x.double() - oracle).abs().max() / scale).item()) if oracle.numel() else 0.0


def assert_no_worse_than_naive(name, ours, naive, oracle, dtype, tolerance=None):
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err, naive_err = rel_err(ours, oracle), rel_err(naive, oracle)
    assert ours_err <= 2 * naive_err + tolerance, (
        f"{name}: relative error {ours_err:.3g} vs naive {dtype} {naive_err:.3g} (×2 +{tolerance:.0e})")


def run_with_grads(fn, tensors, grad_outputs):
    """Run fn on leaf copies of tensors, backprop Σ out·g, return (outputs, grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outputs, grad_outputs))
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves]
    return [o.detach() for o in outputs], grads



def impl_param(impl, *values):
    """``pytest.param(impl, *values)``, skipped for impl="native" when hypo_fast._C was not built."""
    import pytest

    from hypo_fast.ops import native

    skip = pytest.mark.skipif(impl == "native" and not native.available(), reason="hypo_fast._C not built")
    return pytest.param(impl, *values, marks=skip)
