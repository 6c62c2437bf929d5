"""Triton fused sampling head (``sample_head``): next token and its log-probability. Design notes and
compiled-code facts: docs/kernels.md, "The decode-shaped sampling head".

For each row of hidden states ``h [B, D]`` and LM head ``W [V, D]``, with ``z = (h Wᵀ + b)/τ``, draws
``token ~ softmax(z)`` and returns ``logp = z_token − logsumexp_v z_v`` (and optionally the entropy) in
one streaming pass over ``W``: no ``[B, V]`` logits.

Sampling, per row, over vocabulary tiles of ``BLOCK_V`` columns (as the native CPU op does):
  * within a tile, one candidate by inverse CDF of the tile's softmax (one uniform);
  * across tiles, a Gumbel-max race on the tiles' log-masses ``m_t + log s_t + G_t`` (one uniform),
    which picks a tile with probability (tile mass)/(total mass).
The token is the winning tile's candidate, so it is exactly softmax-distributed, with two random numbers
per row and tile instead of one per logit. Uniforms come from Triton's counter-based Philox generator
keyed by ``(seed, row, tile)``: a step is reproducible from its seed (for a given ``BLOCK_V``, which is
fixed per arch in ``launch.TILES``). Greedy decoding races the tiles' maxima.

Decode-shaped launch: a step has few rows (B = prompts × samples, typically 8–256) and is bound by
reading ``W``. Each program computes a transposed tile ``zᵀ [BLOCK_V, BLOCK_B]`` (the vocabulary on the
MMA's M side), the row tile ``BLOCK_B`` follows B (``launch.head_tile``), and the vocabulary is split
over enough programs to fill the GPU (``launch.vocab_splits``, as for the log-prob kernels), so a step
reads ``W`` once per row tile — once in total for B ≤ BLOCK_B. A second small kernel merges the
per-split partials (max, sum-exp, entropy term, race winner) exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .launch import Launch, check_inputs, device_arch, dot_flags, head_tile, vocab_splits
from .tiles import logits_tile, logits_tile_t, merge_softmax_stats


@triton.jit
def _sample_head_kernel(
    h_ptr,  # [B, D] fp32/fp16/bf16, row stride stride_hb
    w_ptr,  # [V, D] same dtype, row stride stride_wv
    b_ptr,  # [V] same dtype (HAS_BIAS) or dummy
    m_ptr,  # [S, B] fp32 out: max logit in the split
    s_ptr,  # [S, B] fp32 out: Σ exp(z − m)
    t_ptr,  # [S, B] fp32 out: Σ exp(z − m)·(m − z)          (HAS_ENTROPY)
    key_ptr,  # [S, B] fp32 out: the split's winning race key
    tok_ptr,  # [S, B] int32 out: its token
    zc_ptr,  # [S, B] fp32 out: its logit z
    B, V, D, stride_hb, stride_wv, inv_temp, seed, v_per_split, v_tiles,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, GREEDY: tl.constexpr, VOCAB_MAJOR: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b, split = tl.program_id(0), tl.program_id(1)  # row tiles of one split run side by side (L2)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    t = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    tok = tl.zeros((BLOCK_B,), dtype=tl.int32)
    z_tok = tl.zeros((BLOCK_B,), dtype=tl.float32)
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + cols
        v_ok = offs_v < v_end
        if VOCAB_MAJOR:  # zᵀ on the MMA (vocabulary on its M side), used as [BLOCK_B, BLOCK_V]
            z = tl.trans(logits_tile_t(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hb, stride_wv,
                                       inv_temp, BLOCK_B, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION))
        else:
            z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hb, stride_wv, inv_temp,
                            BLOCK_B, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
        z_fin = tl.where(v_ok[None, :], z, 0.0)
        m_t = tl.max(z, axis=1)
        e = tl.exp(z - tl.where(m_t == float("-inf"), 0.0, m_t)[:, None])  # 0 at padded (−inf) columns
        s_t = tl.sum(e, axis=1)
        t_t = s_t
        if HAS_ENTROPY:
            t_t = tl.sum(e * (m_t[:, None] - z_fin), axis=1)
        m, s, t = merge_softmax_stats(m, s, t, m_t, s_t, t_t, HAS_ENTROPY)
        if GREEDY:
            key = m_t
            pick = tl.argmax(z, axis=1)
        else:
            counter = (rows * v_tiles + v0 // BLOCK_V).to(tl.int32)  # one Philox counter per (row, tile)
            u_pick, u_race, _, _ = tl.rand4x(seed, counter)
            cdf = tl.cumsum(e, axis=1)
            target = (1.0 - u_pick) * s_t  # in (0, s_t]: the first column whose cdf reaches it has e > 0
            pick = tl.sum((cdf < target[:, None]).to(tl.int32), axis=1)
            last = tl.max(tl.where(e > 0, cols[None, :], 0), axis=1)  # rounding may leave cdf[-1] < s_t
            pick = tl.minimum(pick, last)
            key = m_t + tl.log(s_t) - tl.log(-tl.log(u_race))  # Gumbel race on the tile's log-mass
        take = key > best
        best = tl.where(take, key, best)
        tok = tl.where(take, v0 + pick, tok)
        if GREEDY:
            z_tok = tl.where(take, m_t, z_tok)
        else:
            z_tok = tl.where(take, tl.sum(tl.where(cols[None, :] == pick[:, None], z_fin, 0.0), axis=1), z_tok)

    out = split.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(key_ptr + out, best, mask=row_ok)
    tl.store(tok_ptr + out, tok, mask=row_ok)
    tl.store(zc_ptr + out, z_tok, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    m_ptr,  # [S, B] fp32: per-split max logit
    s_ptr,  # [S, B] fp32: per-split Σ exp(z − m)
    t_ptr,  # [S, B] fp32: per-split entropy term          (HAS_ENTROPY)
    key_ptr,  # [S, B] fp32: per-split race key
    tok_ptr,  # [S, B] int32: per-split token
    zc_ptr,  # [S, B] fp32: per-split token logit
    tokens_ptr,  # [B] int64 out
    logp_ptr,  # [B] fp32 out: z_token − lse
    ent_ptr,  # [B] fp32 out: entropy                   (HAS_ENTROPY)
    B, S,
    HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    tok = tl.zeros((BLOCK,), dtype=tl.int32)
    z_tok = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, S):
        at = k * B + rows
        m_k = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
        s_k = tl.load(s_ptr + at, mask=ok, other=0.0)
        t_k = s_k
        if HAS_ENTROPY:
            t_k = tl.load(t_ptr + at, mask=ok, other=0.0)
        m, s, t = merge_softmax_stats(m, s, t, m_k, s_k, t_k, HAS_ENTROPY)
        key = tl.load(key_ptr + at, mask=ok, other=float("-inf"))
        take = key > best  # ties keep the earlier split, as argmax would
        best = tl.where(take, key, best)
        tok = tl.where(take, tl.load(tok_ptr + at, mask=ok, other=0), tok)
        z_tok = tl.where(take, tl.load(zc_ptr + at, mask=ok, other=0.0), z_tok)
    log_s = tl.log(s)
    tl.store(tokens_ptr + rows, tok.to(tl.int64), mask=ok)
    tl.store(logp_ptr + rows, z_tok - (m + log_s), mask=ok)
    if HAS_ENTROPY:
        tl.store(ent_ptr + rows, t / s + log_s, mask=ok)


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
) -> tuple[Launch, Launch, SimpleNamespace]:
    """Plan the sampling head on ``arch`` (None: interpreter): the tile launch, the merge launch, and
    ``out`` with the ``[S, B]`` partials, the results (``tokens``, ``logp``, ``entropy``) and the row tiles."""
    check_inputs(hidden, weight, bias)
    (B, D), V = hidden.shape, weight.shape[0]
    device = hidden.device
    cfg = head_tile(hidden.dtype, arch, B, allow_tf32)
    v_tiles = triton.cdiv(V, cfg.block_v)  # the Philox counters' stride: one per (row, vocabulary tile)
    if B * v_tiles >= 2**31:
        raise ValueError(f"hidden: B·V/BLOCK_V = {B * v_tiles} must stay below 2³¹ (int32 Philox counters)")
    b_tiles, splits, v_per_split = vocab_splits(B, V, cfg, device, arch, splits)
    part = lambda dtype=torch.float32: torch.empty((splits, B), device=device, dtype=dtype)  # noqa: E731
    out = SimpleNamespace(m=part(), s=part(), key=part(), zc=part(), tok=part(torch.int32), row_tiles=b_tiles)
    out.t = part() if return_entropy else out.m
    out.tokens = torch.empty(B, device=device, dtype=torch.int64)
    out.logp = torch.empty(B, device=device, dtype=torch.float32)
    out.entropy = torch.empty(B, device=device, dtype=torch.float32) if return_entropy else None
    dot_in_fp32, dot_precision = dot_flags(hidden.dtype, arch, allow_tf32)
    tiles = Launch(
        _sample_head_kernel, (b_tiles, splits),
        (hidden, weight, bias if bias is not None else weight, out.m, out.s, out.t, out.key, out.tok, out.zc,
         B, V, D, hidden.stride(0), weight.stride(0), 1.0 if greedy else 1.0 / temperature, seed, v_per_split,
         v_tiles),
        dict(HAS_BIAS=bias is not None, HAS_ENTROPY=return_entropy, GREEDY=greedy,
             VOCAB_MAJOR=cfg.vocab_major, DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=dot_precision,
             BLOCK_B=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    merge_block = 128 if arch is not None else 32
    merge = Launch(
        _merge_splits_kernel, (triton.cdiv(B, merge_block),),
        (out.m, out.s, out.t, out.key, out.tok, out.zc, out.tokens, out.logp,
         out.entropy if return_entropy else out.logp, B, splits),
        dict(HAS_ENTROPY=return_entropy, BLOCK=merge_block, num_warps=4 if arch is not None else 1),
    )
    return tiles, merge, out


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
    ``allow_tf32`` lets fp32 inputs use TF32 tensor cores (default: exact fp32 dots).
    """
    tiles, merge, out = sample_head_launch(
        hidden, weight, bias, arch=device_arch(hidden.device), temperature=temperature, seed=seed, greedy=greedy,
        return_entropy=return_entropy, allow_tf32=allow_tf32, splits=num_splits)
    tiles()
    merge()
    return out.tokens, out.logp, out.entropy
