"""The HyPO objective, decided once (layer 2): validated settings and the one function from a step's
log-probabilities to its loss and metrics.

The trainer, the fused modules (:mod:`hypo_fast.fused_losses`) and evaluation all go through
:class:`HyPOObjective`, so the DPO term, the online KL term, their sum and every logged number are
assembled in exactly one place (:func:`hypo_fast.losses.hypo_loss` does the maths):

    L = mean_pairs ℓ_dpo + λ · ℓ_kl        (Song et al. 2024, §5 and Algorithm 1)

ℓ_dpo is any of TRL 1.16's pairwise losses, or a weighted list of them (:mod:`hypo_fast.dpo_losses`);
:class:`StepLogps` carries summed log-probs with the response token counts beside them, and each loss
type decides its own length normalisation.

**Temperature.** The paper samples from the policy itself (τ = 1). With a sampling temperature τ ≠ 1
the online samples come from π_τ = softmax(z/τ); hypo_fast then regularises KL(π_τ ‖ π_ref,τ), the KL
between the two models' *sampling* distributions (both heads at τ, as TRL's online trainers do), and
it is estimated without bias because the training forward scores the online samples at the same τ
(policy and reference), while the offline pairs are always scored at τ = 1 (the DPO term is on π).
:class:`hypo_fast.models.Policy` owns τ; nothing else passes it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hypo_fast.dpo_losses import (NEEDS_TOKEN_COUNTS, USES_LABEL_SMOOTHING, OptionError, check_dpo_options,
                                  loss_types_of)
from hypo_fast.losses import ONLINE_KL_LOSSES, hypo_loss, sampled_kl

__all__ = ["HyPOObjective", "StepLogps", "OnlineLogps", "PreferenceAux", "DPOAux", "OptionError"]


class OnlineLogps(NamedTuple):
    """Token log-probs of the online samples (k per prompt, consecutive), both at the sampling τ."""

    token_logps: torch.Tensor  # [M, T] or packed [N]: log π_τ(y_t | x, y_<t), with grad
    ref_token_logps: torch.Tensor  # same shape: log π_ref,τ(y_t | x, y_<t)
    mask_or_segment_ids: torch.Tensor  # [M, T] bool mask, or packed [N] int sample index
    num_sequences: int | None = None  # M (required with packed segment ids)
    token_kls: torch.Tensor | None = None  # same shape: exact KL_t at each sampled prefix, with grad (exact_token)

    def kl(self, estimator: str = "k1") -> torch.Tensor:
        """``[M]`` per-sample estimates of KL(π_τ ‖ π_ref,τ) (detached); evaluation reports the same."""
        return sampled_kl(self.token_logps.detach(), self.ref_token_logps, self.mask_or_segment_ids, estimator,
                          self.num_sequences)


class StepLogps(NamedTuple):
    """What the objective reads from one step, by named segment (however the log-probs were computed)."""

    chosen: torch.Tensor  # [B] log π(y+|x) at τ = 1 summed over the response, with grad
    rejected: torch.Tensor  # [B] log π(y−|x)
    ref_chosen: torch.Tensor  # [B] log π_ref(y+|x)
    ref_rejected: torch.Tensor  # [B] log π_ref(y−|x)
    online: OnlineLogps | None = None  # None: no online samples this step
    chosen_logits_mean: torch.Tensor | None = None  # scalar metric (mean logit over vocabulary and tokens)
    rejected_logits_mean: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # [B] response token counts (ipo, sigmoid_norm and sft need them)
    rejected_tokens: torch.Tensor | None = None  # [B]
    entropy: torch.Tensor | None = None  # scalar metric: policy entropy over chosen and rejected tokens (TRL's)
    mean_token_accuracy: torch.Tensor | None = None  # scalar metric: chosen tokens that are the top-1 (TRL's)

    @classmethod
    def of_pairs(cls, parts: "list[StepLogps]") -> "StepLogps":
        """The pairs of several offline-only batches as one: per-pair fields concatenated, the scalar
        token metrics weighted by each batch's pair count (evaluation sees every held-out pair at once)."""
        sizes = [p.chosen.shape[0] for p in parts]

        def weighted(name):
            means = [getattr(p, name) for p in parts]
            return None if means[0] is None else sum(m * n for m, n in zip(means, sizes)) / sum(sizes)

        def joined(name):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

        return cls(joined("chosen"), joined("rejected"), joined("ref_chosen"), joined("ref_rejected"), None,
                   weighted("chosen_logits_mean"), weighted("rejected_logits_mean"), joined("chosen_tokens"),
                   joined("rejected_tokens"), weighted("entropy"), weighted("mean_token_accuracy"))


