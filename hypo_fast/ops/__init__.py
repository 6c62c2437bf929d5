"""Layer 1: each op's one dispatch module (``linear_logprobs``, ``sample_head``) over its backends —
Triton (``hypo_fast.kernels``), ``native`` (C++ CPU ops) and ``chunked`` (PyTorch) — chosen by the one
rule in ``backends``; autograd Functions live with their op."""

from hypo_fast.ops.linear_logprobs import LinearLogprobsFunction, linear_logprobs

__all__ = ["LinearLogprobsFunction", "linear_logprobs"]
