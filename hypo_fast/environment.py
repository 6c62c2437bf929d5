"""``hypo_fast.info()``: what this install is made of and which backend each op picks."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
import warnings
from pathlib import Path

import torch

PACKAGES = ("hypo_fast", "torch", "triton", "transformers", "kernels", "tokenizers", "accelerate", "deepspeed", "peft",
            "safetensors", "datasets", "liger-kernel", "flash-attn", "trl")


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in ``PACKAGES`` (None: not installed); benchmarks record it."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def hf_kernels() -> tuple[str, bool]:
    """What ``import kernels`` gives here, and whether it shadows Hugging Face's ``kernels`` package.

    transformers >= 5.25 imports Hugging Face's ``kernels``; a module of that name found earlier on
    ``sys.path`` (a ``kernels/`` folder with an ``__init__.py`` in the working directory, say) makes
    ``import transformers`` fail. A folder without ``__init__.py``, like this repository's ``kernels/``, is
    only a PEP 420 namespace portion, which never wins over an installed package. Returns (a line saying
    which ``kernels`` is found, whether something shadows it).
    """
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError) as error:
        return f"cannot be looked up ({error})", True
    found = Path(spec.origin).resolve() if spec is not None and spec.origin not in (None, "namespace") else None
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None:
        if found is None:
            return "not installed", False
        return f"not installed, but `import kernels` gives {found}, which is not Hugging Face's package", True
    installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
    if found == installed:
        return f"Hugging Face kernels {dist.version} from {installed.parent}", False
    shadow = found if found is not None else ", ".join(spec.submodule_search_locations or []) or "nothing"
    return (f"Hugging Face kernels {dist.version} is installed at {installed.parent}, but `import kernels` gives "
            f"{shadow}: it shadows the installed package and transformers will fail to import; run from another "
            f"folder or rename that module"), True


def describe() -> dict:
    """The facts ``info()`` prints, as a dict."""
    from hypo_fast.ops import native
    from hypo_fast.ops.backends import resolve_impl

    import hypo_fast

    cuda = torch.cuda.is_available()
    facts = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: v or "not installed" for p, v in package_versions().items()},
        "package": str(Path(hypo_fast.__file__).parent),
        "kernels_package": hf_kernels(),  # (which `kernels` is found, whether it shadows Hugging Face's)
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
    kernels_line, shadowed = facts["kernels_package"]
    out = file or sys.stdout
    print(f"hypo_fast {facts['versions']['hypo_fast']} from {facts['package']}", file=out)
    print(f"python {facts['python']} on {facts['platform']}", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if k != "hypo_fast"), file=out)
    print(f"`import kernels`: {kernels_line}", file=out)
    print(f"native CPU ops: {facts['native_ops']}", file=out)
    print(f"CUDA: {facts['cuda']}", file=out)
    for device, impl in facts["backends"].items():
        print(f"impl='auto' on {device}: linear_logprobs -> {impl}, sample_tokens -> {impl}", file=out)
    if shadowed:
        warnings.warn(f"`import kernels`: {kernels_line}", stacklevel=2)
    return facts
