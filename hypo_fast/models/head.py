"""The fused LM head: the model's output-embedding weight, scored or sampled without logits."""

from __future__ import annotations

import torch

from hypo_fast.ops import linear_logprobs
from hypo_fast.ops.sample_head import sample_tokens


class FusedLogprobHead(torch.nn.Module):
    """Borrows the LM-head weight (the same ``Parameter`` object, as tied embeddings do) so that it is this
    module's own parameter: under DeepSpeed ZeRO-3 the partitioned weight is gathered by this module's
    forward hooks and its gradient reduce-scattered, although the HF ``lm_head`` forward never runs.
    """

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None = None, impl: str = "auto"):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, impl: str = "auto") -> "FusedLogprobHead":
        return cls(linear.weight, getattr(linear, "bias", None), impl)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                temperature: float = 1.0, return_logit_mean: bool = False):
        """Log-probs ``[N]`` of ``targets [N]`` at ``positions [N]`` (flat indices into ``hidden [..., D]``).

        Only those rows reach the vocabulary projection; no host sync (targets come validated from the
        data side). With ``return_logit_mean`` also the mean logit over the vocabulary per row (a metric).
        """
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, D]
        return linear_logprobs(rows, self.weight, targets, bias=self.bias, temperature=temperature,
                               return_logit_mean=return_logit_mean, impl=self.impl, check_targets=False)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, *, temperature: float = 1.0, seed: int = 0, greedy: bool = False):
        """Next token and its log-prob for each row of ``hidden [B, D]`` (see ``sample_tokens``)."""
        return sample_tokens(hidden, self.weight, self.bias, temperature=temperature, seed=seed, greedy=greedy,
                             impl=self.impl)