class PreferenceAux(NamedTuple):
    """Liger's aux tuple order, then HyPO's online statistics (None without online samples)."""

    chosen_logps: torch.Tensor  # [B]
    rejected_logps: torch.Tensor  # [B]
    chosen_logits_mean: torch.Tensor  # scalar: mean logit over the vocabulary and chosen tokens
    rejected_logits_mean: torch.Tensor  # scalar
    nll_loss: torch.Tensor  # scalar: mean NLL of chosen tokens (0 unless computed)
    chosen_rewards: torch.Tensor  # [B] β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor  # [B]
    dpo_loss: torch.Tensor | None = None  # scalar mean ℓ_dpo
    kl_loss: torch.Tensor | None = None  # scalar ℓ_kl (its value, not the KL)
    online_kl: torch.Tensor | None = None  # scalar mean k1 estimate of KL(π_τ ‖ π_ref,τ) on the samples
    advantages: torch.Tensor | None = None  # [M] RLOO advantages r_i − b_i (exact_token: per scored token)
    online_kl_exact: torch.Tensor | None = None  # scalar mean over samples of Σ_t KL_t (exact per-token KLs)
    entropy: torch.Tensor | None = None  # scalar: mean policy entropy (τ = 1) over chosen and rejected tokens
    mean_token_accuracy: torch.Tensor | None = None  # scalar: fraction of chosen tokens that are the top-1

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Scalar metrics under TRL's names plus ``loss/dpo``, ``loss/kl``, ``kl/online`` (and
        ``kl/online_exact`` when exact per-token KLs were computed): the one place they are computed
        (training logs, the fused modules and evaluation all call this). One device→host transfer for all."""
        tensors = self.metric_tensors()
        values = torch.stack([t.float() for t in tensors.values()]).tolist() if tensors else []
        return {prefix + k: v for k, v in zip(tensors, values)}

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """The metrics as 0-d tensors on the device (no host sync; the trainer transfers them once a step)."""
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
        for key, value in (("entropy", self.entropy), ("mean_token_accuracy", self.mean_token_accuracy),
                           ("loss/dpo", self.dpo_loss), ("loss/kl", self.kl_loss), ("kl/online", self.online_kl),
                           ("kl/online_exact", self.online_kl_exact)):
            if value is not None:
                out[key] = value.detach()
        if self.advantages is not None and self.advantages.numel():
            out["advantages/mean"] = self.advantages.mean()
            out["advantages/std"] = self.advantages.std(unbiased=False)
        return {k: v.detach().reshape(()) for k, v in out.items() if v is not None}


class DPOAux(NamedTuple):
    """Liger's ``LigerFusedLinearDPOLoss`` aux tuple, element for element (seven, in its order), returned
    by :class:`hypo_fast.FusedLinearDPOLoss` so that code unpacking Liger's tuple runs unchanged."""

    chosen_logps: torch.Tensor  # [B]
    rejected_logps: torch.Tensor  # [B]
    chosen_logits_mean: torch.Tensor  # scalar: mean logit over the vocabulary and the scored chosen tokens
    rejected_logits_mean: torch.Tensor  # scalar
    nll_loss: torch.Tensor  # scalar: mean NLL of chosen tokens (0 unless computed)
    chosen_rewards: torch.Tensor  # [B] β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor  # [B]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """As :meth:`PreferenceAux.metrics` (TRL's names)."""
        return PreferenceAux(*self).metrics(prefix)


