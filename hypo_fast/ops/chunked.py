"""Vocabulary-chunked PyTorch paths of ``linear_logprobs``, ``linear_token_kl`` and ``sample_tokens`` (the
``"torch"`` backend).

The same two-pass algorithm as the Triton kernels, one ``[N, chunk]`` logits block at a time:

* forward: per chunk, one GEMM and one ``logsumexp``, merged into a running fp32 ``lse`` (with the
  entropy: a running max, sum-exp and Σ e^(z−m)·(m − z), as in the Triton kernel);
  the target logit is a row-wise dot product ``h_n · W[y_n]`` (no gather from the logits).
* backward: per chunk, recompute the logits, turn them into ``−g·p`` in place, and accumulate
  ``dh += dz·W_c`` and ``dW_c += dzᵀ·h`` with two GEMMs; the true-class term ``+g`` is added once,
  outside the loop, as ``g ⊗ W[y]`` / ``index_add`` (exact, in fp32).

Chunk widths follow ``kernels.launch.vocab_chunks`` (the native op's rule too), with this module's
``DEFAULT_CHUNK_ELEMENTS`` and ``MIN_CHUNK``. Peak extra memory is ``O(N·chunk + N·D)`` plus the
gradients, never ``O(N·V)``. Ignored rows are dropped before any vocabulary work. On CPU the GEMMs
run in fp32 (faster than bf16 without AMX, and exact enough to be an oracle); on CUDA they run in the
input dtype with fp32 statistics.

``linear_token_kl`` streams both heads' logits chunk by chunk: per row a running max and sum-exp of each
(the same fold for both, so identical heads give exactly 0) and ``u = Σ e^(z−m)·(z − r)``; then
``KL = u/s − (lse_z − lse_r)``. Its backward recomputes both chunks and forms ``dz = p·(g·(z − r − μ) − g_logp)``
(``μ = u/s``), the true-class ``+g_logp`` added once outside the loop as for the log-probs.
"""

from __future__ import annotations

import torch

from hypo_fast.kernels.launch import vocab_chunks

# Elements per logits block; 4M fp32 = 16 MiB keeps a block near the last-level cache.
DEFAULT_CHUNK_ELEMENTS = 4 * 1024 * 1024
MIN_CHUNK = 256


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "cpu" else t.dtype


def _chunks(n_rows: int, vocab: int, chunk_elements: int | None = None):
    """``launch.vocab_chunks`` with this module's defaults, read at call time (tests shrink them)."""
    return vocab_chunks(n_rows, vocab, chunk_elements or DEFAULT_CHUNK_ELEMENTS, MIN_CHUNK)


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).nonzero().squeeze(1)


def _logits_chunk(h_scaled, w_chunk, bias, lo, hi, inv_temp):
    """z[:, lo:hi] = (h Wᵀ + b)/τ in fp32, with 1/τ folded into ``h_scaled``."""
    if bias is None:
        return torch.mm(h_scaled, w_chunk.t()).float()
    b_scaled = (bias[lo:hi].float() * inv_temp).to(h_scaled.dtype)
    return torch.addmm(b_scaled, h_scaled, w_chunk.t()).float()


def _target_logits(h32, weight, bias, tgt, inv_temp):
    z = (h32 * weight.index_select(0, tgt).float()).sum(-1)  # [n]: h_n · W[y_n]
    if bias is not None:
        z = z + bias.index_select(0, tgt).float()
    return z * inv_temp


def _fold_lse(lse, z):
    lse_c = torch.logsumexp(z, dim=1)
    return lse_c if lse is None else torch.logaddexp(lse, lse_c)


def _fold_entropy_stats(state, z):
    """Fold a logits chunk into ``(m, s, t)``: max logit, Σ e^(z−m), Σ e^(z−m)·(m − z).

    Shifts are taken against real logits (exact differences), never against a rounded lse, so the
    entropy ``t/s + log s`` keeps naive log_softmax's accuracy even for logits of magnitude 1e3.
    """
    m_c = z.amax(dim=1)
    shifted = z.sub_(m_c[:, None])  # z − m_c ≤ 0, in place
    e = torch.exp(shifted)
    s_c, t_c = e.sum(1), -(e * shifted).sum(1)
    if state is None:
        return m_c, s_c, t_c
    m, s, t = state
    m_new = torch.maximum(m, m_c)
    a, a_c = torch.exp(m - m_new), torch.exp(m_c - m_new)
    return m_new, a * s + a_c * s_c, a * (t + (m_new - m) * s) + a_c * (t_c + (m_new - m_c) * s_c)


