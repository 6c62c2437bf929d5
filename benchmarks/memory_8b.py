"""Memory plan for one HyPO step on Llama-3-8B shapes: an analytic estimator, checked against measurements.

    python benchmarks/memory_8b.py                 # estimator tables + CPU measurements of small models
    python benchmarks/memory_8b.py --device cuda   # + the 8B shape itself on the GPU (LoRA, one step)

The estimator (per GPU, bytes) for a micro-step with ``pairs`` preference pairs and ``prompts·k`` online
samples, all of length ``seq``, with gradient checkpointing:

* weights ``w·P`` (``/n`` under ZeRO-3; 0 when parameters are offloaded, but for one gathered layer),
  gradients ``w·P`` (``/n`` from ZeRO-2), AdamW state ``12·P`` in mixed precision or ``8·P`` in fp32
  (``/n`` from ZeRO-1; 0 offloaded, and gradients then stream out in 5e8-element buckets); with LoRA only the adapters train, and the reference is the same
  weights with adapters off (full fine-tuning keeps a frozen reference copy, ``w·P``, unless on CPU);
* activations: each layer's input for the backward, ``L·T·D·w``, plus one layer recomputed,
  ``T·(6·D + 3·F)·w``, with ``T = (2·pairs + prompts·k)·seq`` tokens;
* the fused head: no logits — ``N·D`` gathered rows, an fp32 ``dh`` and, when the head trains, an fp32
  weight-gradient buffer ``4·V·D``;
* sampling: the KV cache ``2·L·KV·hd·seq·prompts·k·w`` (and, under ZeRO-3, the weights gathered for the
  generation phase);
* on CPU only: SDPA's math path materialises attention scores over the whole packed row,
  ``3·heads·T²·4`` for the recomputed layer, and the chunked head's ``[n, chunk]`` fp32 blocks.

The total is a sum of peaks (an upper bound: optimizer state is allocated after activations are freed).

Rows go to benchmarks/results/memory_8b.jsonl; the measured CPU peaks are printed beside the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from benchlib import (PeakMemory, append_rows, bench_arguments, print_table, run_worker, serve_worker, start_run)

GB = 1024**3


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> int:
        D, hd = self.hidden, self.head_dim
        layer = D * self.heads * hd * 2 + 2 * D * self.kv_heads * hd + 3 * D * self.ffn + 2 * D
        return self.vocab * D * (1 if self.tied else 2) + self.layers * layer + D

    def lora_params(self, r: int) -> int:
        D, hd = self.hidden, self.head_dim
        per_layer = r * ((D + self.heads * hd) * 2 + (D + self.kv_heads * hd) * 2 + (D + self.ffn) * 3)
        return self.layers * per_layer


LLAMA3_8B = Shape("llama3-8b", 32, 4096, 14336, 32, 8, 128256)


@dataclass(frozen=True)
class Plan:
    lora: bool
    zero_stage: int
    gpus: int
    offload_optimizer: bool = False
    offload_params: bool = False
    bytes_per_weight: int = 2  # bf16
    pairs: int = 1
    prompts: int = 1
    k: int = 2
    seq: int = 2048
    lora_r: int = 16
    reference_on_cpu: bool = False
    device: str = "cuda"  # "cpu": SDPA's math path and the chunked head add the two terms below


def estimate(shape: Shape, plan: Plan) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring)."""
    P, w, n, z = shape.params(), plan.bytes_per_weight, plan.gpus, plan.zero_stage
    L, D, F, V = shape.layers, shape.hidden, shape.ffn, shape.vocab
    trainable = shape.lora_params(plan.lora_r) if plan.lora else P
    out = {}
    if plan.offload_params:
        out["weights"] = w * (P - V * D * 2) / L + w * V * D  # one gathered layer + the head
    else:
        out["weights"] = w * P / (n if z == 3 else 1)
    out["grads"] = w * trainable / (n if z >= 2 else 1)
    if plan.offload_optimizer:  # gradients stream to the CPU optimizer bucket by bucket (5e8 elements)
        out["grads"] = min(out["grads"], w * 5e8)
    opt_bytes = (12 if w == 2 else 8) * trainable
    out["optimizer"] = 0.0 if plan.offload_optimizer else opt_bytes / (n if z >= 1 else 1)
    out["reference"] = 0.0 if plan.lora or plan.reference_on_cpu else w * P / (n if z == 3 else 1)
    rows = 2 * plan.pairs + plan.prompts * plan.k
    T = rows * plan.seq
    out["activations"] = L * T * D * w + T * (6 * D + 3 * F) * w
    N = T  # scored tokens: at most every token (prompts excluded in practice)
    out["head"] = N * D * (w + 4) + (4 * V * D if not plan.lora else 0)
    out["kv_cache"] = 2 * L * shape.kv_heads * shape.head_dim * plan.seq * plan.prompts * plan.k * w
    if plan.device == "cpu":
        # without flash-attention, SDPA materialises scores, probabilities and their gradient for the
        # recomputed layer — over the whole packed row (block-diagonal mask), so quadratic in T
        out["attention_scores"] = 3 * shape.heads * T * T * 4
        from hypo_fast.ops.chunked import DEFAULT_CHUNK_ELEMENTS

        out["head_workspace"] = 4 * DEFAULT_CHUNK_ELEMENTS * 4  # the chunked path's [n, chunk] fp32 blocks
    if z == 3:  # the sampler gathers the whole model once per generation phase
        out["generation_gather"] = w * P - out["weights"]
    out["total"] = sum(out.values())
    return out


