"""Forward+backward of per-token target log-probs from hidden states and an LM head.

Methods, each on the same inputs with a random per-token upstream gradient (what DPO/HyPO need):
  naive      logits = h Wᵀ, log_softmax in fp32, gather                      (6NVD FLOPs)
  torch_lce  torch.nn.functional.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
  liger      Liger's fused linear cross entropy (CUDA only; scalar "sum" loss: it computes the gradient
             inside its forward, so a per-token upstream gradient is not expressible)
  ours       hypo_fast.linear_logprobs, impl="auto" (Triton on CUDA; on CPU the native op, hypo_fast._C,
             when it was built, else the chunked PyTorch path; the row's "impl" says which; 8NVD FLOPs)
  chunked    hypo_fast.linear_logprobs, impl="torch": the chunked PyTorch path (the CPU baseline the
             native op has to beat)

Each case runs in a fresh process: a cold run measures peak extra memory, then warm repeats give the
median time. Prints a table with ratios to naive and the achieved GFLOP/s against a plain matmul
measured in the same run, and appends rows to benchmarks/results/bench_linear_logprobs.jsonl.

    python benchmarks/bench_linear_logprobs.py                 # CPU: D=512, and a Qwen-0.5B-like head
    python benchmarks/bench_linear_logprobs.py --device cuda   # GPU shapes incl. the Llama-3-8B head
"""

from __future__ import annotations


import torch

from benchlib import HYPO_FAST_IMPLS, head_op_main, resolved_impl, time_and_memory

SHAPES = {  # (N, V, D)
    "cpu": [(4096, 32000, 512), (2048, 151936, 896)],
    "cuda": [(8192, 128256, 4096), (8192, 32000, 4096), (16384, 151936, 896)],
}
DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16"]}
METHODS = {"cpu": ["naive", "torch_lce", "ours", "chunked"], "cuda": ["naive", "torch_lce", "liger", "ours"]}
FLOPS_PER_NVD = {"naive": 6, "torch_lce": 6, "liger": 6, "ours": 8, "chunked": 8}


def make_step(method: str, hidden, weight, targets, grad):
    F = torch.nn.functional
    if method == "naive":
        def step():
            logits = F.linear(hidden, weight)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
            (logp * grad).sum().backward()
    elif method == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise RuntimeError("this torch has no linear_cross_entropy")
        options = torch.nn.LinearCrossEntropyOptions()

        def step():
            nll = F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=options)
            (-nll.float() * grad).sum().backward()
    elif method == "liger":
        if hidden.device.type != "cuda":
            raise RuntimeError("Liger's kernels need CUDA")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step():
            loss_fn(weight, hidden, targets).backward()
    elif method in HYPO_FAST_IMPLS:
        from hypo_fast import linear_logprobs
        impl = HYPO_FAST_IMPLS[method]

        def step():
            (linear_logprobs(hidden, weight, targets, impl=impl) * grad).sum().backward()
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
    targets = torch.randint(0, V, (N,), device=device)
    grad = torch.randn(N, device=device)
    step = make_step(method, hidden, weight, targets, grad)

    def run():
        hidden.grad = weight.grad = None
        step()

    result = time_and_memory(run, device, repeats)
    result["impl"] = resolved_impl(method, device)
    return result


def main() -> None:
    head_op_main(__doc__, __file__, "linear_logprobs", worker, methods=METHODS, shapes=SHAPES, dtypes=DTYPES,
                 flops_per_nvd=FLOPS_PER_NVD)


if __name__ == "__main__":
    main()
