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

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .launch import Launch, check_inputs, device_arch, dot_flags, num_splits, tile_config
from .tiles import logits_tile, online_softmax_update


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
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hb, stride_wv,
                              inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
        m, s, t, _ = online_softmax_update(m, s, t, z, tl.where(v_ok[None, :], z, 0.0), HAS_ENTROPY)
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


def sample_head_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    arch: int | None,
    temperature: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    return_entropy: bool = False,
    allow_tf32: bool = False,
    splits: int | None = None,
) -> tuple[Launch, SimpleNamespace]:
    """Plan the sampling-head launch on ``arch`` (None: interpreter): the Launch and its ``[S, B]`` partials."""
    check_inputs(hidden, weight, bias)
    B, V = hidden.shape[0], weight.shape[0]
    if B * V >= 2**31:
        raise ValueError(f"hidden: B·V = {B * V} must stay below 2³¹ (Philox offsets are int32)")
    device = hidden.device
    cfg = tile_config("sample_head", hidden.dtype, arch, allow_tf32)
    b_tiles, v_tiles = triton.cdiv(B, cfg.block_n), triton.cdiv(V, cfg.block_v)
    splits = splits or num_splits(b_tiles, v_tiles, device, arch)
    v_per_split = triton.cdiv(v_tiles, splits) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)
    part = lambda dtype=torch.float32: torch.empty((splits, B), device=device, dtype=dtype)  # noqa: E731
    out = SimpleNamespace(m=part(), s=part(), best=part(), z_best=part(), tok=part(torch.int32))
    out.t = part() if return_entropy else out.m
    dot_in_fp32, dot_precision = dot_flags(hidden.dtype, arch, allow_tf32)
    inv_temp = 1.0 if greedy else 1.0 / temperature
    launch = Launch(
        _sample_head_kernel, (b_tiles, splits),
        (hidden, weight, bias if bias is not None else weight, out.m, out.s, out.t, out.best, out.tok, out.z_best,
         B, V, hidden.shape[1], hidden.stride(0), weight.stride(0), inv_temp, seed, v_per_split),
        dict(HAS_BIAS=bias is not None, HAS_ENTROPY=return_entropy, GREEDY=greedy,
             DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision,
             BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    return launch, out


def sample_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    return_entropy: bool = False,
    allow_tf32: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw one token per row. Returns ``(tokens [B] int64, logp [B] fp32, entropy [B] fp32 | None)``.

    ``logp`` and ``entropy`` are those of ``softmax(z)`` with ``z = (hWᵀ + b)/τ`` (``τ = 1`` when greedy).
    """
    launch, out = sample_head_launch(
        hidden, weight, bias, arch=device_arch(hidden.device), temperature=temperature, seed=seed, greedy=greedy,
        return_entropy=return_entropy, allow_tf32=allow_tf32, splits=num_splits)
    launch()
    m, s, t = out.m, out.s, out.t
    m_max = m.amax(0)
    scale = torch.exp(m - m_max)  # [S, B]
    sum_exp = (s * scale).sum(0)
    lse = m_max + torch.log(sum_exp)
    winner = out.best.argmax(0, keepdim=True)  # [1, B]: the split holding the overall best score
    tokens = out.tok.gather(0, winner).squeeze(0).long()
    logp = out.z_best.gather(0, winner).squeeze(0) - lse
    entropy = None
    if return_entropy:
        entropy = (scale * (t + (m_max - m) * s)).sum(0) / sum_exp + torch.log(sum_exp)
    return tokens, logp, entropy