def plan_table(shape: Shape) -> list[dict]:
    rows = []
    for lora in (True, False):
        for gpus in (1, 2, 4, 8):
            for stage in (0, 1, 2, 3):
                for offload in ((False, False), (True, False), (True, True)) if stage == 3 else ((False, False),):
                    plan = Plan(lora=lora, zero_stage=stage, gpus=gpus, offload_optimizer=offload[0],
                                offload_params=offload[1])
                    est = estimate(shape, plan)
                    rows.append({"shape": shape.name, "mode": "LoRA r=16" if lora else "full", "gpus": gpus,
                                 "zero": stage, "offload": "opt+params" if offload[1] else "opt" if offload[0] else "-",
                                 **{f"{k}_gb": v / GB for k, v in est.items()}})
    return rows


# ---- measurements -------------------------------------------------------------------------------

SMALL = [Shape("small-256", 2, 256, 1024, 4, 2, 32000), Shape("small-512", 4, 512, 2048, 8, 4, 32000)]


def measure_step(shape: Shape, lora: bool, seq: int, device: str, dtype: str) -> dict:
    """Peak memory of one HyPO training step of hypo_fast's trainer (model built from the shape)."""
    import tempfile
    from pathlib import Path

    from hypo_fast.examples.toy import char_tokenizer
    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        char_tokenizer("abcdefghijklmnopqrstuvwxyz").save_pretrained(folder / "tok")
        half = seq // 2 - 1
        row = {"prompt": "a" * half, "chosen": "b" * half, "rejected": "c" * half}
        (folder / "pairs.jsonl").write_text((json.dumps(row) + "\n") * 4)
        cfg = {"model": {"config": {"model_type": "llama", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
                                    "intermediate_size": shape.ffn, "num_hidden_layers": shape.layers,
                                    "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
                                    "max_position_embeddings": 2 * seq + 8, "tie_word_embeddings": shape.tied},
                         "tokenizer": str(folder / "tok"), "dtype": dtype, "gradient_checkpointing": True},
               "data": {"train_file": str(folder / "pairs.jsonl"), "max_prompt_length": seq, "max_length": 2 * seq},
               "algorithm": {"kl_coef": 0.05, "num_samples": 2},
               "sampling": {"prompts_per_step": 1, "max_new_tokens": half + 1,
                            "stop_on_eos": False},
               "optim": {"max_steps": 1, "pairs_per_micro_batch": 1},
               "output": {"dir": str(folder / "run"), "resume": "never", "report_to": []}}
        if lora:
            cfg["model"]["lora"] = {"r": 16}
        trainer = Trainer(config_from_dict(cfg))
        with PeakMemory(device) as step_memory:
            trainer.train_step()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
    return {"step_extra_bytes": step_memory.extra, "allocated_before_step": base}


