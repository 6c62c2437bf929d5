"""The pairwise preference losses of TRL's ``DPOTrainer`` (1.16) as small pure functions (layer 2).

Every loss reads one micro-batch of B preference pairs through :class:`PairLogps`: the policy's and the
reference's *summed* response log-probs ``c = log π(y+|x)``, ``r = log π(y−|x)``, ``c0``, ``r0`` and,
optionally, the response token counts ``n+``, ``n−``. With the log-ratios ``ρ+ = c − c0``, ``ρ− = r − r0``
and the margin ``h = ρ+ − ρ−``, each function below returns the per-pair losses ``ℓ [B]``; a list of
loss types combines as TRL does, ``L = Σ_k w_k · mean_pairs(ℓ_k)`` (:func:`dpo_loss`). Each loss decides
its own normalisation: ``ipo``, ``sigmoid_norm`` and ``sft`` divide by token counts, ``aot``,
``aot_unpaired`` and ``sft`` couple the pairs of the micro-batch, the others are per pair.

Where hypo_fast deliberately differs from TRL 1.16 (each is stated where it applies):

* ``sigmoid`` ignores ``label_smoothing``, as TRL 1.16 and Liger 0.8.5 do; the conservative DPO of older
  TRL releases (their ``sigmoid`` with ``label_smoothing > 0``) is kept as the extra type ``cdpo``.
* ``label_smoothing`` must lie in [0, 0.5) for every type (TRL only warns for ``robust``), and ``exo_pair``
  needs it > 0 (as TRL and Liger); ``loss_weights`` must be finite and ≥ 0.
* Token counts are clamped at 1, so an empty response contributes 0 instead of NaN (``sft``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "cdpo")
NEEDS_TOKEN_COUNTS = frozenset({"ipo", "sigmoid_norm", "sft"})
USES_LABEL_SMOOTHING = frozenset({"cdpo", "robust", "exo_pair", "aot", "aot_unpaired"})
WHOLE_BATCH = frozenset({"aot", "aot_unpaired", "sft"})  # ℓ of one pair depends on the other pairs


class OptionError(ValueError):
    """A bad objective setting; ``option`` names it (the config layer prefixes its section)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.detail = option, message


class PairLogps(NamedTuple):
    """One micro-batch of pairs: ``[B]`` summed log-probs and, optionally, ``[B]`` response token counts."""

    chosen: torch.Tensor  # c  = log π(y+|x), with grad
    rejected: torch.Tensor  # r  = log π(y−|x)
    ref_chosen: torch.Tensor  # c0 = log π_ref(y+|x)
    ref_rejected: torch.Tensor  # r0 = log π_ref(y−|x)
    chosen_tokens: torch.Tensor | None = None  # n+; None counts each sequence as one unit (already normalised)
    rejected_tokens: torch.Tensor | None = None  # n−

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """``h = ρ+ − ρ−`` (DPO's implicit reward margin divided by β)."""
        return self.chosen_logratios - self.rejected_logratios

    def _count(self, tokens: torch.Tensor | None) -> torch.Tensor | float:
        return 1.0 if tokens is None else tokens.to(self.chosen.dtype).clamp_min(1)

    def normalised_margin(self) -> torch.Tensor:
        """``ρ+/n+ − ρ−/n−``: the margin of per-token (length-averaged) log-ratios."""
        return (self.chosen_logratios / self._count(self.chosen_tokens)
                - self.rejected_logratios / self._count(self.rejected_tokens))

    def chosen_token_mean(self) -> torch.Tensor:
        """``Σ_b c_b / Σ_b n+_b``: the mean log-prob of every chosen token in the micro-batch (a scalar)."""
        count = self.chosen.new_tensor(float(len(self.chosen))) if self.chosen_tokens is None else \
            self.chosen_tokens.to(self.chosen.dtype).sum()
        return self.chosen.sum() / count.clamp_min(1)


# ---- the losses: one function per paper ------------------------------------------------------------

def sigmoid_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``−log σ(β·h)``. ``[B] → [B]``."""
    return -F.logsigmoid(beta * margin)


def cdpo_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"): the DPO loss against
    labels flipped with probability ε, ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``. Not a TRL 1.16 type: older
    TRL's ``sigmoid`` with ``label_smoothing = ε``."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)


def robust_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 7): the unbiased loss under flip rate
    ε < ½, ``(−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε)``."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)


def hinge_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC (Zhao et al. 2023, "SLiC-HF", Eq. 2) on the log-ratio margin: ``max(0, 1 − β·h)``."""
    return torch.relu(1 - beta * margin)


