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

from hypo_fast.losses import sequence_logps
from hypo_fast.objective import HyPOObjective, OnlineLogps, PreferenceAux, StepLogps
from hypo_fast.ops import linear_logprobs

_DEFAULT = HyPOObjective  # keyword defaults below are read from the objective's fields: one default each


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
    online_logps: torch.Tensor | None  # [M, T'] policy token log-probs of online samples at τ (with grad)


class PairScorer:
    """Scores offline pairs (τ = 1) and optional online samples (at the sampling temperature τ) with fused
    policy calls and at most one fused no-grad reference call per temperature. Shared by both modules."""

    def __init__(self, ignore_index: int, average_log_prob: bool, use_ref_model: bool, impl: str,
                 temperature: float = 1.0):
        self.ignore_index, self.average_log_prob = ignore_index, average_log_prob
        self.use_ref_model, self.impl, self.temperature = use_ref_model, impl, temperature

    def _logprobs(self, weight, bias, blocks, logit_mean=False, temperature=1.0):
        """blocks: [(hidden [R, T, D], target [R, T])] → per block ``(token logps [R, T], [logit means])``."""
        D = weight.shape[1]
        hidden = [h.reshape(-1, D) for h, _ in blocks]
        target = [t.reshape(-1) for _, t in blocks]
        out = linear_logprobs(hidden[0] if len(blocks) == 1 else torch.cat(hidden),  # [Σ R·T, D]: one call
                              weight, target[0] if len(blocks) == 1 else torch.cat(target),
                              bias=bias, ignore_index=self.ignore_index, return_logit_mean=logit_mean,
                              temperature=temperature, impl=self.impl)
        sizes = [t.numel() for t in target]
        parts = [o.split(sizes) for o in (out if logit_mean else (out,))]
        return [tuple(p[i].view(t.shape) for p in parts) for i, (_, t) in enumerate(blocks)]

    def _by_temperature(self, weight, bias, offline, online, logit_mean):
        """Pairs at τ = 1 and online samples at self.temperature: one fused call when the two agree."""
        online = online or []
        if offline and online and self.temperature == 1.0:
            scored = self._logprobs(weight, bias, offline + online, logit_mean)
            return scored[:len(offline)], scored[len(offline):]
        return (self._logprobs(weight, bias, offline, logit_mean) if offline else [],
                self._logprobs(weight, bias, online, logit_mean, self.temperature) if online else [])

    def score(self, lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, ref_chosen, ref_rejected,
              online=None):
        """online: None or (online_input, online_target, ref_online_input, online_ref_logps).

        Returns ``(ScoredPairs, online_ref_logps | None)``.
        """
        n_pairs = _check_pairs(_input, target)
        mask = target != self.ignore_index
        ref_weight = lin_weight if ref_weight is None else ref_weight
        pairs, samples = self._by_temperature(lin_weight, bias, [(_input, target)],
                                              [online[:2]] if online else None, logit_mean=True)
        token_logps, logit_means = pairs[0]
        seq = sequence_logps(token_logps, mask, average=self.average_log_prob)

        # reference: precomputed, or live (no grad), or zero
        offline_ref = []
        if ref_chosen is None and ref_rejected is None and self.use_ref_model:
            if ref_input is None or ref_input.shape[:2] != target.shape:
                raise ValueError("use_ref_model=True needs ref_input shaped like _input "
                                 "(or ref_chosen_logps and ref_rejected_logps)")
            if ref_input.shape[-1] != ref_weight.shape[-1]:
                raise ValueError(f"ref_input's hidden size {ref_input.shape[-1]} must equal ref_weight's "
                                 f"D={ref_weight.shape[-1]}")
            offline_ref.append((ref_input.detach(), target))
        online_ref = online[3] if online else None
        live_online_ref = [(online[2].detach(), online[1])] if online is not None and online_ref is None else None
        with torch.no_grad():
            ref_bias = None if ref_bias is None else ref_bias.detach()
            ref_pairs, ref_samples = self._by_temperature(ref_weight.detach(), ref_bias, offline_ref, live_online_ref,
                                                          logit_mean=False)
        if live_online_ref:
            online_ref = ref_samples[0][0]
        ref_chosen, ref_rejected = self._pair_reference(n_pairs, seq, mask, [lp for lp, in ref_pairs], ref_chosen,
                                                        ref_rejected)

        scored_pairs = ScoredPairs(
            seq[:n_pairs], seq[n_pairs:], ref_chosen, ref_rejected,
            _masked_mean(logit_means[:n_pairs], mask[:n_pairs]), _masked_mean(logit_means[n_pairs:], mask[n_pairs:]),
            -_masked_mean(token_logps[:n_pairs], mask[:n_pairs]),
            samples[0][0] if online else None)
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

    def __init__(self, ignore_index: int = -100, beta: float = _DEFAULT.beta, alpha: float = 1.0,
                 compute_nll_loss: bool = False, use_ref_model: bool = True, average_log_prob: bool = False,
                 loss_type: str = _DEFAULT.loss_type, label_smoothing: float = _DEFAULT.label_smoothing,
                 impl: str = "auto"):
        super().__init__()
        self.objective = HyPOObjective(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, kl_coef=0.0)
        self.alpha, self.compute_nll_loss = alpha, compute_nll_loss
        self.scorer = PairScorer(ignore_index, average_log_prob or self.objective.length_normalised, use_ref_model,
                                 impl)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps=None, ref_rejected_logps=None):
        s, _ = self.scorer.score(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                                 ref_chosen_logps, ref_rejected_logps)
        nll = s.chosen_nll if self.compute_nll_loss else None
        loss, aux = self.objective(StepLogps(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, None,
                                             s.chosen_logits_mean, s.rejected_logits_mean), nll)
        return (loss if nll is None else loss + self.alpha * nll), aux


