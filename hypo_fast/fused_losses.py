"""DPO and HyPO losses straight from hidden states and the LM-head weight, never building logits.

``FusedLinearDPOLoss`` is call-compatible with Liger-Kernel's ``LigerFusedLinearDPOLoss``; both modules
score every token through :func:`hypo_fast.linear_logprobs` (memory ``O(N + V·D)`` beyond inputs and
gradients) and hand sequence log-probs to the pure functions of :mod:`hypo_fast.losses`.

Under DeepSpeed ZeRO-3 the LM-head weight is partitioned: call these modules inside a module forward
whose parameters include the head (the ZeRO hooks gather it), or within
``deepspeed.zero.GatheredParameters([lm_head.weight], modifier_rank=None)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hypo_fast.losses import ONLINE_KL_LOSSES, check_dpo_options, dpo_loss, hypo_loss, sequence_logps
from hypo_fast.ops import linear_logprobs


class PreferenceAux(NamedTuple):
    """Liger's aux tuple order, then HyPO's online statistics (zeros for plain DPO)."""

    chosen_logps: torch.Tensor  # [B]
    rejected_logps: torch.Tensor  # [B]
    chosen_logits_mean: torch.Tensor  # scalar: mean logit over the vocabulary and chosen tokens
    rejected_logits_mean: torch.Tensor  # scalar
    nll_loss: torch.Tensor  # scalar: mean NLL of chosen tokens (0 unless compute_nll_loss)
    chosen_rewards: torch.Tensor  # [B] β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor  # [B]
    dpo_loss: torch.Tensor | None = None  # scalar mean ℓ_dpo
    kl_loss: torch.Tensor | None = None  # scalar ℓ_kl
    online_kl: torch.Tensor | None = None  # scalar mean sequence KL estimate (k1) on online samples
    advantages: torch.Tensor | None = None  # [M]

    def metrics(self) -> dict[str, float]:
        """Scalar metrics under TRL's names, plus ``kl/online``, ``loss/dpo``, ``loss/kl``."""
        margins = self.chosen_rewards - self.rejected_rewards
        out = {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": self.chosen_logps.detach().mean(),
            "logps/rejected": self.rejected_logps.detach().mean(),
            "logits/chosen": self.chosen_logits_mean,
            "logits/rejected": self.rejected_logits_mean,
            "nll_loss": self.nll_loss.detach(),
        }
        for key, value in (("loss/dpo", self.dpo_loss), ("loss/kl", self.kl_loss), ("kl/online", self.online_kl)):
            if value is not None:
                out[key] = value.detach()
        if self.advantages is not None and self.advantages.numel():
            out["advantages/mean"] = self.advantages.mean()
            out["advantages/std"] = self.advantages.std(unbiased=False)
        return {k: float(v) for k, v in out.items()}


def _check_pairs(_input: torch.Tensor, target: torch.Tensor) -> int:
    if _input.dim() != 3:
        raise ValueError(f"_input must be [2B, T, D] (chosen rows, then rejected), got {tuple(_input.shape)}")
    if target.shape != _input.shape[:2]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal _input.shape[:2] {tuple(_input.shape[:2])}")
    if _input.shape[0] % 2:
        raise ValueError(f"_input batch must be even (B chosen rows then B rejected), got {_input.shape[0]}")
    return _input.shape[0] // 2


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


class ScoredPairs(NamedTuple):
    chosen: torch.Tensor  # [B] policy sequence log-probs (with grad)
    rejected: torch.Tensor  # [B]
    ref_chosen: torch.Tensor  # [B]
    ref_rejected: torch.Tensor  # [B]
    chosen_logits_mean: torch.Tensor  # scalar
    rejected_logits_mean: torch.Tensor  # scalar
    chosen_nll: torch.Tensor  # scalar mean NLL of chosen tokens (with grad)
    online_logps: torch.Tensor | None  # [M, T'] policy token log-probs of online samples (with grad)


