"""Triton kernels for the fused exact per-position KL between two LM heads (``linear_token_kl``).

    KL[n] = Σ_v p_v·(log p_v − log q_v),   p = softmax(z), q = softmax(r),
    z = (h Wᵀ + b) / τ,   r = (h_ref W_refᵀ + b_ref) / τ

Neither model's ``[N, V]`` logits are written to memory. With ``δ_v = z_v − r_v`` and
``μ = Σ_v p_v δ_v``, ``KL = μ − (lse(z) − lse(r))``: one streaming pass per row keeps the running max and
sum-exp of both heads and ``u = Σ_v e^(z_v − m)·δ_v`` (rescaled with the policy's running max like the
sum-exp), so ``μ = u/s``. The backward needs ``∂KL/∂z_v = p_v·(δ_v − μ)`` (and ``onehot − p`` for the
optional target log-prob), so it saves only ``lse(z)`` and ``μ`` per row.

Forward: programs are (token tile × vocabulary split); each loops over its split's vocabulary tiles,
computing the policy tile and the reference tile (two ``tl.dot`` loops over D and D_ref) and folding
both into the running statistics; optionally both target logits (``logp`` and ``ref_logp`` from the same
pass). The launcher merges the ``[S, N]`` per-split partials exactly.

Backward: programs are (token tile × vocabulary tile); each recomputes both logits tiles, forms
``dz = g·p·(δ − μ) [+ g_logp·(onehot − p)]`` in fp32, and accumulates ``dh``, ``dW`` (and ``db``) with
relaxed atomics through ``tiles.head_grads_tile``, as the log-prob kernel does. The reference side gets
no gradient. Cost: forward 4NVD FLOPs, backward 8NVD (both tiles recomputed, then dh and dW).

Tile configs come from ``launch.TILES`` (per arch); ``fwd_launch``/``bwd_launch`` plan a launch without
running it (the compile gate compiles exactly those); what they plan like the log-prob kernel's comes from
``launch.head_fwd_plan``/``head_bwd_plan``. Ignored rows are visited last and tiles made only of them exit
at once. Layer 0: imports torch and triton only.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .launch import Launch, check_inputs, device_arch, head_bwd_plan, head_fwd_plan, head_grads
from .tiles import (head_grads_tile, logits_tile, no_rows, online_softmax_update, row_values, split_columns,
                    split_program, target_grad, tile_columns, tile_program)


@triton.jit
def _linear_token_kl_fwd_kernel(
    h_ptr,  # [N, D] fp32/fp16/bf16, row stride stride_hn
    w_ptr,  # [V, D] same dtype, row stride stride_wv
    b_ptr,  # [V] or dummy                                   (HAS_BIAS)
    hr_ptr,  # [N, DR] reference hidden, same dtype, row stride stride_hrn
    wr_ptr,  # [V, DR] reference head, row stride stride_wrv
    br_ptr,  # [V] or dummy                                  (HAS_REF_BIAS)
    tgt_ptr,  # [N] int32/int64 (rows equal to ignore_index are skipped)
    order_ptr,  # [N] int64: row visiting order, ignored rows last
    m_ptr,  # [S, N] fp32 out: max policy logit per split
    s_ptr,  # [S, N] fp32 out: Σ exp(z − m)
    u_ptr,  # [S, N] fp32 out: Σ exp(z − m)·(z − r)
    mr_ptr,  # [S, N] fp32 out: max reference logit
    sr_ptr,  # [S, N] fp32 out: Σ exp(r − m_r)
    zt_ptr,  # [S, N] fp32 out: policy target logit, 0 in splits without it   (HAS_LOGP)
    rt_ptr,  # [S, N] fp32 out: reference target logit                       (HAS_LOGP)
    N, V, D, DR, stride_hn, stride_wv, stride_hrn, stride_wrv, inv_temp, ignore_index, v_per_split, num_splits,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_LOGP: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    rows, tgt, row_ok, split = split_program(order_ptr, tgt_ptr, N, ignore_index, num_splits, BLOCK_N, GROUP_N)
    if no_rows(row_ok):
        return  # every row ignored: no vocabulary FLOPs; the launcher zeroes these outputs

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_r = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_r = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    r_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin, v_end = split_columns(split, v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv,
                        inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
        r = logits_tile(hr_ptr, wr_ptr, br_ptr, rows, row_ok, offs_v, v_ok, DR, stride_hrn, stride_wrv,
                        inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, DOT_IN_FP32, DOT_PRECISION)
        delta = tl.where(v_ok[None, :], z, 0.0) - tl.where(v_ok[None, :], r, 0.0)  # no −inf − −inf
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 at padded columns
        s = s * alpha + tl.sum(e, axis=1)
        u = u * alpha + tl.sum(e * delta, axis=1)
        m = m_new
        m_r, s_r, _, _ = online_softmax_update(m_r, s_r, s_r, r, r, False)
        if HAS_LOGP:
            hit = offs_v[None, :] == tgt[:, None]
            z_tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
            r_tgt += tl.sum(tl.where(hit, r, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(u_ptr + out, u, mask=row_ok)
    tl.store(mr_ptr + out, m_r, mask=row_ok)
    tl.store(sr_ptr + out, s_r, mask=row_ok)
    if HAS_LOGP:
        tl.store(zt_ptr + out, z_tgt, mask=row_ok)
        tl.store(rt_ptr + out, r_tgt, mask=row_ok)


@triton.jit
def _linear_token_kl_bwd_kernel(
    h_ptr,  # [N, D] fp32/fp16/bf16
    w_ptr,  # [V, D] same dtype
    b_ptr,  # [V] or dummy                                    (HAS_BIAS)
    hr_ptr,  # [N, DR] reference hidden, same dtype
    wr_ptr,  # [V, DR] reference head
    br_ptr,  # [V] or dummy                                   (HAS_REF_BIAS)
    tgt_ptr,  # [N] int32/int64
    order_ptr,  # [N] int64: row visiting order, ignored rows last
    lse_ptr,  # [N] fp32 from the forward: logsumexp(z)
    mu_ptr,  # [N] fp32 from the forward: μ = Σ p·(z − r)
    g_ptr,  # [N] fp32: upstream gradient of KL
    gl_ptr,  # [N] fp32: upstream gradient of logp            (HAS_LOGP_GRAD)
    dh_ptr,  # [N, D] fp32 accumulator (atomic)                (H_GRAD)
    dw_ptr,  # [V, D] fp32 or weight dtype accumulator (atomic) (W_GRAD)
    db_ptr,  # [V] fp32 accumulator (atomic)                   (HAS_BIAS and B_GRAD)
    N, V, D, DR, stride_hn, stride_wv, stride_hrn, stride_wrv, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_LOGP_GRAD: tl.constexpr,
    H_GRAD: tl.constexpr, W_GRAD: tl.constexpr, B_GRAD: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    rows, tgt, row_ok, pid_v = tile_program(order_ptr, tgt_ptr, N, V, ignore_index, BLOCK_N, BLOCK_V, GROUP_N)
    if no_rows(row_ok):
        return

    offs_v, v_ok = tile_columns(pid_v, V, BLOCK_V)
    z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv,
                    inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
    r = logits_tile(hr_ptr, wr_ptr, br_ptr, rows, row_ok, offs_v, v_ok, DR, stride_hrn, stride_wrv,
                    inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_REF_BIAS, DOT_IN_FP32, DOT_PRECISION)
    lse = row_values(lse_ptr, rows, row_ok)
    mu = row_values(mu_ptr, rows, row_ok)
    g = row_values(g_ptr, rows, row_ok)
    p = tl.exp(z - lse[:, None])  # softmax tile, 0 at padded columns
    delta = tl.where(v_ok[None, :], z, 0.0) - tl.where(v_ok[None, :], r, 0.0)  # no −inf − −inf
    dz = g[:, None] * p * (delta - mu[:, None])  # ∂KL/∂z_v = p_v·(δ_v − μ)
    if HAS_LOGP_GRAD:  # + g_logp·(onehot − p)
        dz += target_grad(p, offs_v[None, :] == tgt[:, None], row_values(gl_ptr, rows, row_ok))
    head_grads_tile(dz, inv_temp, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn,
                    stride_wv, BLOCK_D, HAS_BIAS, H_GRAD, W_GRAD, B_GRAD, DOT_IN_FP32, DOT_PRECISION)


def _check_heads(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias) -> None:
    """Both heads, in the launcher's terms (``ValueError`` naming the argument)."""
    check_inputs(hidden, weight, bias, targets)
    check_inputs(ref_hidden, ref_weight, ref_bias)
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden must have N={hidden.shape[0]} rows, got {tuple(ref_hidden.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have V={weight.shape[0]} rows, got {tuple(ref_weight.shape)}")
    if ref_hidden.dtype != hidden.dtype:
        raise ValueError(f"ref_hidden dtype {ref_hidden.dtype} must match hidden dtype {hidden.dtype}")


def fwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    *,
    arch: int | None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_logprobs: bool = False,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
    splits: int | None = None,
) -> tuple[Launch, SimpleNamespace]:
    """Plan the forward launch on ``arch`` (None: interpreter): the Launch and its ``[S, N]`` partial outputs."""
    _check_heads(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
    (N, D), V, DR = hidden.shape, weight.shape[0], ref_weight.shape[1]
    plan = head_fwd_plan("linear_token_kl_fwd", hidden, bias, targets, V, arch=arch, ignore_index=ignore_index,
                         allow_tf32=allow_tf32, order=order, splits=splits)
    out = plan.partials(N, hidden.device, ("m", "s", "u", "m_r", "s_r"), z_tgt=return_logprobs,
                        r_tgt=return_logprobs)
    launch = Launch(
        _linear_token_kl_fwd_kernel, plan.grid,
        (hidden, weight, bias if bias is not None else weight, ref_hidden, ref_weight,
         ref_bias if ref_bias is not None else ref_weight, targets, plan.order,
         out.m, out.s, out.u, out.m_r, out.s_r, out.z_tgt, out.r_tgt,
         N, V, D, DR, hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
         1.0 / temperature, ignore_index, plan.v_per_split, plan.splits),
        dict(plan.constexprs, HAS_REF_BIAS=ref_bias is not None, HAS_LOGP=return_logprobs),
    )
    return launch, out


def linear_token_kl_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_logprobs: bool = False,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused forward. Returns ``(kl, lse, mu, logp | None, ref_logp | None)``, fp32 ``[N]``; 0 in ignored rows.

    ``lse`` = logsumexp(z) and ``mu`` = Σ p·(z − r) are what the backward needs.
    """
    launch, out = fwd_launch(
        hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, arch=device_arch(hidden.device),
        temperature=temperature, ignore_index=ignore_index, return_logprobs=return_logprobs, allow_tf32=allow_tf32,
        order=order, splits=num_splits)
    launch()

    # merge the splits exactly: each (max, sum) pair on its row's global max; u rides with the policy's
    valid = targets != ignore_index
    m, m_r = out.m.amax(dim=0), out.m_r.amax(dim=0)
    scale = torch.exp(out.m - m)  # [S, N]
    s, u = (out.s * scale).sum(dim=0), (out.u * scale).sum(dim=0)
    s_r = (out.s_r * torch.exp(out.m_r - m_r)).sum(dim=0)
    mu = u / s
    kl = (mu - (m - m_r)) - (torch.log(s) - torch.log(s_r))  # μ − (lse_z − lse_r), small terms first
    lse, lse_r = m + torch.log(s), m_r + torch.log(s_r)
    logp = ref_logp = None
    if return_logprobs:
        logp = torch.where(valid, out.z_tgt.sum(dim=0) - lse, 0.0)
        ref_logp = torch.where(valid, out.r_tgt.sum(dim=0) - lse_r, 0.0)
    zero = lambda t: torch.where(valid, t, 0.0)  # noqa: E731  (skipped rows hold unwritten partials)
    return zero(kl), zero(lse), zero(mu), logp, ref_logp


def bwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    lse: torch.Tensor,
    mu: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_logp: torch.Tensor | None = None,
    *,
    arch: int | None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[Launch, SimpleNamespace]:
    """Plan the backward launch on ``arch``: the Launch and its (zeroed) accumulators."""
    _check_heads(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
    (N, D), V, DR = hidden.shape, weight.shape[0], ref_weight.shape[1]
    plan, out = head_bwd_plan("linear_token_kl_bwd", hidden, weight, bias, targets, arch=arch,
                              ignore_index=ignore_index, allow_tf32=allow_tf32, order=order, needs_grad=needs_grad,
                              fp32_weight_grad=fp32_weight_grad, unused=lse)
    has_logp_grad = grad_logp is not None
    launch = Launch(
        _linear_token_kl_bwd_kernel, plan.grid,
        (hidden, weight, bias if bias is not None else weight, ref_hidden, ref_weight,
         ref_bias if ref_bias is not None else ref_weight, targets, plan.order, lse, mu,
         grad_kl.float().contiguous(), grad_logp.float().contiguous() if has_logp_grad else lse,
         out.dh, out.dw, out.db,
         N, V, D, DR, hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0),
         1.0 / temperature, ignore_index),
        dict(plan.constexprs, HAS_REF_BIAS=ref_bias is not None, HAS_LOGP_GRAD=has_logp_grad),
    )
    return launch, out


def linear_token_kl_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    lse: torch.Tensor,
    mu: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_logp: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward by tile recomputation. Returns ``(d_hidden, d_weight, d_bias)`` in input dtypes
    (the policy side only). ``needs_grad`` and ``fp32_weight_grad`` as in ``linear_logprobs_bwd``."""
    launch, out = bwd_launch(
        hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, lse, mu, grad_kl, grad_logp,
        arch=device_arch(hidden.device), temperature=temperature, ignore_index=ignore_index, needs_grad=needs_grad,
        fp32_weight_grad=fp32_weight_grad, allow_tf32=allow_tf32, order=order)
    launch()
    return head_grads(out, hidden, weight, bias)
