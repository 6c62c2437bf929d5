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


def linear_token_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-position exact KL(π_τ ‖ π_ref,τ) over the vocabulary from both heads' materialised logits.

    ``KL_n = Σ_v π(v)·(log π(v) − log π_ref(v))`` with ``π = softmax((h Wᵀ + b)/τ)`` and
    ``π_ref = softmax((h_ref W_refᵀ + b_ref)/τ)``.

    Returns:
        ``(kl [...], logp [...] | None, ref_logp [...] | None)`` in the input dtype: the target log-probs
        under both heads when ``targets`` is given; all three are 0 where ``targets == ignore_index``.
    """
    log_p = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperature, dim=-1)
    log_q = torch.log_softmax(torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if targets is None:
        return kl, None, None
    ignored = targets == ignore_index
    safe = targets.masked_fill(ignored, 0).unsqueeze(-1)
    logp = log_p.gather(-1, safe).squeeze(-1).masked_fill(ignored, 0.0)
    ref_logp = log_q.gather(-1, safe).squeeze(-1).masked_fill(ignored, 0.0)
    return kl.masked_fill(ignored, 0.0), logp, ref_logp