def ipo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm…", Eq. 17, τ = β): ``(h − 1/(2β))²``. TRL
    (and :func:`pair_losses`) feed it the per-token margin :meth:`PairLogps.normalised_margin`."""
    return (margin - 1 / (2 * beta)) ** 2


def exo_pair_loss(margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment", Eq. 16, K = 2):
    ``KL(q ‖ p)`` between the model's pair distribution ``q = (σ(βh), σ(−βh))`` and the smoothed labels
    ``p = (1−ε, ε)``, ε > 0."""
    eps = label_smoothing
    x = beta * margin
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of LMs with Explicit Rewards", pairwise form):
    ``−log σ(βρ+) − ½·log σ(−βρ+) − ½·log σ(−βρ−)`` (absolute rewards, not only their margin)."""
    rc, rr = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment") on pairs, without the
    paper's running reward shift δ (TRL 1.16 is stateless too): ``−log σ(βρ+) − log σ(−βρ−)``."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7) with hard win probabilities
    (1 for the chosen, 0 for the rejected): ``(ρ+ − 1/(2β))² + (ρ− + 1/(2β))²``."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7): raise the chosen
    and lower the rejected likelihood, ``1 − σ(βρ+) + σ(βρ−)``."""
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both, the rejected more,
    ``σ(βρ+) + 1 − σ(β(ρ+ − ρ−))``."""
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(margin: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP's log-ratio modulated loss (Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for LLMs", Eq. 5): with ``x = βh`` and ``m = σ(x/τ)``,
    ``(1 − m)·(−log σ(x)) + m·e^(−x)``."""
    x = beta * margin
    m = torch.sigmoid(x / tau)
    return (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)


def aot_loss(policy_margins: torch.Tensor, ref_margins: torch.Tensor, beta: float,
             label_smoothing: float) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): first-order stochastic dominance of the policy's margins ``c − r`` over the reference's
    ``c0 − r0``, as the cDPO loss of ``d = sort(c − r) − sort(c0 − r0)`` over the micro-batch (the
    sorted order is the 1-D optimal transport plan)."""
    d = torch.sort(policy_margins, dim=0).values - torch.sort(ref_margins, dim=0).values
    return cdpo_loss(d, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                      label_smoothing: float) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): dominance of the chosen log-ratios' distribution over the
    rejected ones', ``d = sort(ρ+) − sort(ρ−)`` over the micro-batch, then cDPO. (TRL ≤ 0.2x: ``aot_pair``.)"""
    d = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
    return cdpo_loss(d, beta, label_smoothing)


