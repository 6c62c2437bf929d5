"""hypo_fast: fused kernels and a lean trainer for HyPO preference fine-tuning.

HyPO here is Hybrid Preference Optimization (Song, Swamy, Singh, Bagnell, Sun, "The Importance of Online
Data: Understanding Preference Fine-tuning via Coverage", NeurIPS 2024): offline DPO plus a reverse-KL
penalty estimated on the policy's own samples.
"""

from hypo_fast.ops import linear_logprobs

__version__ = "0.1.0"
__all__ = ["linear_logprobs", "__version__"]
