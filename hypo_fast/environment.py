"""``hypo_fast.info()``: what this install is made of and which backend each op picks."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

import torch

PACKAGES = ("hypo_fast", "torch", "triton", "transformers", "deepspeed", "peft", "safetensors", "datasets",
            "liger-kernel", "flash-attn", "trl")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict:
    """The facts ``info()`` prints, as a dict (benchmarks record it with their rows)."""
    from hypo_fast.ops import native
    from hypo_fast.ops.backends import resolve_impl

    import hypo_fast

    cuda = torch.cuda.is_available()
    facts = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "package": str(Path(hypo_fast.__file__).parent),
        "native_ops": native.status(),
        "native_build": native.build_info(),
        "cuda": torch.cuda.get_device_name() if cuda else "not available",
        "backends": {"cpu": resolve_impl("auto", torch.device("cpu"))},
    }
    if cuda:
        facts["backends"]["cuda"] = resolve_impl("auto", torch.device("cuda"))
    return facts


def info(file=None) -> dict:
    """Print versions, the native ops' state and the backend ``impl="auto"`` picks per device; return them.

    ``python -c "import hypo_fast; hypo_fast.info()"``
    """
    facts = describe()
    out = file or sys.stdout
    print(f"hypo_fast {facts['versions']['hypo_fast']} from {facts['package']}", file=out)
    print(f"python {facts['python']} on {facts['platform']}", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if k != "hypo_fast"), file=out)
    print(f"native CPU ops: {facts['native_ops']}", file=out)
    print(f"CUDA: {facts['cuda']}", file=out)
    for device, impl in facts["backends"].items():
        print(f"impl='auto' on {device}: linear_logprobs -> {impl}, sample_tokens -> {impl}", file=out)
    return facts
