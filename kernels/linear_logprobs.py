"""Triton kernels for fused linear log-probabilities (``linear_logprobs``). Design notes (cost, why the
gradient is not formed in the forward) and compiled-code facts: docs/kernels.md.

    logp[n] = z[n, y_n] - logsumexp_v z[n, v],   z = (h Wᵀ + b) / τ

The ``[N, V]`` logits are never written to memory: every program computes a ``[BLOCK_N, BLOCK_V]``
logits tile in registers (a ``tl.dot`` loop over D) and folds it into running fp32 statistics.

Forward: programs are (token tile × vocabulary split); each loops over the vocabulary tiles of its split
keeping an online max / sum-exp, the target logit, and optionally Σ p·(m − z) (entropy) and Σ z (mean logit).
The per-split partials (``[S, N]`` fp32, S small) are merged by the launcher; only ``lse[N]`` is kept for
the backward.

Backward: programs are (token tile × vocabulary tile); each recomputes its logits tile, forms
``dz = g·(onehot − p) [− g_H·p·(log p + H)]`` in fp32, and accumulates ``dh = dz·W/τ`` and
``dW = dzᵀ·h/τ`` with relaxed atomic adds (no fences: the sums need no ordering) into fp32 buffers
(``dW`` in the weight dtype where the arch adds it natively, see ``launch.weight_grad_dtype``).

Token tiles walk the rows in an order that puts ignored rows last, so tiles made only of ignored rows
exit before any vocabulary work. Tile configs come from ``launch.TILES`` (per arch); ``fwd_launch`` and
``bwd_launch`` plan a launch without running it (the compile gate, ``benchmarks/kernel_resources.py``,
compiles exactly those). fp32 inputs use exact fp32 (FMA) dots unless ``allow_tf32``. Under
``TRITON_INTERPRET=1`` (CPU tensors) half-precision ``tl.dot`` operands are cast to fp32: the
interpreter mis-computes bf16 dots (triton-lang/triton#11584).

What both head kernels (this one and ``linear_token_kl``) do alike has one home: ``launch.head_fwd_plan`` /
``head_bwd_plan`` (grid, row order, shared constexprs, accumulators) and ``tiles`` (program prologues,
the gradient tile's atomics). This file holds what is particular to the log-probs.

Layer 0: imports torch and triton only.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .launch import Launch, check_inputs, device_arch, head_bwd_plan, head_fwd_plan, head_grads
from .launch import row_order  # noqa: F401 -- callers plan the order once and pass it to both launches
from .tiles import (head_grads_tile, logits_tile, no_rows, online_softmax_update, row_values, split_columns,
                    split_program, target_grad, tile_columns, tile_program)


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr,  # [N, D] fp32/fp16/bf16, row stride stride_hn
    w_ptr,  # [V, D] same dtype, row stride stride_wv
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [N] int32/int64
    order_ptr,  # [N] int64: row visiting order, ignored rows last
    m_ptr,  # [S, N] fp32 out: max logit per split
    s_ptr,  # [S, N] fp32 out: Σ exp(z - m)
    zt_ptr,  # [S, N] fp32 out: target logit (0 in splits that do not hold it)
    t_ptr,  # [S, N] fp32 out: Σ exp(z - m)·(m - z) ≥ 0  (HAS_ENTROPY)
    zsum_ptr,  # [S, N] fp32 out: Σ z                    (HAS_LOGIT_SUM)
    N, V, D, stride_hn, stride_wv, inv_temp, ignore_index, v_per_split, num_splits,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_LOGIT_SUM: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    rows, tgt, row_ok, split = split_program(order_ptr, tgt_ptr, N, ignore_index, num_splits, BLOCK_N, GROUP_N)
    if no_rows(row_ok):
        return  # every row ignored: no vocabulary FLOPs; the launcher zeroes these outputs

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin, v_end = split_columns(split, v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv,
                              inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_IN_FP32, DOT_PRECISION)
        z_finite = tl.where(v_ok[None, :], z, 0.0)
        m, s, t, _ = online_softmax_update(m, s, t, z, z_finite, HAS_ENTROPY)
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z_finite, 0.0), axis=1)
        if HAS_LOGIT_SUM:
            zsum += tl.sum(z_finite, axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, z_tgt, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    if HAS_LOGIT_SUM:
        tl.store(zsum_ptr + out, zsum, mask=row_ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr,  # [N, D] fp32/fp16/bf16
    w_ptr,  # [V, D] same dtype
    b_ptr,  # [V] or dummy
    tgt_ptr,  # [N] int32/int64
    order_ptr,  # [N] int64: row visiting order, ignored rows last
    lse_ptr,  # [N] fp32 from the forward
    g_ptr,  # [N] fp32: upstream gradient of logp
    ent_ptr,  # [N] fp32: entropy from the forward            (HAS_ENTROPY_GRAD)
    g_ent_ptr,  # [N] fp32: upstream gradient of the entropy   (HAS_ENTROPY_GRAD)
    dh_ptr,  # [N, D] fp32 accumulator (atomic)
    dw_ptr,  # [V, D] fp32 or weight dtype accumulator (atomic) (W_GRAD)
    db_ptr,  # [V] fp32 accumulator (atomic)                     (HAS_BIAS and B_GRAD)
    N, V, D, stride_hn, stride_wv, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
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
    lse = row_values(lse_ptr, rows, row_ok)
    g = row_values(g_ptr, rows, row_ok)
    p = tl.exp(z - lse[:, None])  # softmax tile, 0 at padded columns
    dz = target_grad(p, offs_v[None, :] == tgt[:, None], g)
    if HAS_ENTROPY_GRAD:
        ent = row_values(ent_ptr, rows, row_ok)
        g_ent = row_values(g_ent_ptr, rows, row_ok)
        log_p = tl.where(v_ok[None, :], z - lse[:, None], 0.0)
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])  # ∂H/∂z_v = −p_v·(log p_v + H)
    head_grads_tile(dz, inv_temp, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn,
                    stride_wv, BLOCK_D, HAS_BIAS, H_GRAD, W_GRAD, B_GRAD, DOT_IN_FP32, DOT_PRECISION)


def fwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    arch: int | None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_logit_mean: bool = False,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
    splits: int | None = None,
) -> tuple[Launch, SimpleNamespace]:
    """Plan the forward launch on ``arch`` (None: interpreter): the Launch and its ``[S, N]`` partial outputs."""
    check_inputs(hidden, weight, bias, targets)
    (N, D), V = hidden.shape, weight.shape[0]
    plan = head_fwd_plan("linear_logprobs_fwd", hidden, bias, targets, V, arch=arch, ignore_index=ignore_index,
                         allow_tf32=allow_tf32, order=order, splits=splits)
    out = plan.partials(N, hidden.device, ("m", "s", "z_tgt"), t=return_entropy, zsum=return_logit_mean)
    launch = Launch(
        _linear_logprobs_fwd_kernel, plan.grid,
        (hidden, weight, bias if bias is not None else weight, targets, plan.order,
         out.m, out.s, out.z_tgt, out.t, out.zsum,
         N, V, D, hidden.stride(0), weight.stride(0), 1.0 / temperature, ignore_index, plan.v_per_split, plan.splits),
        dict(plan.constexprs, HAS_ENTROPY=return_entropy, HAS_LOGIT_SUM=return_logit_mean),
    )
    return launch, out


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_logit_mean: bool = False,
    return_top1: bool = False,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused forward. Returns ``(logp [N], lse [N], entropy [N] | None, logit_mean [N] | None,
    is_top1 [N] bool | None)``, fp32 but ``is_top1``.

    ``is_top1``: the target's logit is the row's largest (a tie counts). No extra kernel work: the target
    logit and the split maxima are the same tile values, so the comparison is exact.
    Ignored rows get 0 (False) in every output. ``order`` (from :func:`row_order`) may be passed to reuse it.
    ``allow_tf32`` lets fp32 inputs use TF32 tensor cores (default: exact fp32 dots).
    """
    launch, out = fwd_launch(
        hidden, weight, targets, bias, arch=device_arch(hidden.device), temperature=temperature,
        ignore_index=ignore_index, return_entropy=return_entropy, return_logit_mean=return_logit_mean,
        allow_tf32=allow_tf32, order=order, splits=num_splits)
    launch()

    # merge the splits: lse = M + log Σ_s s_s·exp(m_s − M)
    valid = targets != ignore_index
    m_max = out.m.amax(dim=0)
    scale = torch.exp(out.m - m_max)  # [S, N]
    sum_exp = (out.s * scale).sum(dim=0)
    lse = torch.where(valid, m_max + torch.log(sum_exp), 0.0)
    z_tgt = out.z_tgt.sum(dim=0)  # exact: the splits that do not hold the target add 0
    logp = torch.where(valid, z_tgt - lse, 0.0)
    entropy = logit_mean = is_top1 = None
    if return_entropy:  # H = Σ p·(lse − z) = T/S + log S, with T re-centred on the global max
        t_total = (scale * (out.t + (m_max - out.m) * out.s)).sum(dim=0)
        entropy = torch.where(valid, t_total / sum_exp + torch.log(sum_exp), 0.0)
    if return_logit_mean:
        logit_mean = torch.where(valid, out.zsum.sum(dim=0) / weight.shape[0], 0.0)
    if return_top1:
        is_top1 = valid & (z_tgt >= m_max)
    return logp, lse, entropy, logit_mean, is_top1


def bwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    arch: int | None,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[Launch, SimpleNamespace]:
    """Plan the backward launch on ``arch``: the Launch and its (zeroed) fp32/low-precision accumulators."""
    check_inputs(hidden, weight, bias, targets)
    (N, D), V = hidden.shape, weight.shape[0]
    plan, out = head_bwd_plan("linear_logprobs_bwd", hidden, weight, bias, targets, arch=arch,
                              ignore_index=ignore_index, allow_tf32=allow_tf32, order=order, needs_grad=needs_grad,
                              fp32_weight_grad=fp32_weight_grad, unused=lse)
    has_entropy_grad = grad_entropy is not None
    launch = Launch(
        _linear_logprobs_bwd_kernel, plan.grid,
        (hidden, weight, bias if bias is not None else weight, targets, plan.order, lse,
         grad_logp.float().contiguous(),
         entropy if has_entropy_grad else lse,
         grad_entropy.float().contiguous() if has_entropy_grad else lse,
         out.dh, out.dw, out.db,
         N, V, D, hidden.stride(0), weight.stride(0), 1.0 / temperature, ignore_index),
        dict(plan.constexprs, HAS_ENTROPY_GRAD=has_entropy_grad),
    )
    return launch, out


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
    fp32_weight_grad: bool = True,
    allow_tf32: bool = False,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward by tile recomputation. Returns ``(d_hidden, d_weight, d_bias)`` in input dtypes.

    ``needs_grad`` selects (hidden, weight, bias); ``fp32_weight_grad=False`` accumulates ``d_weight``
    in the weight dtype where the arch has native atomics for it (see ``launch.weight_grad_dtype``).
    """
    launch, out = bwd_launch(
        hidden, weight, targets, bias, lse, grad_logp, arch=device_arch(hidden.device), entropy=entropy,
        grad_entropy=grad_entropy, temperature=temperature, ignore_index=ignore_index, needs_grad=needs_grad,
        fp32_weight_grad=fp32_weight_grad, allow_tf32=allow_tf32, order=order)
    launch()
    return head_grads(out, hidden, weight, bias)
