"""DPO loss from hidden states, forward + backward, policy with a live reference.

Methods (same hidden states, head, targets, β; all tokens scored):
  naive          materialised policy logits (grad) and reference logits (no grad), log_softmax in fp32  8NVD
  liger          Liger's LigerFusedLinearDPOLoss (gradient computed in its forward, a pair at a time;
                 compiled=False on CPU, its plain-PyTorch chunked path)                                8NVD
  ours           hypo_fast.FusedLinearDPOLoss, reference live                                         10NVD
  ours_prerefs   hypo_fast.FusedLinearDPOLoss with precomputed reference log-probs (the trainer's
                 path: offline reference log-probs are cached once per dataset)                        8NVD

N = 2·pairs·T tokens. Each method runs in a fresh process (cold run: peak extra memory; warm repeats:
median time); prints ratios to Liger and GFLOP/s against a plain matmul measured in the same run, and
appends rows to benchmarks/results/bench_dpo_loss.jsonl.

    python benchmarks/bench_dpo_loss.py                  # CPU: 2 pairs, T=1024, V=32000, D=512, fp32
    python benchmarks/bench_dpo_loss.py --device cuda    # GPU: Llama-3-8B head, bf16
"""

from __future__ import annotations


import torch

from benchlib import (bench_arguments, compare_methods, finish_run, serve_worker, start_run, time_and_memory)

CASES = {  # (pairs, T, V, D)
    "cpu": [(2, 1024, 32000, 512)],
    "cuda": [(4, 1024, 128256, 4096), (8, 2048, 32000, 4096)],
}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
METHODS = ["naive", "liger", "ours", "ours_prerefs"]
NVD_MULTIPLE = {"naive": 8, "liger": 8, "ours": 10, "ours_prerefs": 8}
BETA = 0.1


def _naive_seq_logps(hidden, weight, target):
    logits = hidden @ weight.T  # [2B, T, V]
    return torch.log_softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1).sum(-1)


def make_step(method, hidden, weight, ref_hidden, ref_weight, target):
    n = hidden.shape[0] // 2
    if method == "naive":
        from hypo_fast.losses import dpo_loss

        def step():
            seq = _naive_seq_logps(hidden, weight, target)
            with torch.no_grad():
                ref = _naive_seq_logps(ref_hidden, ref_weight, target)
            dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], beta=BETA)[0].mean().backward()
    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=hidden.device.type == "cuda")

        def step():
            loss_fn(weight, hidden, target, None, ref_hidden, ref_weight)[0].backward()
    elif method in ("ours", "ours_prerefs"):
        from hypo_fast import FusedLinearDPOLoss, linear_logprobs
        loss_fn = FusedLinearDPOLoss(beta=BETA)
        with torch.no_grad():
            ref = linear_logprobs(ref_hidden, ref_weight, target).sum(-1)

        def step():
            if method == "ours":
                loss, _ = loss_fn(weight, hidden, target, None, ref_hidden, ref_weight)
            else:
                loss, _ = loss_fn(weight, hidden, target, ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
            loss.backward()
    elif method == "matmul":
        def step():
            with torch.no_grad():
                torch.mm(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach().t())
    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def worker(method: str, case: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    pairs, T, V, D, device = case["pairs"], case["T"], case["V"], case["D"], case["device"]
    dt = getattr(torch, case["dtype"])
    hidden = torch.randn(2 * pairs, T, D, device=device, dtype=dt).requires_grad_()
    ref_hidden = (hidden.detach() + 0.1 * torch.randn_like(hidden)).to(dt)
    weight = (torch.randn(V, D, device=device) / D**0.5).to(dt).requires_grad_()
    ref_weight = weight.detach().clone()
    target = torch.randint(0, V, (2 * pairs, T), device=device)
    step = make_step(method, hidden, weight, ref_hidden, ref_weight, target)

    def run():
        hidden.grad = weight.grad = None
        step()

    return time_and_memory(run, device, repeats)


def main() -> None:
    parser = bench_arguments(__doc__, METHODS)
    parser.add_argument("--cases", nargs="*", help="pairs,T,V,D quadruples (default: per device)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 CPU, 10 CUDA)")
    args = parser.parse_args()
    if serve_worker(args, worker):
        return

    device = args.device
    cases = [tuple(int(x) for x in c.split(",")) for c in args.cases] if args.cases else CASES[device]
    repeats = args.repeats or (3 if device == "cpu" else 10)
    env = start_run(args)
    rows = []
    for pairs, T, V, D in cases:
        N = 2 * pairs * T
        case = {"bench": "dpo_loss", "pairs": pairs, "T": T, "N": N, "V": V, "D": D,
                "dtype": DTYPES[device], "device": device}
        flops = {m: NVD_MULTIPLE[m] * N * V * D for m in args.methods}
        rows += compare_methods(__file__, args.methods, case, repeats, "liger", flops, env)
    finish_run("bench_dpo_loss", rows, [("pairs", "pairs", "d"), ("T", "T", "d"), ("V", "V", "d"), ("D", "D", "d"),
                       ("method", "method", "s"), ("time_s", "time s", ".3f"), ("time_vs_liger", "×liger", ".2f"),
                       ("peak_extra_mb", "extra MiB", ".0f"), ("mem_vs_liger", "mem×liger", ".3f"),
                       ("gflops", "GFLOP/s", ".0f"), ("pct_of_matmul", "%matmul", ".0f"), ("error", "error", "s")], args)


if __name__ == "__main__":
    main()
