"""Layer 1: autograd Functions and the impl dispatch (Triton | chunked PyTorch)."""

from hypo_fast.ops.linear_logprobs import LinearLogprobsFunction, linear_logprobs

__all__ = ["LinearLogprobsFunction", "linear_logprobs"]
