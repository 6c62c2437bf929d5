"""The embedded demo: what the fused log-prob op saves against materialised logits.

    python -m hypo_fast.demo

Scores 2048 tokens against a 32k vocabulary (D=512) with a per-token upstream gradient, the way DPO and
HyPO use it, once with naive PyTorch (full logits, log_softmax, gather) and once with
``hypo_fast.linear_logprobs``; each in a fresh process so the peak memory is its own. Prints time, peak
extra memory and the largest differences in log-probs and gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

N, V, D = 2048, 32000, 512


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _worker(method: str) -> None:
    from hypo_fast import linear_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    grad = torch.randn(N)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
    base = _rss("VmRSS")
    start = time.perf_counter()
    if method == "naive":
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        logp = linear_logprobs(hidden, weight, targets)
    (logp * grad).sum().backward()
    seconds = time.perf_counter() - start
    torch.save({"logp": logp.detach(), "d_hidden": hidden.grad, "d_weight": weight.grad},
               Path(sys.argv[3]) / f"{method}.pt")
    print(json.dumps({"seconds": seconds, "peak_extra_mb": (_rss("VmHWM") - base) / 2**20}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    import tempfile

    print(f"hypo_fast demo: per-token log-probs, N={N} tokens, V={V}, D={D}, fp32, forward+backward\n")
    with tempfile.TemporaryDirectory() as tmp:
        stats = {}
        for method in ("naive", "hypo_fast"):
            out = subprocess.run([sys.executable, "-m", "hypo_fast.demo", "--worker", method, tmp],
                                 capture_output=True, text=True, check=True).stdout
            stats[method] = json.loads(out.strip().splitlines()[-1])
        naive, ours = (torch.load(Path(tmp) / f"{m}.pt") for m in ("naive", "hypo_fast"))
    print(f"{'method':<10} {'time s':>8} {'peak extra MiB':>15}")
    for method, s in stats.items():
        print(f"{method:<10} {s['seconds']:>8.2f} {s['peak_extra_mb']:>15.0f}")
    ratio = stats["hypo_fast"]["peak_extra_mb"] / max(stats["naive"]["peak_extra_mb"], 1e-9)
    print(f"\nhypo_fast uses {ratio:.2f}x the naive peak extra memory (gradients included).")
    for key in ("logp", "d_hidden", "d_weight"):
        print(f"max |naive - hypo_fast| {key:<9} {(naive[key] - ours[key]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
