"""Atomic, resumable checkpoints.

``OUT/checkpoint-STEP/`` holds: the model (or LoRA adapter) in Hugging Face format with safetensors and
the tokenizer (``from_pretrained``-loadable), ``config.yaml``, DeepSpeed's optimizer/scheduler/engine
state in ``deepspeed/``, ``trainer_state.json`` (step, data positions) and ``rng_rank{R}.pt``. It is
written to ``OUT/.tmp-checkpoint-STEP`` and renamed when complete, so a crash never leaves a checkpoint
that looks whole; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hypo_fast.models.loading import is_peft

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*") if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _save_hf_model(model: torch.nn.Module, tokenizer, folder: Path, rank: int) -> None:
    """Hugging Face weights: full model, or only the adapter under LoRA; ZeRO-3 weights gathered first."""
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if is_peft(model):  # adapters are small: gather only those
        params = [p for n, p in model.named_parameters() if hasattr(p, "ds_id") and "lora_" in n]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext():
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if params else None
            model.save_pretrained(folder, safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(folder)


def save_checkpoint(out_dir: Path, step: int, engine, model, tokenizer, trainer_state: dict, config_yaml: str,
                    keep_last: int, rank: int) -> Path:
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    _save_hf_model(model, tokenizer, tmp, rank)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic on one filesystem: the checkpoint appears whole or not at all
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, engine, rank: int) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state."""
    folder = Path(folder)
    load_path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
    if load_path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed state to resume from")
    set_rng_state(torch.load(folder / f"rng_rank{rank}.pt", weights_only=False))
    return json.loads((folder / "trainer_state.json").read_text())
