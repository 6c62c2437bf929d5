"""Triton fused sampling head (DESIGN.md §3, ``sample_head``): next token and its log-probability.

For each row of hidden states ``h [B, D]`` and LM head ``W [V, D]``, with ``z = (h Wᵀ + b)/τ``:

    token  = argmax_v (z_v + G_v),   G_v = −log(−log U_v) i.i.d. Gumbel  ⇒  token ~ softmax(z)
    logp   = z_token − logsumexp_v z_v      (and optionally the entropy of softmax(z))

in one streaming pass over vocabulary tiles: no ``[B, V]`` logits. The uniforms come from Triton's
counter-based Philox generator keyed by ``(seed, row·V + v)``, so a step is reproducible from its seed.
Greedy decoding drops the noise. Programs are (row tile × vocabulary split); the launcher merges the
splits' partial (max, sum-exp, entropy sum, best score, best token, best logit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logprobs import _check, _config, _dot_flags, _load_logits_tile, _num_splits, _online_softmax_update


@triton.jit
def _sample_head_kernel(
    h_ptr,  # [B, D] fp32/fp16/bf16
    w_ptr,  # [V, D] same dtype
    b_ptr,  # [V] or dummy
    m_ptr,  # [S, B] fp32 out: max logit
    s_ptr,  # [S, B] fp32 out: Σ exp(z − m)
    t_ptr,  # [S, B] fp32 out: Σ exp(z − m)·(m − z)        (HAS_ENTROPY)
    best_ptr,  # [S, B] fp32 out: best z + G in the split
    tok_ptr,  # [S, B] int32 out: its token
    zbest_ptr,  # [S, B] fp32 out: its logit z
    B, V, D, stride_hb, stride_wv, inv_temp, seed, v_per_split,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, GREEDY: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b, split = tl.program_id(0), tl.program_id(1)
    rows = (pid_b * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < B
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    tok = tl.zeros((BLOCK_N,), dtype=tl.int32)
    z_best = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = _load_logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hb, stride_wv,
                              inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
        m, s, t, _ = _online_softmax_update(m, s, t, z, tl.where(v_ok[None, :], z, 0.0), HAS_ENTROPY)
        score = z
        if not GREEDY:
            u = tl.rand(seed, (rows[:, None] * V + offs_v[None, :]).to(tl.int32))  # [BLOCK_N, BLOCK_V]
            score = z - tl.log(-tl.log(u))  # Gumbel: −log(−log U); U = 0 gives −inf, never chosen
        tile_best = tl.max(score, axis=1)
        tile_arg = tl.argmax(score, axis=1)
        take = tile_best > best
        best = tl.where(take, tile_best, best)
        tok = tl.where(take, (v0 + tile_arg).to(tl.int32), tok)
        z_at = tl.sum(tl.where(offs_v[None, :] == (v0 + tile_arg)[:, None], z, 0.0), axis=1)
        z_best = tl.where(take, z_at, z_best)

    out = split.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(tok_ptr + out, tok, mask=row_ok)
    tl.store(zbest_ptr + out, z_best, mask=row_ok)


def sample_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    return_entropy: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. Returns ``(tokens [B] int64, logp [B] fp32, entropy [B] fp32 | None)``.

    ``logp`` and ``entropy`` are those of ``softmax(z)`` with ``z = (hWᵀ + b)/τ`` (``τ = 1`` when greedy).
    """
    B, V = hidden.shape[0], weight.shape[0]
    _check(hidden, weight, torch.empty(B, device=hidden.device, dtype=torch.long), bias)
    if B * V >= 2**31:
        raise ValueError(f"B·V = {B * V} must stay below 2³¹ (Philox offsets are int32)")
    device = hidden.device
    cfg = _config(device, hidden.dtype, backward=False)
    b_tiles, v_tiles = triton.cdiv(B, cfg.block_n), triton.cdiv(V, cfg.block_v)
    splits = num_splits or _num_splits(b_tiles, v_tiles, device)
    v_per_split = triton.cdiv(v_tiles, splits) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)
    part = lambda dtype=torch.float32: torch.empty((splits, B), device=device, dtype=dtype)  # noqa: E731
    m, s, best, z_best = part(), part(), part(), part()
    t = part() if return_entropy else m
    tok = part(torch.int32)
    dot_in_fp32, precision = _dot_flags(hidden)
    inv_temp = 1.0 if greedy else 1.0 / temperature
    _sample_head_kernel[(b_tiles, splits)](
        hidden, weight, bias if bias is not None else weight, m, s, t, best, tok, z_best,
        B, V, hidden.shape[1], hidden.stride(0), weight.stride(0), inv_temp, seed, v_per_split,
        HAS_BIAS=bias is not None, HAS_ENTROPY=return_entropy, GREEDY=greedy,
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m_max = m.amax(0)
    scale = torch.exp(m - m_max)  # [S, B]
    sum_exp = (s * scale).sum(0)
    lse = m_max + torch.log(sum_exp)
    winner = best.argmax(0, keepdim=True)  # [1, B]: the split holding the overall best score
    tokens = tok.gather(0, winner).squeeze(0).long()
    logp = z_best.gather(0, winner).squeeze(0) - lse
    entropy = None
    if return_entropy:
        entropy = (scale * (t + (m_max - m) * s)).sum(0) / sum_exp + torch.log(sum_exp)
    return tokens, logp, entropy