class PairScorer:
    """Scores offline pairs (and optional online samples) with one fused policy call and at most one
    fused no-grad reference call. Shared by the DPO and HyPO modules."""

    def __init__(self, ignore_index: int, average_log_prob: bool, use_ref_model: bool, impl: str):
        self.ignore_index, self.average_log_prob = ignore_index, average_log_prob
        self.use_ref_model, self.impl = use_ref_model, impl

    def _logprobs(self, weight, bias, blocks, logit_mean=False):
        """blocks: [(hidden [R, T, D], target [R, T])] → per block ``(token logps [R, T], [logit means])``."""
        D = weight.shape[1]
        hidden = [h.reshape(-1, D) for h, _ in blocks]
        target = [t.reshape(-1) for _, t in blocks]
        out = linear_logprobs(hidden[0] if len(blocks) == 1 else torch.cat(hidden),  # [Σ R·T, D]: one call
                              weight, target[0] if len(blocks) == 1 else torch.cat(target),
                              bias=bias, ignore_index=self.ignore_index, return_logit_mean=logit_mean,
                              impl=self.impl)
        sizes = [t.numel() for t in target]
        parts = [o.split(sizes) for o in (out if logit_mean else (out,))]
        return [tuple(p[i].view(t.shape) for p in parts) for i, (_, t) in enumerate(blocks)]

    def _reference_logprobs(self, weight, bias, blocks):
        with torch.no_grad():
            bias = None if bias is None else bias.detach()
            return [lp for lp, in self._logprobs(weight.detach(), bias, [(h.detach(), t) for h, t in blocks])]

    def score(self, lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, ref_chosen, ref_rejected,
              online=None):
        """online: None or (online_input, online_target, ref_online_input, online_ref_logps).

        Returns ``(ScoredPairs, online_ref_logps | None)``.
        """
        n_pairs = _check_pairs(_input, target)
        mask = target != self.ignore_index
        ref_weight = lin_weight if ref_weight is None else ref_weight
        blocks = [(_input, target)] + ([online[:2]] if online else [])
        scored = self._logprobs(lin_weight, bias, blocks, logit_mean=True)
        token_logps, logit_means = scored[0]
        seq = sequence_logps(token_logps, mask, average=self.average_log_prob)

        # reference: precomputed, or live (pairs and online samples in one no-grad call), or zero
        ref_blocks = []
        if ref_chosen is None and ref_rejected is None and self.use_ref_model:
            if ref_input is None or ref_input.shape[:2] != target.shape:
                raise ValueError("use_ref_model=True needs ref_input shaped like _input "
                                 "(or ref_chosen_logps and ref_rejected_logps)")
            ref_blocks.append((ref_input, target))
        need_online_ref = online is not None and online[3] is None
        if need_online_ref:
            ref_blocks.append((online[2], online[1]))
        ref_scored = self._reference_logprobs(ref_weight, ref_bias, ref_blocks) if ref_blocks else []
        online_ref = ref_scored.pop() if need_online_ref else (online[3] if online else None)
        ref_chosen, ref_rejected = self._pair_reference(n_pairs, seq, mask, ref_scored, ref_chosen, ref_rejected)

        scored_pairs = ScoredPairs(
            seq[:n_pairs], seq[n_pairs:], ref_chosen, ref_rejected,
            _masked_mean(logit_means[:n_pairs], mask[:n_pairs]), _masked_mean(logit_means[n_pairs:], mask[n_pairs:]),
            -_masked_mean(token_logps[:n_pairs], mask[:n_pairs]),
            scored[1][0] if online else None)
        return scored_pairs, online_ref

    def _pair_reference(self, n_pairs, seq, mask, ref_scored, ref_chosen, ref_rejected):
        if (ref_chosen is None) != (ref_rejected is None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        if ref_chosen is not None:
            for name, t in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
                if t.shape != (n_pairs,):
                    raise ValueError(f"{name} must be [B={n_pairs}], got {tuple(t.shape)}")
            return ref_chosen.detach().to(seq.dtype), ref_rejected.detach().to(seq.dtype)
        if not self.use_ref_model:
            return torch.zeros_like(seq[:n_pairs]), torch.zeros_like(seq[n_pairs:])
        ref_seq = sequence_logps(ref_scored[0], mask, average=self.average_log_prob)
        return ref_seq[:n_pairs], ref_seq[n_pairs:]


class FusedLinearDPOLoss(torch.nn.Module):
    """DPO from hidden states: a drop-in for Liger's ``LigerFusedLinearDPOLoss`` without ``[N, V]`` logits.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
    ref_chosen_logps=None, ref_rejected_logps=None) -> (loss, PreferenceAux)``

    ``_input`` is ``[2B, T, D]``: B chosen rows, then their B rejected rows; ``target`` ``[2B, T]`` is
    already aligned with ``_input`` (row t predicts token t+1 of the text) and ``ignore_index`` marks
    non-response tokens. The reference comes from precomputed ``ref_chosen_logps``/``ref_rejected_logps``
    (``[B]``; what Liger's path cannot take), else from ``ref_input`` with ``ref_weight`` (default: the
    policy head) when ``use_ref_model``, else it is 0. ``loss_type="ipo"`` length-averages the log-probs,
    as TRL does. ``logits/*`` are means over scored tokens only (TRL's definition; Liger also averages
    over ignored positions). Loss = mean over pairs of ℓ_dpo (+ ``alpha`` · chosen NLL).
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, use_ref_model: bool = True, average_log_prob: bool = False,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, impl: str = "auto"):
        super().__init__()
        check_dpo_options(beta, loss_type, label_smoothing)
        self.beta, self.alpha, self.compute_nll_loss = beta, alpha, compute_nll_loss
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.scorer = PairScorer(ignore_index, average_log_prob or loss_type == "ipo", use_ref_model, impl)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps=None, ref_rejected_logps=None):
        s, _ = self.scorer.score(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                                 ref_chosen_logps, ref_rejected_logps)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing)
        nll = s.chosen_nll if self.compute_nll_loss else losses.new_zeros(())
        loss = losses.mean() + self.alpha * nll
        aux = PreferenceAux(s.chosen.detach(), s.rejected.detach(), s.chosen_logits_mean.detach(),
                            s.rejected_logits_mean.detach(), nll.detach(), chosen_rewards, rejected_rewards,
                            dpo_loss=losses.mean().detach())
        return loss, aux


class FusedLinearHyPOLoss(torch.nn.Module):
    """HyPO from hidden states: the DPO term on offline pairs plus λ·ℓ_kl on the policy's own samples.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
    online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
    ref_chosen_logps=None, ref_rejected_logps=None) -> (loss, PreferenceAux)``

    The offline arguments are as in :class:`FusedLinearDPOLoss`. ``online_input`` ``[M, T', D]`` holds the
    hidden states of M = prompts·k samples (a prompt's k samples consecutive) and ``online_target``
    ``[M, T']`` the sampled tokens (``ignore_index`` elsewhere). Their reference log-probs come from
    ``online_ref_logps`` (token-level ``[M, T']``) or from ``ref_online_input`` (+ ``ref_weight``). One
    fused policy call scores pairs and samples together. ``kl_coef = 0`` skips the online term (plain DPO).
    """

    def __init__(self, beta: float = 0.1, kl_coef: float = 0.01, group_size: int = 2, ignore_index: int = -100,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, average_log_prob: bool = False,
                 use_ref_model: bool = True, kl_loss: str = "rloo", impl: str = "auto"):
        super().__init__()
        check_dpo_options(beta, loss_type, label_smoothing)
        if kl_loss not in ONLINE_KL_LOSSES:
            raise ValueError(f"kl_loss must be one of {ONLINE_KL_LOSSES}, got {kl_loss!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {group_size}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be ≥ 0, got {kl_coef}")
        self.beta, self.kl_coef, self.group_size, self.kl_loss = beta, kl_coef, group_size, kl_loss
        self.loss_type, self.label_smoothing, self.ignore_index = loss_type, label_smoothing, ignore_index
        self.scorer = PairScorer(ignore_index, average_log_prob or loss_type == "ipo", use_ref_model, impl)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
                ref_chosen_logps=None, ref_rejected_logps=None):
        online = None
        if self.kl_coef > 0 and online_input is not None:
            self._check_online(online_input, online_target, ref_online_input, online_ref_logps)
            online = (online_input, online_target, ref_online_input, online_ref_logps)
        s, online_ref = self.scorer.score(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                                          ref_chosen_logps, ref_rejected_logps, online)
        online_args = (None, None, None)
        if online is not None:
            online_args = (s.online_logps, online_ref, online_target != self.ignore_index)
        result = hypo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, *online_args,
                           beta=self.beta, kl_coef=self.kl_coef, group_size=self.group_size,
                           loss_type=self.loss_type, label_smoothing=self.label_smoothing, kl_loss=self.kl_loss)
        aux = PreferenceAux(s.chosen.detach(), s.rejected.detach(), s.chosen_logits_mean.detach(),
                            s.rejected_logits_mean.detach(), s.chosen_nll.detach(), result.chosen_rewards,
                            result.rejected_rewards, result.dpo_losses.mean().detach(), result.kl_loss,
                            result.online_kl, result.advantages)
        return result.loss, aux

    def _check_online(self, online_input, online_target, ref_online_input, online_ref_logps):
        if online_target is None or online_input.dim() != 3 or online_target.shape != online_input.shape[:2]:
            raise ValueError("online_input must be [M, T, D] with online_target [M, T]")
        if online_input.shape[0] % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the number of online samples "
                             f"M={online_input.shape[0]}")
        if online_ref_logps is None and ref_online_input is None:
            raise ValueError("online samples need online_ref_logps or ref_online_input")
        if online_ref_logps is not None and online_ref_logps.shape != online_target.shape:
            raise ValueError(f"online_ref_logps must be token-level {tuple(online_target.shape)}, "
                             f"got {tuple(online_ref_logps.shape)}")
        if ref_online_input is not None and ref_online_input.shape != online_input.shape:
            raise ValueError(f"ref_online_input shape {tuple(ref_online_input.shape)} must equal online_input's")
