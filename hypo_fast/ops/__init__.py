"""Layer 1: each op's one dispatch module (``linear_logprobs``, ``linear_token_kl``, ``sample_head``) over its
backends — Triton (``hypo_fast.kernels``), ``native`` (C++ CPU ops) and ``chunked`` (PyTorch) — chosen by the
one rule in ``backends``; autograd Functions live with their op."""

from hypo_fast.ops.linear_logprobs import LinearLogprobsFunction, linear_logprobs
from hypo_fast.ops.linear_token_kl import LinearTokenKLFunction, linear_token_kl

__all__ = ["LinearLogprobsFunction", "linear_logprobs", "LinearTokenKLFunction", "linear_token_kl"]
