"""``sample_tokens``: the fused sampling head's one dispatch module (Triton | native | chunked PyTorch)."""

from __future__ import annotations

import torch

from hypo_fast.kernels.sample_head import sample_head as triton_sample_head
from hypo_fast.ops import chunked, native
from hypo_fast.ops.backends import no_autocast, resolve_impl

BACKENDS = {"triton": triton_sample_head, "native": native.sample_head, "torch": chunked.chunked_sample_head}


def sample_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    return_entropy: bool = False,
    allow_tf32: bool = False,
    impl: str = "auto",
):
    """Draw ``token ~ softmax((hidden @ weight.T + bias) / temperature)`` per row, with its log-prob.

    Equals ``torch.multinomial(softmax(z), 1)`` in distribution, and returns ``log_softmax(z)[token]``
    — the log-probability the sampler records for HyPO's KL reward — without materialising the
    ``[B, V]`` logits. The Triton kernel and the native op draw one candidate per vocabulary tile by
    inverse CDF and pick the tile by a Gumbel-max race on the tiles' log-masses; the PyTorch path draws
    per chunk by inverse CDF and merges chunks with a weighted reservoir. Both are exact. ``greedy``
    takes ``argmax z`` and the ``τ = 1`` log-prob. A given ``seed`` reproduces the draw (per impl, and
    for the Triton kernel per GPU arch family: its tile width is part of the key).

    Args:
        hidden: ``[B, D]`` last hidden state of each row; weight ``[V, D]``; bias ``[V]`` or None.
        allow_tf32: fp32 inputs may use TF32 tensor cores in the Triton kernel (default: exact fp32).
        impl: ``"auto"``, ``"triton"``, ``"native"`` or ``"torch"``; see :func:`hypo_fast.ops.backends.resolve_impl`.

    Returns:
        ``(tokens [B] int64, logp [B] fp32)``, plus ``entropy [B]`` when ``return_entropy``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [B, D] and weight [V, D], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive (use greedy=True for argmax), got {temperature}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError("weight must have hidden's dtype and device")
    fn = BACKENDS[resolve_impl(impl, hidden.device)]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    with no_autocast(hidden.device):
        tokens, logp, entropy = fn(hidden, weight, bias, temperature=temperature, seed=seed, greedy=greedy,
                                   return_entropy=return_entropy, allow_tf32=allow_tf32)
    return (tokens, logp, entropy) if return_entropy else (tokens, logp)
