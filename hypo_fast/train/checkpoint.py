"""Atomic, verified, resumable checkpoints.

``OUT/checkpoint-STEP/`` holds: the model (or LoRA adapter) in Hugging Face format with safetensors and
the tokenizer (``from_pretrained``-loadable), ``config.yaml``, DeepSpeed's optimizer/scheduler/engine
state in ``deepspeed/``, ``trainer_state.json`` (step, data positions), ``rng_rank{R}.pt`` and, written
last, ``manifest.json`` (every other file's size and SHA-256). A checkpoint is written to
``OUT/.tmp-checkpoint-STEP`` and renamed into place only when complete; re-saving a step moves the old
copy aside first and deletes it only after the new one is in place, so a crash never leaves the last
good checkpoint deleted. Resuming verifies the manifest and falls back to the newest intact checkpoint,
naming any damaged one; only the last ``keep_last`` of the run's line are kept, and the checkpoint just
written is never among those deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml

from hypo_fast.models.loading import is_peft
from hypo_fast.train.errors import UserError
from hypo_fast.train.fingerprint import Fingerprint
from hypo_fast.train.model_card import model_card

log = logging.getLogger("hypo_fast")
_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used (the message names the folder and what is wrong with it)."""


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


def _sha256(path: Path) -> str:
    return Fingerprint().add_file(path).hex(None)


def write_manifest(folder: Path, step: int) -> None:
    """Record every file's size and checksum; written last, so its presence means the rest is complete."""
    files = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    tmp.rename(folder / MANIFEST)


def verify(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing, truncated or altered file."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST} (an interrupted save, or written by an older hypo_fast)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({err})") from err
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                                  f"{expected['size']} (truncated or replaced)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its checksum (corrupted)")


def latest_intact_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; each damaged newer one is named in a warning and skipped."""
    for _, folder in reversed(list_checkpoints(out_dir)):
        try:
            verify(folder)
            return folder
        except CheckpointError as err:
            log.warning("skipping a damaged checkpoint: %s", err)
    return None


def _save_hf_model(model: torch.nn.Module, tokenizer, folder: Path, rank: int) -> None:
    """Hugging Face weights: full model, or only the adapter under LoRA; ZeRO-3 weights gathered first."""
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if is_peft(model):  # adapters are small: gather only those
        params = [p for n, p in model.named_parameters()  # the adapter's own: LoRA and modules_to_save copies
                  if hasattr(p, "ds_id") and ("lora_" in n or "modules_to_save" in n)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext():
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if params else None
            model.save_pretrained(folder, safe_serialization=True, state_dict=state)
            tokenizer.save_pretrained(folder)


def prune(out_dir: Path, keep_last: int, just_written: Path,
          line: Callable[[Path], list[tuple[int, Path]]] = list_checkpoints) -> None:
    """Delete the oldest checkpoints of ``line(out_dir)`` (the run's line, oldest first) beyond the newest
    ``keep_last``; the one just written always counts among those kept, whatever its step."""
    others = [folder for _, folder in line(out_dir) if folder != just_written]
    for stale in others[:max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(out_dir: Path, step: int, engine, model, tokenizer, trainer_state: dict, config_yaml: str,
                    keep_last: int, rank: int,
                    line: Callable[[Path], list[tuple[int, Path]]] = list_checkpoints) -> Path:
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
        (tmp / "README.md").write_text(model_card(yaml.safe_load(config_yaml) or {}, step))  # not PEFT's template
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    if rank == 0:
        write_manifest(tmp, step)
        old = out_dir / f".old-checkpoint-{step}"
        if final.exists():  # re-saving a step: the old copy stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)  # atomic on one filesystem: the checkpoint appears whole or not at all
        shutil.rmtree(old, ignore_errors=True)
        prune(out_dir, keep_last, final, line)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, engine, rank: int) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the trainer state.

    Raises :class:`CheckpointError` naming the folder when any part cannot be read.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        load_path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag="state")
        if load_path is None:
            raise CheckpointError(f"{folder}: no DeepSpeed state in {folder / 'deepspeed'}")
        set_rng_state(torch.load(folder / f"rng_rank{rank}.pt", weights_only=False))
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or foreign file: name the checkpoint, not DeepSpeed's internals
        raise CheckpointError(f"{folder}: cannot be loaded ({type(err).__name__}: {err})") from err
    return state