def sft_loss(chosen_token_mean: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token (RPO: Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", Eq. 1; MPO mixes it in): ``−Σ_b c_b / Σ_b n+_b``, one scalar for the
    micro-batch, repeated for each of the B pairs so that its mean over pairs is that scalar."""
    return (-chosen_token_mean).expand(num_pairs)


_PAIR_LOSSES: dict[str, Callable[[PairLogps, float, float, float], torch.Tensor]] = {
    "sigmoid": lambda p, beta, eps, tau: sigmoid_loss(p.margin, beta),
    "cdpo": lambda p, beta, eps, tau: cdpo_loss(p.margin, beta, eps),
    "robust": lambda p, beta, eps, tau: robust_loss(p.margin, beta, eps),
    "hinge": lambda p, beta, eps, tau: hinge_loss(p.margin, beta),
    "ipo": lambda p, beta, eps, tau: ipo_loss(p.normalised_margin(), beta),
    "sigmoid_norm": lambda p, beta, eps, tau: sigmoid_loss(p.normalised_margin(), beta),
    "exo_pair": lambda p, beta, eps, tau: exo_pair_loss(p.margin, beta, eps),
    "nca_pair": lambda p, beta, eps, tau: nca_pair_loss(p.chosen_logratios, p.rejected_logratios, beta),
    "bco_pair": lambda p, beta, eps, tau: bco_pair_loss(p.chosen_logratios, p.rejected_logratios, beta),
    "sppo_hard": lambda p, beta, eps, tau: sppo_hard_loss(p.chosen_logratios, p.rejected_logratios, beta),
    "apo_zero": lambda p, beta, eps, tau: apo_zero_loss(p.chosen_logratios, p.rejected_logratios, beta),
    "apo_down": lambda p, beta, eps, tau: apo_down_loss(p.chosen_logratios, p.rejected_logratios, beta),
    "discopop": lambda p, beta, eps, tau: discopop_loss(p.margin, beta, tau),
    "aot": lambda p, beta, eps, tau: aot_loss(p.chosen - p.rejected, p.ref_chosen - p.ref_rejected, beta, eps),
    "aot_unpaired": lambda p, beta, eps, tau: aot_unpaired_loss(p.chosen_logratios, p.rejected_logratios, beta, eps),
    "sft": lambda p, beta, eps, tau: sft_loss(p.chosen_token_mean(), len(p.chosen)),
}
assert set(_PAIR_LOSSES) == set(LOSS_TYPES)


def pair_losses(logps: PairLogps, loss_type: str, *, beta: float, label_smoothing: float = 0.0,
                discopop_tau: float = 0.05) -> torch.Tensor:
    """``[B]`` losses of one type (no option checks: see :func:`check_dpo_options`)."""
    return _PAIR_LOSSES[loss_type](logps, beta, label_smoothing, discopop_tau)


# ---- options -------------------------------------------------------------------------------------

def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def loss_types_of(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """``"sigmoid"`` or ``["sigmoid", "sft"]`` → a tuple of names (TRL wraps a string in a list)."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def check_dpo_options(beta: float, loss_type: str | Sequence[str], label_smoothing: float = 0.0,
                      discopop_tau: float = 0.05,
                      loss_weights: Sequence[float] | None = None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate the DPO options; returns ``(loss types, weights)`` with TRL's default of 1.0 per type.

    Raises:
        OptionError: (a ``ValueError``) naming the bad option.
    """
    if not isinstance(loss_type, (str, list, tuple)):
        raise OptionError("loss_type", f"must be a name or a list of names, got {loss_type!r}")
    types = loss_types_of(loss_type)
    if not types:
        raise OptionError("loss_type", "must name at least one loss type")
    for name in types:
        if name not in LOSS_TYPES:
            raise OptionError("loss_type", f"must be one of {LOSS_TYPES} (or a list of them), got {name!r}")
    if not (_finite(beta) and beta > 0):
        raise OptionError("beta", f"must be a positive finite number, got {beta!r}")
    if not (_finite(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise OptionError("label_smoothing", f"must be in [0, 0.5), got {label_smoothing!r}")
    if "exo_pair" in types and label_smoothing <= 0:
        raise OptionError("label_smoothing", "must be > 0 for loss_type 'exo_pair' (the EXO paper suggests 1e-3)")
    if not (_finite(discopop_tau) and discopop_tau > 0):
        raise OptionError("discopop_tau", f"must be a positive finite number, got {discopop_tau!r}")
    if loss_weights is None:
        return types, (1.0,) * len(types)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise OptionError("loss_weights", f"must be a list of numbers, got {loss_weights!r}")
    if len(loss_weights) != len(types):
        raise OptionError("loss_weights", f"has {len(loss_weights)} weights for {len(types)} loss types {list(types)}")
    for w in loss_weights:
        if not (_finite(w) and w >= 0):
            raise OptionError("loss_weights", f"must be finite numbers ≥ 0, got {list(loss_weights)}")
    return types, tuple(float(w) for w in loss_weights)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards, with TRL 1.16's ``DPOTrainer`` formulas.

    ``loss_type`` is one name of :data:`LOSS_TYPES` or a list; a list combines as
    ``ℓ_b = Σ_k w_k·ℓ_k,b`` (``loss_weights``, default 1 each), so ``mean_b ℓ_b = Σ_k w_k·mean_b ℓ_k,b``
    (TRL's combination). The formulas and their papers are the functions of this module.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` summed
            response log-probs (sums: ``ipo``, ``sigmoid_norm`` and ``sft`` divide by the counts below).
        chosen_tokens, rejected_tokens: ``[B]`` response token counts; ``None`` counts every sequence as one
            unit (pass log-probs that are already length-averaged, or accept sums).
        label_smoothing: ε of ``cdpo``, ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` (unused by
            ``sigmoid``, as in TRL 1.16 and Liger).
        discopop_tau: τ of ``discopop``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the rewards are ``β·(log π − log π_ref)``
        of the summed log-probs for every loss type (TRL 1.16), detached.
    """
    types, weights = check_dpo_options(beta, loss_type, label_smoothing, discopop_tau, loss_weights)
    tensors = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
               "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
               "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens}
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) != 1 or len(shapes[next(iter(shapes))]) != 1:
        raise ValueError(f"policy/ref chosen/rejected log-probs (and token counts) must share one shape [B], "
                         f"got {shapes}")
    if (chosen_tokens is None) != (rejected_tokens is None):
        raise ValueError("pass both chosen_tokens and rejected_tokens, or neither")
    pairs = PairLogps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_tokens, rejected_tokens)
    losses = None
    for name, weight in zip(types, weights):
        term = weight * pair_losses(pairs, name, beta=beta, label_smoothing=label_smoothing,
                                    discopop_tau=discopop_tau)
        losses = term if losses is None else losses + term
    return losses, beta * pairs.chosen_logratios.detach(), beta * pairs.rejected_logratios.detach()
