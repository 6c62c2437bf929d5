"""The sampling head alone: one decode step's token draw (and its log-prob) from hidden states.

Methods, on the same ``[B, D]`` hidden states and ``[V, D]`` LM head, pure sampling at temperature 1:
  naive      logits = h Wᵀ, log_softmax in fp32, torch.multinomial, gather the drawn token's log-prob
  ours       hypo_fast sample_tokens, impl="auto" (Triton on CUDA; on CPU the native op when built,
             else the chunked PyTorch path; the row's "impl" says which)
  chunked    sample_tokens, impl="torch": the chunked PyTorch sampler (inverse CDF + reservoir)

Each case runs in a fresh process (cold run for the peak extra memory, median of warm repeats); prints
ratios to naive and appends rows to benchmarks/results/bench_sample_head.jsonl.

Every row also gives the Triton head's decode-step traffic, computed from its launch grid on the arch
(the device's, or sm_90a on a CPU machine): ``W reads`` = row tiles (each streams all of ``W [V, D]``;
the row tiles of one vocabulary split are adjacent programs, so re-reads can come from L2) and
``W GB/step``. On CUDA, ``GB/s`` is those bytes over the measured time and ``%peak BW`` their fraction of
the device's memory bandwidth (from its memory clock and bus width, when torch reports them); CPU rows
leave both empty: a bandwidth fraction cannot be measured without the GPU.

    python benchmarks/bench_sample_head.py                 # CPU: V=32000 D=512 and V=151936 D=896
    python benchmarks/bench_sample_head.py --device cuda   # bf16 Llama-3-8B head, B = 8, 64, 256
"""

from __future__ import annotations

import torch

from benchlib import (HYPO_FAST_IMPLS, bench_arguments, compare_methods, finish_run, resolved_impl, serve_worker,
                      start_run, time_and_memory)

SHAPES = {  # (B, V, D): B rows decoded at once
    "cpu": [(16, 32000, 512), (64, 32000, 512), (16, 151936, 896)],
    "cuda": [(8, 128256, 4096), (64, 128256, 4096), (256, 128256, 4096)],
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


def head_traffic(B: int, V: int, D: int, dtype: str, device: str) -> dict:
    """Row tiles of the Triton head's launch grid and the bytes of W they stream per decode step."""
    from hypo_fast.kernels import launch
    from hypo_fast.kernels.sample_head import sample_head_launch

    arch = launch.device_arch(torch.device(device)) or 90
    dt = getattr(torch, dtype)
    meta = lambda *shape: torch.empty(*shape, device="meta", dtype=dt)  # noqa: E731
    tiles, _, out = sample_head_launch(meta(B, D), meta(V, D), arch=arch, splits=1)
    w_bytes = out.row_tiles * V * D * dt.itemsize
    return {"head_arch": arch, "w_reads": out.row_tiles, "w_gb_per_step": w_bytes / 1e9,
            "head_config": "x".join(str(tiles.constexprs[k]) for k in ("BLOCK_B", "BLOCK_V", "BLOCK_D"))}


def peak_bandwidth_gbs() -> float | None:
    """The CUDA device's DRAM bandwidth in GB/s from its memory clock (kHz) and bus width (bits)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None


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
        traffic = head_traffic(B, V, D, DTYPES[device], device)
        for row in compare_methods(__file__, methods, case, args.repeats, "naive", flops, env):
            row.update(traffic)
            if device == "cuda" and row.get("impl") == "triton" and "time_s" in row:
                row["gbs"] = traffic["w_gb_per_step"] / row["time_s"]
                peak = peak_bandwidth_gbs()
                row["pct_peak_bw"] = 100 * row["gbs"] / peak if peak else None
            rows.append(row)
    finish_run("bench_sample_head", rows, [("N", "B", "d"), ("V", "V", "d"), ("D", "D", "d"), ("method", "method", "s"),
                                           ("impl", "impl", "s"), ("time_s", "time s", ".4f"),
                                           ("time_vs_naive", "×naive", ".2f"), ("peak_extra_mb", "extra MiB", ".1f"),
                                           ("mem_vs_naive", "mem×naive", ".3f"), ("pct_of_matmul", "%matmul", ".0f"),
                                           ("w_reads", "W reads", "d"), ("w_gb_per_step", "W GB/step", ".3f"),
                                           ("gbs", "GB/s", ".0f"), ("pct_peak_bw", "%peak BW", ".0f"),
                                           ("error", "error", "s")], args)


if __name__ == "__main__":
    main()
