"""``sample_tokens``: the fused sampling head with impl dispatch (Triton | chunked PyTorch)."""

from __future__ import annotations

import torch

from hypo_fast import native
from hypo_fast.kernels.sample_head import sample_head as triton_sample_head
from hypo_fast.ops import chunked
from hypo_fast.ops.linear_logprobs import no_autocast, resolve_impl


def chunked_sample_head(hidden, weight, bias=None, *, temperature=1.0, seed=0, greedy=False, return_entropy=False):
    """The CPU path of :func:`sample_tokens`: exact sampling over vocabulary chunks in PyTorch.

    Per chunk: inverse-CDF draw of a candidate from the chunk's softmax (one uniform per row); across
    chunks: a weighted reservoir keeps the new candidate with probability (chunk mass)/(mass so far), so
    the final token is distributed as softmax over the whole vocabulary. Two uniforms per row and chunk
    instead of Gumbel-max's V (CPU random numbers cost more than the logits). Uniforms come from a
    ``torch.Generator`` seeded with ``seed``.
    """
    B, V = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 if greedy else 1.0 / temperature
    generator = None if greedy else torch.Generator(device=hidden.device).manual_seed(seed)
    cdtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    h_t = (hidden.to(cdtype) * inv_temp).t()  # [D, B]
    chunk = min(V, max(chunked.MIN_CHUNK, chunked.DEFAULT_CHUNK_ELEMENTS // max(B, 1)))
    zeros = lambda: torch.zeros(B, device=hidden.device)  # noqa: E731
    m, s, t, z_best = torch.full((B,), float("-inf"), device=hidden.device), zeros(), zeros(), zeros()
    tokens = torch.zeros(B, dtype=torch.long, device=hidden.device)
    for lo in range(0, V, chunk):
        hi = min(lo + chunk, V)
        z = torch.mm(weight[lo:hi].to(cdtype), h_t).t().float().contiguous()  # [B, chunk]; W-major GEMM is faster
        if bias is not None:
            z += bias[lo:hi].float() * inv_temp
        m_c = z.amax(1)
        e = torch.exp(z - m_c[:, None])
        cdf = e.cumsum(1)
        s_c = cdf[:, -1]
        if greedy:
            candidate = z.argmax(1)
        else:
            u = torch.rand(B, 1, generator=generator, device=hidden.device)
            candidate = torch.searchsorted(cdf, u * s_c[:, None], right=True).squeeze(1).clamp_max(hi - lo - 1)
        m_new = torch.maximum(m, m_c)
        a, a_c = torch.exp(m - m_new), torch.exp(m_c - m_new)
        if return_entropy:
            shift = torch.where(s > 0, m_new - m, torch.zeros_like(m))
            t_c = (e * (m_c[:, None] - z)).sum(1)
            t = a * (t + shift * s) + a_c * (t_c + (m_new - m_c) * s_c)
        s_new = s * a + s_c * a_c
        if greedy:
            take = m_c > m
        else:
            take = torch.rand(B, generator=generator, device=hidden.device) * s_new < s_c * a_c
        tokens = torch.where(take, candidate + lo, tokens)
        z_best = torch.where(take, z.gather(1, candidate[:, None]).squeeze(1), z_best)
        m, s = m_new, s_new
    lse = m + torch.log(s)
    entropy = t / s + torch.log(s) if return_entropy else None
    return tokens, z_best - lse, entropy


_SAMPLERS = {"triton": triton_sample_head, "native": native.sample_head, "torch": chunked_sample_head}


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

    Equals ``torch.multinomial(softmax(z), 1)`` in distribution (Gumbel-max in the Triton kernel, inverse
    CDF within vocabulary tiles + Gumbel-max across them in the native op, inverse CDF + weighted
    reservoir over chunks in the PyTorch path), and returns
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
    fn = _SAMPLERS[impl]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    with no_autocast(hidden.device):
        tokens, logp, entropy = fn(hidden, weight, bias, temperature=temperature, seed=seed, greedy=greedy,
                                   return_entropy=return_entropy)
    return (tokens, logp, entropy) if return_entropy else (tokens, logp)
