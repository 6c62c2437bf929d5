"""Shared set-up for trainer tests: the demo's toy task at test size, and clean subprocess environments."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypo_fast.demo import ALPHABET, demo_config, write_task
from hypo_fast.examples.toy import char_tokenizer

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def toy_config(tmp_path: Path, name: str, *, kl_coef: float = 0.0, steps: int = 4, **sections) -> dict:
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        char_tokenizer(ALPHABET).save_pretrained(tokenizer)
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_task(tmp_path, n_prompts=24, pairs_per_prompt=2)
    cfg = demo_config(tmp_path / name, data, tokenizer, kl_coef, steps)
    cfg["eval"].update(every=0, kl_prompts=4, kl_samples=2)
    cfg["sampling"].update(prompts_per_step=2, max_new_tokens=6)
    cfg["optim"].update(pairs_per_micro_batch=4, lr=1e-3)
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def subprocess_env() -> dict:
    """The parent's environment without the process-group variables an in-process run may have set."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    return env


PYTHON = sys.executable
