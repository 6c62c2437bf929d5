"""Memory plan for one HyPO step at Llama-3-8B scale: an estimator calibrated against measured peaks.

    python benchmarks/memory_8b.py                       # 8B plan + calibration against the measured rows
    python benchmarks/memory_8b.py --config my_run.yaml --gpus 8   # the peak of one config, by phase
    python benchmarks/memory_8b.py --measure lora-llama-0.5b-512 full-llama-0.15b-2048   # measure cells (CPU)
    python benchmarks/memory_8b.py --device cuda --measure lora-llama3-8b-2048           # on a GPU

The estimator (:func:`estimate`) adds up, per GPU (per rank on CPU), what is alive in each phase of a
step and reports the largest: the peak. Persistent state — weights (``w·P``, ``/n`` under ZeRO-3, 0
with parameters offloaded), the frozen reference of full fine-tuning (a full copy on *every* rank: it is
not partitioned, ``model.reference_device: cpu`` moves it off the GPU), fp32 master weights ``4·P`` and
AdamW state ``8·P`` (``/n`` from ZeRO-1, 0 offloaded; ZeRO-3 creates it in the first optimizer step,
ZeRO-0's bf16 optimizer at set-up), DeepSpeed's gradient buffers (ZeRO-3: a partition buffer ``w·P/n``
and the 5e8-element reduce bucket) — plus what each phase adds:

* set-up: the trainer moves the whole model to the GPU, deep-copies it there for the reference (also when
  the copy then goes to the CPU), and ZeRO-3 copies out its partitions before the original is freed;

* sampling: the KV cache ``2·L·KV·hd·S·M·w`` (``M = prompts·k`` rows of ``S`` tokens), one layer's
  prefill, and under ZeRO-3 the whole model gathered for the generation phase;
* reference forward (no grad) over the online samples, packed;
* policy forward: every layer's input kept for the backward (gradient checkpointing), ``L·T·D·w``, one
  layer's forward in flight, the fused head's gathered rows — never ``[N, V]`` logits;
* backward: one layer recomputed with everything it saves (bytes per token: ``8·D`` of fp32 RMSNorm
  inputs, ``4w·D + w·D`` more for the norms and o_proj, ``4w·F`` for SwiGLU, q/k/v as attention saves
  them — GQA-sized with flash-attention, expanded to every head by SDPA with a mask — and the fp32
  log-sum-exp) plus the gradients in flight; the fused head's fp32 ``dh`` and, when it trains, its fp32
  weight gradient ``4·V·D`` (and its ``w·V·D`` cast); full fine-tuning's gradients (all of them in
  ZeRO-0/1, the reduce bucket and its scatter in ZeRO-2/3);
* optimizer step: AdamW's state, the fp32 gradient of one sub-group and its temporaries.

``T = 2·pairs·(prompt + response) + prompts·k·(online prompt + drawn tokens)`` tokens go through the
one policy forward as a single packed row; ``N`` of them (the responses) reach the head.

Device-specific terms. CPU (what the calibration cells run): the runtime's resident set (Python, torch,
transformers, DeepSpeed, gloo; measured), SDPA over a packed row takes a ``T×T`` boolean mask and
expands K/V to every head, the native head converts each vocabulary chunk of the weight to fp32
(``chunk·D·4``, a wide chunk when few rows are scored), and DeepSpeed's reduce bucket is resident only
where gradients were written. CUDA (untested here — no GPU was lent to the calibration): the bucket is
allocated whole at start, flash-attention-2 reads packed rows from position ids (no mask, no K/V
expansion), the Triton head keeps its tiles on chip, and the CUDA context (about 0.5 GiB) and the
caching allocator's fragmentation (``reserved − allocated``) come on top of the allocator's peak.

Calibration: ``--measure`` runs cells of hypo_fast's own trainer (``memory_cells.py``) and appends their
per-phase peaks to benchmarks/results/memory_8b.jsonl; the default run compares every measured row with
its estimate (peak, phases, and a breakdown by component) and carries the spread of measured/estimated
into each row of the 8B table. The estimate counts live tensors: CPU cells run with glibc returning freed
memory (``MALLOC_MMAP_THRESHOLD_=65536``); with glibc's defaults the resident set also keeps freed memory,
a term the estimate leaves out (measured: 1.2–1.4× the estimate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from benchlib import RESULTS_DIR, append_rows, bench_arguments, default_results_dir, print_table, start_run
from model_shapes import LLAMA3_8B, SHAPES, Shape

GB = 1024**3
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """One micro-step on one GPU (or CPU rank): what it processes and how the state is laid out."""

    lora: bool
    zero_stage: int = 0
    gpus: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    reference_on_cpu: bool = False  # model.reference_device: cpu (full fine-tuning)
    bytes_per_weight: int = 2  # bf16
    lora_r: int = 16
    pairs: int = 1  # preference pairs per micro-step (per GPU)
    prompt: int = 512  # tokens of a pair's prompt ...
    response: int = 1536  # ... and of each of its responses
    prompts: int = 1  # online prompts per micro-step; 0: DPO (λ = 0), no sampling and no reference forward
    k: int = 2  # samples per online prompt
    online_prompt: int = 512
    gen: int = 1536  # tokens drawn per sample
    device: str = "cuda"  # "cpu": the CPU terms of the module docstring
    attention: str = "flash"  # "flash" (flash-attention-2: packed rows by position ids) | "sdpa" (T×T mask)
    liger: bool = False  # Liger's RMSNorm/RoPE/SwiGLU (applied on CUDA when liger-kernel is installed)
    first_step: bool = False  # the first step: under ZeRO-3, AdamW's state is created in its optimizer step
    reduce_bucket: int = 500_000_000  # DeepSpeed reduce_bucket_size (elements)
    sub_group: int = 1_000_000_000  # DeepSpeed ZeRO-3 sub_group_size (elements)


CPU_RUNTIME = 580 * MIB  # measured: a rank's resident set after set-up less its tensors, 550–680 MiB (the
# library pages mapped vary with what the page cache holds): Python, torch, transformers, DeepSpeed, gloo
CUDA_CONTEXT = 0.5 * GB  # not measured here: CUDA context and kernels, outside the allocator's statistics
HEAD_CHUNK = 4 * 1024 * 1024  # the CPU head's logits block (hypo_fast.ops.chunked.DEFAULT_CHUNK_ELEMENTS)
SAMPLE_TILE = 2048  # the CPU sampling head's vocabulary tile (hypo_fast.native.SAMPLE_TILE)


def tokens(plan: Plan) -> dict[str, int]:
    """T (tokens in the packed policy forward), N (scored), and the online part's counts."""
    rows = plan.prompts * plan.k
    T_on = rows * (plan.online_prompt + plan.gen)
    return {"T": 2 * plan.pairs * (plan.prompt + plan.response) + T_on, "T_on": T_on,
            "N": 2 * plan.pairs * plan.response + rows * plan.gen, "N_on": rows * plan.gen,
            "M": rows, "S": plan.online_prompt + plan.gen, "prefill": rows * plan.online_prompt}


