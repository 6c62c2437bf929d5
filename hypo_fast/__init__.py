"""hypo_fast: fused kernels and a lean trainer for HyPO preference fine-tuning.

HyPO here is Hybrid Preference Optimization (Song, Swamy, Singh, Bagnell, Sun, "The Importance of Online
Data: Understanding Preference Fine-tuning via Coverage", NeurIPS 2024): offline DPO plus a reverse-KL
penalty estimated on the policy's own samples.
"""

from hypo_fast.environment import info
from hypo_fast.fused_losses import FusedLinearDPOLoss, FusedLinearHyPOLoss
from hypo_fast.objective import DPOAux, HyPOObjective, PreferenceAux, StepLogps, OnlineLogps
from hypo_fast.losses import dpo_loss, hypo_loss, k3_kl_loss, rloo_kl_loss, sampled_kl, sequence_logps
from hypo_fast.ops import linear_logprobs, linear_token_kl

__version__ = "0.1.0"
__all__ = [
    "linear_logprobs", "linear_token_kl",
    "sequence_logps", "dpo_loss", "sampled_kl", "rloo_kl_loss", "k3_kl_loss", "hypo_loss",
    "HyPOObjective", "StepLogps", "OnlineLogps", "PreferenceAux", "DPOAux",
    "FusedLinearDPOLoss", "FusedLinearHyPOLoss",
    "info", "__version__",
]
