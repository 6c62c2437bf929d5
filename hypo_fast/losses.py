"""The HyPO objective as small pure functions (layer 2).

HyPO (Song et al., "The Importance of Online Data: Understanding Preference Fine-tuning via Coverage",
NeurIPS 2024) minimises

    L(θ) = E_(x,y+,y−)~D [ ℓ_dpo ] + λ · KL(π_θ ‖ π_ref)                         (HyPO objective, §5)
    ℓ_dpo = −log σ(β·[(log π(y+|x) − log π_ref(y+|x)) − (log π(y−|x) − log π_ref(y−|x))])   (DPO)

with the reverse KL estimated on fresh samples y ~ π_θ(·|x) (Algorithm 1), here by REINFORCE with a
leave-one-out baseline over the k samples of a prompt. ℓ_dpo may be any of TRL's pairwise losses, or a
weighted list of them (:mod:`hypo_fast.dpo_losses`). Everything takes per-sequence (or per-token)
log-probabilities, so it composes with any way of computing them; the fused modules in
``hypo_fast.fused_losses`` feed them from hidden states without logits.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from hypo_fast.dpo_losses import LOSS_TYPES, check_dpo_options, dpo_loss

__all__ = ["LOSS_TYPES", "check_dpo_options", "dpo_loss", "sequence_logps", "sampled_kl", "rloo_kl_loss",
           "exact_token_kl_loss", "k3_kl_loss", "hypo_loss", "HyPOLoss", "RLOOKL", "ExactTokenKL"]

KL_ESTIMATORS = ("k1", "k2", "k3")
ONLINE_KL_LOSSES = ("rloo", "exact_token", "k3")  # the online term ℓ_kl: the paper's, then beyond it


def sequence_logps(
    token_logps: torch.Tensor,
    mask_or_segment_ids: torch.Tensor,
    average: bool = False,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Per-sequence sums (or means) of token log-probs: ``log π(y|x) = Σ_t log π(y_t | x, y_<t)``.

    Args:
        token_logps: ``[B, T]`` (padded) or ``[N]`` (packed) per-token log-probs.
        mask_or_segment_ids: a bool/float ``[B, T]`` mask of scored tokens, or an integer ``[N]`` tensor
            giving each packed token's sequence index (negative = not scored).
        average: divide by the number of scored tokens (length-normalised log-prob).
        num_segments: number of sequences for segment ids (default ``max id + 1``, one host sync). Ids
            must be below it: checked on CPU; on a GPU the check would cost a host sync, so it is skipped.

    Returns:
        ``[B]`` or ``[num_segments]``.
    """
    ids = mask_or_segment_ids
    if ids.shape != token_logps.shape:
        raise ValueError(f"mask_or_segment_ids shape {tuple(ids.shape)} must equal token_logps shape "
                         f"{tuple(token_logps.shape)}")
    if ids.dtype == torch.bool or ids.is_floating_point():
        mask = ids.to(token_logps.dtype)
        sums, counts = (token_logps * mask).sum(-1), mask.sum(-1)
    else:
        if token_logps.dim() != 1:
            raise ValueError("segment ids need packed [N] token_logps; pass a bool mask for [B, T]")
        scored = ids >= 0
        n = int(ids.max()) + 1 if num_segments is None else num_segments
        if num_segments is not None and ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= n:
            raise ValueError(f"segment id {int(ids.max())} is out of range for num_segments={n}")
        index = torch.where(scored, ids, 0).long()
        weight = scored.to(token_logps.dtype)
        sums = token_logps.new_zeros(n).index_add(0, index, token_logps * weight)
        counts = token_logps.new_zeros(n).index_add(0, index, weight)
    return sums / counts.clamp_min(1) if average else sums


