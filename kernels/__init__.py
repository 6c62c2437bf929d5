"""hypo_fast.kernels: Triton kernels (layer 0: torch + triton only).

One op per module (``linear_logprobs``, ``linear_token_kl``, ``sample_head``); ``tiles`` holds the
device-side helpers they share and ``launch`` the per-arch tile table, input checks and launch records. Installed as
``hypo_fast.kernels`` (setup.py maps the top-level ``kernels/`` folder there); never ``import kernels``: a
different PyPI package has that name.
"""

from .linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd, row_order
from .linear_token_kl import linear_token_kl_bwd, linear_token_kl_fwd

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd", "linear_token_kl_fwd", "linear_token_kl_bwd", "row_order"]