def worker(method: str, case: dict, repeats: int) -> dict:
    shape = {s.name: s for s in SMALL + [LLAMA3_8B]}[case["shape"]]
    lora = method == "lora"
    measured = measure_step(shape, lora, case["seq"], case["device"], case["dtype"])
    plan = Plan(lora=lora, zero_stage=0, gpus=1, bytes_per_weight=4 if case["dtype"] == "float32" else 2,
                seq=case["seq"], device=case["device"])
    est = estimate(shape, plan)
    # the step's own peak above the set-up level: activations, head, KV cache, grads, optimizer state
    # (AdamW allocates its state at the first step). The estimate sums them: an upper bound, since the
    # optimizer state is allocated after the activations are freed.
    step_keys = ("activations", "head", "kv_cache", "grads", "optimizer", "attention_scores", "head_workspace")
    est = {k: est.get(k, 0.0) for k in (*step_keys, "total")}
    return {**measured, "estimate_step_bytes": sum(est[k] for k in step_keys), "estimate_total_bytes": est["total"]}


def main() -> None:
    parser = bench_arguments(__doc__)
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    env = start_run(args)
    print(f"\n## Estimated peak GB per GPU, one HyPO step on {LLAMA3_8B.name} ({LLAMA3_8B.params() / 1e9:.2f}B params),"
          " bf16, 1 pair + 1 prompt × k=2 samples, seq 2048, gradient checkpointing")
    table = plan_table(LLAMA3_8B)
    print_table(table, [("mode", "mode", "s"), ("gpus", "GPUs", "d"), ("zero", "ZeRO", "d"), ("offload", "offload", "s"),
                        ("weights_gb", "weights", ".1f"), ("grads_gb", "grads", ".1f"), ("optimizer_gb", "optim", ".1f"),
                        ("reference_gb", "ref", ".1f"), ("activations_gb", "act", ".1f"), ("head_gb", "head", ".2f"),
                        ("kv_cache_gb", "KV", ".2f"), ("generation_gather_gb", "gen gather", ".1f"),
                        ("total_gb", "total", ".1f")])

    print("\n## Measured vs estimated: one step's peak above the set-up level")
    rows = []
    cases = [(s.name, 512, "float32", args.device, m) for s in SMALL for m in ("lora", "full")]
    if args.device == "cuda":
        cases += [(LLAMA3_8B.name, 2048, "bfloat16", "cuda", "lora")]
    for name, seq, dtype, device, method in cases:
        case = {"bench": "memory_8b", "shape": name, "seq": seq, "dtype": dtype, "device": device}
        res = run_worker(__file__, [method, *[f"{k}={v}" for k, v in sorted(case.items())], "repeats=1"], timeout=3600)
        row = {**env, **case, "mode": method, **res}
        if "step_extra_bytes" in res:
            row["measured_mb"] = res["step_extra_bytes"] / 2**20
            row["estimate_mb"] = res["estimate_step_bytes"] / 2**20
            row["ratio"] = res["step_extra_bytes"] / res["estimate_step_bytes"]
        rows.append(row)
    print_table(rows, [("shape", "shape", "s"), ("mode", "mode", "s"), ("seq", "seq", "d"), ("dtype", "dtype", "s"),
                       ("measured_mb", "measured MiB", ".0f"), ("estimate_mb", "estimate MiB", ".0f"),
                       ("ratio", "measured/est", ".2f"), ("error", "error", "s")])
    if not args.no_save:
        for r in table:
            r.update(env)
        append_rows("memory_8b", table + rows, args.results_dir)


if __name__ == "__main__":
    main()