def sampled_kl(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask_or_segment_ids: torch.Tensor,
    estimator: str = "k1",
    num_segments: int | None = None,
) -> torch.Tensor:
    """Per-sequence estimates of ``KL(π ‖ π_ref)`` from tokens sampled from π.

    Per token, with ``d = log π_ref − log π``: ``k1 = −d`` (unbiased), ``k2 = d²/2`` (low variance,
    biased), ``k3 = e^d − 1 − d`` (unbiased, ≥ 0; Schulman, "Approximating KL divergence", 2020).

    Args:
        logps, ref_logps: ``[B, T]`` (or packed ``[N]``) token log-probs of the samples under π and π_ref.
        mask_or_segment_ids: as in :func:`sequence_logps` (a mask of the sampled response tokens, or
            packed segment ids).

    Returns:
        ``[B]`` sums over tokens; differentiable through ``logps``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} must share one shape")
    d = ref_logps - logps
    per_token = {"k1": lambda: -d, "k2": lambda: 0.5 * d**2, "k3": lambda: torch.expm1(d) - d}[estimator]()
    return sequence_logps(per_token, mask_or_segment_ids, num_segments=num_segments)


class RLOOKL(NamedTuple):
    loss: torch.Tensor  # scalar surrogate ℓ_kl
    rewards: torch.Tensor  # [M] r_i = log π(y_i|x) − log π_ref(y_i|x), detached (k1 sequence KL)
    advantages: torch.Tensor  # [M] r_i − b_i


def rloo_kl_loss(seq_logps: torch.Tensor, seq_ref_logps: torch.Tensor, num_samples: int) -> RLOOKL:
    """The online term ℓ_kl of HyPO (Algorithm 1): REINFORCE with a leave-one-out baseline.

    For the k samples ``y_1..y_k ~ π(·|x)`` of a prompt (consecutive in the batch):
    ``r_i = log π(y_i|x) − log π_ref(y_i|x)`` (stop-gradient), ``b_i = mean_{j≠i} r_j`` (k ≥ 2; k = 1 uses
    no baseline, as the paper's Algorithm 1), and ``ℓ_kl = mean_i (r_i − b_i) · log π(y_i|x)``.

    Since ``E_y[∇ log π(y)] = 0``, ``E[∇ℓ_kl] = E_y[(log π(y) − log π_ref(y)) ∇ log π(y)] = ∇KL(π ‖ π_ref)``:
    its gradient is the REINFORCE estimate of the reverse-KL gradient; the baseline only cuts variance.

    Args:
        seq_logps: ``[M]`` sequence log-probs of the samples under π_θ, with grad.
        seq_ref_logps: ``[M]`` the same under π_ref.
        num_samples: k, samples per prompt; must divide M.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    if seq_logps.dim() != 1 or seq_logps.shape != seq_ref_logps.shape:
        raise ValueError(f"seq_logps {tuple(seq_logps.shape)} and seq_ref_logps {tuple(seq_ref_logps.shape)} "
                         "must be equal 1-D shapes")
    if seq_logps.shape[0] % num_samples:
        raise ValueError(f"num_samples={num_samples} must divide the number of samples M={seq_logps.shape[0]}")
    rewards = (seq_logps - seq_ref_logps).detach()
    if num_samples == 1:
        advantages = rewards
    else:
        groups = rewards.view(-1, num_samples)  # [prompts, k]
        baseline = (groups.sum(1, keepdim=True) - groups) / (num_samples - 1)
        advantages = (groups - baseline).view(-1)
    loss = (advantages * seq_logps).mean()
    return RLOOKL(loss, rewards, advantages)


class ExactTokenKL(NamedTuple):
    loss: torch.Tensor  # scalar surrogate ℓ_kl; its value is mean_i Σ_t KL_t (the exact-KL estimate)
    sequence_kls: torch.Tensor  # [M] Σ_t KL_t per sample, detached
    advantages: torch.Tensor  # like token_logps: future exact KL minus its leave-one-out baseline, detached


def _packed(values: torch.Tensor, mask_or_segment_ids: torch.Tensor, num_segments: int | None):
    """``[M, T]`` + bool mask, or packed ``[N]`` + segment ids → ``(flat values, ids (−1 = unscored), M)``."""
    ids = mask_or_segment_ids
    if ids.shape != values.shape:
        raise ValueError(f"mask_or_segment_ids shape {tuple(ids.shape)} must equal token_logps shape "
                         f"{tuple(values.shape)}")
    if ids.dtype == torch.bool or ids.is_floating_point():
        if values.dim() != 2:
            raise ValueError("a mask needs [M, T] token values; pass segment ids for packed [N] values")
        rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        return values.reshape(-1), torch.where(ids.bool(), rows, -1).reshape(-1), values.shape[0]
    if values.dim() != 1:
        raise ValueError("segment ids need packed [N] token values; pass a bool mask for [M, T]")
    return values, ids.long(), int(ids.max()) + 1 if num_segments is None else num_segments


def _future_sums(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the sum of its segment's *later* values, and its position in the segment (0, 1, …).

    Tokens of one segment are in sequence order (they may interleave with other segments); ``ids < 0``
    get 0 and position −1. Sums run in float64: they are differences of prefix sums over the batch.
    """
    scored = ids >= 0
    seg = torch.where(scored, ids, num_segments)  # unscored tokens: a segment of their own, sorted last
    order = torch.argsort(seg, stable=True)
    v = torch.where(scored, values, 0).double()[order]
    ones = scored.double()[order]
    totals = torch.zeros(num_segments + 1, dtype=torch.float64, device=values.device).index_add_(0, seg[order], v)
    counts = torch.zeros_like(totals).index_add_(0, seg[order], ones)
    before = (totals.cumsum(0) - totals)[seg[order]]  # everything of the earlier segments
    before_n = (counts.cumsum(0) - counts)[seg[order]]
    future = totals[seg[order]] - (v.cumsum(0) - before)  # segment total − inclusive prefix
    position = ones.cumsum(0) - before_n - 1
    out, pos = torch.empty_like(future), torch.empty_like(position)
    out[order], pos[order] = future, position
    return torch.where(scored, out, 0), torch.where(scored, pos, -1).long()


def exact_token_kl_loss(token_logps: torch.Tensor, token_kls: torch.Tensor, mask_or_segment_ids: torch.Tensor,
                        num_samples: int, num_segments: int | None = None) -> ExactTokenKL:
    """Not from the paper: the online term ℓ_kl from exact per-position KLs (``kl_loss: exact_token``).

    The sequence KL decomposes over positions, ``KL(π‖π_ref) = E_y Σ_t KL_t(y_<t)`` with ``KL_t`` the exact
    KL of the next-token distributions at the sampled prefix (:func:`hypo_fast.linear_token_kl`), so

        ∇KL(π‖π_ref) = E_y[ Σ_t ∇KL_t(y_<t) + Σ_t ∇log π(y_t | y_<t) · Σ_{t' > t} KL_t'(y_<t') ]

    (an analytic term at every visited prefix, plus REINFORCE whose per-position reward is the exact KL
    still to come: a ``KL_t'`` with ``t' ≤ t`` is fixed once ``y_<t`` is, and ``E[∇log π(y_t|y_<t) | y_<t] = 0``
    removes it). Against RLOO's sampled log-ratio ``Σ_t log π(y_t) − log π_ref(y_t)`` this replaces every
    sampled term by its conditional expectation and drops the past rewards: unbiased, with less noise.
    With k ≥ 2 samples per prompt each reward gets a leave-one-out baseline, the mean future KL of the
    prompt's other samples at the same position (0 past their end): it does not depend on the sample
    itself, so the estimator stays unbiased. k = 1 uses none.

    ``ℓ_kl = mean_i [ Σ_t KL_i,t + Σ_t A_i,t · (log π(y_i,t) − sg(log π(y_i,t))) ]``: its gradient is the
    estimator above, averaged over samples, and its value is the mean exact sequence KL.

    Args:
        token_logps: ``[M, T]`` (or packed ``[N]``) log π(y_t | y_<t) of the samples, with grad.
        token_kls: the same shape: ``KL_t`` at each sampled prefix, with grad (the analytic term).
        mask_or_segment_ids: ``[M, T]`` bool mask of scored positions, or packed ``[N]`` sample index
            (negative = not scored) with each sample's tokens in sequence order.
        num_samples: k, samples per prompt (consecutive); must divide M.
        num_segments: M for segment ids (default ``max id + 1``, one host sync).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    if token_kls.shape != token_logps.shape:
        raise ValueError(f"token_kls {tuple(token_kls.shape)} and token_logps {tuple(token_logps.shape)} must "
                         "share one shape")
    logps, ids, M = _packed(token_logps, mask_or_segment_ids, num_segments)
    kls = token_kls.reshape(-1)
    if M % num_samples:
        raise ValueError(f"num_samples={num_samples} must divide the number of samples M={M}")
    scored = ids >= 0
    future, position = _future_sums(kls.detach(), ids, M)
    advantages = future
    if num_samples > 1 and ids.numel():  # leave-one-out: the other samples' future KL at the same position
        length = token_logps.shape[-1] if token_logps.dim() == 2 else max(int(position.max()) + 1, 1)  # a sync
        key = torch.where(scored, (ids // num_samples) * length + position, 0)
        sums = torch.zeros((M // num_samples) * length, dtype=future.dtype, device=future.device)
        sums.index_add_(0, key, torch.where(scored, future, 0))
        advantages = torch.where(scored, future - (sums[key] - future) / (num_samples - 1), 0)
    advantages = advantages.to(logps.dtype)
    surrogate = torch.where(scored, kls + advantages * (logps - logps.detach()), 0)
    loss = surrogate.sum() / M
    sequence_kls = sequence_logps(torch.where(scored, kls.detach(), 0), ids, num_segments=M)
    return ExactTokenKL(loss, sequence_kls, advantages.view(token_logps.shape))


def k3_kl_loss(token_logps: torch.Tensor, token_ref_logps: torch.Tensor, mask_or_segment_ids: torch.Tensor,
               num_segments: int | None = None) -> torch.Tensor:
    """Not from the paper (GRPO-style option): the per-token k3 KL summed per sequence, used directly
    as a loss (its gradient is taken through the estimator, not by REINFORCE). Returns a scalar mean."""
    return sampled_kl(token_logps, token_ref_logps.detach(), mask_or_segment_ids, "k3", num_segments).mean()


class HyPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar L = mean(ℓ_dpo) + λ·ℓ_kl
    dpo_losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    kl_loss: torch.Tensor  # scalar ℓ_kl (0 without online samples)
    online_kl: torch.Tensor  # scalar mean k1 sequence KL of the online samples (detached)
    advantages: torch.Tensor | None  # [M] RLOO advantages (exact_token: its per-token advantages)
    online_kl_exact: torch.Tensor | None = None  # scalar mean Σ_t KL_t (exact per-token KLs given), detached


def hypo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    online_token_logps: torch.Tensor | None = None,
    online_ref_token_logps: torch.Tensor | None = None,
    online_mask: torch.Tensor | None = None,
    *,
    num_online: int | None = None,
    kl_coef: float,
    num_samples: int,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    kl_loss: str = "rloo",
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    online_token_kls: torch.Tensor | None = None,
) -> HyPOLoss:
    """``L = mean(ℓ_dpo) + λ·ℓ_kl`` (HyPO). ``kl_coef = 0`` or no online samples is plain DPO.

    Args:
        policy_*/ref_*: ``[B]`` summed sequence log-probs of the offline pairs.
        loss_type, loss_weights, label_smoothing, discopop_tau, chosen_tokens, rejected_tokens: the DPO
            term, as in :func:`hypo_fast.dpo_losses.dpo_loss` (``[B]`` response token counts normalise
            ``ipo``, ``sigmoid_norm`` and ``sft``).
        online_token_logps, online_ref_token_logps, online_mask: ``[M, T]`` token log-probs of the
            k·prompts online samples (a prompt's samples consecutive) under π_θ (with grad) and π_ref,
            and their mask; or packed ``[N]`` log-probs with int segment ids ``[N]`` and ``num_online``.
        kl_coef: λ (required: the paper tunes it per task; ``HyPOObjective`` holds the project's default, 0).
        num_samples: k samples per prompt.
        kl_loss: ``"rloo"`` (the paper: REINFORCE + leave-one-out baseline), ``"exact_token"`` (not from
            the paper: exact per-position KLs, :func:`exact_token_kl_loss`; needs ``online_token_kls``) or
            ``"k3"`` (not from the paper: per-token k3 KL as a direct loss).
        online_token_kls: like ``online_token_logps``: the exact KL of the next-token distributions at each
            sampled prefix, with grad (:func:`hypo_fast.linear_token_kl`); also logged as the exact KL.
    """
    if kl_loss not in ONLINE_KL_LOSSES:  # the dispatch below has no other case
        raise ValueError(f"kl_loss must be one of {ONLINE_KL_LOSSES}, got {kl_loss!r}")
    dpo_losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        loss_weights=loss_weights, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    loss = dpo_losses.mean()
    zero = loss.new_zeros(())
    if online_token_logps is None or kl_coef == 0:
        return HyPOLoss(loss, dpo_losses, chosen_rewards, rejected_rewards, zero, zero, None)

    if online_ref_token_logps is None or online_mask is None:
        raise ValueError("online_token_logps needs online_ref_token_logps and online_mask (or packed segment ids)")
    if not (online_token_logps.shape == online_ref_token_logps.shape == online_mask.shape):
        raise ValueError(f"online log-probs {tuple(online_token_logps.shape)}, reference log-probs "
                         f"{tuple(online_ref_token_logps.shape)} and mask {tuple(online_mask.shape)} must match")
    if kl_loss == "exact_token" and online_token_kls is None:
        raise ValueError("kl_loss='exact_token' needs online_token_kls (OnlineLogps.token_kls): the exact "
                         "per-position KLs, from hypo_fast.linear_token_kl")
    if online_token_kls is not None and online_token_kls.shape != online_token_logps.shape:
        raise ValueError(f"online_token_kls {tuple(online_token_kls.shape)} must have the online log-probs' shape "
                         f"{tuple(online_token_logps.shape)}")
    seq = sequence_logps(online_token_logps, online_mask, num_segments=num_online)
    seq_ref = sequence_logps(online_ref_token_logps.detach(), online_mask, num_segments=num_online)
    rloo = rloo_kl_loss(seq, seq_ref, num_samples)
    advantages, exact_kl = rloo.advantages, None
    if online_token_kls is not None:
        exact = exact_token_kl_loss(online_token_logps, online_token_kls, online_mask, num_samples, num_online)
        exact_kl = exact.sequence_kls.mean()
    if kl_loss == "rloo":
        term = rloo.loss
    elif kl_loss == "exact_token":
        scored = online_mask.bool() if online_mask.dtype == torch.bool or online_mask.is_floating_point() \
            else online_mask >= 0
        term, advantages = exact.loss, exact.advantages[scored]
    else:  # k3
        term = k3_kl_loss(online_token_logps, online_ref_token_logps, online_mask, num_online)
    return HyPOLoss(loss + kl_coef * term, dpo_losses, chosen_rewards, rejected_rewards, term.detach(),
                    rloo.rewards.mean(), advantages, exact_kl)
