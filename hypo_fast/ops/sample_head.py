"""``sample_tokens``: the fused sampling head with impl dispatch (Triton | chunked PyTorch)."""

from __future__ import annotations

import torch

from hypo_fast.kernels.sample_head import sample_head as triton_sample_head
from hypo_fast.ops.chunked import DEFAULT_CHUNK_ELEMENTS, MIN_CHUNK
from hypo_fast.ops.linear_logprobs import resolve_impl


def chunked_sample_head(hidden, weight, bias=None, *, temperature=1.0, seed=0, greedy=False, return_entropy=False):
    """Gumbel-max over vocabulary chunks in PyTorch: the CPU path of :func:`sample_tokens`.

    Gumbel noise is ``−log E`` with ``E ~ Exp(1)`` from a ``torch.Generator`` seeded with ``seed``.
    """
    B, V = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 if greedy else 1.0 / temperature
    generator = None if greedy else torch.Generator(device=hidden.device).manual_seed(seed)
    cdtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    h = hidden.to(cdtype) * inv_temp
    chunk = min(V, max(MIN_CHUNK, DEFAULT_CHUNK_ELEMENTS // max(B, 1)))
    m = torch.full((B,), float("-inf"), device=hidden.device)
    s = torch.zeros(B, device=hidden.device)
    t = torch.zeros(B, device=hidden.device)
    best = torch.full((B,), float("-inf"), device=hidden.device)
    tokens = torch.zeros(B, dtype=torch.long, device=hidden.device)
    z_best = torch.zeros(B, device=hidden.device)
    for lo in range(0, V, chunk):
        hi = min(lo + chunk, V)
        z = torch.mm(h, weight[lo:hi].to(cdtype).t()).float()  # [B, chunk]
        if bias is not None:
            z += bias[lo:hi].float() * inv_temp
        m_c = z.amax(1)
        m_new = torch.maximum(m, m_c)
        e = torch.exp(z - m_new[:, None])
        if return_entropy:
            shift = torch.where(s > 0, m_new - m, torch.zeros_like(m))
            t = torch.exp(m - m_new) * (t + shift * s) + (e * (m_new[:, None] - z)).sum(1)
        s = s * torch.exp(m - m_new) + e.sum(1)
        m = m_new
        score = z if greedy else z - torch.empty_like(z).exponential_(generator=generator).log_()
        c_best, c_arg = score.max(1)
        take = c_best > best
        best = torch.where(take, c_best, best)
        tokens = torch.where(take, c_arg + lo, tokens)
        z_best = torch.where(take, z.gather(1, c_arg[:, None]).squeeze(1), z_best)
    lse = m + torch.log(s)
    entropy = t / s + torch.log(s) if return_entropy else None
    return tokens, z_best - lse, entropy


def sample_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """Draw ``token ~ softmax((hidden @ weight.T + bias) / temperature)`` per row, with its log-prob.

    Equals ``torch.multinomial(softmax(z), 1)`` in distribution (Gumbel-max), and returns
    ``log_softmax(z)[token]`` — the log-probability the sampler records for HyPO's KL reward — without
    materialising the ``[B, V]`` logits. ``greedy`` takes ``argmax z`` and the ``τ = 1`` log-prob.
    A given ``seed`` reproduces the draw (per impl).

    Args:
        hidden: ``[B, D]`` last hidden state of each row; weight ``[V, D]``; bias ``[V]`` or None.

    Returns:
        ``(tokens [B] int64, logp [B] fp32)``, plus ``entropy [B]`` when ``return_entropy``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [B, D] and weight [V, D], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive (use greedy=True for argmax), got {temperature}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError("weight must have hidden's dtype and device")
    impl = resolve_impl(impl, hidden.device)
    fn = triton_sample_head if impl == "triton" else chunked_sample_head
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    tokens, logp, entropy = fn(hidden, weight, bias, temperature=temperature, seed=seed, greedy=greedy,
                               return_entropy=return_entropy)
    return (tokens, logp, entropy) if return_entropy else (tokens, logp)