def _attention_expands(plan: Plan) -> bool:
    """SDPA with a mask (packed rows, left-padded prefill) gets K/V repeated to every head by transformers."""
    return plan.attention == "sdpa"


def layer_saved_bytes(shape: Shape, plan: Plan) -> float:
    """Bytes per token one decoder layer saves for its backward (the recomputed layer), see the docstring.
    With Liger's kernels (``plan.liger``) RMSNorm keeps its bf16 input and a per-row rstd instead of an fp32
    copy, and SwiGLU keeps gate and up only (it recomputes silu in its backward)."""
    w, D, F, H = plan.bytes_per_weight, shape.hidden, shape.ffn, shape.heads
    kv = shape.kv_heads * shape.head_dim
    attention = 3 * w * D if _attention_expands(plan) else w * D + 2 * w * kv
    norms = 2 * (2 * w * D + 4) if plan.liger else 8 * D + 4 * w * D
    mlp = 3 * w * F if plan.liger else 4 * w * F
    return norms + attention + w * D + mlp + 4 * H


def layer_forward_bytes(shape: Shape, plan: Plan) -> float:
    """Bytes per token in flight in one layer's forward when nothing is saved (checkpointed or no-grad):
    SwiGLU's gate, up, silu(gate) (not with Liger's fused kernel) and their product, the residual stream and
    q/k/v."""
    w, D, F = plan.bytes_per_weight, shape.hidden, shape.ffn
    kv = 2 * w * D if _attention_expands(plan) else 2 * w * shape.kv_heads * shape.head_dim
    return w * ((3 if plan.liger else 4) * F + 4 * D) + kv


def layer_grad_bytes(shape: Shape, plan: Plan) -> float:
    """Bytes per token of gradients in flight in one layer's backward: SwiGLU's three F-wide gradients,
    the residual stream's, and (HF's RMSNorm) fp32 input gradients."""
    w, D, F = plan.bytes_per_weight, shape.hidden, shape.ffn
    return w * (3 * D + 3 * F) + (0 if plan.liger else 8 * D)


def mask_bytes(plan: Plan, rows: int, length: int) -> float:
    return rows * length * length if plan.attention == "sdpa" else 0.0  # bool [rows, 1, L, L]


