"""The one rule every op's dispatch follows: which backend ``impl="auto"`` means, and which are allowed.

Backends: ``"triton"`` (``hypo_fast.kernels``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"native"`` (the C++ CPU ops in ``hypo_fast._C``, see :mod:`hypo_fast.ops.native`) and ``"torch"`` (the
vocabulary-chunked PyTorch path, :mod:`hypo_fast.ops.chunked`, any device).
"""

from __future__ import annotations

import os

import torch

from hypo_fast.ops import native

IMPLS = ("auto", "triton", "native", "torch")


def no_autocast(device: torch.device):
    """The backends choose their own precisions (fp32 statistics): an enclosing autocast (HF Trainer,
    accelerate) must not recast the GEMMs inside them (on CPU it would hand the native op bf16 blocks)."""
    return torch.autocast(device_type=device.type, enabled=False)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, has_native: bool = True) -> str:
    """``auto`` → Triton on CUDA, the native op on CPU when it was built, the chunked PyTorch path otherwise.

    ``has_native=False`` is for an op with no native CPU op (``auto`` then means the chunked path on CPU).
    An explicit impl is returned as is when it can run on ``device``; otherwise ValueError says why.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "triton"
        return "native" if device.type == "cpu" and has_native and native.available() else "torch"
    if impl == "native" and not has_native:
        raise ValueError("impl='native': this op has no native CPU op; use impl='torch' (or 'auto') on CPU")
    if impl == "native" and (device.type != "cpu" or not native.available()):
        raise ValueError(f"impl='native' needs CPU tensors and the compiled hypo_fast._C "
                         f"(device {device}, built: {native.available()}); reinstall with cmake and a C++ compiler")
    if impl == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise ValueError(f"impl='triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"got device {device}")
    return impl
