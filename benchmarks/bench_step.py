"""End-to-end training step: hypo_fast (DPO and HyPO) against TRL's DPOTrainer and a plain-PyTorch DPO step.

All methods: the same Llama-style model config (random init), the same pairs (prompt + chosen + rejected
text, one token per character), the same batch, sequence lengths, fp32, AdamW, a live frozen reference.

  trl          trl.DPOTrainer (install with `pip install trl` in the benchmark's environment; not a
               hypo_fast dependency), reference forward every step (its default)
  plain        materialised logits for policy and reference, log_softmax, gather, DPO loss, AdamW
  hypo_dpo     hypo_fast's trainer with λ = 0 (reference log-probs cached once, as it always does)
  hypo_hypo    hypo_fast with λ > 0: k samples per online prompt; reported split into sampling,
               reference and policy time
  hypo_exact   the same with algorithm.kl_loss: exact_token (beyond the paper: the samples' exact
               per-token KL from the fused linear_token_kl op, the reference's hidden rows kept from its
               one online forward)

Same settings for every method: gradient checkpointing off unless ``--gradient-checkpointing`` (TRL 1.16's
``DPOConfig`` defaults it to True, so it is set explicitly for TRL); dropout off; no gradient clipping
(TRL's ``max_grad_norm=0``); a constant learning rate. How each method computes log-probs is recorded per
row (``lm_head``): TRL 1.16's ``DPOTrainer`` always patches the model with its own fused LM head
(``trl.trainer.utils.add_fused_lm_head``: ``_ChunkedLogProbFunction`` over vocabulary chunks of 32768,
Triton tiles on CUDA, PyTorch on CPU), so "TRL" here is TRL with a chunked head, not naive logits; the
row names what the run actually used (read from the patched forward).

Tokens/s counts the prompt + response tokens of chosen and rejected sequences per step (the same
number for every method; HyPO's online samples come on top and are not counted). Each method runs in a
fresh process: median step time after warm-up steps, and peak resident memory above the level reached
once set-up finished (model, reference, data, optimizer). hypo_fast's rows also count the device→host
reads of one more (untimed) step (``HostReads``: host syncs on a GPU; hypo_fast's own and in total, with
DeepSpeed's; the sampler checks for finished rows after every token on CPU, every 8 on a GPU: a last
untimed step with the GPU's interval counts what a GPU step would read, ``host_reads_gpu_path``). Rows go to --results-dir (default
runs/benchmarks/bench_step.jsonl) or, with --record, to benchmarks/results/bench_step.jsonl.

    python benchmarks/bench_step.py                  # CPU: V=32000, D=256, 2 layers, sequences of 513
    python benchmarks/bench_step.py --device cuda    # GPU: a ~0.5B-shaped model, bf16
    python benchmarks/bench_step.py --quick          # a smoke run: small model, 3 steps
    python benchmarks/bench_step.py --layers 4 --hidden 512 --vocab 50304 --prompt-len 256 --response-len 255 \
        --pairs 4 --gradient-checkpointing          # any shape; both lengths count characters = tokens
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchlib import HostReads, PeakMemory, bench_arguments, finish_run, run_worker, serve_worker, start_run

CASES = {  # (pairs per step, prompt chars, response chars, V, D, layers)
    "cpu": [(2, 128, 383, 32000, 256, 2)],
    "cuda": [(8, 256, 767, 151936, 896, 24)],
}
QUICK_CASE = (2, 32, 63, 4096, 128, 2)
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
METHODS = ["trl", "plain", "hypo_dpo", "hypo_hypo", "hypo_exact"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BETA, LR = 0.1, 1e-5
STEPS, WARMUP = 6, 2  # timed steps = STEPS − WARMUP; --quick: 3 and 1


def model_config(case: dict) -> dict:
    D = case["D"]
    return {"model_type": "llama", "vocab_size": case["V"], "hidden_size": D, "intermediate_size": 4 * D,
            "num_hidden_layers": case["layers"], "num_attention_heads": max(1, D // 64),
            "num_key_value_heads": max(1, D // 128), "max_position_embeddings": 4096, "tie_word_embeddings": False}


def write_data(folder: Path, case: dict, n: int = 64) -> tuple[Path, list[dict]]:
    rng = random.Random(0)
    text = lambda k: "".join(rng.choice(ALPHABET) for _ in range(k))  # noqa: E731
    rows = [{"prompt": text(case["prompt_chars"]), "chosen": text(case["response_chars"]),
             "rejected": text(case["response_chars"])} for _ in range(n)]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def tokens_per_step(case: dict) -> int:
    seq = 1 + case["prompt_chars"] + case["response_chars"] + 1  # BOS + prompt + response + EOS
    return 2 * case["pairs"] * seq


def _build_model(case):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = model_config(case)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case["dtype"])).to(case["device"])


def _checkpointing(model) -> bool:
    """Whether activations are recomputed in the backward (transformers ≥ 5.2x renames the property)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def _disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_trl(case, folder, tokenizer_dir, rows):
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    times, memory = [], PeakMemory(case["device"])

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == case["warmup"]:
                memory.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if case["device"] == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = DPOConfig(output_dir=str(folder / "trl"), per_device_train_batch_size=case["pairs"],
                     max_steps=case["steps"], learning_rate=LR, beta=BETA, max_length=4096,
                     use_cpu=case["device"] == "cpu", bf16=case["dtype"] == "bfloat16", report_to=[], logging_steps=1,
                     save_strategy="no", lr_scheduler_type="constant", dataloader_num_workers=0, disable_tqdm=True,
                     gradient_checkpointing=bool(case["grad_ckpt"]), max_grad_norm=0.0)  # the same as hypo_fast's
    trainer = DPOTrainer(model=_build_model(case), ref_model=_build_model(case), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Timer()])
    head = trl_lm_head(trainer.model, case["device"])
    trainer.train()
    memory.__exit__(None, None, None)
    checkpointing = _checkpointing(trainer.model)  # read after training: HF's Trainer enables it in train()
    return times[case["warmup"]:], memory.extra, {"lm_head": head, "grad_ckpt_used": checkpointing}