def chunked_fwd(
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
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``hypo_fast.kernels.linear_logprobs_fwd``: ``(logp, lse, entropy, logit_mean, is_top1)``.

    ``allow_tf32`` is accepted for the common contract; fp32 GEMMs follow torch's own TF32 settings.
    """
    N, V = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    rows = _valid_rows(targets, ignore_index)
    h = hidden.index_select(0, rows)
    h_scaled = h.to(_compute_dtype(hidden)) * inv_temp
    n = h.shape[0]

    tgt = targets.index_select(0, rows).long()
    state = None  # lse, or (m, s, t) when the entropy is wanted
    sum_z = torch.zeros(n, device=hidden.device) if return_logit_mean else None
    if return_top1:  # the running max and the target's logit, both read from the same chunk values
        z_max = torch.full((n,), float("-inf"), device=hidden.device)
        z_tgt = torch.zeros(n, device=hidden.device)
    for lo, hi in _chunks(n, V, chunk_elements):
        z = _logits_chunk(h_scaled, weight[lo:hi].to(h_scaled.dtype), bias, lo, hi, inv_temp)  # [n, chunk]
        if return_logit_mean:
            sum_z += z.sum(1)
        if return_top1:
            z_max = torch.maximum(z_max, z.amax(1))
            in_chunk = (tgt >= lo) & (tgt < hi)
            z_tgt = torch.where(in_chunk, z.gather(1, (tgt - lo).clamp(0, hi - lo - 1)[:, None]).squeeze(1), z_tgt)
        state = _fold_entropy_stats(state, z) if return_entropy else _fold_lse(state, z)
    if return_entropy:
        m, s, t = state
        lse, entropy = m + torch.log(s), t / s + torch.log(s)
    else:
        lse = state

    logp = _target_logits(h.float(), weight, bias, tgt, inv_temp) - lse

    def scatter(values):  # valid rows → [N], 0 elsewhere
        return torch.zeros(N, device=hidden.device, dtype=values.dtype).index_copy_(0, rows, values)

    entropy = scatter(entropy) if return_entropy else None
    logit_mean = scatter(sum_z / V) if return_logit_mean else None
    is_top1 = scatter(z_tgt >= z_max) if return_top1 else None
    return scatter(logp), scatter(lse), entropy, logit_mean, is_top1


class _HeadGradSums:
    """The backward's sums for an LM head over the ``rows`` kept by :func:`_valid_rows`, chunk by chunk of
    the vocabulary: ``dh`` ``[n, D]``, ``dw`` ``[V, D]`` and ``db`` ``[V]`` from ``dz = ∂L/∂z`` (1/τ folded in)."""

    def __init__(self, hidden, weight, bias, rows, needs_grad, fp32_weight_grad, cdtype):
        self.want_h, self.want_w = needs_grad[0], needs_grad[1]
        self.want_b = needs_grad[2] and bias is not None
        (V, D), n, device = weight.shape, rows.numel(), hidden.device
        self.rows, self.cdtype = rows, cdtype
        self.dw_dtype = torch.float32 if fp32_weight_grad or device.type == "cpu" else weight.dtype
        self.dh = torch.zeros((n, D), device=device, dtype=torch.float32) if self.want_h else None
        self.dw = torch.zeros((V, D), device=device, dtype=self.dw_dtype) if self.want_w else None
        self.db = torch.zeros(V, device=device, dtype=torch.float32) if self.want_b else None

    def add_chunk(self, dz: torch.Tensor, lo: int, hi: int, w_c: torch.Tensor, h_c: torch.Tensor) -> None:
        """``dz`` ``[n, hi − lo]`` fp32 of vocabulary columns ``lo:hi``; ``w_c``, ``h_c`` in the compute dtype."""
        if self.want_b:
            self.db[lo:hi] = dz.sum(0)
        dz = dz.to(self.cdtype)
        if self.want_h and self.cdtype == torch.float32:
            self.dh.addmm_(dz, w_c)
        elif self.want_h:
            self.dh += dz @ w_c
        if self.want_w:
            self.dw[lo:hi] = (dz.t() @ h_c).to(self.dw_dtype)

    def add_targets(self, coef: torch.Tensor, tgt: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        """The ``+coef·onehot(tgt)`` term of ``dz``, exactly and once (``coef`` ``[n]`` fp32)."""
        if self.want_h:
            self.dh += coef[:, None] * weight.index_select(0, tgt).float()
        if self.want_w:
            self.dw.index_add_(0, tgt, (coef[:, None] * h.float()).to(self.dw_dtype))
        if self.want_b:
            self.db.index_add_(0, tgt, coef)

    def result(self, hidden, weight, bias):
        """``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes, ``d_hidden`` 0 in skipped rows."""
        d_hidden = None
        if self.want_h:
            d_hidden = torch.zeros_like(hidden).index_copy_(0, self.rows, self.dh.to(hidden.dtype))
        return (d_hidden, self.dw.to(weight.dtype) if self.want_w else None,
                self.db.to(bias.dtype) if self.want_b else None)


def chunked_bwd(
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
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``hypo_fast.kernels.linear_logprobs_bwd``: ``(d_hidden, d_weight, d_bias)``.

    ``dz = g·(onehot − p) − g_H·p·(log p + H)``, scaled by 1/τ. ``allow_tf32`` as in :func:`chunked_fwd`.
    """
    V = weight.shape[0]
    inv_temp = 1.0 / temperature
    cdtype = _compute_dtype(hidden)
    rows = _valid_rows(targets, ignore_index)
    h = hidden.index_select(0, rows)
    h_c = h.to(cdtype)
    h_scaled = h_c * inv_temp
    tgt = targets.index_select(0, rows).long()
    lse = lse.index_select(0, rows)
    g = grad_logp.index_select(0, rows).float() * inv_temp  # [n], 1/τ folded in
    # coefficient of −p in dz: g, plus g_H·(log p + H) when the entropy has a gradient
    g_ent = None if grad_entropy is None else grad_entropy.index_select(0, rows).float() * inv_temp
    ent = None if grad_entropy is None else entropy.index_select(0, rows)

    grads = _HeadGradSums(hidden, weight, bias, rows, needs_grad, fp32_weight_grad, cdtype)
    for lo, hi in _chunks(h.shape[0], V, chunk_elements):
        w_c = weight[lo:hi].to(cdtype)
        log_p = _logits_chunk(h_scaled, w_c, bias, lo, hi, inv_temp).sub_(lse[:, None])  # [n, chunk]
        if g_ent is None:
            coef = g[:, None]
        else:
            coef = (log_p + ent[:, None]).mul_(g_ent[:, None]).add_(g[:, None])
        grads.add_chunk(log_p.exp_().mul_(coef).neg_(), lo, hi, w_c, h_c)  # dz = −p·coef, in place
    grads.add_targets(g, tgt, h, weight)  # the true-class term +g·onehot
    return grads.result(hidden, weight, bias)


def _fold_max_sum(state, z):
    """Fold a logits chunk into ``(m, s)`` = (max, Σ e^(z−m)); returns the state and ``e^(z − m_new)``.

    Consumes ``z`` (exponentiated in place).
    """
    m_c = z.amax(dim=1)
    m_new = m_c if state is None else torch.maximum(state[0], m_c)
    e = z.sub_(m_new[:, None]).exp_()
    s_c = e.sum(1)
    if state is None:
        return (m_new, s_c), e
    return (m_new, state[1] * torch.exp(state[0] - m_new) + s_c), e


def chunked_token_kl_fwd(
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
    chunk_elements: int | None = None,
):
    """Same contract as ``hypo_fast.kernels.linear_token_kl_fwd``: ``(kl, lse, mu, logp, ref_logp)``, fp32
    ``[N]`` (the last two None unless ``return_logprobs``); 0 in ignored rows."""
    N, V = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 / temperature
    rows = _valid_rows(targets, ignore_index)
    h, h_ref = hidden.index_select(0, rows), ref_hidden.index_select(0, rows)
    cdtype = _compute_dtype(hidden)
    h_scaled, ref_scaled = h.to(cdtype) * inv_temp, h_ref.to(cdtype) * inv_temp

    state = ref_state = u = None  # u = Σ e^(z − m)·(z − r), rescaled with the policy's running max
    for lo, hi in _chunks(h.shape[0], V, chunk_elements):
        z = _logits_chunk(h_scaled, weight[lo:hi].to(cdtype), bias, lo, hi, inv_temp)  # [n, chunk]
        r = _logits_chunk(ref_scaled, ref_weight[lo:hi].to(cdtype), ref_bias, lo, hi, inv_temp)
        delta = torch.sub(z, r)
        ref_state, _ = _fold_max_sum(ref_state, r)
        m_old = None if state is None else state[0]
        state, e = _fold_max_sum(state, z)
        u_c = (e * delta).sum(1)
        u = u_c if u is None else u * torch.exp(m_old - state[0]) + u_c
    (m, s), (m_ref, s_ref) = state, ref_state
    mu = u / s  # E_π[z − r]
    kl = (mu - (m - m_ref)) - (torch.log(s) - torch.log(s_ref))  # μ − (lse_z − lse_r), small terms first

    def scatter(values):  # valid rows → [N], 0 elsewhere
        return torch.zeros(N, device=hidden.device).index_copy_(0, rows, values)

    logp = ref_logp = None
    if return_logprobs:
        tgt = targets.index_select(0, rows).long()
        logp = scatter(_target_logits(h.float(), weight, bias, tgt, inv_temp) - (m + torch.log(s)))
        ref_logp = scatter(_target_logits(h_ref.float(), ref_weight, ref_bias, tgt, inv_temp)
                           - (m_ref + torch.log(s_ref)))
    return scatter(kl), scatter(m + torch.log(s)), scatter(mu), logp, ref_logp


def chunked_token_kl_bwd(
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
    chunk_elements: int | None = None,
):
    """Same contract as ``hypo_fast.kernels.linear_token_kl_bwd``: ``(d_hidden, d_weight, d_bias)``.

    ``∂KL/∂z_v = p_v·(z_v − r_v − μ)`` and ``∂logp/∂z_v = onehot_v − p_v``, scaled by 1/τ.
    """
    V = weight.shape[0]
    inv_temp = 1.0 / temperature
    cdtype = _compute_dtype(hidden)
    rows = _valid_rows(targets, ignore_index)
    h, h_ref = hidden.index_select(0, rows), ref_hidden.index_select(0, rows)
    h_c = h.to(cdtype)
    h_scaled, ref_scaled = h_c * inv_temp, h_ref.to(cdtype) * inv_temp
    lse, mu = lse.index_select(0, rows), mu.index_select(0, rows)
    g = grad_kl.index_select(0, rows).float() * inv_temp  # [n], 1/τ folded in
    g_logp = None if grad_logp is None else grad_logp.index_select(0, rows).float() * inv_temp

    grads = _HeadGradSums(hidden, weight, bias, rows, needs_grad, fp32_weight_grad, cdtype)
    for lo, hi in _chunks(h.shape[0], V, chunk_elements):
        w_c = weight[lo:hi].to(cdtype)
        z = _logits_chunk(h_scaled, w_c, bias, lo, hi, inv_temp)  # [n, chunk]
        r = _logits_chunk(ref_scaled, ref_weight[lo:hi].to(cdtype), ref_bias, lo, hi, inv_temp)
        coef = r.neg_().add_(z).sub_(mu[:, None]).mul_(g[:, None])  # g·(z − r − μ), in place of r
        if g_logp is not None:
            coef.sub_(g_logp[:, None])
        grads.add_chunk(z.sub_(lse[:, None]).exp_().mul_(coef), lo, hi, w_c, h_c)  # dz = p·coef, in place of z
    if g_logp is not None:  # the true-class term +g_logp·onehot
        grads.add_targets(g_logp, targets.index_select(0, rows).long(), h, weight)
    return grads.result(hidden, weight, bias)


def chunked_sample_head(hidden, weight, bias=None, *, temperature=1.0, seed=0, greedy=False, return_entropy=False,
                        allow_tf32=False):
    """The PyTorch path of ``sample_tokens``: exact sampling over vocabulary chunks.

    Per chunk: inverse-CDF draw of a candidate from the chunk's softmax (one uniform per row); across
    chunks: a weighted reservoir keeps the new candidate with probability (chunk mass)/(mass so far), so
    the final token is distributed as softmax over the whole vocabulary. Two uniforms per row and chunk
    instead of Gumbel-max's V (CPU random numbers cost more than the logits). Uniforms come from a
    ``torch.Generator`` seeded with ``seed``. ``allow_tf32`` as in :func:`chunked_fwd`.
    """
    B, V = hidden.shape[0], weight.shape[0]
    inv_temp = 1.0 if greedy else 1.0 / temperature
    generator = None if greedy else torch.Generator(device=hidden.device).manual_seed(seed)
    cdtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    h_t = (hidden.to(cdtype) * inv_temp).t()  # [D, B]
    zeros = lambda: torch.zeros(B, device=hidden.device)  # noqa: E731
    m, s, t, z_best = torch.full((B,), float("-inf"), device=hidden.device), zeros(), zeros(), zeros()
    tokens = torch.zeros(B, dtype=torch.long, device=hidden.device)
    for lo, hi in _chunks(B, V):
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
