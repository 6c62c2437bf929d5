"""The native CPU ops (``hypo_fast._C``, built from ``kernels/csrc`` by CMake at install time): one backend
of ``linear_logprobs`` and ``sample_tokens`` (see :mod:`hypo_fast.ops.backends`).

The library is loaded when this module is imported; ``available()`` says whether ``torch.ops.hypo_fast.*``
can be used and ``status()`` says why not. It is optional: without it (no compiler at install,
``HYPO_FAST_NATIVE=0``, or a torch upgraded since the build) every op falls back to the PyTorch path. The
fake implementations below let ``torch.compile`` trace each native op as one node.

The library is looked for in this package's folder (``hypo_fast/``), then in the installed distribution:
after a non-editable
``pip install .``, code run from the repository root imports the source tree's ``hypo_fast`` (no
``_C.so`` there) and still gets the installed build.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import warnings
from pathlib import Path

import torch

from hypo_fast.ops import chunked

SAMPLE_TILE = 2048  # vocabulary columns per sampling tile; part of what a seed reproduces


def _package_folders() -> list[Path]:
    """The ``hypo_fast`` folder, then the installed distribution's (they differ when run from a checkout)."""
    folders = [Path(__file__).resolve().parent.parent]
    for dist in importlib.metadata.distributions(name="hypo_fast"):  # a checkout's egg-info is one of them
        installed = Path(dist.locate_file("hypo_fast"))
        if all(installed.resolve() != f.resolve() for f in folders):
            folders.append(installed)
    return folders


def _find_library() -> Path | None:
    return next((f / "_C.so" for f in _package_folders() if (f / "_C.so").exists()), None)


def build_info() -> dict:
    """What the install recorded (``_build_info.json``): ``{"native_built": bool, "reason": str | None}``."""
    for folder in _package_folders():
        path = folder / "_build_info.json"
        if path.exists():
            return json.loads(path.read_text())
    return {"native_built": None, "reason": "no build record (not installed with pip)"}


def _load() -> tuple[Path | None, str]:
    """Load the library; returns (its path or None, a one-line status)."""
    if os.environ.get("HYPO_FAST_NATIVE", "1") == "0":
        return None, "switched off (HYPO_FAST_NATIVE=0)"
    library = _find_library()
    if library is None:
        reason = build_info()["reason"]
        return None, f"not built ({reason})" if reason else "not found"
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as error:  # e.g. undefined symbols after a torch upgrade
        warnings.warn(f"hypo_fast: could not load {library} ({error}); reinstall hypo_fast to rebuild it. "
                      "Using the PyTorch path.", stacklevel=2)
        return None, f"failed to load {library}"
    built_with, running = torch.ops.hypo_fast.built_with(), torch.__version__.split("+")[0]
    if built_with != running:
        warnings.warn(f"hypo_fast: {library} was built for torch {built_with}, this is torch {running}; "
                      "reinstall hypo_fast to rebuild it. Using the PyTorch path.", stacklevel=2)
        return None, f"built for torch {built_with}, running {running}: reinstall to rebuild"
    _register_fakes()
    return library, f"loaded from {library}"


def available() -> bool:
    """Whether ``torch.ops.hypo_fast.*`` are usable (the library is loaded once, at import)."""
    return LIBRARY is not None


def status() -> str:
    """One line: where the library was loaded from, or why the native ops are not in use."""
    return _STATUS


def _register_fakes() -> None:
    """Shape-only implementations for tracing (``torch.compile``, FakeTensor)."""

    @torch.library.register_fake("hypo_fast::linear_logprobs_fwd")
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, return_logit_mean, return_top1,
          *chunking):
        rows = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        extra = lambda wanted, dtype=torch.float32: rows.new_empty(rows.shape if wanted else (0,), dtype=dtype)  # noqa: E731
        return (rows, rows.new_empty(rows.shape), extra(return_entropy), extra(return_logit_mean),
                extra(return_top1, torch.bool))

    @torch.library.register_fake("hypo_fast::linear_logprobs_bwd")
    def _(hidden, weight, targets, bias, lse, grad_logp, entropy, grad_entropy, temperature, ignore_index,
          want_hidden, want_weight, want_bias, fp32_weight_grad, *chunking):
        like = lambda t, wanted: torch.empty_like(t) if wanted else weight.new_empty((0,))  # noqa: E731
        return like(hidden, want_hidden), like(weight, want_weight), like(bias, want_bias and bias is not None)

    @torch.library.register_fake("hypo_fast::sample_head")
    def _(hidden, weight, bias, temperature, seed, greedy, return_entropy, tile):
        rows = hidden.shape[0]
        return (hidden.new_empty(rows, dtype=torch.long), hidden.new_empty(rows, dtype=torch.float32),
                hidden.new_empty(rows if return_entropy else 0, dtype=torch.float32))


def _chunking() -> tuple[int, int]:
    """The vocabulary chunking rule, shared with the PyTorch path (read at call time: tests shrink it)."""
    return chunked.DEFAULT_CHUNK_ELEMENTS, chunked.MIN_CHUNK


# Adapters with the contracts of hypo_fast.kernels' launchers (absent outputs are None). The ops compute
# in fp32 on the CPU, so ``allow_tf32`` (part of the common contract) changes nothing here.


def linear_logprobs_fwd(hidden, weight, targets, bias=None, *, temperature=1.0, ignore_index=-100,
                        return_entropy=False, return_logit_mean=False, return_top1=False, allow_tf32=False):
    logp, lse, entropy, logit_mean, is_top1 = torch.ops.hypo_fast.linear_logprobs_fwd(
        hidden, weight, targets, bias, temperature, ignore_index, return_entropy, return_logit_mean, return_top1,
        *_chunking())
    return (logp, lse, entropy if return_entropy else None, logit_mean if return_logit_mean else None,
            is_top1 if return_top1 else None)


def linear_logprobs_bwd(hidden, weight, targets, bias, lse, grad_logp, *, entropy=None, grad_entropy=None,
                        temperature=1.0, ignore_index=-100, needs_grad=(True, True, True), fp32_weight_grad=True,
                        allow_tf32=False):
    want_h, want_w, want_b = needs_grad
    want_b = want_b and bias is not None
    d_hidden, d_weight, d_bias = torch.ops.hypo_fast.linear_logprobs_bwd(
        hidden, weight, targets, bias, lse, grad_logp, entropy if grad_entropy is not None else None,
        grad_entropy, temperature, ignore_index, want_h, want_w, want_b, fp32_weight_grad,
        *_chunking())
    return d_hidden if want_h else None, d_weight if want_w else None, d_bias if want_b else None


def sample_head(hidden, weight, bias=None, *, temperature=1.0, seed=0, greedy=False, return_entropy=False,
                allow_tf32=False):
    tokens, logp, entropy = torch.ops.hypo_fast.sample_head(hidden, weight, bias, temperature, seed, greedy,
                                                            return_entropy, SAMPLE_TILE)
    return tokens, logp, entropy if return_entropy else None


LIBRARY, _STATUS = _load()  # Path of the loaded library, or None