def trl_lm_head(model, device: str) -> str:
    """What TRL's DPOTrainer computes log-probs with, read from the model it patched."""
    forward = getattr(model.forward, "__func__", model.forward)
    code = getattr(forward, "__code__", None)
    if code is None or code.co_name != "_fused_forward":
        return "HF logits (model.forward unpatched)"
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer import utils

    chunk = getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", "?")
    backend = "triton" if _use_triton(torch.device(device)) else "torch"
    return f"TRL fused LM head (add_fused_lm_head → _ChunkedLogProbFunction, vocab chunk {chunk}, {backend})"


def run_plain(case, rows, tokenizer):
    from hypo_fast.losses import dpo_loss

    policy, reference = _build_model(case), _build_model(case).requires_grad_(False)
    _disable_dropout(policy)
    if case["grad_ckpt"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    device = case["device"]
    encode = lambda t, special: tokenizer(t, add_special_tokens=special)["input_ids"]  # noqa: E731
    batches = []
    for start in range(0, case["steps"] * case["pairs"], case["pairs"]):
        chunk = rows[start:start + case["pairs"]]
        seqs, labels = [], []
        for key in ("chosen", "rejected"):
            for r in chunk:
                p, c = encode(r["prompt"], True), encode(r[key], False) + [tokenizer.eos_token_id]
                seqs.append(p + c)
                labels.append([-100] * len(p) + c)
        batches.append((torch.tensor(seqs, device=device), torch.tensor(labels, device=device)))

    def seq_logps(model, ids, labels):
        logits = model(ids).logits[:, :-1].float()  # [2B, T-1, V] materialised
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
        return (logp * (target != -100)).sum(-1)

    times, memory = [], PeakMemory(device)
    for step, (ids, labels) in enumerate(batches):
        if step == case["warmup"]:
            memory.__enter__()
        start = time.perf_counter()
        seq = seq_logps(policy, ids, labels)
        with torch.no_grad():
            ref = seq_logps(reference, ids, labels)
        n = case["pairs"]
        dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], beta=BETA)[0].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory.__exit__(None, None, None)
    return times[case["warmup"]:], memory.extra, {"lm_head": "materialised logits + log_softmax + gather",
                                                   "grad_ckpt_used": _checkpointing(policy)}


def run_hypo_fast(case, folder, tokenizer_dir, data, kl_coef, kl_loss="rloo"):
    from hypo_fast.train.config import config_from_dict
    from hypo_fast.train.trainer import Trainer

    cfg = config_from_dict({
        "model": {"config": model_config(case), "tokenizer": str(tokenizer_dir), "dtype": case["dtype"],
                  "gradient_checkpointing": bool(case["grad_ckpt"])},
        "data": {"train_file": str(data), "max_prompt_length": 4096, "max_length": 8192},
        "algorithm": {"beta": BETA, "kl_coef": kl_coef, "num_samples": 2, "kl_loss": kl_loss},
        "sampling": {"prompts_per_step": case["pairs"], "max_new_tokens": case["response_chars"] + 1},
        "optim": {"lr": LR, "max_steps": case["steps"], "pairs_per_micro_batch": case["pairs"],
                  "scheduler": "constant", "max_grad_norm": 0.0},
        "output": {"dir": str(folder / f"hypo-{kl_coef}"), "resume": "never", "report_to": []},
    })
    trainer = Trainer(cfg)
    rows, memory = [], PeakMemory(case["device"])
    for step in range(case["steps"]):
        if step == case["warmup"]:
            memory.__enter__()
        rows.append(trainer.train_step())
    memory.__exit__(None, None, None)
    with HostReads() as reads:  # one more step, untimed: its device→host reads (host syncs on a GPU)
        trainer.train_step()
    gpu_reads = reads
    if kl_coef > 0:  # and one with the GPU's stop-check interval (same samples): the reads of a GPU step
        trainer.sampler.config = dataclasses.replace(trainer.sampler.config, stop_check_every=8)
        with HostReads() as gpu_reads:
            trainer.train_step()
    rows = rows[case["warmup"]:]
    split = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in ("time/sampling", "time/reference", "time/policy")}
    split.update(host_reads_hypo_fast=reads.ours, host_reads_total=reads.total, host_reads_gpu_path=gpu_reads.ours)
    from hypo_fast.ops.backends import resolve_impl

    impl = resolve_impl(trainer.policy.head.impl if hasattr(trainer.policy.head, "impl") else "auto",
                        torch.device(case["device"]))
    split["lm_head"] = f"hypo_fast FusedLogprobHead ({impl})"
    split["grad_ckpt_used"] = _checkpointing(trainer.policy.model)
    return [r["step_seconds"] for r in rows], memory.extra, split


