"""Measured cells for the memory plan: one training step of hypo_fast's trainer, its peak per phase.

A cell (``MODE-SHAPE-SEQ``, see :func:`cell_case`) runs in fresh processes — one, or two gloo ranks
under ``torch.distributed.run`` — with a model built from a Llama-shaped config (random weights, nothing
downloaded). Each rank wraps the trainer's set-up steps and the step's phases (sampling, reference
forward, policy forward, fused head forward/backward, backward, optimizer step) with
:class:`benchlib.PhasePeaks` and writes what it saw; the parent watches every process of the cell and
kills them all if together they pass a memory cap, or if the machine runs low (it is shared).

Used by ``memory_8b.py --measure``; ``python benchmarks/memory_cells.py`` is the per-rank entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import REPO, PhasePeaks
from model_shapes import SHAPES

GB = 1024**3
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
GEN_TOKENS = 32  # tokens drawn per online sample in a measured cell (decoding on 2 CPU cores is slow)
MMAP_THRESHOLD = 65536  # glibc: every allocation ≥ 64 KiB its own mapping, unmapped when freed


def cell_case(name: str, device: str = "cpu", malloc: str = "mmap") -> dict:
    """A measured cell from its name, ``MODE-SHAPE-SEQ``.

    ``lora``: a HyPO step (λ = 0.05, k = 2) with LoRA r = 16, one pair and one online prompt, one process.
    ``full``: a DPO step (λ = 0, no sampling, no reference forward) with one pair per rank on two ranks
    under ZeRO-3. Every sequence is ``SEQ`` tokens: a pair is half prompt, half response; an online
    sample is a prompt of ``SEQ − 32`` tokens (its own prompt set) and 32 drawn tokens, so the KV cache
    and the training forward see full-length sequences while decoding stays short.
    ``malloc="mmap"`` runs with ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors leave the resident set,
    so it tracks live tensors (what CUDA's allocator statistics report); ``"default"`` is glibc as shipped.
    """
    mode, rest = name.split("-", 1)
    shape, seq = rest.rsplit("-", 1)
    seq = int(seq)
    if shape not in SHAPES or mode not in ("lora", "full"):
        raise ValueError(f"unknown cell {name!r}: MODE-SHAPE-SEQ with MODE lora|full, SHAPE one of {sorted(SHAPES)}")
    prompt = seq // 2
    case = {"cell": name, "shape": shape, "mode": mode, "seq": seq, "prompt": prompt, "response": seq - prompt,
            "pairs": 1, "dtype": "bfloat16", "device": device, "malloc": malloc if device == "cpu" else "-"}
    if mode == "lora":
        return {**case, "kl_coef": 0.05, "k": 2, "prompts": 1, "online_prompt": seq - GEN_TOKENS,
                "gen": GEN_TOKENS, "ranks": 1, "zero": 0}
    # two gloo ranks on CPU; one GPU where a single one is lent (ZeRO-3 then partitions over one rank)
    return {**case, "kl_coef": 0.0, "k": 2, "prompts": 1, "online_prompt": 0, "gen": 1,
            "ranks": 2 if device == "cpu" else 1, "zero": 3}


def run_config(case: dict, folder: Path) -> dict:
    """The trainer config of a measured cell: a model built from the shape (random weights), one row of
    random letters per rank (prompt, chosen, rejected of exactly the cell's token counts), one step."""
    import random

    from hypo_fast.examples.toy import char_tokenizer

    shape = SHAPES[case["shape"]]
    char_tokenizer(ALPHABET).save_pretrained(folder / "tok")
    rng = random.Random(0)
    text = lambda n: "".join(rng.choice(ALPHABET) for _ in range(n))  # noqa: E731
    P, R = case["prompt"], case["response"]  # tokens: BOS + P−1 letters; R−1 letters + EOS
    rows = [{"prompt": text(P - 1), "chosen": text(R - 1), "rejected": text(R - 1)}
            for _ in range(case["ranks"] * case["pairs"])]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    online = case["online_prompt"]
    if online:  # the online prompts: their own set, so that samples can be long while decoding is short
        prompts = [{"prompt": text(online - 1)} for _ in range(case["ranks"] * case["prompts"])]
        (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    cfg = {"model": {"config": shape.hf_config(max_positions=max(P + R, online + case["gen"]) + 8),
                     "tokenizer": str(folder / "tok"), "dtype": case["dtype"], "gradient_checkpointing": True,
                     "attn_implementation": case.get("attn", "auto")},
           "data": {"train_file": str(folder / "pairs.jsonl"), "max_prompt_length": max(P, online),
                    "max_length": max(P + R, online + 1),
                    "prompt_file": str(folder / "prompts.jsonl") if online else None},
           "algorithm": {"kl_coef": case["kl_coef"], "num_samples": case["k"]},
           "sampling": {"prompts_per_step": case["prompts"], "max_new_tokens": case["gen"], "stop_on_eos": False},
           "optim": {"max_steps": 1, "pairs_per_micro_batch": case["pairs"]},
           "deepspeed": {"zero_stage": case["zero"], "offload_optimizer": case.get("offload_optimizer", False),
                         "offload_params": case.get("offload_params", False)},
           "eval": {"every": 0, "kl_prompts": 0},
           "output": {"dir": str(folder / "run"), "resume": "never"}}  # train_step() only: no logs written
    if case["mode"] == "lora":
        cfg["model"]["lora"] = {"r": case.get("lora_r", 16)}
    return cfg


class _PhasedEngine:
    """The DeepSpeed engine, its forward, backward and step each run as a phase."""

    def __init__(self, engine, phases):
        self._engine = engine
        self._forward = phases.wrap("policy_forward", engine)
        self.backward = phases.wrap("backward", engine.backward)
        self.step = phases.wrap("optimizer_step", engine.step)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _phase_the_head(head, phases) -> None:
    """The fused head's forward (with grad) and its backward (from its output's gradient hook to its
    input's) as phases ``head_forward`` / ``head_backward``."""
    forward = head.forward

    def phased(hidden, targets, positions, **kwargs):
        if not torch.is_grad_enabled():  # the reference forward (LoRA shares the head): not this phase
            return forward(hidden, targets, positions, **kwargs)
        out = phases.wrap("head_forward", forward)(hidden, targets, positions, **kwargs)
        logp = out[0] if isinstance(out, tuple) else out
        if logp.requires_grad and hidden.requires_grad:
            logp.register_hook(lambda grad: phases.enter("head_backward"))
            hidden.register_hook(lambda grad: phases.exit("head_backward"))
        return out

    head.forward = phased


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _param_bytes(module) -> int:
    """Bytes of a module's parameters held by this rank (its ZeRO-3 partition where partitioned)."""
    return _bytes(getattr(p, "ds_tensor", p) for p in module.parameters())


# where DeepSpeed keeps the fp32 master weights
_MASTER_ATTRIBUTES = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                      "fp32_groups_flat")  # ZeRO-3, ZeRO-1/2, BF16_Optimizer, FP16_Optimizer (bf16 under ZeRO-0)


def tensor_inventory(trainer) -> dict:
    """Exact tensor bytes of what the estimator names, read from the objects (not from RSS)."""
    engine = trainer.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed wraps torch's AdamW
    masters = next((getattr(engine.optimizer, a) for a in _MASTER_ATTRIBUTES if hasattr(engine.optimizer, a)), [])
    reference = trainer.policy.reference
    own_reference = reference is not None and reference.model is not trainer.policy.model
    return {
        "model_param_bytes": _param_bytes(trainer.policy.model),
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.policy.model.parameters()
                                if p.requires_grad),
        "reference_param_bytes": _param_bytes(reference.model) if own_reference else 0,
        "optimizer_state_bytes": _bytes(t for s in inner.state.values() for t in s.values()),
        "master_weight_bytes": _bytes(masters),
    }


# set-up steps timed as phases, by the module-level name the trainer calls them through
SETUP_PHASES = {"load_causal_lm": "load_model", "add_lora": "add_lora", "build_engine": "engine_init"}


def _phase_the_setup(trainer_module, phases) -> None:
    """Wrap the trainer's set-up calls wherever it looks them up (its own module, or a ``build`` helper
    module beside it), the reference copy and the offline reference cache."""
    import importlib

    modules = [trainer_module]
    try:
        modules.append(importlib.import_module("hypo_fast.train.build"))
    except ImportError:
        pass
    for module in modules:
        for name, phase in SETUP_PHASES.items():
            if hasattr(module, name):
                setattr(module, name, phases.wrap(phase, getattr(module, name)))
    from hypo_fast.models import FrozenReference

    FrozenReference.copy_of = phases.wrap("reference_copy", FrozenReference.copy_of)
    trainer_module.Trainer._reference_logps = phases.wrap("reference_cache", trainer_module.Trainer._reference_logps)


def _liger_patched(model) -> bool:
    """Whether Liger's kernels replaced a module's forward (hypo_fast applies them on CUDA when installed):
    Liger binds its forward onto each instance, or swaps in its own module classes."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        name = getattr(getattr(forward, "__func__", forward), "__qualname__", "") or ""
        if name.startswith("Liger") or type(module).__name__.startswith("Liger"):
            return True
    return False


def measure_worker(case: dict, out_dir: Path) -> None:
    """One rank of one measured cell: set-up and one training step, each phase's peak, to rankN.json."""
    phases = PhasePeaks(case["device"])
    phases.mark("python")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (its import is part of the runtime's footprint)

    import hypo_fast.train.trainer as tr
    from hypo_fast.train.config import config_from_dict

    phases.mark("imports")
    _phase_the_setup(tr, phases)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(run_config(case, Path(tmp)))
        start = time.perf_counter()
        phases.enter("setup")
        trainer = tr.Trainer(cfg)
        phases.exit("setup")
        setup_s = time.perf_counter() - start
        trainer.engine = _PhasedEngine(trainer.engine, phases)
        policy, sampler = trainer.policy, trainer.sampler
        policy.reference_online_logprobs = phases.wrap("reference_forward", policy.reference_online_logprobs)
        sampler.generate = phases.wrap("sampling", sampler.generate)
        sampler.decoder = phases.wrap("prefill", sampler.decoder)
        decode = sampler._decode
        sampler._decode = lambda *a, **k: (decode(*a, **k), phases.mark("kv_cache_full"))[0]
        _phase_the_head(policy.head, phases)
        start = time.perf_counter()
        phases.enter("step")
        metrics = trainer.train_step()
        phases.exit("step")
        step_s = time.perf_counter() - start
        phases.mark("end")
    result = {"rank": trainer.rank, "world": trainer.world, "peaks": phases.peaks, "levels": phases.levels,
              "process_peak": phases.process_peak, "reserved_peak": phases.reserved_peak, "seconds": phases.seconds,
              "setup_s": setup_s, "step_s": step_s, "loss": float(metrics["loss"]),
              "attention": getattr(policy.model.config, "_attn_implementation", None),
              "liger": _liger_patched(policy.model),
              **tensor_inventory(trainer)}
    if case["device"] == "cuda":  # what the driver sees: allocator reservations + the CUDA context
        free, total = torch.cuda.mem_get_info()
        result["device_used_end"] = total - free
        result["reserved_end"] = torch.cuda.memory_reserved()
    (out_dir / f"rank{trainer.rank}.json").write_text(json.dumps(result))


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (launchers may start their ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # fields[1]: the parent pid
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


MIN_AVAILABLE = 1.5 * GB  # the guard also stops a cell when the machine (shared) runs this low


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    return total


def default_cap(device: str) -> float:
    """The memory guard's cap on a cell's resident sets: 12.5 GiB on the shared CPU machine; on a GPU
    machine (the model is built on the host first) 80% of its memory."""
    if device == "cpu":
        return 12.5 * GB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return 0.8 * int(line.split()[1]) * 1024
    return 12.5 * GB


def run_cell(case: dict, cap_bytes: float, timeout: float) -> dict:
    """Run one cell in fresh processes (torch.distributed.run for several ranks) under a memory guard:
    every process of the cell is killed if their resident sets together pass ``cap_bytes``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "case.json").write_text(json.dumps(case))
        script = [str(Path(__file__).resolve()), str(out / "case.json"), str(out)]
        if case["ranks"] > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(case["ranks"]),
                   "--master-port", str(_free_port()), *script]
        else:
            cmd = [sys.executable, *script]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if case.get("malloc") == "mmap":
            env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        log = (out / "log.txt").open("w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        start, seen, stopped = time.monotonic(), 0, None
        while proc.poll() is None:
            pids = _descendants(proc.pid)
            rss = _tree_rss(pids)
            seen = max(seen, rss)
            if rss > cap_bytes:
                stopped = f"stopped by the memory guard: {rss / GB:.1f} GiB > {cap_bytes / GB:.1f} GiB"
            elif _available_bytes() < MIN_AVAILABLE:
                stopped = f"stopped by the memory guard: the machine has under {MIN_AVAILABLE / GB:.0f} GiB available"
            elif time.monotonic() - start > timeout:
                stopped = f"stopped after the {timeout:.0f} s time limit"
            if stopped:
                for pid in pids:  # the processes this cell started, by id
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                break
            time.sleep(0.5)
        log.close()
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        row = {"wall_s": time.monotonic() - start, "guard_max_total_rss": seen}
        if stopped or proc.returncode != 0 or len(ranks) != case["ranks"]:
            tail = (out / "log.txt").read_text().strip().splitlines()[-3:]
            row["error"] = stopped or (" | ".join(tail))[-400:]
        row["per_rank"] = ranks
        return row


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MIB = 2**20


def measured_row(case: dict, result: dict, env: dict) -> dict:
    """A results row: the cell, the machine, and per rank its phase peaks, levels and tensor inventory (MiB)."""
    per_rank = []
    for r in result["per_rank"]:
        per_rank.append({"rank": r["rank"], "peak_mib": r["process_peak"] / MIB,
                         "phase_peak_mib": {k: v / MIB for k, v in r["peaks"].items()},
                         "level_mib": {k: v / MIB for k, v in r["levels"].items()},
                         "seconds": r["seconds"], "setup_s": r["setup_s"], "step_s": r["step_s"],
                         "reserved_peak_mib": r["reserved_peak"] / MIB, "attention": r.get("attention"),
                         "liger": r.get("liger"),
                         **{f"{k}_mib": r[k] / MIB for k in ("device_used_end", "reserved_end") if k in r},
                         **{k: (v / MIB if k.endswith("_bytes") else v) for k, v in r.items()
                            if k.endswith("_bytes") or k == "trainable_params"}})
    row = {**env, "kind": "measured", **case, "wall_s": result["wall_s"],
           "guard_max_total_rss_mib": result["guard_max_total_rss"] / MIB, "per_rank": per_rank}
    if per_rank:
        row["peak_mib"] = max(r["peak_mib"] for r in per_rank)
    if "error" in result:
        row["error"] = result["error"]
    return row


if __name__ == "__main__":  # one rank of one cell: memory_cells.py CASE.json OUT_DIR
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case")
    parser.add_argument("out")
    args = parser.parse_args()
    measure_worker(json.loads(Path(args.case).read_text()), Path(args.out))
