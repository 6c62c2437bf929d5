"""Sampling throughput: hypo_fast's sampler (KV cache + fused sampling head) against HF ``generate``.

Same model (Llama-style, built from a config), same prompts, k samples per prompt, pure sampling at
temperature 1 (HF: ``do_sample=True, top_k=0, top_p=1``), no stop token (every row generates
``max_new_tokens``). Each method runs in a fresh process: a cold run gives the peak extra memory,
warm repeats the median time; prints tokens/s and ratios to HF, and appends rows to
benchmarks/results/bench_generate.jsonl.

    python benchmarks/bench_generate.py                   # CPU: V=32000, D=256, 2 layers
    python benchmarks/bench_generate.py --device cuda     # GPU: a ~0.5B-shaped model, bf16
"""

from __future__ import annotations


import torch

from benchlib import (bench_arguments, finish_run, run_worker, serve_worker, start_run, time_and_memory)

CASES = {  # (prompts, k, prompt_len, new_tokens, V, D, layers)
    "cpu": [(8, 2, 32, 64, 32000, 256, 2)],
    "cuda": [(16, 4, 128, 256, 151936, 896, 24)],
}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
METHODS = ["hf_generate", "hypo_fast_static_cache", "hypo_fast_dynamic_cache"]


def build(case: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    D = case["D"]
    config = LlamaConfig(vocab_size=case["V"], hidden_size=D, intermediate_size=4 * D, num_hidden_layers=case["layers"],
                         num_attention_heads=max(1, D // 64), num_key_value_heads=max(1, D // 128),
                         max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(case["device"], getattr(torch, case["dtype"])).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, case["V"], (case["prompts"], case["prompt_len"]), generator=g)
    return model, prompts


def worker(method: str, case: dict, repeats: int) -> dict:
    model, prompts = build(case)
    k, new = case["k"], case["new_tokens"]
    if method == "hf_generate":
        input_ids = prompts.repeat_interleave(k, 0).to(case["device"])
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0

        def run():
            with torch.no_grad():
                model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new)
    else:
        from hypo_fast.models import Policy
        from hypo_fast.sampling import Sampler, SamplingConfig

        cache = method.removeprefix("hypo_fast_").removesuffix("_cache")
        sampler = Sampler(Policy(model), SamplingConfig(max_new_tokens=new, num_samples=k, cache=cache))
        prompt_lists = prompts.tolist()

        def run():
            sampler.generate(prompt_lists)

    result = time_and_memory(run, case["device"], repeats)
    result["tokens_per_s"] = case["prompts"] * k * new / result["time_s"]
    return result


def main() -> None:
    parser = bench_arguments(__doc__, METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    device = args.device
    env = start_run(args)
    rows = []
    for prompts, k, prompt_len, new, V, D, layers in CASES[device]:
        case = {"bench": "generate", "prompts": prompts, "k": k, "prompt_len": prompt_len, "new_tokens": new,
                "V": V, "D": D, "layers": layers, "dtype": DTYPES[device], "device": device}
        worker_args = [f"{key}={value}" for key, value in sorted(case.items())] + [f"repeats={args.repeats}"]
        results = {m: run_worker(__file__, [m, *worker_args]) for m in args.methods}
        base = results.get("hf_generate", {})
        for method, res in results.items():
            row = {**env, **case, "method": method, "repeats": args.repeats, **res}
            if "tokens_per_s" in res and "tokens_per_s" in base:
                row["speed_vs_hf"] = res["tokens_per_s"] / base["tokens_per_s"]
                row["mem_vs_hf"] = res["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
                row["peak_extra_mb"] = res["peak_extra_bytes"] / 2**20
            rows.append(row)
    finish_run("bench_generate", rows, [("V", "V", "d"), ("D", "D", "d"), ("layers", "layers", "d"), ("method", "method", "s"),
                       ("time_s", "time s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("speed_vs_hf", "×HF speed", ".2f"), ("peak_extra_mb", "extra MiB", ".0f"),
                       ("mem_vs_hf", "mem×HF", ".2f"), ("error", "error", "s")], args)


if __name__ == "__main__":
    main()