@dataclass(frozen=True)
class HyPOObjective:
    """HyPO's settings, validated once, and the objective itself (call it on :class:`StepLogps`).

    Every layer takes these names and defaults from here: the config's ``algorithm`` section *is* this
    class, and the fused modules' keyword defaults read its fields.
    """

    beta: float = 0.1  # β of the DPO term
    # one of hypo_fast.dpo_losses.LOSS_TYPES (TRL 1.16's names and formulas, plus cdpo), or a list of them
    loss_type: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] | None = None  # one per loss_type (TRL: None = 1.0 each)
    label_smoothing: float = 0.0  # ε of cdpo, robust, exo_pair (> 0), aot, aot_unpaired; in [0, 0.5)
    kl_coef: float = 0.0  # λ. 0 is DPO and never samples; the paper tunes λ per task (no universal value)
    num_samples: int = 2  # k online samples per prompt (the RLOO baseline needs k ≥ 2)
    # the online term ℓ_kl: rloo (the paper: REINFORCE on the sampled log-ratio, leave-one-out baseline) |
    # exact_token (not from the paper: exact per-token KLs from a fused kernel, analytic term + REINFORCE on
    # the exact future KL; unbiased, lower variance) | k3 (not from the paper: per-token k3 as a direct loss)
    kl_loss: str = "rloo"
    discopop_tau: float = 0.05  # τ of discopop (TRL's default)

    def __post_init__(self):
        def check(ok: bool, option: str, message: str):
            if not ok:
                raise OptionError(option, message)

        if isinstance(self.loss_type, list):  # frozen and hashable: lists become tuples
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if isinstance(self.loss_weights, list):
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        check_dpo_options(self.beta, self.loss_type, self.label_smoothing, self.discopop_tau, self.loss_weights)
        check(isinstance(self.kl_coef, (int, float)) and 0 <= self.kl_coef < math.inf, "kl_coef",
              f"must be a finite number ≥ 0, got {self.kl_coef!r}")
        check(isinstance(self.num_samples, int) and self.num_samples >= 1, "num_samples",
              f"must be an integer ≥ 1, got {self.num_samples!r}")
        check(self.kl_loss in ONLINE_KL_LOSSES, "kl_loss", f"must be one of {ONLINE_KL_LOSSES}, got {self.kl_loss!r}")
        types = set(self.loss_types)
        if self.label_smoothing > 0 and "sigmoid" in types and not USES_LABEL_SMOOTHING & types:
            # earlier hypo_fast and TRL releases read it as conservative DPO: say where that went
            warnings.warn(f"label_smoothing={self.label_smoothing} is unused by loss_type {self.loss_type!r}: "
                          "'sigmoid' is plain DPO, as in TRL 1.16 and Liger; conservative DPO is loss_type 'cdpo'",
                          stacklevel=3)

    @property
    def loss_types(self) -> tuple[str, ...]:
        """``loss_type`` as a tuple of names."""
        return loss_types_of(self.loss_type)

    @property
    def needs_token_counts(self) -> bool:
        """Whether a loss type normalises by response length (``StepLogps`` must then carry token counts)."""
        return bool(NEEDS_TOKEN_COUNTS & set(self.loss_types))

    @property
    def samples_online(self) -> bool:
        """Whether a step draws online samples (λ > 0)."""
        return self.kl_coef > 0

    def __call__(self, logps: StepLogps, nll_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, PreferenceAux]:
        """``(loss, aux)``: ``loss = mean ℓ_dpo + λ·ℓ_kl``; ``aux`` carries every metric.

        ``logps.online`` is ignored when λ = 0 (the DPO baseline); ``nll_loss`` is only reported.
        """
        if self.needs_token_counts and (logps.chosen_tokens is None or logps.rejected_tokens is None):
            raise ValueError(f"loss_type {self.loss_type!r} divides by response lengths: StepLogps needs "
                             "chosen_tokens and rejected_tokens (and summed, not averaged, log-probs)")
        online = logps.online if self.samples_online else None
        online_args = (None, None, None) if online is None else online[:3]
        result = hypo_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected, *online_args,
                           num_online=None if online is None else online.num_sequences,
                           beta=self.beta, kl_coef=self.kl_coef, num_samples=self.num_samples,
                           loss_type=self.loss_type, label_smoothing=self.label_smoothing, kl_loss=self.kl_loss,
                           discopop_tau=self.discopop_tau, loss_weights=self.loss_weights,
                           chosen_tokens=logps.chosen_tokens, rejected_tokens=logps.rejected_tokens,
                           online_token_kls=None if online is None else online.token_kls)
        zero = result.loss.new_zeros(()).detach()
        aux = PreferenceAux(
            logps.chosen.detach(), logps.rejected.detach(),
            zero if logps.chosen_logits_mean is None else logps.chosen_logits_mean.detach(),
            zero if logps.rejected_logits_mean is None else logps.rejected_logits_mean.detach(),
            zero if nll_loss is None else nll_loss.detach(),
            result.chosen_rewards, result.rejected_rewards, result.dpo_losses.mean().detach(),
            None if online is None else result.kl_loss,
            None if online is None else result.online_kl,
            result.advantages, result.online_kl_exact,
            None if logps.entropy is None else logps.entropy.detach(),
            None if logps.mean_token_accuracy is None else logps.mean_token_accuracy.detach())
        return result.loss, aux
