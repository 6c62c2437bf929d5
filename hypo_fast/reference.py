"""Readable PyTorch oracles: they materialise what the fused ops never do.

Tests run them on float64 inputs as ground truth, and on low-precision inputs as the "naive PyTorch in
that dtype" every fused path must be no worse than.
"""

from __future__ import annotations

import torch


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token target log-probs and softmax entropies from materialised logits.

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; targets: ``[...]``; bias: ``[V]`` or None.

    Returns:
        ``(logp [...], entropy [...])`` in the input dtype; 0 where ``targets == ignore_index``.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature  # [..., V]
    log_probs = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)
