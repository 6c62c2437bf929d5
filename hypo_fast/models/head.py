"""The fused LM head: the model's output-embedding weight, scored or sampled without logits."""

from __future__ import annotations

import torch

from hypo_fast.ops import linear_logprobs, linear_token_kl
from hypo_fast.ops.sample_head import sample_tokens
from hypo_fast.segments import RowMetrics


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

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                temperature: float = 1.0, return_metrics: bool = False):
        """Log-probs ``[N]`` of ``targets [N]`` at ``positions [N]`` (flat indices into ``hidden [..., D]``;
        ``None``: ``hidden`` is already the ``[N, D]`` rows).

        Only those rows reach the vocabulary projection; no host sync (targets come validated from the
        data side). With ``return_metrics`` ``(logps, RowMetrics)``: also the per-row values behind TRL's
        ``logits/*``, ``entropy`` and ``mean_token_accuracy`` (no grad).
        """
        rows = _rows(hidden, positions)  # [N, D]
        out = linear_logprobs(rows, self.weight, targets, bias=self.bias, temperature=temperature,
                              return_entropy=return_metrics, return_logit_mean=return_metrics,
                              return_top1=return_metrics, impl=self.impl, check_targets=False)
        return RowMetrics.of_linear_logprobs(*out) if return_metrics else out

    def score(self, rows: torch.Tensor, targets: torch.Tensor, temperature: float, metrics: bool):
        """:func:`hypo_fast.segments.score_segments`' ``score``: this module's forward on ``[N, D]`` rows."""
        return self(rows, targets, None, temperature, metrics)

    def token_kl(self, rows: torch.Tensor, targets: torch.Tensor, ref_rows: torch.Tensor,
                 ref_head: "FusedLogprobHead", temperature: float = 1.0):
        """``(kl [N], logp [N], ref_logp [N])`` of ``rows [N, D]``: the exact KL(π_τ ‖ π_ref,τ) of the
        next-token distributions against ``ref_head`` applied to ``ref_rows [N, D_ref]`` (the reference's
        hidden states at the same positions; no grad), and the targets' log-probs under π_τ and π_ref,τ, from
        one fused pass (not from the paper: the ``exact_token`` estimator's input). The reference head's
        weight is brought to this head's device and dtype (a copy per call if the reference lives elsewhere).
        """
        like = dict(device=rows.device, dtype=rows.dtype)
        ref_bias = None if ref_head.bias is None else ref_head.bias.detach().to(**like)
        return linear_token_kl(rows, self.weight, ref_rows.to(**like), ref_head.weight.detach().to(**like), targets,
                               bias=self.bias, ref_bias=ref_bias, temperature=temperature, return_logprobs=True,
                               impl="auto" if self.impl == "native" else self.impl, check_targets=False)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, *, temperature: float = 1.0, seed: int = 0, greedy: bool = False):
        """Next token and its log-prob for each row of ``hidden [B, D]`` (see ``sample_tokens``)."""
        return sample_tokens(hidden, self.weight, self.bias, temperature=temperature, seed=seed, greedy=greedy,
                             impl=self.impl)


def _rows(hidden: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    return hidden if positions is None else hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
