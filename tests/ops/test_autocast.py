"""Under an enclosing autocast (HF Trainer / accelerate bf16), the ops keep their own precision: the same
result as outside it, on every CPU backend."""

from __future__ import annotations

import pytest
import torch

from hypo_fast import linear_logprobs
from hypo_fast.ops import native
from hypo_fast.ops.sample_head import sample_tokens

IMPLS = ["torch"] + (["native"] if native.available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_does_not_recast_the_ops(impl, seed):
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (9,))
    plain = linear_logprobs(hidden, weight, targets, impl=impl)
    grads = torch.autograd.grad(plain.sum(), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = linear_logprobs(hidden, weight, targets, impl=impl)
        cast_grads = torch.autograd.grad(cast.sum(), (hidden, weight))
        draw = sample_tokens(hidden.detach(), weight.detach(), seed=5, impl=impl)
    torch.testing.assert_close(cast, plain)
    for a, b in zip(cast_grads, grads):
        torch.testing.assert_close(a, b)
    expected = sample_tokens(hidden.detach(), weight.detach(), seed=5, impl=impl)
    assert torch.equal(draw[0], expected[0]) and torch.allclose(draw[1], expected[1])
