"""Device-side helpers shared by the Triton kernels: logits tiles, online softmax, tile order.

Every function here is ``@triton.jit`` and inlined into its callers; the kernels import them by name.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``z = (h[rows] W[offs_v]ᵀ + b) / τ`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile; padded columns are −inf.

    One ``tl.dot`` per ``BLOCK_D`` slice of D, accumulated in fp32. ``rows`` are int64 (N·D may pass 2³¹).
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_rows = w_ptr + offs_v[:, None].to(tl.int64) * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        h = tl.load(h_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def logits_tile_t(
    h_ptr, w_ptr, b_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The transposed tile ``zᵀ = (W[offs_v] h[rows]ᵀ + b) / τ``, ``[BLOCK_V, BLOCK_N]`` fp32; padded rows −inf.

    For few rows (decode): the vocabulary is the MMA's M side, so a 16-row batch still fills wgmma's
    64-row instruction shape instead of wasting three quarters of it.
    """
    acc = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_rows = w_ptr + offs_v[:, None].to(tl.int64) * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        w = tl.load(w_rows + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        h = tl.load(h_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(w, tl.trans(h), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[:, None]
    return tl.where(v_ok[:, None], acc * inv_temp, float("-inf"))


@triton.jit
def merge_softmax_stats(m, s, t, m2, s2, t2, HAS_ENTROPY: tl.constexpr):
    """Merge two partial (max m, Σ e^(z−m), Σ e^(z−m)·(m − z)) of disjoint column sets (s, s2 ≥ 0)."""
    m_new = tl.maximum(m, m2)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: avoid −inf − −inf
    alpha, alpha2 = tl.exp(m - m_ref), tl.exp(m2 - m_ref)
    if HAS_ENTROPY:  # re-centre each t on the new max: t + (m_new − m)·s, 0 for an empty side
        t = alpha * (t + tl.where(s > 0, m_new - m, 0.0) * s) + alpha2 * (t2 + tl.where(s2 > 0, m_new - m2, 0.0) * s2)
    return m_new, alpha * s + alpha2 * s2, t


@triton.jit
def online_softmax_update(m, s, t, z, z_finite, HAS_ENTROPY: tl.constexpr):
    """Fold a logits tile into the running (max m, Σ e^(z−m), Σ e^(z−m)·(m − z)); returns them and e^(z−m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])  # 0 at padded columns
    if HAS_ENTROPY:  # non-negative terms, no lse − Σpz cancellation
        shift = tl.where(s > 0, m_new - m, 0.0)
        t = alpha * (t + shift * s) + tl.sum(e * (m_new[:, None] - z_finite), axis=1)
    return m_new, s * alpha + tl.sum(e, axis=1), t, e


@triton.jit
def target_grad(p, onehot, g):
    """``g·(onehot − p)`` for a softmax tile ``p`` and per-row weights ``g``, formed in fp32 so that the true
    class keeps ``1 − p`` exactly."""
    return tl.where(onehot, g[:, None] * (1.0 - p), -g[:, None] * p)


@triton.jit
def head_grads_tile(
    dz, inv_temp, h_ptr, w_ptr, dh_ptr, dw_ptr, db_ptr, rows, row_ok, offs_v, v_ok, D, stride_hn, stride_wv,
    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, H_GRAD: tl.constexpr, W_GRAD: tl.constexpr,
    B_GRAD: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add one ``[BLOCK_N, BLOCK_V]`` fp32 tile ``dz = ∂loss/∂z`` of the tempered logits ``z = (h Wᵀ + b)/τ``
    into ``dh += dz·W/τ``, ``dW += dzᵀ·h/τ`` and ``db += Σ_n dz/τ``: the 1/τ and the mask (rows outside
    ``row_ok``, columns outside ``v_ok`` dropped) are applied here. Relaxed atomics: the sums need no
    ordering with other memory traffic (acq_rel, Triton's default, puts GPU-wide fences and L1
    invalidations around every one of them). ``dh``/``db`` are fp32, ``dW`` fp32 or the weight dtype.
    """
    dz = tl.where(row_ok[:, None] & v_ok[None, :], dz * inv_temp, 0.0)
    if HAS_BIAS and B_GRAD:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_ok, sem="relaxed")
    dz_op = dz.to(h_ptr.dtype.element_ty)
    if DOT_IN_FP32:
        dz_op = dz
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_rows = w_ptr + offs_v[:, None].to(tl.int64) * stride_wv
    dh_rows = dh_ptr + rows[:, None] * D
    dw_rows = dw_ptr + offs_v[:, None].to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        if H_GRAD:
            w = tl.load(w_rows + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                w = w.to(tl.float32)
            dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(dh_rows + offs_d[None, :], dh, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        if W_GRAD:
            h = tl.load(h_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(dw_rows + offs_d[None, :], dw.to(dw_ptr.dtype.element_ty),
                          mask=v_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def grouped_tile(pid, num_pid_n, num_pid_other, GROUP_N: tl.constexpr):
    """Grouped launch order: GROUP_N token tiles run together so their h rows stay in L2."""
    per_group = GROUP_N * num_pid_other
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_other = (pid % per_group) // group_size
    return pid_n, pid_other


@triton.jit
def rows_of_tile(order_ptr, tgt_ptr, pid_n, N, ignore_index, BLOCK_N: tl.constexpr):
    """Rows (int64), targets and "scored" mask of token tile ``pid_n``, visiting rows in ``order``."""
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < N
    rows = tl.load(order_ptr + offs, mask=in_range, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=in_range, other=ignore_index).to(tl.int64)
    return rows, tgt, in_range & (tgt != ignore_index)


@triton.jit
def no_rows(row_ok):
    """True when a token tile scores no row: its program exits before any vocabulary work."""
    return tl.max(row_ok.to(tl.int32), axis=0) == 0


@triton.jit
def row_values(ptr, rows, row_ok):
    """A per-row fp32 input ``ptr[rows]`` of a token tile (0 in rows not scored)."""
    return tl.load(ptr + rows, mask=row_ok, other=0.0)


@triton.jit
def split_program(order_ptr, tgt_ptr, N, ignore_index, num_splits, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """A split forward's program (token tile × vocabulary split): its rows, targets and scored mask
    (:func:`rows_of_tile`) and its split. The split's columns: :func:`split_columns`, after the exit of
    tiles with no scored row (:func:`no_rows`)."""
    pid_n, split = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    rows, tgt, row_ok = rows_of_tile(order_ptr, tgt_ptr, pid_n, N, ignore_index, BLOCK_N)
    return rows, tgt, row_ok, split


@triton.jit
def split_columns(split, v_per_split, V):
    """The columns ``[v_begin, v_end)`` of vocabulary split ``split``."""
    v_begin = split * v_per_split
    return v_begin, tl.minimum(v_begin + v_per_split, V)


@triton.jit
def tile_program(order_ptr, tgt_ptr, N, V, ignore_index,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """A backward's program (token tile × vocabulary tile): its rows, targets and scored mask
    (:func:`rows_of_tile`) and its vocabulary tile. The tile's columns: :func:`tile_columns`, after the
    exit of tiles with no scored row (:func:`no_rows`)."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows, tgt, row_ok = rows_of_tile(order_ptr, tgt_ptr, pid_n, N, ignore_index, BLOCK_N)
    return rows, tgt, row_ok, pid_v


@triton.jit
def tile_columns(pid_v, V, BLOCK_V: tl.constexpr):
    """The columns of vocabulary tile ``pid_v`` and their mask."""
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return offs_v, offs_v < V
