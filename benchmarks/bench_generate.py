"""Sampling throughput: hypo_fast's sampler (KV cache + fused sampling head) against HF ``generate``.

Same model (Llama-style, built from a config), same prompts, k samples per prompt, pure sampling at
temperature 1 (HF: ``do_sample=True, top_k=0, top_p=1``). Two cases: no stop token (every row generates
``max_new_tokens``), and a stop set of 1% of the vocabulary (lengths roughly geometric, as real samples'
are), where finished rows can leave the decode batch. Each method runs in a fresh process: a cold run
gives the peak extra memory (and, for compiled methods, pays the compilation), warm repeats the median
time; prints generated tokens/s and ratios to HF, and appends rows to bench_generate.jsonl.

  hf_generate                     model.generate with its default dynamic cache
  hf_generate_static_compiled     model.generate with a static cache and torch.compile (GPU only: the
                                  fairest HF baseline there; on CPU its compilation alone outlasts the run)
  hypo_fast_{static,dynamic}_cache  hypo_fast's sampler (one prefill per prompt, fused sampling head)
  hypo_fast_compiled              the sampler with a static cache and a torch.compile'd decode step
  hypo_fast_per_sample_prefill    k prefills per prompt instead of one (what sharing saves)
  hypo_fast_no_compaction         finished rows stay in the decode batch (what dropping them saves)

    python benchmarks/bench_generate.py                   # CPU: V=32000, D=256, 2 layers
    python benchmarks/bench_generate.py --device cuda     # GPU: a ~0.5B-shaped model, bf16
"""

from __future__ import annotations


import torch

from benchlib import (bench_arguments, finish_run, run_worker, serve_worker, start_run, time_and_memory)

CASES = {  # (prompts, k, prompt_len, new_tokens, V, D, layers, stop share of the vocabulary)
    "cpu": [(8, 2, 32, 64, 32000, 256, 2, 0.0), (8, 2, 32, 256, 32000, 256, 2, 0.01)],
    "cuda": [(16, 4, 128, 256, 151936, 896, 24, 0.0), (16, 4, 128, 512, 151936, 896, 24, 0.005)],
}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
METHODS = ["hf_generate", "hf_generate_static_compiled", "hypo_fast_static_cache", "hypo_fast_dynamic_cache",
           "hypo_fast_compiled", "hypo_fast_per_sample_prefill", "hypo_fast_no_compaction"]
ALWAYS_STOPPING = {"hypo_fast_no_compaction"}  # only meaningful with stops
GPU_ONLY = {"hf_generate_static_compiled"}


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


def stop_tokens(case: dict) -> list[int]:
    n = int(float(case["stop_share"]) * case["V"])
    return list(range(3, 3 + n))  # token ids 0–2 are the prompts' specials; prompts draw from ≥ 3


def worker(method: str, case: dict, repeats: int) -> dict:
    model, prompts = build(case)
    k, new, stops = case["k"], case["new_tokens"], stop_tokens(case)
    counted = {}
    if method.startswith("hf_generate"):
        input_ids = prompts.repeat_interleave(k, 0).to(case["device"])
        model.generation_config.eos_token_id = stops or None
        model.generation_config.pad_token_id = 0
        extra = {}
        if method == "hf_generate_static_compiled":
            extra = {"cache_implementation": "static"}
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        def run():
            with torch.no_grad():
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                     min_new_tokens=1 if stops else new, **extra)
            hits = torch.isin(out[:, input_ids.shape[1]:], torch.tensor(stops or [-1], device=out.device)).int()
            counted["tokens"] = int((hits.cumsum(1) - hits == 0).sum())  # each row's tokens up to its first stop
    else:
        from hypo_fast.models import Policy
        from hypo_fast.sampling import Sampler, SamplingConfig

        options = {"hypo_fast_static_cache": dict(cache="static"), "hypo_fast_dynamic_cache": dict(cache="dynamic"),
                   "hypo_fast_compiled": dict(cache="static", compile_decode=True),
                   "hypo_fast_per_sample_prefill": dict(shared_prefill=False),
                   "hypo_fast_no_compaction": dict(compact_below=0.0)}[method]
        sampler = Sampler(Policy(model), SamplingConfig(max_new_tokens=new, num_samples=k, stop_token_ids=tuple(stops),
                                                        **options))
        prompt_lists = prompts.tolist()

        def run():
            counted["tokens"] = sampler.generate(prompt_lists).num_tokens()

    result = time_and_memory(run, case["device"], repeats)
    result["generated_tokens"] = counted["tokens"]
    result["tokens_per_s"] = counted["tokens"] / result["time_s"]
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
    for prompts, k, prompt_len, new, V, D, layers, stop_share in CASES[device]:
        case = {"bench": "generate", "prompts": prompts, "k": k, "prompt_len": prompt_len, "new_tokens": new,
                "V": V, "D": D, "layers": layers, "dtype": DTYPES[device], "device": device, "stop_share": stop_share}
        worker_args = [f"{key}={value}" for key, value in sorted(case.items())] + [f"repeats={args.repeats}"]
        methods = [m for m in args.methods if (stop_share or m not in ALWAYS_STOPPING)
                   and (device == "cuda" or m not in GPU_ONLY)]
        results = {m: run_worker(__file__, [m, *worker_args]) for m in methods}
        base = results.get("hf_generate", {})
        for method, res in results.items():
            row = {**env, **case, "method": method, "repeats": args.repeats, **res}
            if "tokens_per_s" in res and "tokens_per_s" in base:
                row["speed_vs_hf"] = res["tokens_per_s"] / base["tokens_per_s"]
                row["mem_vs_hf"] = res["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
                row["peak_extra_mb"] = res["peak_extra_bytes"] / 2**20
            rows.append(row)
    finish_run("bench_generate", rows, [("V", "V", "d"), ("D", "D", "d"), ("layers", "layers", "d"),
                       ("new_tokens", "max new", "d"), ("stop_share", "stops", ".3f"), ("method", "method", "s"),
                       ("generated_tokens", "tokens", "d"),
                       ("time_s", "time s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("speed_vs_hf", "×HF speed", ".2f"), ("peak_extra_mb", "extra MiB", ".0f"),
                       ("mem_vs_hf", "mem×HF", ".2f"), ("error", "error", "s")], args)


if __name__ == "__main__":
    main()