def cpu_head_workspace(shape: Shape, n: int) -> float:
    """The native/chunked CPU head: a ``[n, chunk]`` fp32 logits block and the chunk of W in fp32."""
    if n == 0:
        return 0.0
    chunk = min(shape.vocab, max(256, HEAD_CHUNK // n))
    return 4 * chunk * shape.hidden + 4 * n * chunk


def estimate(shape: Shape, plan: Plan) -> dict:
    """Bytes per GPU: ``state`` (persistent), ``phases`` (each phase's components, state included), the
    ``peak`` and the phase that sets it."""
    P, w, n, z = shape.params(), plan.bytes_per_weight, plan.gpus, plan.zero_stage
    L, D, V = shape.layers, shape.hidden, shape.vocab
    P_lora = shape.lora_params(plan.lora_r) if plan.lora else 0
    P_tr = P_lora if plan.lora else P
    cpu = plan.device == "cpu"
    tok = tokens(plan)
    T, N = tok["T"], tok["N"]
    shard = n if z == 3 else 1
    opt_shard = n if z >= 1 else 1

    state = {"runtime": CPU_RUNTIME if cpu else 0.0}
    state["weights"] = 0.0 if plan.offload_params else w * (P + P_lora) / shard
    state["reference"] = w * P if not plan.lora and (cpu or not plan.reference_on_cpu) else 0.0
    state["master_weights"] = 0.0 if plan.offload_optimizer else 4 * P_tr / opt_shard
    bucket = w * min(plan.reduce_bucket, P_tr) if cpu else w * plan.reduce_bucket  # CPU: pages written
    grads_buffers = 0.0
    if z >= 2:
        grads_buffers = (0.0 if plan.offload_optimizer else w * P_tr / n) + (0.0 if cpu else bucket)
    state["grad_buffers"] = grads_buffers
    adam = 0.0 if plan.offload_optimizer else 8 * P_tr / opt_shard
    # measured: DeepSpeed's bf16 optimizer of ZeRO-0 creates AdamW's state at set-up, ZeRO-3 in the first step
    state["optimizer_state"] = 0.0 if plan.first_step and z == 3 else adam

    gathered_layer = w * shape.layer_params() if z == 3 and (n > 1 or plan.offload_params) else 0.0
    gathered_head = w * V * D if z == 3 and (n > 1 or plan.offload_params) else 0.0
    hidden_out = 8 * T * D  # the final RMSNorm (not checkpointed): fp32 input, bf16 cast and output
    checkpoints = L * T * D * w
    phases = {}

    if plan.prompts:
        cache = 2 * L * shape.kv_heads * shape.head_dim * tok["S"] * tok["M"] * w
        phases["sampling"] = {
            "generation_gather": (w * P - state["weights"]) if z == 3 else 0.0,
            "kv_cache": cache,
            "prefill": tok["prefill"] * (layer_forward_bytes(shape, plan) + w * D)
            + mask_bytes(plan, tok["M"], tok["S"]),
            "sample_head": 2 * 4 * SAMPLE_TILE * D if cpu else 0.0,
        }
        on_gpu = cpu or plan.lora or not plan.reference_on_cpu
        # the body's layers, then the head: one after the other, over the final hidden states
        head = tok["N_on"] * D * (w + 4) + (cpu_head_workspace(shape, tok["N_on"]) if cpu else 0.0)
        phases["reference_forward"] = {
            "hidden_and_mask": tok["T_on"] * w * D + mask_bytes(plan, 1, tok["T_on"]) if on_gpu else 0.0,
            "layer_or_head": max(tok["T_on"] * layer_forward_bytes(shape, plan), head) if on_gpu else 0.0,
        }
    head = N * D * w + (4 * N * D + cpu_head_workspace(shape, N) if cpu else 0.0)
    layer = T * layer_forward_bytes(shape, plan) + gathered_layer
    phases["policy_forward"] = {
        "checkpoints": checkpoints + hidden_out + mask_bytes(plan, 1, T),
        "layer_or_head": max(layer, head + gathered_head),
    }
    head_trains = not plan.lora
    head_backward = (4 * N * D + T * D * w + (4 * V * D + w * V * D if head_trains else 0.0)
                     + (cpu_head_workspace(shape, N) + 4 * N * D if cpu else 0.0))
    recompute = T * (layer_saved_bytes(shape, plan) + layer_grad_bytes(shape, plan))
    phases["backward"] = {
        "checkpoints": checkpoints + hidden_out,
        "activations": max(head_backward, recompute + gathered_layer) + mask_bytes(plan, 1, T),
        "zero3_gathered": gathered_head if head_backward >= recompute else 0.0,
    }
    parts = {"head_forward": head, "head_backward": head_backward,
             "recomputed_layer": recompute,  # what the forward leaves for the backward:
             "kept_for_backward": checkpoints + hidden_out + mask_bytes(plan, 1, T) + N * D * w}
    phases["optimizer_step"] = {}
    content = w * min(plan.reduce_bucket, P_tr)  # gradients in the reduce bucket when it is reduced
    if z >= 2:
        # the bucket's gradients are concatenated for the reduce-scatter (one copy); gloo has no native
        # reduce-scatter, and its fallback takes a second copy (CPU runs)
        phases["backward"]["gradients"] = content if cpu else 0.0  # CPU: the bucket's written pages
        phases["gradient_reduce"] = {"gradients": content if cpu else 0.0,  # after the last layer's backward
                                     "reduce_scatter": content * (2 if cpu else 1)}
        if not plan.offload_optimizer:
            phases["optimizer_step"]["reduce_bucket"] = content if cpu else 0.0
    elif not plan.lora or P_tr:  # ZeRO-0/1: every trainable parameter's gradient, until the step
        phases["backward"]["gradients"] = w * P_tr
        phases["optimizer_step"]["gradients"] = w * P_tr
    sub = min(plan.sub_group, P_tr / opt_shard)
    if not plan.offload_optimizer:
        # first step: AdamW creates its state here; then the fp32 gradient of a sub-group, its bf16 flat
        # copy and AdamW's denominator temporary
        phases["optimizer_step"].update({"optimizer_state": adam - state["optimizer_state"],
                                         "fp32_gradients": 4 * sub + w * sub, "adamw_temporaries": 4 * sub})
    base = sum(state.values())
    totals = {name: base + sum(parts.values()) for name, parts in phases.items()}
    # set-up: the trainer moves the whole model to the GPU, deep-copies it there for the reference (then
    # moved to the CPU if asked), and under ZeRO-3 DeepSpeed copies out its partitions before freeing it
    copy = w * P if not plan.lora else 0.0
    init = {"weights_before_partition": w * P + w * P_lora, "reference": max(copy, state["reference"])}
    if z == 3:
        init["partitions"] = ((0.0 if plan.offload_params else w * (P + P_lora) / n)
                              + (0.0 if plan.offload_optimizer else (4 + w) * P_tr / n))
    totals["set-up"] = state["runtime"] + sum(init.values())
    peak_phase = max(totals, key=totals.get)
    return {"state": state, "phases": phases, "totals": totals, "peak": totals[peak_phase], "peak_phase": peak_phase,
            "tokens": tok, "parts": parts}


def host_bytes(shape: Shape, plan: Plan) -> dict[str, float]:
    """Host (CPU) memory per node for ``plan.gpus`` ranks, from the same terms: each rank builds the whole
    model on the CPU before moving it (``load``), and holds what is offloaded or kept on the CPU."""
    P, w, n = shape.params(), plan.bytes_per_weight, plan.gpus
    P_tr = shape.lora_params(plan.lora_r) if plan.lora else P
    out = {"load": n * w * P}  # transient, at start: every rank at once
    steady = n * w * P if plan.reference_on_cpu and not plan.lora else 0.0
    if plan.offload_optimizer:  # fp32 master + AdamW + an fp32 gradient per sub-group + the bf16 gradient partition
        steady += (4 + 8 + 4 + w) * P_tr
    if plan.offload_params:
        steady += w * P
    out["steady"] = steady
    out["peak"] = max(out["load"], steady)
    return out


# ---- calibration: measured rows against their estimates ---------------------------------------------

MEASURED_PHASES = ("sampling", "reference_forward", "policy_forward", "backward", "optimizer_step")


def plan_of_case(case: dict) -> Plan:
    """The estimator's plan for a measured cell (``memory_cells.cell_case``)."""
    attention = next((r.get("attention") for r in case.get("per_rank", [])), None) or "sdpa"
    liger = any(r.get("liger") for r in case.get("per_rank", []))
    return Plan(lora=case["mode"] == "lora", zero_stage=case["zero"], gpus=case["ranks"],
                bytes_per_weight=2 if case["dtype"] in ("bfloat16", "float16") else 4,
                pairs=case["pairs"], prompt=case["prompt"], response=case["response"],
                prompts=case["prompts"] if case["kl_coef"] > 0 else 0, k=case["k"],
                online_prompt=case["online_prompt"], gen=case["gen"], device=case["device"],
                attention="flash" if attention == "flash_attention_2" else "sdpa", liger=liger, first_step=True,
                offload_optimizer=case.get("offload_optimizer", False),
                offload_params=case.get("offload_params", False))


def measured_rows(results_dir=RESULTS_DIR) -> list[dict]:
    """Measured cells, the latest row per (cell, malloc, device, machine), errors included."""
    path = Path(results_dir) / "memory_8b.jsonl"
    latest = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if row.get("kind") == "measured":
            latest[(row["cell"], row.get("malloc"), row["device"], row["machine"])] = row
    return list(latest.values())


def calibrate(rows: list[dict]) -> list[dict]:
    """Each measured row beside its estimate: the peak and each phase's peak, measured / estimated."""
    out = []
    for row in rows:
        shape = SHAPES[row["shape"]]
        est = estimate(shape, plan_of_case(row))
        entry = {k: row.get(k) for k in ("cell", "mode", "shape", "seq", "malloc", "device", "machine", "error")}
        entry["params_b"] = shape.params() / 1e9
        if "peak_mib" in row and not row.get("error"):
            entry.update(measured_mib=row["peak_mib"], estimate_mib=est["peak"] / MIB,
                         ratio=row["peak_mib"] * MIB / est["peak"], peak_phase=est["peak_phase"])
            phase_peaks = max(row["per_rank"], key=lambda r: r["peak_mib"])["phase_peak_mib"]
            totals = dict(est["totals"])
            totals["backward"] = max(totals["backward"], totals.get("gradient_reduce", 0.0))  # one measured phase
            entry["phase_ratios"] = {p: phase_peaks[p] * MIB / totals[p]
                                     for p in MEASURED_PHASES if p in phase_peaks and p in totals}
            entry["measured_phase"] = max((p for p in MEASURED_PHASES if p in phase_peaks), key=phase_peaks.get)
        out.append(entry)
    return out


# the measured breakdown: what each number is, read off one rank's phase boundaries (RSS or allocator)
BREAKDOWN = {  # the measured side of each component, read off one rank's phase boundaries
    "weights": "RSS growth while the model is built (the trainer's load_causal_lm)",
    "reference": "RSS growth while the frozen reference is deep-copied (full fine-tuning)",
    "optimizer_state": "RSS growth across the first optimizer step (ZeRO-3 creates AdamW's state there; "
                       "ZeRO-0's bf16 optimizer does at set-up)",
    "kv_cache": "RSS after the last decode step (cache alive, prefill freed) less RSS when sampling starts",
    "sampling": "peak while sampling (prefill, decode, KV cache) above its start",
    "reference_forward": "peak of the online reference forward above its start",
    "forward": "peak of the policy forward above its start (checkpointed inputs, one layer, the head)",
    "kept_for_backward": "RSS after the policy forward less RSS before it (checkpoints, mask, final norm, head rows)",
    "head_forward": "peak of the fused head's forward above its start",
    "head_backward": "peak of the fused head's backward (output-gradient hook to input-gradient hook) above its start",
    "backward": "peak of the backward above its start (recomputed layer, head, gradients, their reduce)",
}


# what the CPU cells check, and what only a GPU can (bash benchmarks/gpu_suite.sh OUT memory)
CHECKED_ON_CPU = [
    "weights, the full-fine-tuning reference (a full copy per rank under ZeRO-3), AdamW's state, fp32 masters, "
    "ZeRO-3's partitions and gradient partition buffer (per rank, 2 ranks)",
    "every layer's checkpointed input, the final RMSNorm, SDPA's T×T boolean mask over the packed row",
    "the recomputed layer: its saved tensors (fp32 RMSNorm inputs, K/V expanded to every head by SDPA with a "
    "mask) and gradients in flight",
    "the fused head: its saved rows, fp32 dh, and in full fine-tuning the fp32 weight gradient 4·V·D and its cast",
    "the KV cache (dynamic), the prefill, the reference forward, ZeRO-3's reduce bucket as written and its scatter",
    "the optimizer step under ZeRO-3: the fp32 gradient of a sub-group, its bf16 flat copy, AdamW's temporary",
]
UNTESTED_ON_GPU = [
    "the CUDA context (~0.5 GiB, taken as a constant) and the caching allocator's fragmentation (reserved − "
    "allocated; not estimated)",
    "flash-attention-2: packed rows read from position ids, no mask, K/V saved at GQA size (the estimate "
    "assumes it; 'peak SDPA' assumes PyTorch's memory-efficient kernel with a T×T mask, no score matrix)",
    "Liger's RMSNorm/RoPE/SwiGLU kernels, applied on CUDA when installed: modelled from what they save "
    "(bf16 input + rstd; gate and up), never measured; the 8B table assumes the HF modules (higher)",
    "the Triton head (its tiles stay on chip: no CPU chunk workspace), the static KV cache",
    "DeepSpeed's 5e8-element reduce bucket allocated whole at start; NCCL's reduce-scatter (one copy; gloo's "
    "fallback takes two)",
    "ZeRO-1/2 (never measured), optimizer/parameter offload (never measured), more than 2 ranks, the set-up "
    "peak of ZeRO-3 on one GPU",
]


def breakdown(row: dict) -> dict[str, tuple[float, float]]:
    """Component → (measured MiB, estimated MiB) for one measured row (its rank with the highest peak);
    see ``BREAKDOWN`` for how each measured number is obtained."""
    r = max(row["per_rank"], key=lambda x: x["peak_mib"])
    lv, pk = r["level_mib"], r["phase_peak_mib"]
    shape, plan = SHAPES[row["shape"]], plan_of_case(row)
    est = estimate(shape, plan)
    base, t, parts = sum(est["state"].values()), est["totals"], est["parts"]

    def grew(name):
        return lv[f"{name}:end"] - lv[f"{name}:start"] if f"{name}:end" in lv else None

    def above(name):
        return pk[name] - lv[f"{name}:start"] if name in pk else None

    backward = max(t["backward"], t.get("gradient_reduce", 0.0)) - base - parts["kept_for_backward"]
    out = {"weights": (grew("load_model"), plan.bytes_per_weight * shape.params() / MIB),
           "reference": (grew("reference_copy"), est["state"]["reference"] / MIB),
           "optimizer_state": (grew("optimizer_step"), est["phases"]["optimizer_step"].get("optimizer_state", 0) / MIB),
           "forward": (above("policy_forward"), (t["policy_forward"] - base) / MIB),
           "kept_for_backward": (grew("policy_forward"), parts["kept_for_backward"] / MIB),
           "head_forward": (above("head_forward"), parts["head_forward"] / MIB),
           "head_backward": (above("head_backward"), parts["head_backward"] / MIB),
           "backward": (above("backward"), backward / MIB)}
    if "sampling" in est["phases"]:
        out["kv_cache"] = (lv["kv_cache_full"] - lv["sampling:start"] if "kv_cache_full" in lv else None,
                           est["phases"]["sampling"]["kv_cache"] / MIB)
        out["sampling"] = (above("sampling"), (t["sampling"] - base) / MIB)
        out["reference_forward"] = (above("reference_forward"), (t["reference_forward"] - base) / MIB)
    return {k: v for k, v in out.items() if v[0] is not None}


def breakdown_rows(rows: list[dict]) -> list[dict]:
    """One row per measured cell: each component as "measured / estimated" MiB."""
    out = []
    for row in rows:
        if row.get("error") or not row.get("per_rank"):
            continue
        parts = breakdown(row)
        out.append({"cell": row["cell"], "malloc": row.get("malloc"),
                    **{k: f"{m:.0f} / {e:.0f}" for k, (m, e) in parts.items()}})
    return out


def calibration_band(calibrated: list[dict], mode: str, device: str = "cpu") -> tuple[float, float] | None:
    """min and max of measured/estimated over the cells of one mode measured on ``device`` (CPU cells:
    with the mmap malloc, whose resident set tracks live tensors), or None."""
    ratios = [c["ratio"] for c in calibrated
              if c.get("ratio") and c["mode"] == mode and c["device"] == device and c["malloc"] != "default"]
    return (min(ratios), max(ratios)) if ratios else None


def plan_bands(calibrated: list[dict]) -> dict[str, tuple[float, float] | None]:
    """The band carried into the GPU plan: from GPU cells when there are any, else from the CPU cells."""
    return {mode: calibration_band(calibrated, mode, "cuda") or calibration_band(calibrated, mode, "cpu")
            for mode in ("lora", "full")}


# ---- the 8B plan ---------------------------------------------------------------------------------

# the step the 8B table is for: 1 pair and 1 online prompt × k = 2 per GPU, every sequence 2048 tokens
PLAN_STEP = {"pairs": 1, "prompt": 512, "response": 1536, "prompts": 1, "k": 2, "online_prompt": 512, "gen": 1536}


def plan_rows(shape: Shape, bands: dict[str, tuple[float, float] | None], step: dict = PLAN_STEP) -> list[dict]:
    """The plan table: every mode × GPUs × ZeRO stage × offload, peaks with flash-attention and SDPA."""
    rows = []
    for lora in (True, False):
        for gpus in (1, 8):
            for stage in (0, 1, 2, 3):
                offloads = [(False, False)] + ([(True, False)] if stage >= 1 else [])
                offloads += [(True, True)] if stage == 3 else []
                for opt, par in offloads:
                    plan = Plan(lora=lora, zero_stage=stage, gpus=gpus, offload_optimizer=opt, offload_params=par,
                                **step)
                    est, sdpa = estimate(shape, plan), estimate(shape, replace(plan, attention="sdpa"))
                    band = bands.get("lora" if lora else "full")
                    peak = est["peak"] / GB
                    rows.append({"kind": "plan", "shape": shape.name, "mode": "LoRA r=16" if lora else "full",
                                 "gpus": gpus, "zero": stage, "offload": "opt+params" if par else "opt" if opt else "-",
                                 "peak_gb": peak, "peak_sdpa_gb": sdpa["peak"] / GB, "peak_phase": est["peak_phase"],
                                 "low_gb": peak * band[0] if band else None,
                                 "high_gb": peak * band[1] if band else None,
                                 "device_gb": peak * max(1.0, band[1] if band else 1.0) + CUDA_CONTEXT / GB,
                                 "host_gb": host_bytes(shape, plan)["peak"] / GB,
                                 **{f"{k}_gb": v / GB for k, v in est["state"].items()},
                                 **{f"{p}_gb": t / GB for p, t in est["totals"].items()}})
    return rows


# ---- a user's config -------------------------------------------------------------------------------

def plan_of_config(path: str, overrides: list[str], gpus: int, attention: str = "flash",
                   liger: bool = False) -> tuple[Shape, Plan]:
    """The plan of a training config (model.config, or model.path's config.json) on ``gpus`` GPUs."""
    from hypo_fast.train.config import load_config

    cfg = load_config(path, overrides)
    m, d, s, a, z = cfg.model, cfg.data, cfg.sampling, cfg.algorithm, cfg.deepspeed
    hf = dict(m.config) if m.config else json.loads((Path(m.path) / "config.json").read_text())
    shape = Shape(Path(m.path).name if m.path else "config", hf["num_hidden_layers"], hf["hidden_size"],
                  hf["intermediate_size"], hf["num_attention_heads"],
                  hf.get("num_key_value_heads", hf["num_attention_heads"]),
                  hf["vocab_size"], hf.get("tie_word_embeddings", False))
    if m.attn_implementation not in ("auto", "flash_attention_2"):
        attention = "sdpa"
    prompt = min(d.max_prompt_length, d.max_length - 1)
    plan = Plan(lora=m.lora is not None, lora_r=m.lora.r if m.lora else 16, zero_stage=z.zero_stage, gpus=gpus,
                offload_optimizer=z.offload_optimizer, offload_params=z.offload_params,
                reference_on_cpu=m.reference_device == "cpu", bytes_per_weight=2 if m.dtype != "float32" else 4,
                pairs=cfg.optim.pairs_per_micro_batch, prompt=prompt, response=d.max_length - prompt,
                prompts=s.prompts_per_step if a.kl_coef > 0 else 0, k=a.num_samples, online_prompt=prompt,
                gen=s.max_new_tokens, device="cuda", attention=attention, liger=liger)
    return shape, plan


def describe(shape: Shape, plan: Plan, band: tuple[float, float] | None) -> None:
    est = estimate(shape, plan)
    offload = ", optimizer offload" if plan.offload_optimizer else ""
    offload += ", parameter offload" if plan.offload_params else ""
    print(f"# {shape.name}: {shape.params() / 1e9:.2f}B parameters; {plan.gpus} GPU(s), ZeRO-{plan.zero_stage}{offload}"
          f"; {'LoRA r=%d' % plan.lora_r if plan.lora else 'full fine-tuning'}; {plan.attention}")
    print(f"# per micro-step: T = {est['tokens']['T']} tokens packed, N = {est['tokens']['N']} scored")
    for name, value in est["state"].items():
        print(f"  state  {name:<22} {value / GB:7.2f} GiB")
    print(f"  {'set-up':<18} {est['totals']['set-up'] / GB:7.2f} GiB  (the model on the GPU, its reference copy"
          f"{', ZeRO-3 partitions' if plan.zero_stage == 3 else ''})")
    for phase, parts in est["phases"].items():
        inner = ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)
        print(f"  {phase:<18} {est['totals'][phase] / GB:7.2f} GiB  (state{' + ' + inner if inner else ''})")
    line = f"peak {est['peak'] / GB:.1f} GiB in {est['peak_phase']}"
    if band:
        line += f"; calibration band {est['peak'] * band[0] / GB:.1f}–{est['peak'] * band[1] / GB:.1f} GiB"
    if plan.device == "cuda":
        line += f"; plus ~{CUDA_CONTEXT / GB:.1f} GiB CUDA context and the allocator's fragmentation"
    print(line)
    host = host_bytes(shape, plan)
    print(f"host memory per node: {host['load'] / GB:.0f} GiB while every rank builds the model on the CPU, "
          f"{host['steady'] / GB:.0f} GiB held (offloaded state, CPU reference), plus each process's runtime")


# ---- command line ----------------------------------------------------------------------------------

CAL_COLUMNS = [("cell", "cell", "s"), ("params_b", "params B", ".2f"), ("malloc", "malloc", "s"),
               ("measured_mib", "measured MiB", ".0f"), ("estimate_mib", "estimate MiB", ".0f"),
               ("ratio", "measured/est", ".2f"), ("measured_phase", "measured peak in", "s"),
               ("peak_phase", "estimated peak in", "s"), ("error", "error", "s")]
PLAN_COLUMNS = [("mode", "mode", "s"), ("gpus", "GPUs", "d"), ("zero", "ZeRO", "d"), ("offload", "offload", "s"),
                ("weights_gb", "weights", ".1f"), ("reference_gb", "ref", ".1f"),
                ("master_weights_gb", "master", ".1f"),
                ("optimizer_state_gb", "AdamW", ".1f"), ("grad_buffers_gb", "grad buf", ".1f"),
                ("set-up_gb", "set-up", ".1f"), ("sampling_gb", "sampling", ".1f"),
                ("policy_forward_gb", "forward", ".1f"),
                ("backward_gb", "backward", ".1f"), ("optimizer_step_gb", "opt step", ".1f"),
                ("peak_gb", "peak", ".1f"), ("low_gb", "band lo", ".1f"), ("high_gb", "band hi", ".1f"),
                ("peak_sdpa_gb", "peak SDPA", ".1f"), ("peak_phase", "peak in", "s"), ("host_gb", "host/node", ".0f")]


def main() -> None:
    parser = bench_arguments(__doc__)
    parser.add_argument("--measure", nargs="*", default=[], help="cells MODE-SHAPE-SEQ (memory_cells.cell_case)")
    parser.add_argument("--malloc", default="mmap", choices=["mmap", "default"], help="CPU cells: glibc's mode")
    parser.add_argument("--max-rss-gib", type=float, help="memory guard on all processes of a cell (default: 12.5 "
                        "GiB on CPU, 80%% of the host's memory with --device cuda)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    parser.add_argument("--config", help="estimate this training config's peak instead of the 8B table")
    parser.add_argument("--gpus", type=int, default=1, help="with --config: GPUs (ranks)")
    parser.add_argument("--attention", default="flash", choices=["flash", "sdpa"],
                        help="with --config: flash-attention-2 installed on the GPU, or SDPA")
    parser.add_argument("--liger", action="store_true", help="with --config: liger-kernel installed on the GPU")
    parser.add_argument("overrides", nargs="*", help="with --config: dotted key=value overrides")
    args = parser.parse_args()
    folders = {Path(RESULTS_DIR).resolve(), Path(args.results_dir or default_results_dir()).resolve()}  # the committed rows and this run's
    calibrated = calibrate([r for folder in sorted(folders) for r in measured_rows(folder)])
    bands = plan_bands(calibrated)
    if args.config:
        shape, plan = plan_of_config(args.config, args.overrides, args.gpus, args.attention, args.liger)
        describe(shape, plan, bands["lora" if plan.lora else "full"])
        return
    env = start_run(args)
    if args.measure:
        from memory_cells import cell_case, default_cap, measured_row, run_cell

        cap = args.max_rss_gib * GB if args.max_rss_gib else default_cap(args.device)
        for spec in args.measure:
            case = cell_case(spec, args.device, args.malloc)
            row = measured_row(case, run_cell(case, cap, args.timeout), env)
            est = estimate(SHAPES[case["shape"]], plan_of_case(case))
            row["estimate_mib"] = est["peak"] / MIB
            print(f"{spec} [{case['malloc']}]: peak {row.get('peak_mib', float('nan')):.0f} MiB per rank, "
                  f"estimate {row['estimate_mib']:.0f} MiB, {row['wall_s']:.0f} s"
                  + (f" — {row['error']}" if "error" in row else ""), flush=True)
            if not args.no_save:
                append_rows("memory_8b", [row], args.results_dir)
        return
    print("\n## Calibration: measured peak per rank (hypo_fast's trainer, one step) against the estimate")
    print_table(calibrated, CAL_COLUMNS)
    for mode in ("lora", "full"):
        for device in ("cpu", "cuda"):
            band = calibration_band(calibrated, mode, device)
            if band:
                print(f"{mode} on {device}: measured/estimated spans {band[0]:.2f}–{band[1]:.2f}")
    default = [c["ratio"] for c in calibrated if c.get("ratio") and c["malloc"] == "default"]
    if default:
        print(f"glibc's default malloc: {min(default):.2f}–{max(default):.2f} — the resident set keeps freed "
              "memory "
              "(arenas, fragmentation); the estimate counts live tensors and misses that term")
    print("\n## Breakdown, MiB measured / estimated (how each is measured: BREAKDOWN in memory_8b.py)")
    print_table(breakdown_rows([r for folder in sorted(folders) for r in measured_rows(folder)]),
                [("cell", "cell", "s"), ("malloc", "malloc", "s")] + [(k, k, "s") for k in BREAKDOWN])
    print("\nChecked on CPU:\n" + "\n".join(f"  - {x}" for x in CHECKED_ON_CPU))
    print("Untested on GPU:\n" + "\n".join(f"  - {x}" for x in UNTESTED_ON_GPU))
    print(f"\n## Estimated peak GiB per GPU, one HyPO step on {LLAMA3_8B.name} ({LLAMA3_8B.params() / 1e9:.2f}B), "
          "bf16, gradient checkpointing, 1 pair + 1 prompt × k=2 per GPU, every sequence 2048 tokens (512 prompt), "
          f"steady state; band = peak × the calibration spread; add ~{CUDA_CONTEXT / GB:.1f} GiB CUDA context")
    table = plan_rows(LLAMA3_8B, bands)
    print_table(table, PLAN_COLUMNS)
    if not args.no_save:
        append_rows("memory_8b", [{**env, **r} for r in table], args.results_dir)


if __name__ == "__main__":
    main()