class FusedLinearHyPOLoss(torch.nn.Module):
    """HyPO from hidden states: the DPO term on offline pairs plus λ·ℓ_kl on the policy's own samples.

    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
    online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
    ref_chosen_logps=None, ref_rejected_logps=None) -> (loss, PreferenceAux)``

    The offline arguments are as in :class:`FusedLinearDPOLoss`. ``online_input`` ``[M, T', D]`` holds the
    hidden states of M = prompts·k samples (a prompt's k samples consecutive) and ``online_target``
    ``[M, T']`` the sampled tokens (``ignore_index`` elsewhere). Their reference log-probs come from
    ``online_ref_logps`` (token-level ``[M, T']``, at ``temperature``) or from ``ref_online_input``
    (+ ``ref_weight``). ``temperature`` is the τ the samples were drawn at: online samples are scored
    under π_τ and π_ref,τ (the objective is then KL(π_τ ‖ π_ref,τ); see :mod:`hypo_fast.objective`), pairs
    at τ = 1. ``kl_coef = 0`` skips the online term (plain DPO).
    """

    def __init__(self, beta: float = _DEFAULT.beta, kl_coef: float = _DEFAULT.kl_coef,
                 num_samples: int = _DEFAULT.num_samples, ignore_index: int = -100,
                 loss_type: str = _DEFAULT.loss_type, label_smoothing: float = _DEFAULT.label_smoothing,
                 average_log_prob: bool = False, use_ref_model: bool = True, kl_loss: str = _DEFAULT.kl_loss,
                 temperature: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.objective = HyPOObjective(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                       kl_coef=kl_coef, num_samples=num_samples, kl_loss=kl_loss)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.ignore_index = ignore_index
        self.scorer = PairScorer(ignore_index, average_log_prob or self.objective.length_normalised, use_ref_model,
                                 impl, float(temperature))

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                online_input=None, online_target=None, ref_online_input=None, online_ref_logps=None,
                ref_chosen_logps=None, ref_rejected_logps=None):
        online = None
        given = (online_input, online_target, ref_online_input, online_ref_logps)
        if any(t is not None for t in given):
            self._check_online(*given, need_reference=self.objective.samples_online)
            if self.objective.samples_online:  # λ = 0 is DPO: the samples are not scored at all
                online = given
        s, online_ref = self.scorer.score(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                                          ref_chosen_logps, ref_rejected_logps, online)
        online_logps = None
        if online is not None:
            online_logps = OnlineLogps(s.online_logps, online_ref, online_target != self.ignore_index)
        return self.objective(StepLogps(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, online_logps,
                                        s.chosen_logits_mean, s.rejected_logits_mean), s.chosen_nll)

    def _check_online(self, online_input, online_target, ref_online_input, online_ref_logps, need_reference):
        if online_input is None or online_target is None:
            raise ValueError("online samples need both online_input [M, T, D] and online_target [M, T] "
                             f"(got online_input={'None' if online_input is None else 'a tensor'}, "
                             f"online_target={'None' if online_target is None else 'a tensor'})")
        if online_input.dim() != 3 or online_target.shape != online_input.shape[:2]:
            raise ValueError(f"online_input must be [M, T, D] with online_target [M, T], got "
                             f"{tuple(online_input.shape)} and {tuple(online_target.shape)}")
        k = self.objective.num_samples
        if online_input.shape[0] % k:
            raise ValueError(f"num_samples={k} must divide the number of online samples M={online_input.shape[0]}")
        if need_reference and online_ref_logps is None and ref_online_input is None:
            raise ValueError("online samples need online_ref_logps or ref_online_input")
        if online_ref_logps is not None and online_ref_logps.shape != online_target.shape:
            raise ValueError(f"online_ref_logps must be token-level {tuple(online_target.shape)}, "
                             f"got {tuple(online_ref_logps.shape)}")
        if ref_online_input is not None and ref_online_input.shape != online_input.shape:
            raise ValueError(f"ref_online_input shape {tuple(ref_online_input.shape)} must equal online_input's")
