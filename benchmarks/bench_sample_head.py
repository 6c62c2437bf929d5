"""The sampling head alone: one decode step's token draw (and its log-prob) from hidden states.

Methods, on the same ``[B, D]`` hidden states and ``[V, D]`` LM head, pure sampling at temperature 1:
  naive      logits = h Wᵀ, log_softmax in fp32, torch.multinomial, gather the drawn token's log-prob
  ours       hypo_fast sample_tokens, impl="auto" (Triton on CUDA; on CPU the native op when built,
             else the chunked PyTorch path; the row's "impl" says which)
  chunked    sample_tokens, impl="torch": the chunked PyTorch sampler (inverse CDF + reservoir)

Each case runs in a fresh process (cold run for the peak extra memory, median of warm repeats); prints
ratios to naive and appends rows to benchmarks/results/bench_sample_head.jsonl.

    python benchmarks/bench_sample_head.py                 # CPU: V=32000 D=512 and V=151936 D=896
    python benchmarks/bench_sample_head.py --device cuda   # bf16, Llama-3-8B and Qwen-0.5B heads
"""

from __future__ import annotations

import torch

from benchlib import (HYPO_FAST_IMPLS, bench_arguments, compare_methods, finish_run, resolved_impl, serve_worker,
                      start_run, time_and_memory)

SHAPES = {  # (B, V, D): B rows decoded at once
    "cpu": [(16, 32000, 512), (64, 32000, 512), (16, 151936, 896)],
    "cuda": [(64, 128256, 4096), (256, 151936, 896)],
}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
METHODS = {"cpu": ["naive", "ours", "chunked"], "cuda": ["naive", "ours"]}


def make_step(method: str, hidden, weight):
    from hypo_fast.ops.sample_head import sample_tokens

    if method == "naive":
        def step():
            logp = torch.log_softmax((hidden @ weight.T).float(), -1)
            tokens = torch.multinomial(logp.exp(), 1)
            return tokens.squeeze(1), logp.gather(1, tokens).squeeze(1)
    elif method in HYPO_FAST_IMPLS:
        impl = HYPO_FAST_IMPLS[method]

        def step():
            return sample_tokens(hidden, weight, seed=0, impl=impl)
    elif method == "matmul":
        def step():
            return hidden @ weight.T
    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def worker(method: str, case: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    N, V, D, device, dt = case["N"], case["V"], case["D"], case["device"], getattr(torch, case["dtype"])
    hidden = torch.randn(N, D, device=device, dtype=dt)
    weight = (torch.randn(V, D, device=device) * 2 / D**0.5).to(dt)
    with torch.no_grad():
        result = time_and_memory(make_step(method, hidden, weight), device, repeats)
    result["impl"] = resolved_impl(method, device)
    return result


def main() -> None:
    parser = bench_arguments(__doc__, [])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    device = args.device
    methods = args.methods or METHODS[device]
    env = start_run(args)
    rows = []
    for B, V, D in SHAPES[device]:
        case = {"bench": "sample_head", "N": B, "V": V, "D": D, "dtype": DTYPES[device], "device": device}
        flops = {m: 2 * B * V * D for m in methods}  # the GEMM; the rest is memory-bound
        rows += compare_methods(__file__, methods, case, args.repeats, "naive", flops, env)
    finish_run("bench_sample_head", rows, [("N", "B", "d"), ("V", "V", "d"), ("D", "D", "d"), ("method", "method", "s"),
                                           ("impl", "impl", "s"), ("time_s", "time s", ".4f"),
                                           ("time_vs_naive", "×naive", ".2f"), ("peak_extra_mb", "extra MiB", ".1f"),
                                           ("mem_vs_naive", "mem×naive", ".3f"), ("pct_of_matmul", "%matmul", ".0f"),
                                           ("error", "error", "s")], args)


if __name__ == "__main__":
    main()
