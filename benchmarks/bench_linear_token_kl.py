"""Forward+backward of the exact per-position KL(π ‖ π_ref) between two LM heads (``linear_token_kl``).

Methods, each on the same inputs (a policy head and a nearby reference head, the reference without grad)
with a random per-position upstream gradient of the KL and of the target log-prob (what the
``exact_token`` estimator backpropagates):
  naive      both [N, V] logits materialised, log_softmax of each in fp32, Σ p·(log p − log q), gather
             (forward 4NVD + backward 4NVD FLOPs)
  ours       hypo_fast.linear_token_kl(return_logprobs=True), impl="auto" (Triton on CUDA, the chunked
             PyTorch path on CPU: this op has no native CPU op; forward 4NVD + backward with recompute 8NVD)
  logprobs   hypo_fast.linear_logprobs on the policy head alone (impl="auto"): what the paper's RLOO
             estimator pays for the same rows, for scale

Each case runs in a fresh process: a cold run measures peak extra memory, then warm repeats give the
median time. Prints a table with ratios to naive and appends rows to
bench_linear_token_kl.jsonl under --results-dir (default runs/benchmarks/; --record: benchmarks/results/).

    python benchmarks/bench_linear_token_kl.py                 # CPU
    python benchmarks/bench_linear_token_kl.py --device cuda   # GPU shapes incl. the Llama-3-8B head
"""

from __future__ import annotations

import torch

from benchlib import head_op_main, time_and_memory

SHAPES = {  # (N, V, D)
    "cpu": [(2048, 32000, 512), (1024, 151936, 896)],
    "cuda": [(8192, 128256, 4096), (16384, 151936, 896)],
}
DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16"]}
METHODS = {"cpu": ["naive", "ours", "logprobs"], "cuda": ["naive", "ours", "logprobs"]}
FLOPS_PER_NVD = {"naive": 8, "ours": 12, "logprobs": 8}


def make_step(method: str, hidden, weight, ref_hidden, ref_weight, targets, g_kl, g_logp):
    F = torch.nn.functional
    if method == "naive":
        def step():
            log_p = torch.log_softmax(F.linear(hidden, weight).float(), -1)
            with torch.no_grad():
                log_q = torch.log_softmax(F.linear(ref_hidden, ref_weight).float(), -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
            ((kl * g_kl).sum() + (logp * g_logp).sum()).backward()
    elif method == "ours":
        from hypo_fast import linear_token_kl

        def step():
            kl, logp, _ = linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, return_logprobs=True)
            ((kl * g_kl).sum() + (logp * g_logp).sum()).backward()
    elif method == "logprobs":
        from hypo_fast import linear_logprobs

        def step():
            (linear_logprobs(hidden, weight, targets) * g_logp).sum().backward()
    elif method == "matmul":
        def step():
            with torch.no_grad():
                torch.mm(hidden, weight.t())
    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def worker(method: str, case: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    N, V, D, device, dt = case["N"], case["V"], case["D"], case["device"], getattr(torch, case["dtype"])
    hidden = torch.randn(N, D, device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(V, D, device=device) / D**0.5).to(dt).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(N, D, device=device)).to(dt)
    ref_weight = (weight.detach().float() + 0.1 * torch.randn(V, D, device=device) / D**0.5).to(dt)
    targets = torch.randint(0, V, (N,), device=device)
    g_kl, g_logp = torch.randn(N, device=device), torch.randn(N, device=device)
    step = make_step(method, hidden, weight, ref_hidden, ref_weight, targets, g_kl, g_logp)

    def run():
        hidden.grad = weight.grad = None
        step()

    result = time_and_memory(run, device, repeats)
    if method in ("ours", "logprobs"):
        from hypo_fast.ops.backends import resolve_impl

        result["impl"] = resolve_impl("auto", torch.device(device), has_native=method == "logprobs")
    return result


def main() -> None:
    head_op_main(__doc__, __file__, "linear_token_kl", worker, methods=METHODS, shapes=SHAPES, dtypes=DTYPES,
                 flops_per_nvd=FLOPS_PER_NVD)


if __name__ == "__main__":
    main()