def worker(method: str, case: dict, repeats: int) -> dict:
    from hypo_fast.examples.toy import char_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = char_tokenizer(ALPHABET)
        tokenizer.save_pretrained(folder / "tokenizer")
        data, rows = write_data(folder, case)
        if method == "trl":
            times, extra, split = run_trl(case, folder, folder / "tokenizer", rows)
        elif method == "plain":
            times, extra, split = run_plain(case, rows, tokenizer)
        else:
            times, extra, split = run_hypo_fast(case, folder, folder / "tokenizer", data,
                                                0.0 if method == "hypo_dpo" else 0.05,
                                                "exact_token" if method == "hypo_exact" else "rloo")
    step = sorted(times)[len(times) // 2]
    return {"step_s": step, "tokens_per_s": tokens_per_step(case) / step, "peak_extra_bytes": extra, **split}


def cases(args) -> list[tuple[int, int, int, int, int, int]]:
    """The shapes to run: the device's default, or --quick's, with any size given on the command line."""
    base = [QUICK_CASE] if args.quick else CASES[args.device]
    given = (args.pairs, args.prompt_len, args.response_len, args.vocab, args.hidden, args.layers)
    return [tuple(g if g is not None else b for g, b in zip(given, case)) for case in base]


def main(argv: list[str] | None = None) -> None:
    parser = bench_arguments(__doc__, METHODS)
    parser.add_argument("--layers", type=int, help="decoder layers (default: per device)")
    parser.add_argument("--hidden", type=int, help="hidden size D (heads D/64, KV heads D/128, MLP 4D)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (BOS not counted)")
    parser.add_argument("--response-len", type=int, help="response tokens (EOS not counted)")
    parser.add_argument("--pairs", type=int, help="preference pairs per step (and HyPO's online prompts)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward, for every method (default: off for all)")
    parser.add_argument("--quick", action="store_true", help=f"V={QUICK_CASE[3]}, D={QUICK_CASE[4]}, 3 steps")
    args = parser.parse_args(argv)
    if serve_worker(args, worker):
        return
    device = args.device
    env = start_run(args)
    rows = []
    steps, warmup = (3, 1) if args.quick else (STEPS, WARMUP)
    for pairs, prompt_chars, response_chars, V, D, layers in cases(args):
        case = {"bench": "step", "pairs": pairs, "prompt_chars": prompt_chars, "response_chars": response_chars,
                "V": V, "D": D, "layers": layers, "dtype": DTYPES[device], "device": device, "steps": steps,
                "warmup": warmup, "grad_ckpt": int(args.gradient_checkpointing)}
        worker_args = [f"{k}={v}" for k, v in sorted(case.items())] + ["repeats=1"]
        results = {m: run_worker(__file__, [m, *worker_args], timeout=3600) for m in args.methods}
        trl, dpo = results.get("trl", {}), results.get("hypo_dpo", {})
        for method, res in results.items():
            row = {**env, **case, "method": method, "seq_len": 2 + prompt_chars + response_chars,
                   "tokens_per_step": tokens_per_step(case), **res}
            if "step_s" in res:
                row["peak_extra_mb"] = res["peak_extra_bytes"] / 2**20
                if "step_s" in trl:
                    row["speed_vs_trl"] = res["tokens_per_s"] / trl["tokens_per_s"]
                    row["mem_vs_trl"] = res["peak_extra_bytes"] / max(trl["peak_extra_bytes"], 1)
                if "step_s" in dpo:
                    row["cost_vs_hypo_dpo"] = res["step_s"] / dpo["step_s"]
            rows.append(row)
    finish_run("bench_step", rows, [("V", "V", "d"), ("seq_len", "seq", "d"), ("method", "method", "s"),
                       ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("speed_vs_trl", "×TRL speed", ".2f"), ("peak_extra_mb", "extra MiB", ".0f"),
                       ("mem_vs_trl", "mem×TRL", ".2f"), ("cost_vs_hypo_dpo", "×DPO step", ".2f"), ("host_reads_hypo_fast", "syncs", "d"),
                       ("host_reads_gpu_path", "syncs/GPU", "d"),
                       ("time/sampling", "sample s", ".3f"), ("time/reference", "ref s", ".3f"),
                       ("time/policy", "policy s", ".3f"), ("grad_ckpt_used", "ckpt", ""),
                       ("error", "error", "s")], args)
    for method in args.methods:
        head = next((r.get("lm_head") for r in rows if r["method"] == method and r.get("lm_head")), None)
        if head:
            print(f"{method}: log-probs by {head}")


if __name__ == "__main__":
    main()
