"""Shared set-up for the fault suite: small runs of the toy task, in process or through the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from hypo_fast.train import checkpoint
from hypo_fast.train.config import config_from_dict
from hypo_fast.train.trainer import Trainer
from tests.train.helpers import PYTHON, subprocess_env, toy_config


def config(tmp_path: Path, name: str = "run", *, steps: int = 4, kl_coef: float = 0.0, **sections) -> dict:
    """The toy task with a run folder that is protected (no overwrite) and saved every 2 steps."""
    cfg = toy_config(tmp_path, name, kl_coef=kl_coef, steps=steps)
    cfg["output"].update(overwrite=False, resume="auto", save_every=2, keep_last=2)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def train(cfg: dict) -> list[dict]:
    return Trainer(config_from_dict(cfg)).train()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(folder: Path, how: str) -> None:
    """Damage one checkpoint folder the way disks and killed writers do."""
    if how == "truncated model.safetensors":
        _truncate(folder / "model.safetensors")
    elif how == "truncated DeepSpeed state":
        _truncate(max((folder / "deepspeed").rglob("*.pt"), key=lambda p: p.stat().st_size))
    elif how == "missing trainer_state.json":
        (folder / "trainer_state.json").unlink()
    elif how == "flipped bytes, same size":
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "no manifest":
        (folder / checkpoint.MANIFEST).unlink()
    else:
        raise ValueError(f"unknown damage {how!r}")


def train_then_damage_every_checkpoint(cfg: dict) -> Path:
    """Train ``cfg`` (saving at steps 2 and 4), then truncate both checkpoints' weights; returns the run folder."""
    train(cfg)
    folder = Path(cfg["output"]["dir"])
    for step in (2, 4):
        damage(folder / f"checkpoint-{step}", "truncated model.safetensors")
    return folder


def metric_steps(folder: Path) -> list[int]:
    """The step of every training row in metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def cli(tmp_path: Path, cfg: dict, *overrides: str, name: str = "run.yaml", wait: bool = True):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    args = [PYTHON, "-m", "hypo_fast.cli", "train", str(path), *overrides]
    if not wait:
        return subprocess.Popen(args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
